"""``adamkit kernels``: compile every Triton kernel the optimizers need, ahead of time.

The kernels an optimizer × parameter dtype × state storage combination needs are found by
running one step of it with the Triton engine in *recording* mode (the maps are recorded, not
launched), then each distinct kernel is compiled with ``triton.compile`` for a GPU target
(``cuda:80``, ``cuda:90``: no GPU needed) and Triton's own ``ptxas -v`` reports its registers,
spills and shared memory.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

PARAM_DTYPES = ("float32", "bfloat16", "float16")
STORAGES = (None, "bfloat16", "int8")


def _configurations():
    """(optimizer, param dtype, storage, stochastic rounding) for every dense optimizer."""
    import adamkit

    for name in adamkit.available():
        # sparse gradients run on the reference engine; C-Adam's step needs a closure and
        # Schedule-Free's step computes its group counters itself, which the recording step
        # (engine.record_step) does not run: their rules are not listed here yet
        if name in ("sparseadam", "compositeadam", "c-adam", "schedulefreeadamw",
                    "schedulefreesgd"):
            continue
        for dtype in PARAM_DTYPES:
            for storage in STORAGES:
                for sr in ((False, True) if "bfloat16" in (dtype, storage) else (False,)):
                    yield name, dtype, storage, sr


def needed_kernels() -> list[tuple]:
    """[(spec, label)] of the distinct kernels every configuration needs, with one label
    (optimizer, dtype, storage) per kernel: the first configuration that needs it."""
    import torch

    import adamkit
    from ..engines import gpu
    from ..engines.gpu import engine

    found: dict = {}
    for name, dtype, storage, sr in _configurations():
        torch.manual_seed(0)
        params = [torch.randn(*shape).to(getattr(torch, dtype)).requires_grad_()
                  for shape in ((8, 16), (16,))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Muon takes the matrix, its AdamW group the vector
            groups = ([{"params": params[:1]}, {"params": params[1:], "use_muon": False}]
                      if name == "muon" else params)
            opt = adamkit.create(name, groups, backend="reference", state_dtype=storage,
                                 stochastic_rounding=sr)
            if hasattr(opt, "train"):  # Schedule-Free steps in train mode
                opt.train()
            for maximize, skip in ((False, "apply"), (True, "skip")):
                for group in opt.param_groups:
                    group["maximize"] = maximize
                opt.on_nonfinite = skip
                for p in params:
                    p.grad = torch.randn_like(p)
                for spec in engine.record_step(opt):
                    label = (name, dtype, storage or dtype, "sr" if sr else "")
                    found.setdefault(spec, label)
    del gpu
    return list(found.items())


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, f"-arch={target}", "-v", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def compile_kernel(spec: tuple, arch: int) -> dict:
    """Compile one kernel (a TritonEngine spec) for ``cuda:arch``; its resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..engines.gpu import codegen

    fn, fields, kinds, stores, n_sums, n_results, outcomes, negated, sr, skip = spec
    kernel = codegen.load_kernel(spec[:9], fn, fields, kinds, stores, n_sums, n_results,
                                 outcomes, negated)
    signature, constexprs = codegen.signature(kinds, len(fields), n_sums, len(stores), skip, sr)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": codegen.NUM_WARPS,
                                       "enable_fp_fusion": False})
    seconds = time.perf_counter() - start
    report = _ptxas_report(compiled.asm["ptx"], arch)
    report.update(shared=compiled.metadata.shared, seconds=round(seconds, 2))
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=("triton",), default="triton",
                        help="the kernels' backend (default triton)")
    parser.add_argument("--target", default="cuda:90",
                        help="GPU target: cuda:80 (A100) or cuda:90 (H100); default cuda:90")
    parser.add_argument("--one-per-rule", action="store_true",
                        help="compile one kernel per rule (its first configuration) instead of "
                             "every kernel")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as JSON")


def main(args) -> int:
    return run(args.target, as_json=args.json, one_per_rule=args.one_per_rule)


def run(target: str = "cuda:90", as_json: str | None = None, out=sys.stdout,
        one_per_rule: bool = False) -> int:
    """Compile every kernel for ``target`` (``one_per_rule``: the first kernel of each rule),
    print one row per kernel; the exit status."""
    if not target.startswith("cuda:") or not target[5:].isdigit():
        print(f"unknown target {target!r}: use cuda:80 or cuda:90", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("adamkit kernels compiles for a GPU: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from ..engines import gpu

    if not gpu.available():
        print(f"adamkit kernels needs Triton ({gpu.unavailable_reason()}); install adamkit[gpu]",
              file=sys.stderr)
        return 2
    arch = int(target[5:])
    rows, failures = [], 0
    header = (f"{'rule':<34} {'optimizer':<10} {'param':<9} {'storage':<9} {'sr':<3} "
              f"{'max':<4} {'skip':<4} {'regs':>5} {'spills':>7} {'smem':>6} {'compile_s':>9}")
    print(f"Triton kernels for {target} (BLOCK elements per program, 4 warps)", file=out)
    print(header, file=out)
    seen = set()
    for spec, (name, dtype, storage, sr) in needed_kernels():
        fn = spec[0]
        if one_per_rule:
            if fn in seen:
                continue
            seen.add(fn)
        rule = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__.rsplit('.', 1)[-1]}"
        row = {"rule": rule, "optimizer": name, "param": dtype, "storage": storage,
               "stochastic": bool(sr), "maximize": bool(spec[7]), "skip": bool(spec[9]),
               "kinds": list(spec[2])}
        try:
            row.update(compile_kernel(spec, arch))
            spills = row["spill_stores"] + row["spill_loads"] \
                if row["spill_stores"] is not None else "?"
            print(f"{rule:<34} {name:<10} {dtype:<9} {storage:<9} {'sr' if sr else '':<3} "
                  f"{'y' if row['maximize'] else '':<4} {'y' if row['skip'] else '':<4} "
                  f"{row['registers']:>5} {spills:>7} {row['shared']:>6} "
                  f"{row['seconds']:>9.2f}", file=out)
        except Exception as exc:  # reported, counted, and the exit status says so
            failures += 1
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{rule:<34} {name:<10} {dtype:<9} {storage:<9} FAILED {row['error']}",
                  file=out)
        rows.append(row)
    print(f"{len(rows)} kernels, {failures} failed", file=out)
    if as_json:
        with open(as_json, "w") as f:
            json.dump({"target": target, "kernels": rows}, f, indent=1)
    return 1 if failures else 0
