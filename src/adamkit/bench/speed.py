"""``adamkit speed``: time each optimizer's step on a realistic parameter set.

Builds the tensor shapes of a real model (``--shapes gpt2`` for GPT-2 small, ``resnet18``, or
``uniform``), shrunk by ``--scale``, gives every tensor a random gradient, and times
``optimizer.step()``: the median of ``--steps`` steps after ``--warmup`` untimed ones. Printed
(and written with ``--json FILE``): the machine's copy bandwidth, its read bandwidth and the
cost of an in-place write-back first (see :func:`memory_bandwidth`), then one row per
optimizer, engine and state dtype with

* ms/step and million parameters per second;
* bytes/param: the bytes the algorithm must move per parameter and step, counted by running
  one step of the algorithm's own program through a counting engine (every ``map`` reads its
  inputs and writes its outputs once; a multi-pass rule counts every pass). Adam in float32
  counts 28 (16 read, 12 written), AMSGrad 36, Lion 20, FAdam 44 (32 read, 12 written);
* effective GB/s = bytes/param x parameters / step time;
* floor ms: the time the row's counted traffic needs at this machine's measured bandwidth,
  parameters x (bytes read / read bandwidth + bytes written x write-back cost), and % floor =
  floor / step time (100 = at the memory limit; a little above is noise or cache). Reads and
  writes are priced apart because they cost differently: every map stores only to tensors it
  also reads, and writing back a line just read is nearly free, so a rule with read-only passes
  (FAdam's sums) is at the limit well below torch fused AdamW's effective GB/s;
* ``x fusedAdamW``: step time relative to ``torch.optim.AdamW(fused=True)`` on the same
  parameters, timed side by side: the two optimizers' steps alternate, and the ratio is the
  row's median over the baseline's median from the same interleaved run (below 1 is faster),
  so that a machine whose speed drifts during the run does not bias it;
* state B/param: bytes of optimizer state per parameter (float32 Adam: 8).

``--param-dtype float32,bfloat16`` repeats the whole table for parameters (and gradients) of
each dtype, each against torch's fused AdamW on parameters of that dtype (whose state is then
bfloat16 too); the ``params`` column names it, and the ``state`` column the storage: on
bfloat16 parameters, ``float32`` is ``state_dtype="float32"`` and ``bfloat16`` the default
(``--state-dtype`` defaults to the parameters' dtype).
``--on-nonfinite apply,skip`` times each adamkit optimizer with each mode (the engine column
says ``+skip``), which shows what the NaN/Inf check of ``on_nonfinite="skip"`` costs.
``--compare`` adds torch.optim's foreach (and fused) implementations of the same algorithms and,
when they are installed, the ``pytorch-optimizer`` package and bitsandbytes' 8-bit optimizers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import adamkit
from adamkit import storage
from adamkit.engines.reference import ReferenceEngine
from adamkit.registry import OPTIMIZERS

Tensor = torch.Tensor

# ---- parameter sets ------------------------------------------------------------------------


def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M parameters): embeddings, 12 blocks, final layer norm."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet18_shapes() -> list[tuple[int, ...]]:
    """ResNet-18 for ImageNet (11.7M parameters): convolutions, batch norms, classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = in_ch if block == 0 else out_ch
            shapes += [(out_ch, first_in, 3, 3), (out_ch,), (out_ch,),
                       (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if block == 0 and (stride != 1 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    return shapes + [(1000, 512), (1000,)]


def uniform_shapes() -> list[tuple[int, ...]]:
    """64 tensors of 2**20 elements."""
    return [(1 << 20,)] * 64


SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_shapes, "resnet18": resnet18_shapes, "uniform": uniform_shapes,
}


def scaled(shapes: list[tuple[int, ...]], scale: float) -> list[tuple[int, ...]]:
    """Shrink every tensor's first dimension by ``scale`` (at least 1), keeping the count."""
    if scale == 1.0:
        return list(shapes)
    return [(max(1, round(s[0] * scale)), *s[1:]) for s in shapes]


def make_parameters(shapes, dtype=torch.float32, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).mul_(0.02)
        p.requires_grad_(True)
        p.grad = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).mul_(0.01)
        params.append(p)
    return params


# ---- what an algorithm moves ---------------------------------------------------------------


class CountingEngine(ReferenceEngine):
    """A reference engine that counts the bytes each ``map`` reads and writes (apart)."""

    def __init__(self, dtype):
        super().__init__(dtype)
        self.read = 0
        self.written = 0

    def map(self, fn, s, ins, outs, n_sums=0):
        # only the traffic matters here, not the values
        self.read += sum(storage.state_nbytes(t) for t in ins)
        self.written += sum(storage.state_nbytes(o) for o in outs if o is not None)
        return [1.0] * n_sums

    def mean_sq_last_dims(self, x):
        self.read += storage.state_nbytes(x)
        return super().mean_sq_last_dims(x)

    def mean_rows(self, x):
        self.read += storage.state_nbytes(x)
        return super().mean_rows(x)

    def sq_stats_last_dims(self, fn, s, state, x, y):
        # the fused engine's pass: each row of x read once (with y's), the row rule on the way
        self.read += storage.state_nbytes(x) + storage.state_nbytes(y)
        self.read += storage.state_nbytes(state)
        self.written += storage.state_nbytes(state)
        a, cols = ReferenceEngine.mean_sq_last_dims(self, x)
        return a, cols, torch.ones_like(cols), [1.0] * 5

    def sums_where(self, where, fn, s, ins, n_sums):
        # a fallback pass that runs only where the one-pass result is not exact: not counted
        return [0.0] * n_sums


def traffic_per_param(name: str, state_dtype: str | None, kwargs: dict | None = None,
                      shape=(64, 4096), dtype: torch.dtype = torch.float32
                      ) -> tuple[float, float]:
    """(bytes read, bytes written) per parameter by one step of ``name`` on ``dtype``
    parameters, from its own ``apply`` program."""
    cls = OPTIMIZERS[name]
    p = torch.zeros(shape, dtype=dtype, requires_grad=True)
    p.grad = torch.ones(shape, dtype=dtype)
    opt = cls([p], backend="reference", state_dtype=state_dtype, **(kwargs or {}))
    group = opt.param_groups[0]
    engine = CountingEngine(p.dtype)
    state = opt.state[p]
    s = opt.scalars(group, state)
    slots = {}
    for slot in opt.state_slots(group, p):
        if slot not in state:
            state[slot] = opt.new_slot(group, p, slot)
        slots[slot] = state[slot]
    with torch.no_grad():
        opt.apply_now(engine, s, p.detach(), p.grad, slots)
    return engine.read / p.numel(), engine.written / p.numel()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step" and not (isinstance(value, Tensor) and value.dim() == 0):
                total += storage.state_nbytes(value)
    return total


# ---- timing --------------------------------------------------------------------------------


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 7) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), repeats) / 1e9


