"""The Triton target of the rule compiler: a rule's multi-tensor kernel module.

The compiler (:mod:`adamkit.compiler`) gives a rule's scalar functions with element casts and
its uniform branches resolved; here they become ``@triton.jit`` functions on blocks of
elements (the scalar namespace ``s`` is spread into one argument per field, ``s.lr`` becomes
``s_lr``, element divisions are correctly rounded), and :func:`kernel_source` wraps them in one
kernel that updates every tensor of a param group in one launch:

* program ``pid`` handles ``BLOCK`` elements of tensor ``prog_t[pid]`` from ``prog_off[pid]``;
* operand ``j`` of tensor ``t`` lives at address ``pa{j}[t]`` (a table of pointers, as torch's
  multi-tensor kernels), a number operand is ``cs{j}[t]``;
* the rule's scalars are row ``t`` of a float64 table ``svs`` (per tensor, so a changing
  learning rate or FAdam's per-tensor clip factors never recompile);
* sums are written per program to ``part`` and added up per tensor by the caller;
* with ``SKIP`` the kernel reads a found-non-finite flag and writes nothing when it is set
  (decided on the device, no host synchronisation);
* bfloat16 results are rounded to nearest even, or stochastically with the CPU engine's random
  bits: element ``i`` of a tensor gets the word ``bh + i * 0x9E3779B9 (mod 2**32)``, ``bh`` the
  per-tensor, per-output hash the host computes with the same function as the CPU engine.

Operand kinds: ``f32``, ``b16`` (bfloat16), ``f16`` arrays, ``num`` a Python number, ``none``.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
import tempfile
from typing import Callable, Sequence

from ...compiler import _rule_program

BLOCK = 1024
NUM_WARPS = 4
ARRAY_KINDS = {"f32": "tl.float32", "b16": "tl.bfloat16", "f16": "tl.float16"}
#: version of the generated text; part of every module's name
_VERSION = "2"

_OPS_MODULE = "adamkit.engines.ops"
_TRITON_OPS = "adamkit.engines.gpu.triton_ops"


class _SpreadScalars(ast.NodeTransformer):
    """``s.field`` -> ``s_field``; ``def f(s, ...)`` and ``f(s, ...)`` take every field."""

    def __init__(self, fields: Sequence[str]):
        self.fields = list(fields)

    def _spread(self):
        return [f"s_{f}" for f in self.fields]

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        if node.args.args and node.args.args[0].arg == "s":
            node.args.args = [ast.arg(arg=a) for a in self._spread()] + node.args.args[1:]
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "s":
            if node.attr not in self.fields:
                raise ValueError(f"s.{node.attr} is not a scalar field")
            return ast.Name(id=f"s_{node.attr}", ctx=node.ctx)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "s":
            node.args = [ast.Name(id=a, ctx=ast.Load()) for a in self._spread()] + node.args[1:]
        return node


class _TritonForms(ast.NodeTransformer):
    """What Triton needs beyond the compiler's output: ``_E`` of a constant is ``_Ec`` (a
    literal is a compile-time constant in Triton, not a tensor); divisions go through ``_div``
    (correctly rounded in float32); conditional expressions left on element values become
    ``tl.where``."""

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "_E" and node.args:
            if not any(isinstance(n, ast.Name) and n.id.startswith("s_")
                       for n in ast.walk(node.args[0])):
                node.func = ast.Name(id="_Ec", ctx=ast.Load())
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return ast.Call(func=ast.Name(id="_div", ctx=ast.Load()),
                            args=[node.left, node.right], keywords=[])
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        return ast.Call(func=ast.Attribute(value=ast.Name(id="tl", ctx=ast.Load()), attr="where",
                                           ctx=ast.Load()),
                        args=[node.test, node.body, node.orelse], keywords=[])


def rule_source(fn: Callable, fields: Sequence[str], outcomes: tuple) -> tuple[str, list[str]]:
    """The rule ``fn``'s functions for ``outcomes`` as ``@triton.jit`` source, and the import
    lines they need (ops helpers imported from :mod:`.triton_ops`)."""
    program = _rule_program(fn)
    text = program.source(outcomes, "")
    tree = ast.parse(text)
    tree = _SpreadScalars(fields).visit(tree)
    tree = _TritonForms().visit(tree)
    ast.fix_missing_locations(tree)
    functions = []
    for node in tree.body:
        functions.append("@triton.jit\n" + ast.unparse(node))
    imports = [line.replace(f"from {_OPS_MODULE} import", f"from {_TRITON_OPS} import")
               for line in program.imports]
    for line in imports:
        if line.startswith("import "):
            raise ValueError(f"{fn.__qualname__}: {line!r} cannot run in a Triton kernel")
    return "\n\n\n".join(functions), imports


def kernel_source(fn: Callable, fields: Sequence[str], kinds: Sequence[str],
                  stores: Sequence[tuple[int, int]], n_sums: int, n_results: int,
                  outcomes: tuple, negated: Sequence[int]) -> str:
    """The kernel module's text (see the module docstring). ``stores``: (result index, input
    index) pairs; ``negated``: inputs read with their sign flipped (``maximize``)."""
    rule_src, imports = rule_source(fn, fields, outcomes)
    args = ["svs", "ns", "prog_t", "prog_off", "bh", "part", "found"]
    for j, kind in enumerate(kinds):
        if kind in ARRAY_KINDS:
            args.append(f"pa{j}")
        elif kind == "num":
            args.append(f"cs{j}")
    args += ["NF: tl.constexpr", "NS: tl.constexpr", "NB: tl.constexpr", "SKIP: tl.constexpr",
             "SR: tl.constexpr", "BLOCK: tl.constexpr"]
    body = [
        "    pid = tl.program_id(0)",
        "    t = tl.load(prog_t + pid).to(tl.int64)",
        "    n = tl.load(ns + t)",
        "    idx = tl.load(prog_off + pid) + tl.arange(0, BLOCK)",
        "    m = idx < n",
        "    if SKIP:",
        "        m = m & (tl.load(found + idx * 0) == 0)",
    ]
    body += [f"    s_{f} = tl.load(svs + t * NF + {i})" for i, f in enumerate(fields)]
    call = []
    for j, kind in enumerate(kinds):
        if kind in ARRAY_KINDS:
            body.append(f"    a{j} = tl.load(pa{j} + t).to(tl.pointer_type({ARRAY_KINDS[kind]}))")
            sign = "-" if j in negated else ""
            body.append(f"    x{j} = {sign}tl.load(a{j} + idx, mask=m, other=0).to(tl.float32)")
            call.append(f"x{j}")
        elif kind == "num":
            call.append(f"_E(tl.load(cs{j} + t))")
        else:
            call.append("_Ec(0.0)")
    result = f"rule({', '.join(['s_' + f for f in fields] + call)})"
    body.append(f"    r = {result}" if n_results > 1 else f"    r = ({result},)")
    for b, (k, j) in enumerate(stores):
        kind = kinds[j]
        if kind == "b16":
            body += [
                f"    v{k} = r[{k}]",
                "    if SR:",
                # the CPU engine's stochastic rounding: 16 random bits added below bfloat16's
                # last kept bit, carried into it with probability equal to the dropped fraction
                f"        word = (tl.load(bh + t * NB + {b}) + idx * 0x9E3779B9) & 0xFFFF",
                f"        bits = v{k}.to(tl.uint32, bitcast=True).to(tl.int64)",
                "        up = (((bits + word) >> 16) << 16).to(tl.uint32).to(tl.float32, "
                "bitcast=True)",
                f"        v{k} = tl.where(v{k} != v{k}, v{k}, up)",
                "    else:",
                # to nearest even in integer arithmetic, as the CPU engine's bf16_encode (the
                # interpreter's float conversion truncates); the conversion below is exact
                f"        bits = v{k}.to(tl.uint32, bitcast=True).to(tl.int64)",
                "        near = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.uint32)"
                ".to(tl.float32, bitcast=True)",
                f"        v{k} = tl.where(v{k} != v{k}, v{k}, near)",
                f"    tl.store(a{j} + idx, v{k}.to(tl.bfloat16), mask=m)",
            ]
        else:
            body.append(f"    tl.store(a{j} + idx, r[{k}].to({ARRAY_KINDS[kind]}), mask=m)")
    for q in range(n_sums):
        body.append(f"    tl.store(part + pid * NS + {q}, "
                    f"tl.sum(tl.where(m, r[{n_results - n_sums + q}], 0.0), 0))")
    header = [
        "# Generated by adamkit.engines.gpu; do not edit (regenerated when rules change).",
        f"# rule: {fn.__module__}.{fn.__qualname__} kinds={list(kinds)} stores={list(stores)} "
        f"sums={n_sums} outcomes={outcomes!r} negated={list(negated)}",
        "import triton",
        "import triton.language as tl",
        f"from {_TRITON_OPS} import _E, _Ec, _div, _pow, _pow_general, _sqrt",
        *imports,
        "",
        "",
    ]
    kernel = ["@triton.jit", f"def kernel({', '.join(args)}):", *body]
    return "\n".join(header) + rule_src + "\n\n\n" + "\n".join(kernel) + "\n"


_MODULES: dict = {}


def _cache_dir() -> str:
    root = os.environ.get("ADAMKIT_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "adamkit", "triton")
    os.makedirs(root, exist_ok=True)
    return root


def load_kernel(key: tuple, fn: Callable, fields, kinds, stores, n_sums, n_results, outcomes,
                negated):
    """The ``kernel`` JIT function for ``key`` (generated, written to the cache directory and
    imported once per process: Triton reads a kernel's source from its file)."""
    kernel = _MODULES.get(key)
    if kernel is not None:
        return kernel
    source = kernel_source(fn, fields, kinds, stores, n_sums, n_results, outcomes, negated)
    digest = hashlib.sha256((_VERSION + source).encode()).hexdigest()[:24]
    name = f"adamkit_triton_{digest}"
    path = os.path.join(_cache_dir(), name + ".py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent test processes share the directory
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    _MODULES[key] = module.kernel
    return module.kernel


def signature(kinds: Sequence[str], n_fields: int, n_sums: int, n_bits: int, skip: bool,
              stochastic: bool) -> tuple[dict, dict]:
    """Triton's ``signature`` and ``constexprs`` for ahead-of-time compilation of a kernel."""
    sig = {"svs": "*fp64", "ns": "*i64", "prog_t": "*i32", "prog_off": "*i64", "bh": "*i64",
           "part": "*fp32", "found": "*i32"}
    for j, kind in enumerate(kinds):
        if kind in ARRAY_KINDS:
            sig[f"pa{j}"] = "*i64"
        elif kind == "num":
            sig[f"cs{j}"] = "*fp64"
    const = {"NF": max(1, n_fields), "NS": max(1, n_sums), "NB": max(1, n_bits), "SKIP": skip,
             "SR": stochastic, "BLOCK": BLOCK}
    for name in const:
        sig[name] = "constexpr"
    return sig, const
