"""The fused CPU engine: one multithreaded pass over memory per ``map``, compiled with Numba.

It runs the same primitives as :class:`~adamkit.engines.reference.ReferenceEngine`
(``map(fn, s, ins, outs, n_sums)``, ``mean_sq_last_dims``, ``sq_stats_last_dims``,
``sums_where``, ``mean_rows`` and ``per_tensor``)
but evaluates ``fn`` element by element inside a generated ``numba.prange`` loop: every input
is read once, every output written once, the per-tensor sums are parallel reductions, and
stored formats (bfloat16, 8-bit blockwise codes) are decoded on load and encoded on store
inside the same loop.

How a kernel is made from a rule
--------------------------------
The rule (``Adam.update``, FAdam's ``_update_pass``, ...) is compiled from its own source, which
is copied into a generated kernel module with one mechanical change: wherever an element value
meets a Python scalar (a field of ``s`` or a literal) the scalar is rounded to the element's
compute type first (``_E(...)``). That is exactly torch's rule for ``tensor op python_scalar``
(the scalar takes the tensor's dtype) and it keeps float32 rules in float32 arithmetic, which on
CPU is twice as fast as letting Numba promote everything to float64. Helpers from
:mod:`adamkit.engines.ops` compile through the overloads in :mod:`adamkit.engines.numba_ops`;
plain functions of the rule's own module that the rule calls (Adafactor's ``_scaled_update``)
are copied the same way. No formula lives in this file.

One kernel is generated per (function, operand formats, outputs, sums, compute dtype, layout,
outcomes). Fields of ``s`` are runtime values, except the rule's decisions that depend on them
alone (``if s.amsgrad:``, the exponent of ``fim ** s.power``): each combination of their
outcomes gets its own kernel with only the taken branch, so the element loop has no branch on a
scalar and vectorizes (see :class:`_UniformPoints`). A step's single-pass maps run as one
multi-tensor launch (:class:`KernelBatch`), and so does each pass of a multi-pass rule (FAdam,
Adafactor: their generator ``apply`` advances in lockstep over the tensors, and a pass's sums
come back per tensor). Maps that broadcast row and column factors against matrices (Adafactor's
factored update) are batched the same way (the ``mfact`` layout, :func:`factor_roles`); other
broadcasts, and matrices of at most ``SMALL_BCAST`` elements, run per tensor, those below
``SERIAL_BELOW`` elements on the calling thread; over small matrices the factors are spread
over 16 matrices at a time by one vector permute (``numba_ops.shuffled_copy``). Kernels are
written as Python modules into the kernel cache directory and compiled with ``cache=True``, so
a later process loads machine code instead of compiling: ``$ADAMKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/adamkit/kernels``, else ``~/.cache/adamkit/kernels``. File names carry a hash
of the generated source, of the rule's module and of this engine, so editing a rule never runs
a stale kernel.

Coverage: CPU tensors of dtype float32, float64 or bfloat16 (computed in float32), contiguous.
Operands of ``map`` may also be Python numbers (broadcast), ``None`` (an inactive slot) and
:class:`adamkit.storage.BlockQuantized` state. Inputs that broadcast against each other
(Adafactor's factored second moment) use a strided variant. Anything else (non-contiguous or
complex tensors, CUDA) is the reference engine's job; the front end decides that per parameter.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import inspect
import math
import os
import re
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from . import ops
from .reference import ReferenceEngine, compute_dtype

Tensor = torch.Tensor

#: bump when the generated code changes in a way the hashed sources do not show
KERNEL_FORMAT = 10

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_numba_state: dict = {}
_lock = threading.RLock()


def available() -> bool:
    """Whether numba can be imported (the fused engine's only extra dependency)."""
    if "ok" not in _numba_state:
        try:
            import numba

            _prefer_wide_vectors(numba)
            from . import numba_ops  # noqa: F401  (registers the overloads)

            if "NUMBA_THREADING_LAYER" not in os.environ and \
                    "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
                # OpenMP first: a kernel launch on it costs 2-4 us, on the workqueue layer
                # 50-200 us (its threads sleep between launches). Measured on 2 cores: a
                # training iteration of a 6.3M-parameter MLP with AdamW 39.5 ms (omp) vs 54 ms
                # (workqueue; torch fused AdamW 39.4 ms); FAdam on GPT-2 shapes at --scale 0.1
                # 32 vs 87 ms/step. TBB, then the workqueue, where OpenMP cannot be loaded.
                numba.config.THREADING_LAYER = "default"
                numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

            _numba_state["ok"] = True
        except Exception as error:  # ImportError, or a broken numba/llvmlite install
            _numba_state["ok"] = False
            _numba_state["error"] = f"{type(error).__name__}: {error}"
    return _numba_state["ok"]


def _prefer_wide_vectors(numba) -> None:
    """Let LLVM vectorize kernels with 512-bit registers on CPUs with AVX-512.

    LLVM's tuning for AVX-512 CPUs prefers 256-bit vectors; the int8 and bfloat16 codecs are
    compute-bound, and with 512-bit vectors the int8 Adam step is measured 1.4x faster (float32
    steps, bound by memory bandwidth, are unchanged). Numba takes target features per process,
    so this applies to every Numba function compiled in the process afterwards; it does not
    change results. Skipped where NUMBA_CPU_FEATURES is set or ADAMKIT_AVX512=0.
    """
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("ADAMKIT_AVX512", "1") == "0":
        return
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        if features.get("avx512f") and features.get("avx512bw") and features.get("avx512vl"):
            numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    except Exception:  # feature detection is best effort: the default is still correct
        pass


def unavailable_reason() -> str:
    available()
    return _numba_state.get("error", "")


def cache_dir() -> Path:
    """Where generated kernel modules and Numba's compiled code are kept."""
    if os.environ.get("ADAMKIT_CACHE_DIR"):
        return Path(os.environ["ADAMKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adamkit" / "kernels"


def unsupported_reason(t: Tensor) -> str | None:
    """Why the fused engine cannot update tensor ``t`` in place, or None if it can."""
    if t.is_cpu and t.dtype in _KINDS and not t.is_sparse and t.is_contiguous():
        return None  # the common case, first and cheap: this runs for every tensor and step
    if t.device.type != "cpu":
        return f"it is on device {t.device} (the fused engine runs on CPU)"
    if t.is_complex():
        return f"its dtype is {t.dtype} (complex parameters use the reference engine)"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"its dtype is {t.dtype} (the fused engine takes float32, float64 and bfloat16)"
    if t.is_sparse:
        return "it is sparse"
    if not t.is_contiguous():
        return "it is not contiguous"
    return None


#: elements per work item of the NaN/Inf check, read as four streams of 64K (16K-element
#: work items measured no faster with four streams than with one)
CHECK_CHUNK = 1 << 18


def any_nonfinite(tensors: Sequence[Tensor]) -> bool:
    """Whether any of the given contiguous CPU float tensors holds a NaN or Inf, read in one
    multithreaded pass over all of them (one launch per dtype)."""
    import numpy as np

    from . import numba_ops

    # one pass over the tensors, which this reads every step
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for t in tensors:
        n = t.numel()
        if n:
            tables = by_dtype.get(t.dtype)
            if tables is None:
                tables = by_dtype[t.dtype] = ([], [])
            tables[0].append(t.data_ptr())
            tables[1].append(n)
    for dtype, (pointers, sizes) in by_dtype.items():
        ns = np.array(sizes, dtype=np.int64)
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum((ns + (CHECK_CHUNK - 1)) // CHECK_CHUNK, out=starts[1:])
        addresses = np.array(pointers, dtype=np.uint64)
        element = {torch.float32: np.float32, torch.float64: np.float64,
                   torch.bfloat16: np.int16}[dtype]
        args = (addresses, ns, starts, CHECK_CHUNK, element)
        if _serialize_calls():
            with _lock:
                bad = numba_ops.chunks_nonfinite(*args)
        else:
            bad = numba_ops.chunks_nonfinite(*args)
        if bad:
            return True
    return False


class KernelUnsupported(Exception):
    """A map whose operands the generated kernels do not cover (the engine falls back)."""


# ---- rule source -> kernel source ---------------------------------------------------------


def _function_ast(fn: Callable) -> ast.FunctionDef:
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise KernelUnsupported(f"{fn.__qualname__} is not a plain function")
    node.decorator_list = []
    node.returns = None
    for arg in node.args.args:
        arg.annotation = None
    return node


class _ElementCasts(ast.NodeTransformer):
    """Round Python scalars to the element type where they meet element values.

    A value is an *element* value when it depends on a per-element argument (every argument
    after the first, the scalar namespace ``s``). Locals are classified by a fixpoint over their
    assignments.
    """

    def __init__(self, fn_node: ast.FunctionDef, local_functions: set[str]):
        self.local_functions = local_functions
        self.elements = {a.arg for a in fn_node.args.args[1:]}
        assigns: list[tuple[str, ast.AST]] = []
        for node in ast.walk(fn_node):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in self._target_names(target):
                        assigns.append((name, node.value))
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                for name in self._target_names(node.target):
                    assigns.append((name, node.value))
        changed = True
        while changed:
            changed = False
            for name, value in assigns:
                if name not in self.elements and self.is_element(value):
                    self.elements.add(name)
                    changed = True

    @staticmethod
    def _target_names(target) -> list[str]:
        if isinstance(target, ast.Name):
            return [target.id]
        if isinstance(target, (ast.Tuple, ast.List)):
            return [n for elt in target.elts for n in _ElementCasts._target_names(elt)]
        return []

    def is_element(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.elements
        if isinstance(node, ast.Constant):
            return False
        if isinstance(node, ast.Attribute):
            return self.is_element(node.value)
        if isinstance(node, ast.Call):
            return any(self.is_element(a) for a in node.args)
        return any(self.is_element(child) for child in ast.iter_child_nodes(node))

    @staticmethod
    def _cast(node):
        return ast.Call(func=ast.Name(id="_E", ctx=ast.Load()), args=[node], keywords=[])

    def _mixed(self, nodes: list) -> list:
        if any(self.is_element(n) for n in nodes):
            return [n if self.is_element(n) else self._cast(n) for n in nodes]
        return nodes

    def visit_BinOp(self, node):
        self.generic_visit(node)
        node.left, node.right = self._mixed([node.left, node.right])
        if isinstance(node.op, ast.Pow) and self.is_element(node.left):
            # element ** scalar: torch's pow takes fast paths (0.5 -> sqrt, 2 -> square, ...)
            return ast.Call(func=ast.Name(id="_pow", ctx=ast.Load()),
                            args=[node.left, node.right], keywords=[])
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        parts = self._mixed([node.left, *node.comparators])
        node.left, node.comparators = parts[0], parts[1:]
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        node.body, node.orelse = self._mixed([node.body, node.orelse])
        return node

    def visit_Assign(self, node):
        self.generic_visit(node)
        names = [n for t in node.targets for n in self._target_names(t)]
        if isinstance(node.targets[0], ast.Name) and names[0] in self.elements:
            if not self.is_element(node.value):
                node.value = self._cast(node.value)
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        if self.is_element(node.target) and not self.is_element(node.value):
            node.value = self._cast(node.value)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in self.local_functions:
            # arguments of the rule module's own helpers are element values (as in the caller)
            node.args = node.args[:1] + [
                a if self.is_element(a) else self._cast(a) for a in node.args[1:]
            ]
        elif isinstance(node.func, ast.Name) and node.func.id not in ("_E", "_pow"):
            # an ops helper given an element and a scalar (maximum(v, eps * eps)) works in the
            # element's dtype, as torch does with a Python scalar operand
            node.args = self._mixed(node.args)
        return node


def _free_names(node: ast.FunctionDef) -> set[str]:
    bound = {a.arg for a in node.args.args}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            bound.add(sub.id)
    loads = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)
             and isinstance(sub.ctx, ast.Load)}
    return loads - bound


class _UniformPoints(ast.NodeTransformer):
    """Decisions of a rule that are the same for every element: ``if`` tests and conditional
    expressions over the scalars only (``if s.amsgrad:``, ``if s.weight_decay != 0:``) and the
    exponents of ``element ** scalar``. Left in the kernel, they are branches inside the element
    loop, which LLVM does not always hoist, and the loop then does not vectorize (FAdam's
    ``fim ** s.power`` with int8 state ran 7x slower). The kernels are therefore compiled per
    outcome: ``collect`` numbers each point and its expression; ``resolve`` replaces each by
    the outcome in ``values`` (an outcome of None leaves the point as it is)."""

    SAFE_NAMES = {"s", "_E", "abs", "min", "max", "math"}

    def __init__(self, elements: "_ElementCasts", points: list, values=None):
        self.elements = elements
        self.points = points  # [(kind, expression source)], numbered as found
        self.values = values

    def _evaluable(self, node) -> bool:
        if self.elements.is_element(node):
            return False
        return all(n.id in self.SAFE_NAMES for n in ast.walk(node) if isinstance(n, ast.Name))

    def _point(self, node, kind, expr):
        # collecting numbers the point on the node itself (copies keep the number), so that
        # resolving finds it even where an enclosing branch was dropped
        if self.values is None:
            node.uniform_point = len(self.points)
            self.points.append((kind, ast.unparse(expr)))
            return None
        return self.values[node.uniform_point]

    def visit_If(self, node):
        if self._evaluable(node.test):
            outcome = self._point(node, "if", node.test)
            if outcome is not None:
                chosen = []
                for child in (node.body if outcome else node.orelse):
                    result = self.visit(child)
                    chosen.extend(result if isinstance(result, list) else [result])
                return chosen or [ast.Pass()]
        self.generic_visit(node)
        return node

    def visit_IfExp(self, node):
        if self._evaluable(node.test):
            outcome = self._point(node, "if", node.test)
            if outcome is not None:
                return self.visit(node.body if outcome else node.orelse)
        self.generic_visit(node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "_pow" \
                and self._evaluable(node.args[1]):
            exponent = self._point(node, "pow", node.args[1])
            base = node.args[0]
            if exponent == 0.5:  # the fast paths of numba_ops.scalar_pow, chosen once
                return ast.Call(func=ast.Name(id="_sqrt", ctx=ast.Load()), args=[base],
                                keywords=[])
            if exponent == 1.0:
                return base
            if exponent == 2.0:
                return ast.BinOp(left=base, op=ast.Mult(), right=base)
            if exponent == "other":
                node.func = ast.Name(id="_pow_general", ctx=ast.Load())
        return node


class _RuleProgram:
    """A rule translated for the kernels, with its uniform decision points (see
    :class:`_UniformPoints`); ``source(values)`` is the kernel text for one outcome."""

    def __init__(self, functions: dict, imports: list[str], module_sources: list[str]):
        self.functions = functions  # name -> (AST after element casts, _ElementCasts)
        self.imports = imports
        self.module_sources = module_sources
        self.points: list[tuple[str, str]] = []
        for fname in sorted(functions):
            node, elements = functions[fname]
            _UniformPoints(elements, self.points).visit(node)  # annotates, changes nothing
        body = ", ".join(f"({expr})" for _, expr in self.points)
        # the fields of s the outcomes depend on (all of s if it is used otherwise): the memo
        # key, so that scalars set per tensor (FAdam's clip factors) do not defeat the memo
        self.fields = None if re.search(r"\bs\b(?!\.)", body) else tuple(
            sorted(set(re.findall(r"\bs\.(\w+)", body))))
        namespace = {"math": math, "abs": abs, "min": min, "max": max}
        exec(f"def _evaluate(s, _E):\n    return ({body}{',' if self.points else ''})\n",
             namespace)
        self._evaluate = namespace["_evaluate"]

    def outcomes(self, s, dtype: torch.dtype) -> tuple:
        """The points' outcomes for scalars ``s`` (None where evaluation fails)."""
        if not self.points:
            return ()
        import numpy as np

        cast = np.float64 if dtype == torch.float64 else np.float32
        try:
            values = self._evaluate(s, cast)
        except Exception:
            return (None,) * len(self.points)
        out = []
        for (kind, _), value in zip(self.points, values):
            if kind == "if":
                out.append(bool(value))
            else:
                v = float(value)
                out.append(v if v in (0.5, 1.0, 2.0) else "other")
        return tuple(out)

    def source(self, values: tuple) -> str:
        decorator = '@numba.njit(error_model="numpy")\n'
        texts = []
        for fname in sorted(self.functions):
            node, elements = self.functions[fname]
            if values:
                node = _UniformPoints(elements, [], values).visit(_copy_ast(node))
                ast.fix_missing_locations(node)
            texts.append(decorator + ast.unparse(node))
        return "\n\n\n".join(texts)


def _copy_ast(node):
    import copy

    return copy.deepcopy(node)


_PROGRAMS: dict = {}
_OUTCOMES: dict = {}  # (rule, scalars, dtype) -> outcomes, for the step's other tensors


def _rule_program(fn: Callable) -> _RuleProgram:
    program = _PROGRAMS.get(fn)
    if program is None:
        program = _PROGRAMS[fn] = _translate(fn, "rule")
    return program


def block_outcomes(fn: Callable, s, dtype: torch.dtype, rows: int) -> list:
    """:func:`rule_outcomes` for a block of ``rows`` maps whose scalars ``s`` may hold NumPy
    arrays (one value per map): ``[(outcomes, indices)]`` per distinct outcome, ``indices``
    None when one outcome holds for all rows (the usual case: branches and exponents read
    hyperparameters, which a block shares)."""
    import numpy as np

    program = _PROGRAMS.get(fn) or _rule_program(fn)
    if not program.points:
        return [((), None)]
    read = s if program.fields is None else [getattr(s, f) for f in program.fields]
    if not any(isinstance(v, np.ndarray) for v in read):
        return [(rule_outcomes(fn, s, dtype), None)]
    found: dict = {}
    for i in range(rows):
        row = type(s)(*(float(v[i]) if isinstance(v, np.ndarray) else v for v in s))
        found.setdefault(rule_outcomes(fn, row, dtype), []).append(i)
    if len(found) == 1:
        return [(next(iter(found)), None)]
    return [(outcomes, np.array(indices, dtype=np.int64)) for outcomes, indices in found.items()]


def rule_outcomes(fn: Callable, s, dtype: torch.dtype) -> tuple:
    """The rule's scalar-only branch outcomes and exponents for scalars ``s`` (part of a
    kernel's identity). The tensors of a param group share their scalars, so the outcomes are
    memoized, not re-evaluated per tensor."""
    program = _PROGRAMS.get(fn) or _rule_program(fn)
    if not program.points:
        return ()
    memo = (fn, s if program.fields is None else tuple(getattr(s, f) for f in program.fields),
            dtype)
    try:
        outcomes = _OUTCOMES.get(memo)
    except TypeError:  # an unhashable scalar: evaluate every time
        return program.outcomes(s, dtype)
    if outcomes is None:
        outcomes = program.outcomes(s, dtype)
        if len(_OUTCOMES) > 4096:
            _OUTCOMES.clear()
        _OUTCOMES[memo] = outcomes
    return outcomes


def _translate(fn: Callable, name: str) -> _RuleProgram:
    """``fn`` (and the same-module helpers it calls) with element casts, as a
    :class:`_RuleProgram` (its import lines and the module sources hashed into kernel names).
    """
    module = sys.modules[fn.__module__]
    ops_names = {k for k, v in vars(ops).items() if callable(v) and getattr(v, "__module__", "")
                 == ops.__name__}
    todo = [(fn, name)]
    done: dict[str, tuple] = {}
    imports: set[str] = set()
    while todo:
        func, fname = todo.pop()
        if fname in done:
            continue
        node = _function_ast(func)
        node.name = fname
        free = _free_names(node)
        local_functions = set()
        for ref in sorted(free):
            if ref in ("_E", "_pow") or (ref not in func.__globals__ and hasattr(builtins, ref)):
                continue
            value = func.__globals__.get(ref)
            if value is None:
                raise KernelUnsupported(f"{func.__qualname__}: unknown global {ref!r}")
            if ref in ops_names and value is getattr(ops, ref):
                imports.add(f"from adamkit.engines.ops import {ref}")
            elif inspect.ismodule(value) and value.__name__ in ("math", "numpy"):
                imports.add(f"import {value.__name__} as {ref}")
            elif inspect.isfunction(value) and value.__module__ == func.__module__:
                local_functions.add(ref)
                todo.append((value, ref))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                imports.add(f"{ref} = {value!r}")
            else:
                raise KernelUnsupported(
                    f"{func.__qualname__}: global {ref!r} cannot be compiled by the fused engine")
        elements = _ElementCasts(node, local_functions)
        node = elements.visit(node)
        ast.fix_missing_locations(node)
        done[fname] = (node, elements)
    return _RuleProgram(done, sorted(imports), [inspect.getsource(module)])


# operand formats: "f32" / "f64" float arrays, "b16" bfloat16 bits in int16, "q8s" / "q8u"
# 8-bit blockwise codes with one absmax per block, "num" a Python number, "none" no operand
_FLOAT_ARRAYS = ("f32", "f64", "b16")
#: the numba_ops pointer intrinsic a generated kernel reads each operand format through
_POINTERS = {"f32": "_ptr_f32", "f64": "_ptr_f64", "b16": "_ptr_i16", "q8s": "_ptr_i8",
             "q8u": "_ptr_u8"}
#: the formats of x, y and the row state that sq_stats_last_dims's kernel takes
_ROW_STATS_KINDS = ("f32", "f64", "b16")
BLOCK = 256
GROUP = 64  # blocks per parallel work item of the blockwise layout
CHUNK = BLOCK * GROUP  # elements per parallel work item of the multi-tensor layouts
# Per-tensor kernels (rules with reductions, sparse rows) for fewer elements than this run on
# the calling thread. With the OpenMP layer a launch costs a few us and 2**14 or 2**17 measure
# the same (FAdam, Adafactor on GPT-2 and ResNet-18 shapes); on the workqueue layer, Numba's
# fallback, a launch costs 50-200 us, the time one core takes to update about 100k elements.
SERIAL_BELOW = 1 << 17
MEAN_ROWS_ITEM = 1 << 14  # matrices per work item of FusedEngine.mean_rows
ROW_BLOCK = 4096  # elements per work item of the bcast layout (whole rows, at least one)
# Broadcast maps over matrices of at most this many elements (the last two dimensions: a conv
# kernel's 3x3) get kernels with the matrix's sizes and every operand's strides compiled in,
# one per shape: the loops over a matrix then unroll. On 512x512x3x3 (Adafactor's two
# factored passes, float32) that measured 2-3x faster than runtime sizes and strides.
SMALL_BCAST = 64
# ... and their broadcast operands (the factors) are spread over SHUFFLE_MATRICES matrices at a
# time (fewer where that is over SHUFFLE_WINDOW elements) by one vector permute
# (numba_ops.shuffled_copy) where the source elements those matrices read span at most
# SHUFFLE_WINDOW elements: on 512x512x3x3 float32 Adafactor's update-sums kernel took 1.0 ms
# instead of 2.0 ms with element-by-element copies (the flat loop alone 0.7 ms), measured
# standalone.
SHUFFLE_MATRICES = 16
SHUFFLE_WINDOW = 256


def _kernel_source(rule_src: str, imports: list[str], fields: Sequence[str], kinds: Sequence[str],
                   stores: Sequence[tuple[int, int]], n_sums: int, n_results: int, dtype: str,
                   layout: str, negated: Sequence[int] = (), parallel: bool = True,
                   last_strides: Sequence[int | None] = (),
                   small: tuple | None = None) -> str:
    """Generate the kernel module. ``stores``: (result index, input index) pairs; ``negated``:
    inputs read with their sign flipped (the gradient under ``maximize=True``); ``parallel``:
    whether the outer loop runs on Numba's threads (else ``prange`` is a plain loop);
    ``last_strides``: for the bcast layout, each operand's stride along the last dimension when
    it is 0 or 1 (compiled in, so the inner loop vectorizes), None when it is a runtime value;
    ``small``: for the bcast layout over small matrices, ``(rows, cols, strides)`` compiled in
    (``strides``: each operand's (batch, row, column) strides, None for non-arrays).
    ``layout`` is ``("mfact", roles)`` for the multi-tensor layout of maps that broadcast
    factors against matrices (see :func:`factor_roles`)."""
    E = "np.float32" if dtype == "float32" else "np.float64"
    roles = None
    if isinstance(layout, tuple):
        layout, roles = layout
    multi = layout in ("mflat", "mblock", "mfact")
    if multi:
        # one launch for many tensors: per-tensor scalars, sizes, seeds and operand addresses
        # in tables; the iteration space is every tensor's chunks of CHUNK elements. Sums are
        # written per chunk (``part``, one row per chunk) and added up per tensor by the caller.
        args = ["svs", "ns", "starts", "seeds", "sr_b16", "sr_q8"] + (["part"] if n_sums else [])
        if layout == "mfact":
            args += ["ms", "nns"]  # per tensor: columns, and rows per matrix
    else:
        args = ["sv", "n", "seed", "sr_b16", "sr_q8"]
    if layout == "bcast":
        args += ["nb_", "nn_", "nm_"]
    # per operand: an array (a), 8-bit codes and their absmax (a, x) or a number (c); the
    # multi-tensor kernels take tables of addresses (pa, px) and numbers (cs) instead
    array, scales, number = ("pa", "px", "cs") if multi else ("a", "x", "c")
    for j, kind in enumerate(kinds):
        if kind in _FLOAT_ARRAYS:
            args.append(f"{array}{j}")
            if layout == "bcast":
                args += [f"st{j}_0", f"st{j}_1", f"st{j}_2"]
        elif kind in ("q8s", "q8u"):
            args += [f"{array}{j}", f"{scales}{j}"]
        elif kind == "num":
            args.append(f"{number}{j}")

    def sign(j):
        return "-" if j in negated else ""

    # small bcast: operands that broadcast are gathered per work item into contiguous copies
    # t{j} (their element k is element k of the work item), so that the rule's loop is flat
    gathered = set()
    shuffles: dict[int, tuple[int, tuple[int, ...]]] = {}  # gathered operand -> window, pattern
    per_copy = 0  # matrices per shuffled copy
    if small is not None:
        per_copy = _shuffle_matrices(small[0], small[1])
        flat_strides = (small[0] * small[1], small[1], 1)
        gathered = {j for j, kind in enumerate(kinds)
                    if kind in _FLOAT_ARRAYS and small[2][j] != flat_strides}
        for j in gathered:
            sb, sr, sc = small[2][j]
            pattern = tuple(bb * sb + jj * sr + kk * sc for bb in range(per_copy)
                            for jj in range(small[0]) for kk in range(small[1]))
            shuffles[j] = (max(pattern) + 1, pattern)
        if any(window > SHUFFLE_WINDOW for window, _ in shuffles.values()):
            shuffles = {}

    def load(j, kind, index):
        array = f"t{j}" if j in gathered else f"a{j}"
        if kind in ("f32", "f64"):
            return f"{sign(j)}_E({array}[{index}])"
        if kind == "b16":
            return f"{sign(j)}_E(_bf16_decode({array}[{index}]))"
        if kind == "q8s":
            return f"_E(_signed_decode(a{j}[{index}], u{j}))"
        if kind == "q8u":
            return f"_E(_unsigned_decode(a{j}[{index}], u{j}))"
        if kind == "num":
            return f"_E(c{j})"
        return "_E(0.0)"

    def gather_index(j):
        """Operand j's element (bb, jj, kk) of a small bcast map."""
        terms = [f"{v} * {s_}" for v, s_ in zip(("bb", "jj", "kk"), small[2][j]) if s_]
        return " + ".join(f"np.uint64({t})" for t in terms) or "np.uint64(0)"

    def index(j, flat_index):
        if j in gathered:
            return "k"
        if roles is not None and kinds[j] in _FLOAT_ARRAYS:
            # full: the element's own index; row: its row's; col: its column's in its matrix
            return {"full": flat_index, "row": "ri", "col": "cb + kk"}[roles[j]]
        if small is not None and kinds[j] in _FLOAT_ARRAYS:
            return flat_index
        if layout == "bcast" and kinds[j] in _FLOAT_ARRAYS:
            last = last_strides[j] if j < len(last_strides) else None
            step = {0: "", 1: " + kk"}.get(last, f" + kk * np.uint64(st{j}_2)")
            return f"np.uint64(bb * st{j}_0 + jj * st{j}_1){step}"
        return flat_index

    def body(ind, flat_index):
        call_args = ", ".join(load(j, k, index(j, flat_index)) for j, k in enumerate(kinds))
        lines = [f"r = _as_tuple(rule(s, {call_args}))"]
        for k, j in stores:
            kind = kinds[j]
            target = f"a{j}[{index(j, flat_index)}]"
            if kind in ("f32", "f64"):
                lines.append(f"{target} = r[{k}]")
            elif kind == "b16":
                lines.append(f"if sr_b16:")
                lines.append(f"    {target} = _bf16_encode_stochastic(r[{k}], "
                             f"_u32_add(bh{j}, _u32_mul({flat_index}, 0x9E3779B9)))")
                lines.append("else:")
                lines.append(f"    {target} = _bf16_encode(r[{k}])")
            else:  # 8-bit: keep the block's new values and their finite absmax (IEEE bits)
                lines.append(f"buf{j}[{flat_index} - np.uint64(lo)] = r[{k}]")
                lines.append(f"amax{j} = _u32_max(amax{j}, _finite_abs_bits(r[{k}]))")
        for q in range(n_sums):  # per work item; added to acc{q} at its end
            value = f"_E(r[{n_results - n_sums + q}])"
            lines.append(f"lacc{q} = _add_reassoc(lacc{q}, {value})")
        return textwrap.indent("\n".join(lines), " " * ind)

    fields_src = ", ".join(f"sv[{i}]" for i in range(len(fields)))
    buf_type = "np.float32" if dtype == "float32" else "np.float64"

    quantized = [(k, j) for k, j in stores if kinds[j] in ("q8s", "q8u")]

    def encode_loop(stochastic: bool) -> list[str]:
        """Encode the block's buffered values. With stochastic rounding one 32-bit random
        word per element serves two states (16 random bits each): element k of the block
        gets ``h + k * 0x9E3779B9`` (mod 2**32), where ``h`` is one well-mixed hash
        (numba_ops.random32) of the step's seed, the block's position and the pair of states.
        Over steps each element's word is uniform, so the rounding stays unbiased; within a
        block the words form a golden-ratio (Weyl) sequence with a random start, a dither of
        low discrepancy. A full hash per element (3 vector multiplies and 6 shifts and xors
        per 16 elements) made a 16M-element int8 AdamW step 1.64-1.77x torch's fused AdamW
        instead of 1.46-1.57x (kernel timed alone, alternated with torch's)."""
        lines = []
        if stochastic:
            lines += [f"                h{q // 2} = _random32(0, _u32_add(bseed, "
                      f"{q // 2 * 0x3C6EF372}))" for q in range(0, len(quantized), 2)]
        lines += ["                for k0 in range(hi - lo):",
                  "                    k = np.uint64(k0)"]
        for q, (k, j) in enumerate(quantized):
            which = "signed" if kinds[j] == "q8s" else "unsigned"
            if stochastic:
                if q % 2 == 0:
                    lines.append(f"                    rnd{q // 2} = _u32_add(h{q // 2}, "
                                 "_u32_mul(k0, 0x9E3779B9))")
                # the random bits go below the code's rounding position (bit 20 or 19)
                bits = (f"_u32_shl(_u32_and(rnd{q // 2}, 0xFFFF), {4 if which == 'signed' else 3})"
                        if q % 2 == 0 else
                        f"_u32_shl(_u32_shr(rnd{q // 2}, 16), {4 if which == 'signed' else 3})")
            else:
                bits = "524288" if which == "signed" else "262144"
            lines.append(f"                    a{j}[np.uint64(lo) + k] = _{which}_encode("
                         f"buf{j}[k], sc{j}, iv{j}, {bits})")
        return lines

    def finish_sum(q: int) -> str:
        """Where a work item's sum goes: its chunk's row of ``part`` (multi-tensor kernels) or
        the kernel's float64 reduction."""
        return f"part[c, {q}] = np.float64(lacc{q})" if multi else f"acc{q} += np.float64(lacc{q})"

    def block_group(first_block: str) -> list[str]:
        """One parallel work item of the blockwise layouts: GROUP blocks from ``first_block``
        (``nblk`` blocks in all). The element loop writes each 8-bit state's new values to a
        scratch buffer (allocated once per group) and tracks their absmax; a second loop over
        the block then encodes all of them."""
        lines = [f"        buf{j} = np.empty({BLOCK}, {buf_type})" for k, j in quantized]
        lines += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
        lines.append(f"        for b in range({first_block}, min({first_block} + {GROUP}, nblk)):")
        lines.append(f"            lo = b * {BLOCK}")
        lines.append(f"            hi = min(lo + {BLOCK}, n)")
        lines += [f"            u{j} = _block_unit(x{j}[b])"
                  for j, kind in enumerate(kinds) if kind in ("q8s", "q8u")]
        lines += [f"            amax{j} = np.uint32(0)" for k, j in quantized]
        # unsigned indices: Numba then skips negative-index wraparound, which would stop the
        # loop from vectorizing
        lines.append("            for i0 in range(lo, hi):")
        lines.append("                i = np.uint64(i0)")
        lines.append(body(16, "i"))
        if quantized:
            for k, j in quantized:
                lines.append(f"            x{j}[b] = _bits_f32(amax{j})")
                lines.append(f"            sc{j}, iv{j} = _block_factors(x{j}[b])")
            # the block's seed: the step's seed with the block's position mixed in
            lines.append("            if sr_q8:")
            lines.append("                bseed = _u32_add(seed + 0x1B873593, "
                         "_u32_mul(lo, 0x9E3779B9))")
            lines += encode_loop(True)
            lines.append("            else:")
            lines += encode_loop(False)
        lines += [f"        {finish_sum(q)}" for q in range(n_sums)]
        return lines
    out = [f"_x{j} = _shuffled_copy({window}, {pattern})" for j, (window, pattern)
           in sorted(shuffles.items())]
    out += ["", ""] if out else []
    out += [f"@numba.njit(parallel={parallel}, cache=True, error_model=\"numpy\", nogil=True)",
            f"def kernel({', '.join(args)}):"]
    # stochastic rounding of bfloat16 results: element i of a tensor gets the random word
    # bh + i * 0x9E3779B9 (mod 2**32), bh one hash of the step's seed per tensor and result (a
    # function of the element's index, so every layout draws the same bits). Over steps each
    # element's word is uniform, so the rounding is unbiased; a full hash per element cost
    # 3 vector multiplies and 6 shifts and xors per 16 elements (AdamW on bfloat16 GPT-2
    # shapes at --scale 0.5: stochastic rounding +19% over nearest with it).
    seeded = [f"bh{j} = _random32(0, seed + {j * 0x3C6EF372})"
              for k, j in stores if kinds[j] == "b16"]
    if not multi:
        out.append(f"    s = _S({fields_src})")
        out += [f"    {line}" for line in seeded]
    out += [f"    acc{q} = 0.0" for q in range(n_sums)]
    if multi:
        out.append("    for c in numba.prange(starts[-1]):")
        out.append("        t = np.searchsorted(starts, c, side=\"right\") - 1")
        out.append("        sv = svs[t]")
        out.append(f"        s = _S({fields_src})")
        out.append("        n = ns[t]")
        out.append("        seed = seeds[t]")
        out += [f"        {line}" for line in seeded]
        if layout != "mfact":
            out.append("        first = (c - starts[t]) * CHUNK")
        else:
            out += ["        m = ms[t]",
                    "        nn = nns[t]",
                    # whole rows, about CHUNK elements' worth (the rows' count is n // m)
                    "        rb = max(1, CHUNK // m)",
                    "        row0 = (c - starts[t]) * rb"]
        for j, kind in enumerate(kinds):
            if kind in _FLOAT_ARRAYS:
                size = {"row": "n // m", "col": "n // nn"}.get(roles[j], "n") if roles else "n"
                out.append(f"        a{j} = numba.carray({_POINTERS[kind]}(pa{j}[t]), {size})")
            elif kind in ("q8s", "q8u"):
                out.append(f"        a{j} = numba.carray({_POINTERS[kind]}(pa{j}[t]), n)")
                out.append(f"        x{j} = numba.carray(_ptr_f32(px{j}[t]), "
                           f"(n + {BLOCK - 1}) // {BLOCK})")
            elif kind == "num":
                out.append(f"        c{j} = cs{j}[t]")
        if layout == "mflat":
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out.append("        for i0 in range(first, min(first + CHUNK, n)):")
            out.append("            i = np.uint64(i0)")
            out.append(body(12, "i"))
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        elif layout == "mfact":
            # unsigned indices (see block_group); the flat index is the element's, so
            # stochastic rounding draws what the per-tensor bcast kernel draws
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += ["        for row in range(row0, min(row0 + rb, n // m)):",
                    "            ri = np.uint64(row)",
                    "            fb = np.uint64(row * m)",
                    "            cb = np.uint64((row // nn) * m)",
                    "            for kk0 in range(m):",
                    "                kk = np.uint64(kk0)",
                    body(16, "fb + kk")]
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        else:  # CHUNK = GROUP blocks: a chunk is one group of the tensor's blocks
            out.append(f"        nblk = (n + {BLOCK - 1}) // {BLOCK}")
            out += block_group(f"first // {BLOCK}")
        out.append("    return ()")
    elif layout == "block":  # prange over groups of GROUP blocks
        out.append(f"    nblk = (n + {BLOCK - 1}) // {BLOCK}")
        out.append(f"    ngroups = (nblk + {GROUP - 1}) // {GROUP}")
        out.append("    for grp in numba.prange(ngroups):")
        out += block_group(f"grp * {GROUP}")
    else:
        # each work item sums into its own lacc (in the element dtype, so the loop vectorizes
        # at full width), added to the reduction in float64 at its end
        if layout == "flat":  # prange over chunks of CHUNK elements
            out += ["    for c in numba.prange((n + CHUNK - 1) // CHUNK):"]
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += ["        for i0 in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):",
                    "            i = np.uint64(i0)", body(12, "i")]
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        elif small is not None:
            # bcast over small matrices (a conv kernel's 3x3): sizes and strides compiled in.
            # A work item takes whole matrices, about ROW_BLOCK elements' worth: the operands
            # that broadcast are first copied out element by element (loops over a matrix
            # that unroll), then the rule runs in a flat loop that vectorizes (2x faster
            # than the rule in the unrolled loops on 512x512x3x3, measured standalone).
            # bb, jj, kk, k are unsigned (see block_group).
            rows, cols = small[0], small[1]
            rc = rows * cols
            per = max(1, ROW_BLOCK // rc)
            out += [f"    for blk in numba.prange((nb_ + {per - 1}) // {per}):",
                    f"        b0 = blk * {per}",
                    f"        b1 = min(b0 + {per}, nb_)"]
            out += [f"        t{j} = np.empty({per * rc}, a{j}.dtype)" for j in sorted(gathered)]
            first = "b0"
            if shuffles:
                # per_copy matrices per copy, element by element for the rest
                out += [f"        nfull = (b1 - b0) // {per_copy}",
                        "        for sh in range(nfull):"]
                out += [f"            _x{j}(a{j}, np.uint64((b0 + sh * {per_copy}) * "
                        f"{small[2][j][0]}), t{j}, np.uint64(sh * {per_copy * rc}))"
                        for j in sorted(shuffles)]
                first = f"b0 + nfull * {per_copy}"
            if gathered:
                out += [f"        for bb0 in range({first}, b1):",
                        "            bb = np.uint64(bb0)",
                        f"            o = np.uint64((bb0 - b0) * {rc})",
                        f"            for jj0 in range({rows}):",
                        "                jj = np.uint64(jj0)",
                        f"                for kk0 in range({cols}):",
                        "                    kk = np.uint64(kk0)"]
                out += [f"                    t{j}[o + jj * np.uint64({cols}) + kk] = "
                        f"a{j}[{gather_index(j)}]" for j in sorted(gathered)]
            out += [f"        base = np.uint64(b0 * {rc})"]
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += [f"        for k0 in range((b1 - b0) * {rc}):",
                    "            k = np.uint64(k0)", body(12, "base + k")]
            out += [f"        acc{q} += np.float64(lacc{q})" for q in range(n_sums)]
        else:
            # bcast: iterate (batch, rows, cols) with per-operand strides (0 = broadcast). A
            # work item takes a block of about ROW_BLOCK elements' worth of rows (short rows,
            # like a conv kernel's 3x3, would otherwise cost a division and a loop each) and
            # steps (batch, row) along them; long rows are summed in CHUNK segments.
            flat_index = "np.uint64(row * nm_) + kk"
            out += ["    nrows = nb_ * nn_",
                    f"    rb_ = max(1, {ROW_BLOCK} // nm_)",
                    "    for blk in numba.prange((nrows + rb_ - 1) // rb_):",
                    "        row0 = blk * rb_",
                    "        bb = row0 // nn_",
                    "        jj = row0 - bb * nn_"]
            out += [f"        bacc{q} = 0.0" for q in range(n_sums)]
            out.append("        for row in range(row0, min(row0 + rb_, nrows)):")
            if n_sums:
                out.append("            for seg in range(0, nm_, CHUNK):")
                out += [f"                lacc{q} = _E(0.0)" for q in range(n_sums)]
                out += ["                for kk0 in range(seg, min(seg + CHUNK, nm_)):",
                        "                    kk = np.uint64(kk0)", body(20, flat_index)]
                out += [f"                bacc{q} += np.float64(lacc{q})" for q in range(n_sums)]
            else:
                out += ["            for kk0 in range(nm_):",
                        "                kk = np.uint64(kk0)", body(16, flat_index)]
            out += ["            jj += 1",
                    "            if jj == nn_:",
                    "                jj = 0",
                    "                bb += 1"]
            out += [f"        acc{q} += bacc{q}" for q in range(n_sums)]
    if not multi:
        out.append(f"    return ({''.join(f'acc{q}, ' for q in range(n_sums))})")
    header = _module_header(imports, E, fields)
    return "\n".join(header) + rule_src + "\n\n\n" + "\n".join(out) + "\n"


def _module_header(imports: Sequence[str], E: str, fields: Sequence[str]) -> list[str]:
    """The first lines of a generated kernel module: its imports, the element type ``_E``,
    ``CHUNK`` and the scalars' type ``_S``."""
    return [
        "# Generated by adamkit.engines.fused_cpu; do not edit (regenerated when rules change).",
        "import numba",
        "import numpy as np",
        "from collections import namedtuple as _namedtuple",
        "from adamkit.engines.numba_ops import as_tuple as _as_tuple",
        "from adamkit.engines.numba_ops import bf16_decode as _bf16_decode",
        "from adamkit.engines.numba_ops import bf16_encode as _bf16_encode",
        "from adamkit.engines.numba_ops import bf16_encode_stochastic as _bf16_encode_stochastic",
        "from adamkit.engines.numba_ops import random32 as _random32",
        "from adamkit.engines.numba_ops import scalar_pow as _pow",
        "from adamkit.engines.numba_ops import general_pow as _pow_general",
        "_sqrt = np.sqrt",
        "from adamkit.engines.numba_ops import block_unit as _block_unit",
        "from adamkit.engines.numba_ops import signed_decode as _signed_decode",
        "from adamkit.engines.numba_ops import unsigned_decode as _unsigned_decode",
        "from adamkit.engines.numba_ops import block_factors as _block_factors",
        "from adamkit.engines.numba_ops import finite_abs_bits as _finite_abs_bits",
        "from adamkit.engines.numba_ops import signed_encode as _signed_encode",
        "from adamkit.engines.numba_ops import unsigned_encode as _unsigned_encode",
        "from adamkit.engines.numba_ops import bits_f32 as _bits_f32",
        "from adamkit.engines.numba_ops import add_reassoc as _add_reassoc",
        "from adamkit.engines.numba_ops import u32_add as _u32_add",
        "from adamkit.engines.numba_ops import u32_and as _u32_and",
        "from adamkit.engines.numba_ops import u32_max as _u32_max",
        "from adamkit.engines.numba_ops import u32_mul as _u32_mul",
        "from adamkit.engines.numba_ops import u32_shl as _u32_shl",
        "from adamkit.engines.numba_ops import u32_shr as _u32_shr",
        "from adamkit.engines.numba_ops import ptr_f32 as _ptr_f32",
        "from adamkit.engines.numba_ops import ptr_f64 as _ptr_f64",
        "from adamkit.engines.numba_ops import ptr_i16 as _ptr_i16",
        "from adamkit.engines.numba_ops import ptr_i8 as _ptr_i8",
        "from adamkit.engines.numba_ops import ptr_u8 as _ptr_u8",
        "from adamkit.engines.numba_ops import shuffled_copy as _shuffled_copy",
        *imports,
        "",
        f"_E = {E}",
        f"CHUNK = {CHUNK}",
        f"_S = _namedtuple('_S', {list(fields)!r})",
        "",
        "",
    ]


def _engine_sources_digest() -> str:
    if "digest" not in _numba_state:
        import numba

        from . import numba_ops

        h = hashlib.sha256()
        for mod in (sys.modules[__name__], numba_ops, ops):
            h.update(inspect.getsource(mod).encode())
        h.update(f"{KERNEL_FORMAT}|{numba.__version__}|{sys.version_info[:2]}".encode())
        _numba_state["digest"] = h.hexdigest()
    return _numba_state["digest"]


def _writable_cache_dir() -> Path:
    if "dir" not in _numba_state:
        path = cache_dir()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError:
            path = Path(tempfile.mkdtemp(prefix="adamkit-kernels-"))
        _numba_state["dir"] = path
    return _numba_state["dir"]


_KERNELS: dict[tuple, Callable] = {}
_KINDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "b16"}


def _block_quantized():
    cls = _numba_state.get("BlockQuantized")
    if cls is None:
        from ..storage import BlockQuantized as cls  # storage imports this module's helpers

        _numba_state["BlockQuantized"] = cls
    return cls


def _serialize_calls() -> bool:
    """The workqueue threading layer must not be entered from two threads at once. Numba
    picks its layer at the first parallel launch; until then calls are serialized."""
    serialize = _numba_state.get("serialize")
    if serialize is None:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel launch yet
            return True
        serialize = _numba_state["serialize"] = layer == "workqueue"
    return serialize


def _load_kernel(key: tuple, fn: Callable, fields, kinds, stores, n_sums, n_results, dtype,
                 layout, negated=(), parallel: bool = True, last_strides=(),
                 outcomes: tuple = (), small: tuple | None = None) -> Callable:
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            return kernel
        program = _rule_program(fn)
        rule_src, imports, module_sources = (program.source(outcomes), program.imports,
                                             program.module_sources)
        source = _kernel_source(rule_src, imports, fields, kinds, stores, n_sums, n_results,
                                dtype, layout, negated, parallel, last_strides, small)
        module = _load_module(f"# rule: {fn.__module__}.{fn.__qualname__}\n" + source,
                              module_sources)
        kernel = module.kernel
        _KERNELS[key] = kernel
        return kernel


def _load_module(source: str, module_sources: Sequence[str] = ()):
    """Import generated ``source`` from the kernel cache (written there first if new; named
    by a hash of it, of the engine's sources and of ``module_sources``, the rule's module)."""
    h = hashlib.sha256(source.encode())
    h.update(_engine_sources_digest().encode())
    for text in module_sources:
        h.update(text.encode())
    name = f"adamkit_kernel_{h.hexdigest()[:20]}"
    directory = _writable_cache_dir()
    path = directory / f"{name}.py"
    if not path.exists():
        tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(source)
        os.replace(tmp, path)
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _shuffle_matrices(rows: int, cols: int) -> int:
    """How many small (rows, cols) matrices one shuffled copy covers (numba_ops.shuffled_copy):
    SHUFFLE_MATRICES, fewer where their elements would exceed SHUFFLE_WINDOW."""
    return max(1, min(SHUFFLE_MATRICES, SHUFFLE_WINDOW // (rows * cols)))


def _sq_means_small_kernel(rows: int, cols: int, parallel: bool,
                           bfloat16: bool = False) -> Callable:
    """A kernel for the row and column means of x**2 over small (rows, cols) matrices (a conv
    kernel's 3x3), with their sizes compiled in: ``kernel(x, row_means, col_means, batch)``.
    Sums are taken in float64 in the order of numba_ops.sq_means_many's whole matrices.
    ``bfloat16``: x holds bfloat16 bits (int16), decoded exactly to float32 as read.

    ``L`` matrices at a time are split by shuffled copies into one contiguous run per column
    (the elements of every row at that column) and one per row, and the means are then loops
    over those runs that vectorize; the last matrices of a work item take the element loop.
    Sums are multiplied by 1/n rather than divided (a float64 divide costs ~16 cycles per 8
    lanes): float32 means keep their bits but where the float64 quotient lies within one
    of its ulps of a float32 rounding boundary, float64 means are within 1 ulp. On 512x512x3x3
    float32 (standalone, cache-warm) 0.9 ms instead of 2.3 ms with the element loop only."""
    key = ("sq_means_small", rows, cols, parallel, bfloat16)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    rc = rows * cols
    per = max(1, ROW_BLOCK // rc)
    L = _shuffle_matrices(rows, cols)
    # by_col[k]: element k of every row of L matrices; by_row[j]: row j of each of them
    by_col = [tuple(q * cols + k for q in range(L * rows)) for k in range(cols)]
    by_row = [tuple((q // cols) * rc + j * cols + q % cols for q in range(L * cols))
              for j in range(rows)]
    copies = "\n".join([f"_c{k} = _shuffled_copy({L * rc}, {pattern})"
                        for k, pattern in enumerate(by_col)]
                       + [f"_r{j} = _shuffled_copy({L * rc}, {pattern})"
                          for j, pattern in enumerate(by_row)])
    split = "\n".join(
        [f"            _c{k}(x, src, tc, np.uint64({k * per * rows} + sh * {L * rows}))"
         for k in range(cols)]
        + [f"            _r{j}(x, src, tr, np.uint64({j * per * cols} + sh * {L * cols}))"
           for j in range(rows)])

    def load(element: str) -> str:
        return f"np.float64(_bf16_decode({element}))" if bfloat16 else f"np.float64({element})"

    def total(run: str, count: int, length: int) -> str:
        terms = [load(f"{run}[np.uint64({i * length}) + q]") for i in range(count)]
        # ((0.0 + x0 * x0) + x1 * x1) + ...: the element loop's order
        return "(" * (count - 1) + "0.0 + " + ") + ".join(f"{t} * {t}" for t in terms)

    row_total = total("tc", cols, per * rows)
    col_total = total("tr", rows, per * cols)
    source = f"""# Generated by adamkit.engines.fused_cpu; do not edit (regenerated when it changes).
# row and column means of x**2 over matrices of {rows} x {cols}
import numba
import numpy as np
from adamkit.engines.numba_ops import bf16_decode as _bf16_decode
from adamkit.engines.numba_ops import shuffled_copy as _shuffled_copy

{copies}


@numba.njit(parallel={parallel}, cache=True, error_model="numpy", nogil=True)
def kernel(x, row_means, col_means, batch):
    for w in numba.prange((batch + {per - 1}) // {per}):
        b0 = w * {per}
        b1 = min(b0 + {per}, batch)
        nfull = (b1 - b0) // {L}
        tc = np.empty({cols * per * rows}, x.dtype)
        tr = np.empty({rows * per * cols}, x.dtype)
        for sh in range(nfull):
            src = np.uint64((b0 + sh * {L}) * {rc})
{split}
        out = np.uint64(b0 * {rows})
        for q0 in range(nfull * {L * rows}):
            q = np.uint64(q0)
            row_means[out + q] = ({row_total}) * {1.0 / cols!r}
        out = np.uint64(b0 * {cols})
        for q0 in range(nfull * {L * cols}):
            q = np.uint64(q0)
            col_means[out + q] = ({col_total}) * {1.0 / rows!r}
        col = np.empty({cols}, dtype=np.float64)
        for bq in range(b0 + nfull * {L}, b1):
            b = np.uint64(bq)
            for k in range({cols}):
                col[k] = 0.0
            for j0 in range({rows}):
                j = np.uint64(j0)
                base = (b * np.uint64({rows}) + j) * np.uint64({cols})
                acc = 0.0
                for k0 in range({cols}):
                    k = np.uint64(k0)
                    v = {load("x[base + k]")}
                    v = v * v
                    acc += v
                    col[k] += v
                row_means[b * np.uint64({rows}) + j] = acc * {1.0 / cols!r}
            for k0 in range({cols}):
                k = np.uint64(k0)
                col_means[b * np.uint64({cols}) + k] = col[k] * {1.0 / rows!r}
    return ()
"""
    with _lock:
        kernel = _KERNELS.get(key)
        if kernel is None:
            kernel = _KERNELS[key] = _load_module(source).kernel
    return kernel




def _row_stats_source(rule_src: str, imports: Sequence[str], fields: Sequence[str], kind: str,
                      state_kind: str, stochastic: bool) -> str:
    """The kernel of :meth:`FusedEngine.sq_stats_last_dims` for a row rule, over many tensors
    in one launch: ``kernel(svs, seeds, xs, ys, states, a_at, col_at, w_at, shapes, items,
    parts, banded, found)``. Tensor t has scalars ``svs[t]``, x and y (``kind``: f32, f64 or
    b16, bfloat16 computed in float32) viewed as ``shapes[t] = (batch, n, m)`` at ``xs[t]``
    and ``ys[t]``, its row state (``state_kind``, batch * n) at ``states[t]``, and gets a
    (batch * n), the column means of x**2 and the column sums of (a x)**2 (batch * m each, in
    the compute dtype) at ``a_at[t]``, ``col_at[t]`` and ``w_at[t]``. Work item i (``items``:
    cumulative per tensor) writes ``found[i] = (sum of y**2, max a over its rows whose mean
    is not 0, max a over the others, sum of x**2, min a over the rows whose mean is not 0)``
    (inf where there are none). A bfloat16 row state is rounded to nearest-even, or
    with ``stochastic`` as a map would round it: element i gets the random word
    ``random32(0, seeds[t]) + i * 0x9E3779B9`` (the state is operand 0 of the row rule).

    Work items are bands of rows of about numba_ops.BAND elements (:func:`_row_stats_plan`).
    A row is read once from memory: its sum of x**2 (in the element dtype per run of
    SUM_RUN * 64 elements, then in float64: numba_ops.sq_means_many's order, so the row means
    keep their bits), its squares added to the band's column sums and y's squares to the
    item's; the row rule then turns the mean into the new state and a, and a second loop over
    the row, now in the L1 cache, adds (a x)**2 to the band's other column sums (rows with a
    zero mean add nothing there). Column sums go to float64 every SUM_RUN rows, in the work
    item's own arrays: a matrix of one band writes its columns at once; the bands of larger
    ones (``banded``: those tensors; ``parts``: where their bands' sums go) are added up by a
    second parallel loop. (Partial arrays for every matrix, added up by that loop, made the
    kernel 1.2 ms a step instead of 0.7 ms on GPT-2's shapes at --scale 0.005, most of it in
    the finishing loop.)"""
    E = "np.float64" if kind == "f64" else "np.float32"
    compute = "f64" if kind == "f64" else "f32"  # a, the column means and w

    def load(kind_, element):
        return f"_E(_bf16_decode({element}))" if kind_ == "b16" else element

    if state_kind != "b16":
        store = "st[ri] = r[0]"
    elif stochastic:
        store = "st[ri] = _bf16_encode_stochastic(r[0], _u32_add(bh, _u32_mul(ri, 0x9E3779B9)))"
    else:
        store = "st[ri] = _bf16_encode(r[0])"
    fields_src = ", ".join(f"sv[{i}]" for i in range(len(fields)))
    seg = "SUM_RUN * 64"
    body = f"""

from adamkit.engines.numba_ops import SUM_RUN
from adamkit.engines.numba_ops import _bands


@numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def kernel(svs, seeds, xs, ys, states, a_at, col_at, w_at, shapes, items, parts, banded,
           found):
    cpart = np.empty(parts[-1], dtype=np.float64)
    wpart = np.empty(parts[-1], dtype=np.float64)
    for it in numba.prange(items[-1]):
        t = np.searchsorted(items, it, side="right") - 1
        w = it - items[t]
        sv = svs[t]
        s = _S({fields_src})
        bh = _random32(0, seeds[t])
        batch, n, m = shapes[t, 0], shapes[t, 1], shapes[t, 2]
        x = numba.carray({_POINTERS[kind]}(xs[t]), batch * n * m)
        y = numba.carray({_POINTERS[kind]}(ys[t]), batch * n * m)
        st = numba.carray({_POINTERS[state_kind]}(states[t]), batch * n)
        a = numba.carray({_POINTERS[compute]}(a_at[t]), batch * n)
        splits = _bands(n, m)
        band = (n + splits - 1) // splits
        b = w // splits
        r0 = (w - b * splits) * band
        r1 = min(r0 + band, n)
        run = np.zeros(m, _E)
        wrun = np.zeros(m, _E)
        csum = np.zeros(m, np.float64)
        wsum = np.zeros(m, np.float64)
        ysum = 0.0
        xsum = 0.0
        amax = _E(0.0)
        azero = _E(0.0)
        amin = _E(np.inf)
        for j in range(r0, r1):
            base = np.uint64((b * n + j) * m)
            acc = 0.0
            for k1 in range(0, m, {seg}):
                sacc = _E(0.0)
                yacc = _E(0.0)
                for k0 in range(k1, min(k1 + {seg}, m)):
                    k = np.uint64(k0)
                    v = {load(kind, "x[base + k]")}
                    v = v * v
                    sacc = _add_reassoc(sacc, v)
                    run[k] += v
                    u = {load(kind, "y[base + k]")}
                    yacc = _add_reassoc(yacc, u * u)
                acc += np.float64(sacc)
                ysum += np.float64(yacc)
            xsum += acc
            ri = np.uint64(b * n + j)
            r = _as_tuple(rule(s, _E({load(state_kind, "st[ri]")}), _E(acc / m)))
            {store}
            ai = _E(r[1])
            a[ri] = ai
            if acc != 0.0:  # NaN counts as not 0: its (a x)**2 are NaN
                if ai > amax:
                    amax = ai
                if ai < amin:
                    amin = ai
                for k0 in range(m):
                    k = np.uint64(k0)
                    u = {load(kind, "x[base + k]")} * ai
                    wrun[k] += u * u
            elif ai > azero:
                azero = ai
            if (j - r0) % SUM_RUN == SUM_RUN - 1 or j == r1 - 1:
                for k0 in range(m):
                    csum[k0] += np.float64(run[k0])
                    wsum[k0] += np.float64(wrun[k0])
                    run[k0] = 0.0
                    wrun[k0] = 0.0
        if splits == 1:
            _store_columns(csum, wsum, b, n, m, col_at[t], w_at[t])
        else:
            at = parts[t] + w * m
            cpart[at:at + m] = csum
            wpart[at:at + m] = wsum
        found[it, 0] = ysum
        found[it, 1] = amax
        found[it, 2] = azero
        found[it, 3] = xsum
        found[it, 4] = amin
    for q in numba.prange(len(banded)):
        t = banded[q]
        _finish_columns(cpart, wpart, parts[t], shapes[t, 0], shapes[t, 1], shapes[t, 2],
                        col_at[t], w_at[t])
    return ()


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _store_columns(csum, wsum, b, n, m, col_at, w_at):
    # matrix b's column means of x**2 and sums of (a x)**2 (functions, not inline: Numba
    # drops a parallel loop whose only effect is a store through a raw pointer)
    cols = numba.carray({_POINTERS[compute]}(col_at), (b + 1) * m)
    ws = numba.carray({_POINTERS[compute]}(w_at), (b + 1) * m)
    for k in range(m):
        cols[b * m + k] = csum[k] / n
        ws[b * m + k] = wsum[k]


@numba.njit(cache=True, error_model="numpy", nogil=True)
def _finish_columns(cpart, wpart, at, batch, n, m, col_at, w_at):
    splits = _bands(n, m)
    for b in range(batch):
        csum = np.zeros(m, np.float64)
        wsum = np.zeros(m, np.float64)
        for w in range(b * splits, b * splits + splits):
            for k in range(m):
                csum[k] += cpart[at + w * m + k]
                wsum[k] += wpart[at + w * m + k]
        _store_columns(csum, wsum, b, n, m, col_at, w_at)
"""
    header = _module_header(imports, E, fields)
    return "\n".join(header) + rule_src + body


def _row_stats_plan(shapes) -> tuple:
    """(items, parts, banded) for :func:`_row_stats_source`'s kernel over tensors of
    ``shapes`` ((batch, n, m) each): cumulative work items (bands of rows), cumulative
    partial column sums (only for tensors of more than one band per matrix) and the indices
    of those tensors."""
    import numpy as np

    from . import numba_ops

    splits = np.array([numba_ops._bands(n, m) for _, n, m in shapes], dtype=np.int64)
    batch = np.array([sh[0] for sh in shapes], dtype=np.int64)
    m = np.array([sh[2] for sh in shapes], dtype=np.int64)
    items = np.zeros(len(shapes) + 1, dtype=np.int64)
    parts = np.zeros(len(shapes) + 1, dtype=np.int64)
    np.cumsum(batch * splits, out=items[1:])
    np.cumsum(np.where(splits > 1, batch * splits * m, 0), out=parts[1:])
    return items, parts, np.flatnonzero(splits > 1).astype(np.int64)


def _row_stats_kernel(fn: Callable, outcomes: tuple, fields: tuple, kind: str,
                      state_kind: str, stochastic: bool) -> Callable:
    key = ("row_stats", fn, outcomes, fields, kind, state_kind, stochastic)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _KERNELS.get(key)
        if kernel is None:
            program = _rule_program(fn)
            source = _row_stats_source(program.source(outcomes), program.imports, fields, kind,
                                       state_kind, stochastic)
            kernel = _KERNELS[key] = _load_module(
                f"# row rule: {fn.__module__}.{fn.__qualname__}\n" + source,
                program.module_sources).kernel
    return kernel


def row_stats_tables(shapes) -> tuple:
    """The tables of :func:`run_row_stats` that depend on the tensors' shapes only: their
    ``(batch, n, m)`` array and :func:`_row_stats_plan`'s."""
    import numpy as np

    return (np.array(shapes, dtype=np.int64).reshape(-1, 3), *_row_stats_plan(shapes))


def run_row_stats(key: tuple, svs, seeds, address: Sequence, tables: tuple):
    """One launch of the row-statistics kernel ``key`` (see :func:`_row_stats`) over tensors
    with scalars ``svs`` (one row each), stochastic-rounding ``seeds`` (int64, one each), the
    address columns of x, y, state, a, cols and w, and ``tables`` from
    :func:`row_stats_tables`; returns a (tensors, 5) array: sum of y**2, max a over rows with
    a nonzero mean, max a over the others, sum of x**2, min a over rows with a nonzero
    mean."""
    import numpy as np

    kernel = _row_stats_kernel(*key)
    shapes, items, parts, banded = tables
    found = np.empty((int(items[-1]), 5), dtype=np.float64)
    args = (svs, seeds, *address, shapes, items, parts, banded, found)
    if _serialize_calls():
        with _lock:
            kernel(*args)
    else:
        kernel(*args)
    first = items[:-1]
    return np.stack([np.add.reduceat(found[:, 0], first),
                     np.maximum.reduceat(found[:, 1], first),
                     np.maximum.reduceat(found[:, 2], first),
                     np.add.reduceat(found[:, 3], first),
                     np.minimum.reduceat(found[:, 4], first)], axis=1)


def _row_stats(queued: dict) -> None:
    """Run the row statistics queued under each ``(fn, outcomes, fields, kind, state_kind,
    stochastic)`` as ``(values, x, y, state, a, cols, w, pending, seed)``: one launch per key;
    each ``pending`` gets the five statistics of :func:`run_row_stats`."""
    import numpy as np

    for key, entries in queued.items():
        tables = row_stats_tables([(x.numel() // (x.shape[-2] * x.shape[-1]), x.shape[-2],
                                    x.shape[-1]) for _, x, *_ in entries])
        svs = np.array([e[0] for e in entries], dtype=np.float64).reshape(len(entries), -1)
        address = [np.array([t.data_ptr() for t in column], dtype=np.uint64)
                   for column in list(zip(*entries))[1:7]]
        seeds = np.array([e[8] for e in entries], dtype=np.int64)
        stats = run_row_stats(key, svs, seeds, address, tables)
        for entry, values in zip(entries, stats.tolist()):
            entry[7].value = values


# ---- the engine ---------------------------------------------------------------------------


def _numpy(t: Tensor):
    if t.requires_grad and torch.is_grad_enabled():  # step() runs under no_grad: no detach
        t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.reshape(-1).numpy()


def _broadcast_shape(shapes) -> tuple | None:
    """``torch.broadcast_shapes(*shapes)`` as a tuple, None where they do not broadcast (torch's
    own is written in Python with checks for symbolic shapes: measured 28 us a call for three
    2-D shapes, this one 1.2 us)."""
    out = [1] * max(len(sh) for sh in shapes)
    for sh in shapes:
        offset = len(out) - len(sh)
        for i, size in enumerate(sh):
            current = out[offset + i]
            if size != current:
                if current == 1:
                    out[offset + i] = size
                elif size != 1:
                    return None
    return tuple(out)


def _collapse_strides(t: Tensor, shape: torch.Size) -> tuple[int, int, int] | None:
    """(batch, row, column) element strides of ``t`` broadcast to ``shape`` (None if the
    leading dimensions cannot be merged)."""
    # the strides of t.expand(shape), without making the view (this runs per tensor and map)
    offset = len(shape) - t.dim()
    strides = [0] * offset + [stride if size == full else 0 for size, stride, full in
                              zip(t.shape, t.stride(), shape[offset:])]
    sizes = list(shape)
    while len(sizes) < 3:
        sizes.insert(0, 1)
        strides.insert(0, 0)
    lead_sizes, lead_strides = sizes[:-2], strides[:-2]
    batch_stride = None
    expected = None
    for size, stride in zip(reversed(lead_sizes), reversed(lead_strides)):
        if size == 1:
            continue
        if batch_stride is None:
            batch_stride, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return (batch_stride or 0, strides[-2], strides[-1])


def factor_roles(ins: Sequence, kinds: Sequence[str], shape: tuple) -> tuple | None:
    """How each operand of a map broadcast to ``shape`` (at least 2-D) is indexed, when the
    multi-tensor ``mfact`` layout covers it: "full" (the shape itself), "row" (``(..., n, 1)``,
    a row factor), "col" (``(..., 1, m)``, a column factor) or None (not an array); None
    where an operand broadcasts otherwise. Operands are contiguous (``map`` checked)."""
    lead, n, m = tuple(shape[:-2]), shape[-2], shape[-1]
    roles = []
    for t, kind in zip(ins, kinds):
        if kind not in _FLOAT_ARRAYS:
            roles.append(None)
            continue
        sh = tuple(t.shape)
        if len(sh) < len(shape):
            sh = (1,) * (len(shape) - len(sh)) + sh
        if sh == shape:
            roles.append("full")
        elif sh[:-2] != lead:
            return None
        elif sh[-2:] == (n, 1):
            roles.append("row")
        elif sh[-2:] == (1, m):
            roles.append("col")
        else:
            return None
    return tuple(roles)


def _sq_means(means: dict) -> None:
    """Fill, for each ``(x, rows, cols)`` listed under ``(x dtype, means dtype)``, ``rows`` and
    ``cols`` with the row and column means of ``x**2`` over its last two dimensions: one launch
    per dtype pair (x contiguous float32 or float64, at least one element)."""
    import numpy as np

    from . import numba_ops

    element = {torch.float32: np.float32, torch.float64: np.float64}
    for (dtype, out_dtype), queued in means.items():
        shapes = np.array([(x.numel() // (x.shape[-2] * x.shape[-1]), x.shape[-2],
                            x.shape[-1]) for x, _, _ in queued], dtype=np.int64)
        address = [np.array([t.data_ptr() for t in column], dtype=np.uint64)
                   for column in zip(*queued)]
        args = (*address, shapes, *numba_ops.sq_means_plan(shapes.tolist()),
                element[dtype], element[out_dtype])
        if _serialize_calls():
            with _lock:
                numba_ops.sq_means_many(*args)
        else:
            numba_ops.sq_means_many(*args)


def _negated(ins: Sequence, kinds: Sequence[str], negate) -> tuple:
    """The positions of the array operands read with their sign flipped (``negate``: the
    gradient under ``maximize=True``, else None)."""
    if negate is None:
        return ()
    return tuple(j for j, t in enumerate(ins) if t is negate and kinds[j] in _FLOAT_ARRAYS)


class _Call(NamedTuple):
    """A batched map as a generator ``apply`` queued it last step (``FusedEngine(calls=...)``):
    its kernel spec and size, and per operand the index of the ``trusted`` object it was (-1:
    none) and its shape (None for numbers and absent operands)."""

    spec: tuple
    n: int
    dims: tuple | None
    roles: tuple
    shapes: tuple


class _PerTensor(NamedTuple):
    """A generator ``apply``'s ``per_tensor`` call as it ran last step
    (``FusedEngine(calls=...)``): the function, and whether it gave a number (a vectorized run
    needs one)."""

    fn: Callable
    number: bool


class Pending:
    """The sums of a map deferred to a :class:`KernelBatch`; ``value`` is set by ``flush()``.

    A generator ``apply`` receives it by yielding the map (``(a, b) = yield engine.map(...)``);
    the optimizer flushes the batch once every tensor has reached its ``yield`` and sends the
    sums back."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def __iter__(self):
        raise TypeError("the sums of a batched map are known only after the step's other "
                        "tensors reach the same pass: yield the map in a generator apply, "
                        "as in `(total,) = yield engine.map(...)`")


def operand_columns(kinds: Sequence[str], operands: Sequence[list]) -> list:
    """The operand tables a multi-tensor kernel takes, in argument order, from each map's
    operands (``(address or number, second address)`` per operand, as KernelBatch stores
    them): one array per operand, two for 8-bit state (codes, scales), none for "none"."""
    import numpy as np

    columns = []
    for j, kind in enumerate(kinds):
        if kind == "none":
            continue
        columns.append(np.array([ops[j][0] for ops in operands],
                                dtype=np.float64 if kind == "num" else np.uint64))
        if kind in ("q8s", "q8u"):
            columns.append(np.array([ops[j][1] for ops in operands], dtype=np.uint64))
    return columns


def operand_column(kinds: Sequence[str], j: int) -> int | None:
    """Where operand ``j``'s (first) table is in :func:`operand_columns` (None: it has none)."""
    if kinds[j] == "none":
        return None
    return sum(0 if kind == "none" else 2 if kind in ("q8s", "q8u") else 1
               for kind in kinds[:j])


class KernelBatch:
    """Maps deferred by :class:`FusedEngine` until ``flush()``, grouped by kernel.

    An optimizer step on a model is a few hundred small maps with the same rule; run one by
    one, each pays a Python call, Numba's argument dispatch and a thread-pool launch (tens of
    microseconds, as long as updating a 100k-element tensor). Batched, those costs are paid once
    per kernel: the multi-tensor kernel takes tables of per-tensor scalars, sizes, seeds and
    operand addresses, and its parallel loop runs over every tensor's chunks of ``CHUNK``
    elements (whole rows of about that many for maps of matrices with their row and column
    factors), so small and large tensors share the threads. Maps with sums get per-tensor
    totals (per-chunk partial sums, added up per tensor in chunk order) in their
    :class:`Pending`. Row and column means of squares (:meth:`FusedEngine.mean_sq_last_dims`)
    and row statistics (:meth:`FusedEngine.sq_stats_last_dims`) are deferred the same way,
    and run first, in one launch per kernel.
    """

    def __init__(self):
        self._groups: dict[tuple, list] = {}
        #: per kernel, blocks of maps given as ready-made tables (see :meth:`add_block`)
        self._blocks: dict[tuple, list] = {}
        #: deferred means of squares, as (x, rows, cols) per (x dtype, means dtype)
        self._means: dict[tuple, list] = {}
        #: deferred row statistics (FusedEngine.sq_stats_last_dims) per kernel key
        self._stats: dict[tuple, list] = {}
        #: ... and launches of them given as ready-made tables (see add_row_stats_block)
        self._stat_blocks: list = []
        #: the most recently added map, as ``(spec, n, operands)``: what :meth:`repeat` needs
        self.last: tuple | None = None
        #: addresses of the tensors the queued maps and means write (see FusedEngine)
        self.writes: set[int] = set()
        #: ... those the queued maps write (see add)
        self._map_writes: set[int] = set()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._groups.values()) + sum(
            len(block[1]) for blocks in self._blocks.values() for block in blocks) + sum(
            len(means) for means in self._means.values()) + sum(
            len(stats) for stats in self._stats.values()) + len(self._stat_blocks)

    def add_means(self, x: Tensor, rows: Tensor, cols: Tensor) -> None:
        """Fill ``rows`` and ``cols`` with the row and column means of ``x**2`` over its last
        two dimensions (contiguous float32 or float64; at least one element) at ``flush()``,
        before the queued maps run."""
        self._means.setdefault((x.dtype, rows.dtype), []).append((x, rows, cols))
        self.writes.update((rows.data_ptr(), cols.data_ptr()))

    def add_row_stats(self, key: tuple, entry: tuple) -> None:
        """Queue :meth:`FusedEngine.sq_stats_last_dims` of one tensor (see :func:`_row_stats`
        for ``key`` and ``entry``); it runs at ``flush()``, before the queued maps, after the
        means of squares."""
        self._stats.setdefault(key, []).append(entry)
        self.writes.update(t.data_ptr() for t in entry[3:7])

    def add_row_stats_block(self, key: tuple, svs, seeds, address: Sequence, tables: tuple,
                            writes: Sequence[int], sums: "Pending", keep) -> None:
        """Queue one launch of :func:`run_row_stats` with ready-made tables (a vectorized
        run's, for all the tensors of a cohort); at ``flush()`` ``sums.value`` becomes its
        five statistics, one array each with one value per tensor. ``writes``: the addresses
        it stores to (row state, a, cols, w)."""
        self._stat_blocks.append((key, svs, seeds, address, tables, sums, keep))
        self.writes.update(writes)

    def add(self, spec: tuple, values: tuple, n: int, seed: int, operands: list, keep,
            sums: Pending | None = None, dims: tuple[int, int] | None = None) -> None:
        """Queue one map. ``keep`` holds the operand tensors so their memory outlives the
        addresses; ``dims``: for the ``mfact`` layout, the (columns, rows per matrix) of the
        shape the operands broadcast to.

        A map that reads or writes a tensor an earlier queued map writes runs after it: the
        batch is flushed first. (Flushed, maps run grouped by kernel, which would otherwise
        reorder such a pair when another tensor queued the second kernel first; the means of
        squares are exempt, they run before every map.)"""
        writes = self._map_writes
        # dict(operands): their first entries, addresses or numbers, at C speed (a number
        # equal to an address would only cost a flush)
        if writes and not writes.isdisjoint(dict(operands)):
            self.flush()
        self._groups.setdefault(spec, []).append((values, n, seed, operands, keep, sums, dims))
        # what a _Plan may re-add; maps of the mfact layout need their dims, not recorded
        self.last = (spec, n, operands) if dims is None else None
        for _, j in spec[2]:
            self.writes.add(operands[j][0])
            self._map_writes.add(operands[j][0])

    def repeat(self, last: tuple, s, seed: int, grad_address: int, keep) -> None:
        """Add a map recorded as ``last`` by an earlier step again, with new scalars ``s``, a
        new seed and operand 1 (the gradient) at ``grad_address``; every other operand must
        still be where it was (the caller checks). This is the optimizer's fast path for a
        parameter whose tensors have not changed since its last step: no per-operand checks,
        no kernel lookup."""
        spec, n, operands = last
        outcomes = rule_outcomes(spec[0], s, spec[4])
        if outcomes != spec[-1]:
            spec = spec[:-1] + (outcomes,)
        operands = [operands[0], (grad_address, 0), *operands[2:]]
        self.add(spec, tuple(s), n, seed, operands, keep)

    def add_block(self, spec: tuple, svs, ns, seeds, columns: list, keep,
                  writes: Sequence[int], sums: "Pending | None" = None, rows=None,
                  reads: Sequence = ()) -> None:
        """Add many maps of one kernel at once, as the tables :meth:`flush` passes it: scalars
        ``svs`` (one row per map), sizes ``ns``, ``seeds`` and the operand ``columns`` in
        kernel argument order (NumPy arrays). ``writes``: the addresses the maps store to.

        Maps with sums give a ``sums`` whose ``value`` holds one array per sum; ``flush()``
        writes each map's total at its index in ``rows`` (all rows in order when None).
        ``reads``: address columns the maps read; if an earlier queued map writes one of them,
        the batch is flushed first (as :meth:`add` does)."""
        if bool(spec[10]) != (sums is not None):
            raise ValueError("add_block: give a Pending exactly for maps with sums")
        map_writes = self._map_writes
        if map_writes and any(not map_writes.isdisjoint(column.tolist()) for column in reads):
            self.flush()
        self._blocks.setdefault(spec, []).append((svs, ns, seeds, columns, keep, sums, rows))
        self.writes.update(writes)
        self._map_writes.update(writes)

    @staticmethod
    def _tables(spec: tuple, entries: list) -> tuple:
        """(svs, ns, seeds, columns) of maps added one by one; for the mfact layout the
        columns start with the tables of each map's columns and rows per matrix."""
        import numpy as np

        if spec[6]:  # fields
            svs = np.array([e[0] for e in entries], dtype=np.float64)
        else:
            svs = np.zeros((len(entries), 0), dtype=np.float64)
        ns = np.array([e[1] for e in entries], dtype=np.int64)
        seeds = np.array([e[2] for e in entries], dtype=np.int64)
        columns = operand_columns(spec[1], [e[3] for e in entries])
        if isinstance(spec[5], tuple):  # mfact
            dims = np.array([e[6] for e in entries], dtype=np.int64).reshape(-1, 2)
            columns = [np.ascontiguousarray(dims[:, 0]), np.ascontiguousarray(dims[:, 1]),
                       *columns]
        return svs, ns, seeds, columns

    def flush(self) -> None:
        import numpy as np

        groups, self._groups = self._groups, {}
        blocks, self._blocks = self._blocks, {}
        means, self._means = self._means, {}
        stats, self._stats = self._stats, {}
        stat_blocks, self._stat_blocks = self._stat_blocks, []
        self.writes = set()
        self._map_writes = set()
        if means:  # the maps queued after them may read them
            _sq_means(means)
        if stats:
            _row_stats(stats)
        for key, svs, seeds, address, tables, sums, _ in stat_blocks:
            found = run_row_stats(key, svs, seeds, address, tables)
            sums.value = [found[:, k] for k in range(5)]
        for spec in list(groups) + [spec for spec in blocks if spec not in groups]:
            (fn, kinds, stores, n_results, dtype, layout, fields, sr_b16, sr_q8, negated,
             n_sums, outcomes) = spec
            key = ("multi",) + spec
            kernel = _KERNELS.get(key) or _load_kernel(
                key, fn, fields, kinds, stores, n_sums, n_results,
                "float64" if dtype == torch.float64 else "float32", layout, negated,
                outcomes=outcomes)
            entries = groups.get(spec, [])
            tables = [block[:4] for block in blocks.get(spec, ())]
            if entries:
                tables.insert(0, self._tables(spec, entries))
            if len(tables) == 1:
                svs, ns, seeds, columns = tables[0]
            else:
                svs, ns, seeds = (np.concatenate([t[i] for t in tables]) for i in range(3))
                columns = [np.concatenate([t[3][c] for t in tables])
                           for c in range(len(tables[0][3]))]
            starts = np.zeros(len(ns) + 1, dtype=np.int64)
            if isinstance(layout, tuple):  # mfact: work items of whole rows (see the kernel)
                ms = columns[0]
                per = np.maximum(1, CHUNK // ms)
                np.cumsum((ns // ms + per - 1) // per, out=starts[1:])
            else:
                np.cumsum((ns + (CHUNK - 1)) // CHUNK, out=starts[1:])
            args = [svs, ns, starts, seeds, sr_b16, sr_q8]
            if n_sums:
                part = np.zeros((int(starts[-1]), n_sums), dtype=np.float64)
                args.append(part)
            args += columns
            if _serialize_calls():
                with _lock:
                    kernel(*args)
            else:
                kernel(*args)
            if n_sums:  # every tensor has at least one chunk (empty maps are not batched)
                totals = np.add.reduceat(part, starts[:-1], axis=0)
                for entry, total in zip(entries, totals[:len(entries)].tolist()):
                    entry[5].value = total
                at = len(entries)
                for block in blocks.get(spec, ()):
                    size = len(block[1])
                    pending, rows = block[5], block[6]
                    for q in range(n_sums):
                        pending.value[q][slice(None) if rows is None else rows] = \
                            totals[at:at + size, q]
                    at += size


class FusedEngine:
    """Executes a rule's primitives with generated Numba kernels (see the module docstring).

    Args:
        dtype: the parameter's dtype; rules compute in float64 for float64 parameters and in
            float32 otherwise.
        negate: a tensor (the gradient) to be read with its sign flipped wherever it is an
            operand; this is how ``maximize=True`` costs no extra pass.
        seed: seeds stochastic rounding (bfloat16 parameters with ``stochastic_bf16``, 8-bit
            state with ``stochastic_int8``).
        batch: a :class:`KernelBatch` that collects maps over same-shaped operands, maps of
            matrices with their row and column factors (over SMALL_BCAST elements), and
            ``mean_sq_last_dims`` of matrices over SMALL_BCAST elements, instead of running
            them; ``batch.flush()`` then runs all of them, one launch per kernel. The
            tensors must not be touched in between (the optimizer flushes at the end of
            ``step()``, and for a generator ``apply`` at each ``yield``), except by this
            engine: a map it runs at once, or ``mean_sq_last_dims``, on a tensor that a queued
            map writes flushes the batch first, and so does queuing a map that reads or
            writes such a tensor.
        batch_sums: whether maps with sums are batched too; ``map`` then returns a
            :class:`Pending` for them, to be yielded (only for generator ``apply``).
        calls: a list kept from one step of a parameter to the next, to repeat a generator
            ``apply``'s batched maps cheaply: entry k (a ``_Call``) describes this engine's
            k-th ``map`` call of the last step, None where that call was not batched (a
            ``per_tensor`` call counts too: its entry is a ``_PerTensor``). A map that
            matches its entry reuses it (only new addresses, scalars and outcomes are looked
            up); any other takes the full path, which rewrites the entry.
        trusted: with ``calls``: the tensors (parameter, gradient, state) whose storage, dtype
            and shape the caller checked for this step, so that an operand that is one of
            them at the position it held last step needs no checks but a fresh address.
    """

    name = "fused"

    def __init__(self, dtype: torch.dtype, negate: Tensor | None = None, seed: int = 0,
                 stochastic_bf16: bool = False, stochastic_int8: bool = False,
                 batch: "KernelBatch | None" = None, batch_sums: bool = False,
                 calls: list | None = None, trusted: tuple = ()):
        if not available():
            raise RuntimeError(f"the fused engine needs numba: {unavailable_reason()}")
        self.batch = batch
        self.batch_sums = batch_sums
        self.param_dtype = dtype
        self.dtype = compute_dtype(dtype)
        self.negate = negate
        self.seed = int(seed) & 0x3FFFFFFF
        self.stochastic_bf16 = stochastic_bf16
        self.stochastic_int8 = stochastic_int8
        self.calls = calls
        self.trusted = trusted
        self._call = 0

    def _after_queued_writes(self, tensors) -> None:
        """Flush the batch if one of its queued maps writes one of ``tensors`` (which this
        engine is about to use at once), so that nothing reads or writes them out of order."""
        writes = self.batch.writes if self.batch is not None else None
        if not writes:
            return
        for t in tensors:
            if isinstance(t, Tensor):
                address = t.data_ptr()
            elif isinstance(t, _block_quantized()):
                address = t.codes.data_ptr()
            else:
                continue
            if address in writes:
                self.batch.flush()
                return

    # The reference engine handles maps whose operands the kernels do not cover.
    def _fallback(self, fn, s, ins, outs, n_sums):
        from ..storage import BlockQuantized

        self._after_queued_writes(ins)
        loaded = []
        for t in ins:
            if t is not None and t is self.negate:
                t = -t
            if isinstance(t, BlockQuantized):
                raise KernelUnsupported("8-bit state in a map the fused kernels do not cover")
            loaded.append(t)
        return ReferenceEngine(self.param_dtype).map(fn, s, loaded, outs, n_sums)

    def map(self, fn: Callable, s, ins: Sequence, outs: Sequence, n_sums: int = 0) -> list[float]:
        # This runs once per tensor and step: it is kept to plain loops and attribute reads.
        calls = self.calls
        call = -1
        if calls is not None:  # a generator apply's k-th map: repeat last step's if it fits
            call = self._call
            self._call = call + 1
            if call < len(calls):
                entry = calls[call]
                if type(entry) is _Call:
                    result = self._repeat(entry, fn, s, ins, outs, n_sums)
                    if result is not None:
                        return result
                calls[call] = None
            else:
                calls.append(None)
        kinds: list[str] = []
        shapes = []
        quantized = False
        for t in ins:
            if t is None:
                kinds.append("none")
            elif isinstance(t, Tensor):
                kind = _KINDS.get(t.dtype)
                if kind is None or not t.is_cpu or not t.is_contiguous():
                    return self._fallback(fn, s, ins, outs, n_sums)
                kinds.append(kind)
                shapes.append(t.shape)
            elif isinstance(t, _block_quantized()):
                kinds.append("q8s" if t.signed else "q8u")
                shapes.append(t.shape)
                quantized = True
            elif isinstance(t, (int, float)):
                kinds.append("num")
            else:
                return self._fallback(fn, s, ins, outs, n_sums)
        if not shapes:
            return self._fallback(fn, s, ins, outs, n_sums)
        shape = shapes[0]
        layout = "flat"
        for sh in shapes:
            if sh != shape:
                shape = _broadcast_shape(shapes)
                if shape is None:
                    return self._fallback(fn, s, ins, outs, n_sums)
                layout = "bcast"
                break
        n = math.prod(shape)
        if quantized:
            if layout != "flat":
                raise KernelUnsupported("8-bit state must have the parameter's shape")
            layout = "block"
        stores = []
        for k, out in enumerate(outs):
            if out is None:
                continue
            for j, t in enumerate(ins):
                if t is out:
                    break
            else:
                return self._fallback(fn, s, ins, outs, n_sums)
            if layout == "bcast" and tuple(out.shape) != tuple(shape):
                return self._fallback(fn, s, ins, outs, n_sums)
            stores.append((k, j))
        if n == 0:
            return [0.0] * n_sums
        fields = type(s)._fields
        n_results = len(outs) + n_sums
        # the sign flip of maximize=True is compiled in: such steps use their own kernels
        negated = _negated(ins, kinds, self.negate)
        # the rule's scalar-only branches and exponents, resolved per kernel (the tensors of a
        # param group share their scalars, so the outcomes are looked up, not re-evaluated)
        outcomes = rule_outcomes(fn, s, self.dtype)
        batched = self.batch is not None and (n_sums == 0 or self.batch_sums)
        dims = None
        if batched and layout == "bcast":
            # factors broadcast against matrices (Adafactor): one launch for many tensors,
            # except small matrices, whose per-shape kernels unroll (see SMALL_BCAST)
            roles = factor_roles(ins, kinds, shape) if len(shape) >= 2 and \
                shape[-1] * shape[-2] > SMALL_BCAST else None
            if roles is None:
                batched = False
            else:
                layout = ("mfact", roles)
                dims = (shape[-1], shape[-2])
        if batched:
            operands = []
            for t, kind in zip(ins, kinds):
                if kind in _FLOAT_ARRAYS:
                    operands.append((t.data_ptr(), 0))
                elif kind in ("q8s", "q8u"):
                    operands.append((t.codes.data_ptr(), t.absmax.data_ptr()))
                elif kind == "num":
                    operands.append((float(t), 0.0))
                else:
                    operands.append((0, 0.0))
            spec = (fn, tuple(kinds), tuple(stores), n_results, self.dtype,
                    {"flat": "mflat", "block": "mblock"}.get(layout, layout), fields,
                    self.stochastic_bf16, self.stochastic_int8, negated, n_sums, outcomes)
            sums = Pending() if n_sums else None
            self.batch.add(spec, tuple(s), n, self.seed, operands, ins, sums, dims)
            if call >= 0:
                trusted = self.trusted
                roles = tuple(next((r for r, x in enumerate(trusted) if x is t), -1)
                              for t in ins)
                calls[call] = _Call(spec, n, dims, roles,
                                    tuple(None if kind in ("none", "num") else t.shape
                                          for t, kind in zip(ins, kinds)))
            return sums if n_sums else []
        self._after_queued_writes(ins)
        # a small tensor runs on the calling thread: waking the thread pool costs more
        parallel = n >= SERIAL_BELOW
        strides = {}
        if layout == "bcast":
            for j, (t, kind) in enumerate(zip(ins, kinds)):
                if kind in _FLOAT_ARRAYS:
                    strides[j] = _collapse_strides(t, shape)
                    if strides[j] is None:
                        return self._fallback(fn, s, ins, outs, n_sums)
        small = None
        if layout == "bcast":
            sizes = [1, 1, *shape][-3:] if len(shape) < 3 else [math.prod(shape[:-2]),
                                                                  shape[-2], shape[-1]]
            if sizes[1] * sizes[2] <= SMALL_BCAST:
                # an operand of the full shape is contiguous: its strides are the flat ones
                # (_collapse_strides gives batch stride 0 for one matrix), which the kernel
                # reads in place instead of gathering (see _kernel_source)
                flat = (sizes[1] * sizes[2], sizes[2], 1)
                small = (sizes[1], sizes[2], tuple(
                    (flat if ins[j].shape == shape else strides[j]) if j in strides else None
                    for j in range(len(kinds))))
        last_strides = () if small else tuple(
            strides[j][2] if j in strides and strides[j][2] in (0, 1) else None
            for j in range(len(kinds)))
        key = (fn, tuple(kinds), tuple(stores), n_sums, n_results, self.dtype, layout, fields,
               negated, parallel, last_strides, outcomes, small)
        kernel = _KERNELS.get(key) or _load_kernel(
            key, fn, fields, kinds, stores, n_sums, n_results,
            "float64" if self.dtype == torch.float64 else "float32", layout, negated, parallel,
            last_strides, outcomes, small)

        import numpy as np

        sv = np.array(s, dtype=np.float64)
        args = [sv, n, self.seed, self.stochastic_bf16, self.stochastic_int8]
        if layout == "bcast":
            args += sizes
        for j, (t, kind) in enumerate(zip(ins, kinds)):
            if kind in _FLOAT_ARRAYS:
                args.append(_numpy(t))
                if layout == "bcast":
                    args += strides[j]
            elif kind in ("q8s", "q8u"):
                args += [t.codes.reshape(-1).numpy(), t.absmax.numpy()]
            elif kind == "num":
                args.append(float(t))
        if _serialize_calls():
            with _lock:
                return list(kernel(*args))
        return list(kernel(*args))

    def _repeat(self, entry: _Call, fn: Callable, s, ins: Sequence, outs: Sequence,
                n_sums: int):
        """Queue this map as last step's ``entry`` (see ``calls``) if it fits: the same rule,
        scalars fields, stores and engine settings, and per operand the same kind and shape
        (an operand that is the trusted tensor it was is not checked again). None if it
        does not fit, and nothing is queued."""
        spec, n, dims, roles, shapes = entry
        # spec: (fn, kinds, stores, n_results, dtype, layout, fields, sr_b16, sr_q8,
        #        negated, n_sums, outcomes), as map() builds it
        kinds, stores = spec[1], spec[2]
        if (fn is not spec[0] or type(s)._fields != spec[6] or n_sums != spec[10]
                or len(outs) + n_sums != spec[3] or len(ins) != len(kinds)
                or spec[4] is not self.dtype or spec[7] != self.stochastic_bf16
                or spec[8] != self.stochastic_int8 or self.batch is None
                or (n_sums and not self.batch_sums)):
            return None
        for k, j in stores:
            if outs[k] is not ins[j]:
                return None
        if sum(out is not None for out in outs) != len(stores):
            return None
        trusted = self.trusted
        operands = []
        for t, kind, role, shape in zip(ins, kinds, roles, shapes):
            if role >= 0 and trusted[role] is t:  # a checked tensor where it was
                if kind in _FLOAT_ARRAYS:
                    operands.append((t.data_ptr(), 0))
                else:  # 8-bit state
                    operands.append((t.codes.data_ptr(), t.absmax.data_ptr()))
            elif kind in _FLOAT_ARRAYS:
                if not (isinstance(t, Tensor) and _KINDS.get(t.dtype) == kind and t.is_cpu
                        and t.is_contiguous() and t.shape == shape):
                    return None
                operands.append((t.data_ptr(), 0))
            elif kind == "num":
                if not isinstance(t, (int, float)):
                    return None
                operands.append((float(t), 0.0))
            elif kind == "none" and t is None:
                operands.append((0, 0.0))
            else:  # 8-bit state that is not the trusted object it was
                return None
        if _negated(ins, kinds, self.negate) != spec[9]:
            return None
        outcomes = rule_outcomes(fn, s, self.dtype)
        if outcomes != spec[-1]:
            spec = spec[:-1] + (outcomes,)
        sums = Pending() if n_sums else None
        self.batch.add(spec, tuple(s), n, self.seed, operands, ins, sums, dims)
        return sums if n_sums else []

    def per_tensor(self, fn: Callable, t: Tensor, *args):
        self._after_queued_writes((t,))
        result = fn(t, *args)
        calls = self.calls
        if calls is not None:  # recorded for a vectorized run (see optimizer._sequence)
            call = self._call
            self._call = call + 1
            entry = _PerTensor(fn, isinstance(result, (int, float)))
            if call < len(calls):
                calls[call] = entry
            else:
                calls.append(entry)
        return result

    def mean_rows(self, x: Tensor) -> Tensor:
        """torch's ``mean(dim=-2, keepdim=True)`` (the reference engine's) with the same bits;
        for a stack of matrices of up to 3 rows (a conv kernel's row factor) one Numba pass
        that sums each matrix's rows left to right and divides, as torch's mean does over so
        few values (ResNet-18's 1.28M means of 3 took about 5 ms a step in torch; bfloat16
        ones 13 ms), bfloat16 in float32 and rounded to nearest."""
        self._after_queued_writes((x,))
        n = x.shape[-2] if x.dim() >= 2 else 0
        batch = x.numel() // n if n else 0
        if (x.dtype not in SUPPORTED_DTYPES or not x.is_contiguous()
                or x.shape[-1] != 1 or not 1 <= n <= 3 or batch < 2):
            return ReferenceEngine(self.param_dtype).mean_rows(x)
        import numpy as np

        from . import numba_ops

        out = torch.empty(x.shape[:-2] + (1, 1), dtype=x.dtype)
        kernel = numba_ops.mean_rows if x.numel() >= SERIAL_BELOW else numba_ops.mean_rows_serial
        element = np.float64 if x.dtype == torch.float64 else np.float32
        args = (_numpy(x), _numpy(out), batch, n, element(n), MEAN_ROWS_ITEM)
        if _serialize_calls():
            with _lock:
                kernel(*args)
        else:
            kernel(*args)
        return out

    def sq_stats_last_dims(self, fn: Callable, s, state: Tensor, x: Tensor, y: Tensor):
        """The reference engine's ``sq_stats_last_dims`` in one pass over ``x`` and ``y``
        (:func:`_row_stats_source`), for contiguous float32, float64 or bfloat16 x and y of
        the parameters' dtype over matrices of more than SMALL_BCAST elements, and a float32,
        float64 or bfloat16 row state (rounded as a map rounds it): returns ``(a, cols, w,
        sums)`` with ``w`` the column sums of (a x)**2 and ``sums`` (a :class:`Pending` when
        batched) the five statistics of :func:`run_row_stats`. Anything else takes the
        reference engine's path (``mean_sq_last_dims``, then ``fn`` as a map), which gives
        ``w`` and ``sums`` as None."""
        if not self.makes_row_stats(state, x, y):
            return ReferenceEngine.sq_stats_last_dims(self, fn, s, state, x, y)
        self._after_queued_writes((x, y, state))
        key = (fn, rule_outcomes(fn, s, self.dtype), type(s)._fields, _KINDS[x.dtype],
               _KINDS[state.dtype], self.stochastic_bf16 and state.dtype is torch.bfloat16)
        return self.queue_row_stats(key, tuple(float(v) for v in s), state, x, y)

    def queue_row_stats(self, key: tuple, values, state: Tensor, x: Tensor, y: Tensor):
        """:meth:`sq_stats_last_dims` for tensors that :meth:`makes_row_stats` accepted and
        that no queued map writes, with its kernel's ``key`` (see :func:`_row_stats`) and the
        scalars' ``values`` given (a vectorized run makes them for many tensors at once)."""
        n, m = x.shape[-2], x.shape[-1]
        lead = tuple(x.shape[:-2])
        a = torch.empty(lead + (n, 1), dtype=self.dtype)
        both = torch.empty((2,) + lead + (1, m), dtype=self.dtype)
        cols, w = both[0], both[1]
        sums = Pending()
        entry = (values, x, y, state, a, cols, w, sums, self.seed)
        if self.batch is not None:
            self.batch.add_row_stats(key, entry)
            return a, cols, w, sums
        _row_stats({key: [entry]})
        return a, cols, w, sums.value

    def makes_row_stats(self, state, x: Tensor, y: Tensor) -> bool:
        """Whether :meth:`sq_stats_last_dims` takes its one-pass kernel for these tensors."""
        return (x.dtype is self.param_dtype and y.dtype is x.dtype and x.dim() >= 2
                and _KINDS.get(x.dtype) in _ROW_STATS_KINDS and isinstance(state, Tensor)
                and _KINDS.get(state.dtype) in _ROW_STATS_KINDS
                and x.shape[-2] * x.shape[-1] > SMALL_BCAST and x.numel() > 0
                and y.shape == x.shape and x.is_contiguous() and y.is_contiguous()
                and state.is_contiguous())

    def sums_where(self, where, fn: Callable, s, ins: Sequence, n_sums: int) -> list:
        """The reference engine's ``sums_where``: the map runs at once, unbatched."""
        if not where:
            return [0.0] * n_sums
        if self.batch is not None and self.batch.writes:
            self.batch.flush()
        engine = FusedEngine(self.param_dtype, negate=self.negate)
        return engine.map(fn, s, ins, [], n_sums)

    def mean_sq_last_dims(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The reference engine's means, for contiguous x of at least two dimensions: float32
        or float64, or bfloat16 over matrices of up to SMALL_BCAST elements (a conv kernel's
        3x3; larger bfloat16 matrices are read by :meth:`sq_stats_last_dims`'s pass)."""
        self._after_queued_writes((x,))
        small = x.dim() >= 2 and x.shape[-2] * x.shape[-1] <= SMALL_BCAST
        if (x.dtype not in (torch.float32, torch.float64)
                and not (x.dtype is torch.bfloat16 and small)) \
                or not x.is_contiguous() or x.dim() < 2:
            return ReferenceEngine(self.param_dtype).mean_sq_last_dims(x)
        n, m = x.shape[-2], x.shape[-1]
        lead = tuple(x.shape[:-2])
        rows = torch.empty(lead + (n, 1), dtype=self.dtype)
        cols = torch.empty(lead + (1, m), dtype=self.dtype)
        if not x.numel():
            return rows, cols
        if n * m > SMALL_BCAST:
            if self.batch is not None:
                self.batch.add_means(x, rows, cols)  # run at the next flush
            else:
                _sq_means({(x.dtype, rows.dtype): [(x, rows, cols)]})
            return rows, cols
        kernel = _sq_means_small_kernel(n, m, x.numel() >= SERIAL_BELOW,
                                        x.dtype is torch.bfloat16)
        args = (_numpy(x), rows.view(-1).numpy(), cols.view(-1).numpy(), x.numel() // (n * m))
        if _serialize_calls():
            with _lock:
                kernel(*args)
        else:
            kernel(*args)
        return rows, cols