@dataclass
class Bandwidth:
    """What memory traffic costs on this machine, measured by :func:`memory_bandwidth`."""

    read_gbps: float  # bytes read per second by a read-only streaming pass, in GB/s
    write_ns_per_byte: float  # the extra time per byte written back to lines just read

    def floor_seconds(self, read_bytes: float, written_bytes: float) -> float:
        """The time that reading ``read_bytes`` and writing back ``written_bytes`` needs."""
        return read_bytes / (self.read_gbps * 1e9) + written_bytes * self.write_ns_per_byte * 1e-9


def memory_bandwidth(nbytes: int = 1 << 28, repeats: int = 7) -> Bandwidth:
    """Read bandwidth and in-place write-back cost, each the best of ``repeats`` passes over
    float32 buffers of ``nbytes``.

    Read: the faster of ``x.sum()`` and ``torch.dot(x, y)``. Write-back: ``x.add_(y)`` reads 8
    bytes and writes 4 per element; what it takes beyond reading its 8 bytes is the cost of the
    4 written. Every map of adamkit's engines stores only to tensors it also reads, so this,
    not a copy into fresh memory, is what its writes cost.
    """
    n = nbytes // 4
    x, y = torch.ones(n), torch.ones(n)
    t_sum = _best_time(lambda: x.sum(), repeats)
    t_dot = _best_time(lambda: torch.dot(x, y), repeats)
    read_bw = max(4 * n / t_sum, 8 * n / t_dot)  # bytes per second
    # a tiny alpha keeps x at 1.0 however often it runs (1 + 1e-9 rounds to 1 in float32)
    t_add = _best_time(lambda: x.add_(y, alpha=1e-9), repeats)
    write_s_per_byte = max(0.0, (t_add - 8 * n / read_bw) / (4 * n))
    return Bandwidth(read_gbps=read_bw / 1e9, write_ns_per_byte=write_s_per_byte * 1e9)


def time_interleaved(opt, baseline, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Step times of ``opt`` and ``baseline``, stepped alternately (baseline first)."""
    for _ in range(warmup):
        baseline.step()
        opt.step()
    times, base_times = [], []
    for _ in range(steps):
        for o, out in ((baseline, base_times), (opt, times)):
            t0 = time.perf_counter()
            o.step()
            out.append(time.perf_counter() - t0)
    return times, base_times


def time_steps(opt, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class Row:
    optimizer: str
    implementation: str  # "adamkit", "torch", "pytorch-optimizer", "bitsandbytes"
    engine: str  # "fused", "reference", "foreach", "fused (torch)", ...
    state_dtype: str
    ms_per_step: float
    mparams_per_s: float
    bytes_per_param: float
    effective_gbps: float
    read_bytes_per_param: float
    written_bytes_per_param: float
    #: the time the counted traffic needs at the measured bandwidth (see Bandwidth)
    floor_ms: float
    #: 100 x floor_ms / ms_per_step: 100 = at the memory limit
    pct_of_floor: float
    ratio_to_torch_fused_adamw: float
    state_bytes_per_param: float
    samples_ms: list[float] = field(default_factory=list)
    #: torch fused AdamW's step times interleaved with this row's (the ratio's denominator)
    baseline_samples_ms: list[float] = field(default_factory=list)
    #: the parameters' (and gradients') dtype: the baseline steps parameters of the same dtype
    param_dtype: str = "float32"


TORCH_EQUIVALENTS = {  # adamkit name -> (torch.optim class name, kwargs), foreach only
    "adam": ("Adam", {}), "adamw": ("AdamW", {}), "adagrad": ("Adagrad", {}),
    "rmsprop": ("RMSprop", {}), "nadam": ("NAdam", {}), "radam": ("RAdam", {}),
    "adamax": ("Adamax", {}), "sgd": ("SGD", {"momentum": 0.9}), "adafactor": ("Adafactor", {}),
}
TORCH_FUSED = {"adam", "adamw", "sgd", "adagrad"}
PYTORCH_OPTIMIZER = {  # adamkit name -> pytorch_optimizer class name
    "adabelief": "AdaBelief", "adabound": "AdaBound", "adamod": "AdaMod", "lion": "Lion",
    "radam": "RAdam", "adamw": "AdamW", "nadam": "NAdam", "adafactor": "AdaFactor",
    "fadam": "FAdam", "adamax": "AdaMax",
}
ADAMKIT_KWARGS = {"sgd": {"momentum": 0.9}}  # the benchmarked configuration
# Untimed steps an optimizer needs before its steps are the steady-state ones: RAdam's
# rectification starts at step 6 (rho_t > 5 with beta2 = 0.999); before it, torch and adamkit
# take un-adapted momentum steps and some other implementations skip the update altogether.
MIN_WARMUP = {"radam": 5}


def default_optimizers() -> list[str]:
    return [n for n in sorted(OPTIMIZERS) if not OPTIMIZERS[n].requires_sparse]


def _row(name, implementation, engine, state_dtype, times, n_params,
         traffic: tuple[float, float], base_times, state_nbytes, bandwidth: Bandwidth,
         param_dtype: str = "float32") -> Row:
    median = statistics.median(times)
    baseline_s = statistics.median(base_times) if base_times else 0.0
    read, written = traffic
    nbytes = read + written
    floor_s = bandwidth.floor_seconds(read * n_params, written * n_params)
    return Row(
        optimizer=name, implementation=implementation, engine=engine, state_dtype=state_dtype,
        ms_per_step=median * 1e3, mparams_per_s=n_params / median / 1e6,
        bytes_per_param=nbytes, effective_gbps=nbytes * n_params / median / 1e9,
        read_bytes_per_param=read, written_bytes_per_param=written,
        floor_ms=floor_s * 1e3, pct_of_floor=100 * floor_s / median,
        ratio_to_torch_fused_adamw=median / baseline_s if baseline_s else math.nan,
        state_bytes_per_param=state_nbytes / n_params, samples_ms=[t * 1e3 for t in times],
        baseline_samples_ms=[t * 1e3 for t in base_times], param_dtype=param_dtype,
    )


PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _state_argument(state_dtype: str, param_dtype: str) -> str | None:
    """The ``state_dtype`` argument a row's state label stands for: state in the parameters'
    own dtype is the default (``None``, torch's behaviour), any other is asked for."""
    return None if state_dtype == param_dtype else state_dtype


def run_benchmark(args, out=print) -> dict:
    shapes = scaled(SHAPES[args.shapes](), args.scale)
    copy_gbps = copy_bandwidth()
    bandwidth = memory_bandwidth()
    out(f"copy bandwidth: {copy_gbps:.1f} GB/s (torch copy_ of 256 MiB, read + write)")
    out(f"read bandwidth: {bandwidth.read_gbps:.1f} GB/s (faster of torch sum and dot, 256 MiB); "
        f"in-place write-back: {bandwidth.write_ns_per_byte:.3g} ns/byte (x.add_(y) beyond "
        f"reading its 8 bytes); floor = params x (B read / read GB/s + B written x write-back)")
    n_params = sum(math.prod(s) for s in shapes)
    out(f"parameters: {n_params / 1e6:.2f} M in {len(shapes)} tensors "
        f"(--shapes {args.shapes} --scale {args.scale}); median of {args.steps} steps after "
        f"{args.warmup} warm-up steps; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; x fusedAdamW: ratio to torch.optim.AdamW(fused=True) stepped alternately "
        f"on parameters of the row's dtype")
    rows: list[Row] = []
    for param_dtype in getattr(args, "param_dtype", ["float32"]):
        rows += _benchmark_dtype(args, shapes, param_dtype, bandwidth, out)
        gc.collect()  # that dtype's parameters and their copies, before the next dtype's
    out("")
    out(format_table(rows))
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
        "copy_gbps": copy_gbps, "read_gbps": bandwidth.read_gbps,
        "write_ns_per_byte": bandwidth.write_ns_per_byte,
        "shapes": args.shapes, "scale": args.scale,
        "n_params": n_params, "n_tensors": len(shapes), "steps": args.steps,
        "warmup": args.warmup, "rows": [asdict(r) for r in rows],
    }


def _benchmark_dtype(args, shapes, param_dtype: str, bandwidth: Bandwidth, out) -> list[Row]:
    """The rows of one parameter dtype: torch's fused AdamW on these parameters first, then
    every plan, each stepped alternately with a fresh torch fused AdamW."""
    dtype = PARAM_DTYPES[param_dtype]
    params = make_parameters(shapes, dtype)
    n_params = sum(p.numel() for p in params)
    originals = [p.detach().clone() for p in params]

    def reset():
        with torch.no_grad():
            for p, o in zip(params, originals):
                p.copy_(o)

    def torch_fused_adamw():
        return torch.optim.AdamW(params, fused=True)

    def measure(make, warmup: int) -> tuple[list[float], list[float], int, str | None]:
        # the baseline steps the same parameters, alternating with the measured optimizer
        reset()
        opt, base = make(), torch_fused_adamw()
        times, base_times = time_interleaved(opt, base, args.steps, warmup)
        nbytes = state_bytes(opt)
        # the engines an adamkit optimizer actually ran (backend="auto" falls back per tensor)
        used = getattr(opt, "engines_used", None)
        engines = "+".join(sorted(used)) if used else None
        del opt, base
        gc.collect()
        return times, base_times, nbytes, engines

    reset()
    base = torch_fused_adamw()
    baseline = time_steps(base, args.steps, args.warmup)
    base_state = state_bytes(base)
    del base
    rows: list[Row] = []
    plans: list[tuple] = []
    for name in args.optimizers:
        # by default the state is kept in the parameters' dtype (torch's behaviour)
        for state_dtype in getattr(args, "state_dtype", None) or [param_dtype]:
            for mode in getattr(args, "on_nonfinite", ["apply"]):
                plans.append(("adamkit", name, (state_dtype, mode)))
        if args.compare:
            if name in TORCH_EQUIVALENTS:
                plans.append(("torch-foreach", name, None))
            if name in TORCH_FUSED:
                plans.append(("torch-fused", name, None))
            if name in PYTORCH_OPTIMIZER:
                plans.append(("pytorch-optimizer", name, None))
            if name in ("adam", "adamw"):
                plans.append(("bitsandbytes", name, None))
    results = []
    for kind, name, state_dtype in plans:
        mode = "apply"
        if kind == "adamkit":
            state_dtype, mode = state_dtype
        kwargs = ADAMKIT_KWARGS.get(name, {})
        # other libraries keep state in the parameters' dtype, as torch does; their rows count
        # the algorithm's own traffic (their floor is the same)
        traffic = traffic_per_param(
            name, _state_argument(state_dtype, param_dtype) if kind == "adamkit" else None,
            kwargs, dtype=dtype)
        if kind == "adamkit":
            def make(name=name, state_dtype=state_dtype, kwargs=kwargs, mode=mode):
                return adamkit.create(name, params, backend=args.backend,
                                      state_dtype=_state_argument(state_dtype, param_dtype),
                                      on_nonfinite=mode, **kwargs)
            label = ("adamkit", None, state_dtype)  # the engine it used, once measured
        elif kind.startswith("torch"):
            cls_name, tkw = TORCH_EQUIVALENTS[name]
            cls = getattr(torch.optim, cls_name, None)
            if cls is None:
                continue
            flag = {"fused": True} if kind == "torch-fused" else {"foreach": True}
            if cls_name == "Adafactor":
                flag = {"foreach": True}

            def make(cls=cls, tkw=tkw, flag=flag):
                return cls(params, **tkw, **flag)
            label = ("torch", kind.split("-")[1], param_dtype)
        elif kind == "pytorch-optimizer":
            try:
                import pytorch_optimizer
            except ImportError:
                continue
            cls = getattr(pytorch_optimizer, PYTORCH_OPTIMIZER[name], None)
            if cls is None:
                continue

            def make(cls=cls):
                return cls(params)
            label = ("pytorch-optimizer", "torch ops", param_dtype)
        else:  # bitsandbytes
            try:
                import bitsandbytes as bnb
            except Exception:
                continue
            cls = getattr(bnb.optim, "AdamW8bit" if name == "adamw" else "Adam8bit")

            def make(cls=cls):
                return cls(params)
            label = ("bitsandbytes", "8-bit", "int8")
            traffic = traffic_per_param(name, "int8", kwargs, dtype=dtype)
        try:
            times, base_times, state_nbytes, engines = measure(
                make, max(args.warmup, MIN_WARMUP.get(name, 0)))
        except Exception as error:  # a comparison library that cannot run here
            out(f"  {label[0]} {name} ({param_dtype} parameters): skipped "
                f"({type(error).__name__}: {error})")
            continue
        if kind == "adamkit":
            engine = engines or "none"  # "none": no parameter had a gradient
            if mode != "apply":
                engine += f" +{mode}"
            label = ("adamkit", engine, state_dtype)
        results.append((name, label, times, base_times, traffic, state_nbytes))
        baseline += base_times
    # the baseline's own row: all its step times, first alone and then interleaved; AdamW's
    # traffic on these parameters, state in their dtype (float32: 16 bytes read, 12 written)
    rows.append(_row("adamw", "torch", "fused (torch)", param_dtype, baseline, n_params,
                     traffic_per_param("adamw", None, dtype=dtype), baseline, base_state,
                     bandwidth, param_dtype))
    for name, (impl, engine, sd), times, base_times, traffic, state_nbytes in results:
        rows.append(_row(name, impl, engine, sd, times, n_params, traffic, base_times,
                         state_nbytes, bandwidth, param_dtype))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("optimizer", "impl", "engine", "params", "state", "ms/step", "Mparam/s", "B/param",
              "eff GB/s", "floor ms", "% floor", "x fusedAdamW", "state B/param")
    lines = [header]
    for r in rows:
        lines.append((r.optimizer, r.implementation, r.engine, r.param_dtype, r.state_dtype,
                      f"{r.ms_per_step:.2f}", f"{r.mparams_per_s:.0f}", f"{r.bytes_per_param:.1f}",
                      f"{r.effective_gbps:.1f}", f"{r.floor_ms:.2f}", f"{r.pct_of_floor:.3g}",
                      f"{r.ratio_to_torch_fused_adamw:.2f}", f"{r.state_bytes_per_param:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for k, line in enumerate(lines):
        text.append("  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


# ---- command line --------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    if text == "all":
        return default_optimizers()
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {n!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
        if OPTIMIZERS[n].requires_sparse:
            raise argparse.ArgumentTypeError(f"{n} needs sparse gradients; not benchmarked here")
    return names


def _state_dtypes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in ("float32", "bfloat16", "int8"):
            raise argparse.ArgumentTypeError(
                f"invalid state dtype {v!r}; valid: float32, bfloat16, int8")
    return values


def _param_dtypes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PARAM_DTYPES]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"invalid parameter dtype {', '.join(bad) or repr(text)}; valid: "
            f"{', '.join(PARAM_DTYPES)}")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("apply", "skip", "raise")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown on_nonfinite mode {', '.join(bad) or repr(text)}; choose from apply, skip, "
            "raise")
    return modes


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, else an error that names the bound."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in "invalid ..." errors
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="gpt2",
                        help="parameter shapes: GPT-2 small (124M), ResNet-18 (11.7M) or 64 "
                             "tensors of 1M (default gpt2)")
    parser.add_argument("--scale", type=_positive_float, default=1.0,
                        help="multiply every tensor's first dimension by this (default 1)")
    parser.add_argument("--optimizers", type=_names, default=default_optimizers(),
                        help="comma-separated optimizer names, or 'all' (default: all that take "
                             "dense gradients)")
    parser.add_argument("--state-dtype", type=_state_dtypes, default=None,
                        help="comma-separated state storage: float32, bfloat16, int8 "
                             "(default: the parameters' dtype, as torch keeps it)")
    parser.add_argument("--param-dtype", type=_param_dtypes, default=["float32"],
                        help="comma-separated parameter (and gradient) dtypes: float32, "
                             "bfloat16 (default float32); each gets its own rows and its own "
                             "torch fused AdamW baseline on parameters of that dtype, and the "
                             "state column names the storage (bfloat16 parameters with "
                             "float32 state: state_dtype='float32')")
    parser.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto",
                        help="adamkit engine (default auto)")
    parser.add_argument("--on-nonfinite", type=_modes, default=["apply"],
                        help="comma-separated on_nonfinite modes to time: apply, skip, raise "
                             "(default apply; 'apply,skip' shows what the NaN/Inf check costs)")
    parser.add_argument("--steps", type=_int_at_least(1), default=10,
                        help="timed steps; the median is reported (default 10)")
    parser.add_argument("--warmup", type=_int_at_least(0), default=3,
                        help="untimed steps first (default 3; at least 5 for RAdam, whose "
                        "rectified steps start at step 6)")
    parser.add_argument("--compare", action="store_true",
                        help="also time torch.optim's foreach/fused versions and, if installed, "
                             "pytorch-optimizer and bitsandbytes")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(args)
    if args.json:
        # temporary file then rename: an interrupted write never leaves a truncated file
        tmp = f"{args.json}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adamkit speed",
        description="Time each optimizer's step on a realistic parameter set and print "
                    "ms/step, effective memory bandwidth, the floor (the time its memory "
                    "traffic needs at this machine's measured read and write-back bandwidth) "
                    "and the ratio to torch's fused AdamW.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
