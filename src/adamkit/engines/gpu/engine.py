"""The Triton engine: :class:`TritonEngine` runs a rule's primitives (the contract in
:mod:`adamkit.engines.reference`) with kernels generated from the rule (:mod:`.codegen`),
and :func:`step` is ``Optimizer.step`` for ``backend="triton"``: every map of a pass is
queued, and the queue runs one launch per kernel for all tensors of the step."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from ...compiler import rule_outcomes
from ..plans import run_in_lockstep
from ..reference import ReferenceEngine, newton_schulz
from . import codegen

Tensor = torch.Tensor

KINDS = {torch.float32: "f32", torch.bfloat16: "b16", torch.float16: "f16"}
_M32 = 0xFFFFFFFF


def random32(i: int, seed: int) -> int:
    """:func:`adamkit.engines.cpu.numba_ops.random32` in Python (the same bits): the
    stochastic-rounding hash the host computes once per tensor and output."""
    x = (i * 0x9E3779B9 + seed) & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


@triton.jit
def _nonfinite_kernel(pa, ns, prog_t, prog_off, found, BLOCK: tl.constexpr,
                      DTYPE: tl.constexpr):
    """Sets ``found`` when any element of the tensors in the table is NaN or +-Inf."""
    pid = tl.program_id(0)
    t = tl.load(prog_t + pid).to(tl.int64)
    n = tl.load(ns + t)
    idx = tl.load(prog_off + pid) + tl.arange(0, BLOCK)
    a = tl.load(pa + t).to(tl.pointer_type(DTYPE))
    x = tl.load(a + idx, mask=idx < n, other=0).to(tl.float32)
    bad = tl.max(((x - x) != 0).to(tl.int32), 0)  # x - x is NaN exactly for NaN and Inf
    tl.atomic_max(found, bad)


_TL = {"f32": tl.float32, "b16": tl.bfloat16, "f16": tl.float16}


def _programs(sizes: Sequence[int], device) -> tuple[Tensor, Tensor]:
    """Each program's tensor index and first element, BLOCK elements per program."""
    counts = torch.tensor([-(-n // codegen.BLOCK) for n in sizes], dtype=torch.int64)
    prog_t = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    starts = torch.cumsum(counts, 0) - counts
    prog_off = (torch.arange(len(prog_t)) - starts[prog_t]) * codegen.BLOCK
    return prog_t.to(torch.int32).to(device), prog_off.to(device)


def mark_nonfinite(tensors: Sequence[Tensor], found: Tensor) -> None:
    """Set ``found`` (an int32 tensor of one element) where any tensor holds NaN or Inf, one
    launch per dtype, without a host synchronisation."""
    by_kind: dict = {}
    for t in tensors:
        if t.numel():
            by_kind.setdefault(KINDS[t.dtype], []).append(t)
    for kind, ts in by_kind.items():
        device = found.device
        pa = torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64).to(device)
        ns = torch.tensor([t.numel() for t in ts], dtype=torch.int64).to(device)
        prog_t, prog_off = _programs([t.numel() for t in ts], device)
        _nonfinite_kernel[(len(prog_t),)](pa, ns, prog_t, prog_off, found,
                                          BLOCK=codegen.BLOCK, DTYPE=_TL[kind])


class Pending:
    """The sums of a queued map, set when the queue runs (what a generator ``apply`` yields)."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class _Launch:
    """The queued maps that share one kernel: one row per tensor."""

    def __init__(self, spec):
        self.spec = spec
        self.rows = []


class KernelQueue:
    """Maps queued by :class:`TritonEngine`; :meth:`flush` runs them, one launch per kernel.
    ``found``: the found-non-finite flag the kernels read (``on_nonfinite="skip"``)."""

    def __init__(self, found: Tensor | None = None):
        self.found = found
        self.launches: dict = {}

    def add(self, spec, row) -> None:
        launch = self.launches.get(spec)
        if launch is None:
            launch = self.launches[spec] = _Launch(spec)
        launch.rows.append(row)

    def flush(self) -> None:
        launches, self.launches = self.launches, {}
        for launch in launches.values():
            _run(launch, self.found)


def _run(launch: _Launch, found: Tensor | None) -> None:
    fn, fields, kinds, stores, n_sums, n_results, outcomes, negated, sr = launch.spec
    rows = launch.rows
    device = rows[0]["device"]
    kernel = codegen.load_kernel(launch.spec, fn, fields, kinds, stores, n_sums, n_results,
                                 outcomes, negated)
    sizes = [r["n"] for r in rows]
    prog_t, prog_off = _programs(sizes, device)
    programs = len(prog_t)
    nf, ns_, nb = max(1, len(fields)), max(1, n_sums), max(1, len(stores))
    svs = torch.tensor([list(r["scalars"]) + [0.0] * (nf - len(fields)) for r in rows],
                       dtype=torch.float64).to(device)
    ns = torch.tensor(sizes, dtype=torch.int64).to(device)
    bh = torch.tensor([list(r["bits"]) + [0] * (nb - len(r["bits"])) for r in rows],
                      dtype=torch.int64).to(device)
    part = torch.zeros(programs * ns_, dtype=torch.float32, device=device)
    flag = found if found is not None else torch.zeros(1, dtype=torch.int32, device=device)
    operands = []
    for j, kind in enumerate(kinds):
        if kind in codegen.ARRAY_KINDS:
            operands.append(torch.tensor([r["addresses"][j] for r in rows],
                                         dtype=torch.int64).to(device))
        elif kind == "num":
            operands.append(torch.tensor([r["numbers"][j] for r in rows],
                                         dtype=torch.float64).to(device))
    kernel[(programs,)](svs, ns, prog_t, prog_off, bh, part, flag, *operands,
                        NF=nf, NS=ns_, NB=nb, SKIP=found is not None, SR=sr,
                        BLOCK=codegen.BLOCK, num_warps=codegen.NUM_WARPS,
                        enable_fp_fusion=False)  # no FMA contraction: torch's rounding
    if n_sums:
        totals = torch.zeros(len(rows), ns_, dtype=torch.float64, device=device)
        totals.index_add_(0, prog_t.long(), part.view(programs, ns_).double())
        values = totals.tolist()  # the rule's next pass needs them on the host
        for r, v in zip(rows, values):
            r["pending"].value = v[:n_sums]


def _scalar_value(v) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


class TritonEngine:
    """Executes a rule's primitives with generated Triton kernels.

    ``map`` over operands the kernels cover (float32, bfloat16 and float16 arrays of one
    size, contiguous, numbers) is queued on ``queue`` (run by its ``flush``: one launch per
    kernel for all tensors); its sums then come back as a :class:`Pending`, to be yielded.
    Other maps (broadcast operands: Adafactor's factored passes) and the other primitives run
    at once on the reference engine, after the queue is flushed.

    Args: ``dtype`` the parameter's dtype; ``negate`` the tensor read with its sign flipped
    (the gradient under ``maximize``); ``seed`` the step's seed (as the CPU engine's);
    ``stochastic_bf16`` stochastic rounding of bfloat16 results.
    """

    name = "triton"

    def __init__(self, dtype: torch.dtype, queue: KernelQueue, negate: Tensor | None = None,
                 seed: int = 0, stochastic_bf16: bool = False):
        self.param_dtype = dtype
        self.dtype = torch.float32
        self.queue = queue
        self.negate = negate
        self.seed = int(seed) & 0x3FFFFFFF
        self.stochastic_bf16 = stochastic_bf16
        self._reference = ReferenceEngine(dtype, seed if stochastic_bf16 else None)

    def _fallback(self, fn, s, ins, outs, n_sums):
        self.queue.flush()
        loaded = [-t if t is not None and t is self.negate else t for t in ins]
        return self._reference.map(fn, s, loaded, outs, n_sums)

    def map(self, fn: Callable, s, ins: Sequence, outs: Sequence, n_sums: int = 0):
        kinds, addresses, numbers, size, shape, device = [], [], [], None, None, None
        for t in ins:
            if t is None:
                kinds.append("none")
            elif isinstance(t, Tensor):
                kind = KINDS.get(t.dtype)
                if kind is None or not t.is_contiguous() or (shape is not None
                                                             and t.shape != shape):
                    return self._fallback(fn, s, ins, outs, n_sums)
                size, shape, device = t.numel(), t.shape, t.device
                kinds.append(kind)
            elif isinstance(t, (int, float)):
                kinds.append("num")
            else:
                return self._fallback(fn, s, ins, outs, n_sums)
            addresses.append(t.data_ptr() if isinstance(t, Tensor) else 0)
            numbers.append(float(t) if kinds[-1] == "num" else 0.0)
        if size is None:
            return self._fallback(fn, s, ins, outs, n_sums)
        stores = []
        for k, out in enumerate(outs):
            if out is None:
                continue
            j = next((j for j, t in enumerate(ins) if t is out), None)
            if j is None:
                return self._fallback(fn, s, ins, outs, n_sums)
            stores.append((k, j))
        if size == 0:
            return [0.0] * n_sums
        negated = tuple(j for j, t in enumerate(ins) if t is not None and t is self.negate)
        fields = tuple(type(s)._fields)
        outcomes = rule_outcomes(fn, s, self.dtype)
        sr = self.stochastic_bf16 and any(kinds[j] == "b16" for _, j in stores)
        spec = (fn, fields, tuple(kinds), tuple(stores), n_sums, len(outs) + n_sums, outcomes,
                negated, sr)
        pending = Pending() if n_sums else None
        bits = [random32(0, (self.seed + j * 0x3C6EF372) & _M32) for _, j in stores]
        self.queue.add(spec, {"n": size, "device": device, "addresses": addresses,
                              "numbers": numbers, "bits": bits, "pending": pending,
                              "scalars": [_scalar_value(v) for v in s]})
        return pending if n_sums else []

    # the other primitives: torch operations, in order with the queued maps
    def per_tensor(self, fn: Callable, t: Tensor, *args):
        self.queue.flush()
        return self._reference.per_tensor(fn, t, *args)

    def sq_stats_last_dims(self, fn: Callable, s, state: Tensor, x: Tensor, y: Tensor):
        self.queue.flush()
        return self._reference.sq_stats_last_dims(fn, s, state, x, y)

    def sums_where(self, where, fn: Callable, s, ins: Sequence, n_sums: int):
        if not where:
            return [0.0] * n_sums
        return self.map(fn, s, ins, [], n_sums)

    def orthogonalize(self, u: Tensor, coefficients, steps: int, eps: float) -> Tensor:
        """The contract's whole-matrix stage: torch's matmuls (cuBLAS) after the queued maps
        have run (see :func:`~adamkit.engines.reference.newton_schulz`); contiguous, so that
        the kernels can read it."""
        self.queue.flush()
        return newton_schulz(u, coefficients, steps, eps).contiguous()

    def mean_rows(self, x: Tensor) -> Tensor:
        self.queue.flush()
        return self._reference.mean_rows(x)

    def mean_sq_last_dims(self, x: Tensor):
        self.queue.flush()
        return self._reference.mean_sq_last_dims(x)


def _resolve(value):
    if isinstance(value, Pending):
        return value.value
    if isinstance(value, list):
        return [v.value if isinstance(v, Pending) else v for v in value]
    return value


class _RecordingQueue(KernelQueue):
    """A queue that records the kernels a step needs instead of running them (sums are 1)."""

    def __init__(self, skip: bool):
        super().__init__(None)
        self.skip = skip
        self.specs: list = []

    def flush(self) -> None:
        launches, self.launches = self.launches, {}
        for spec, launch in launches.items():
            if spec + (self.skip,) not in self.specs:
                self.specs.append(spec + (self.skip,))
            for row in launch.rows:
                if row["pending"] is not None:
                    row["pending"].value = [1.0] * spec[4]


def record_step(opt) -> list[tuple]:
    """The kernels (engine specs plus the skip flag) one step of ``opt`` launches, on any
    device and without running them; ``opt``'s state is restored afterwards."""
    import copy

    from . import _recording

    saved = copy.deepcopy(opt.state_dict())
    queue = _RecordingQueue(opt.on_nonfinite == "skip")
    with _recording(), torch.no_grad():
        try:
            step(opt, queue)
        finally:
            opt.load_state_dict(saved)
    return queue.specs


def step(opt, queue: KernelQueue | None = None) -> None:
    """``opt.step()`` on the Triton engine (see the package docstring); ``queue`` replaces
    the one the step would make (recording)."""
    from ... import storage
    from . import unsupported_reason

    recording = isinstance(queue, _RecordingQueue)
    if opt.on_nonfinite == "raise" and not recording and not opt._gradients_finite():
        return
    opt._steps_taken = getattr(opt, "_steps_taken", 0) + 1
    skip = opt.on_nonfinite == "skip"
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse and g.dtype in KINDS and g.is_contiguous()]
    if recording:
        skip = False
    if skip and len(dense) < len(grads):  # other tensors: decided on the host
        if not opt._gradients_finite():
            return
        skip = False
    found = None
    if skip and dense:
        found = torch.zeros(1, dtype=torch.int32, device=dense[0].device)
        mark_nonfinite(dense, found)
    queue = queue if queue is not None else KernelQueue(found)
    generator = inspect.isgeneratorfunction(type(opt).apply)
    pending = opt._pending_steps = []
    snapshots = []  # (state, copy) to restore if the step is skipped
    finishing = []  # 8-bit state kept as float copies: encoded back after the kernels
    programs = []
    try:
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                state = opt.state[p]
                if found is not None:
                    snapshots.append((state, {k: v.clone() if isinstance(v, Tensor) else v
                                              for k, v in state.items()}))
                if unsupported_reason(p) is not None or grad.is_sparse \
                        or grad.dtype != p.dtype or not grad.is_contiguous():
                    queue.flush()
                    opt._step_parameter(group, p, (gi, pi))  # the reference engine
                    continue
                opt._last_step = None
                s = opt.scalars(group, state)
                names = opt.state_slots(group, p)
                for name in names:
                    if name not in state:
                        state[name] = opt.new_slot(group, p, name)
                if p.numel() == 0:
                    continue
                slots = {name: state[name] for name in names}
                quantized = {k: v for k, v in slots.items()
                             if isinstance(v, storage.BlockQuantized)}
                slots.update({k: v.dequantize() for k, v in quantized.items()})
                seed = opt._seed(state, p, (gi, pi))
                engine = TritonEngine(p.dtype, queue,
                                      negate=grad if group["maximize"] else None, seed=seed,
                                      stochastic_bf16=opt.stochastic_rounding)
                program = opt.apply(engine, s, p, grad, slots)
                if generator and program is not None:
                    programs.append(program)
                for i, (k, q) in enumerate(quantized.items()):
                    finishing.append((q, slots[k],
                                      seed + i if opt.round_int8_stochastically else None))
        if programs:
            run_in_lockstep(programs, queue, _resolve)
        queue.flush()
        skipped = found is not None and bool(found.item())  # after every launch
        if skipped:
            for state, copy in snapshots:
                state.clear()
                state.update(copy)
            pending.clear()
            opt.skipped_steps += 1
            if not opt._warned_nonfinite:
                opt._warned_nonfinite = True
                warnings.warn(
                    f"{type(opt).__name__}: a gradient holds NaN or Inf; the step was skipped "
                    "(on_nonfinite='skip'). Further skips are counted in "
                    "optimizer.skipped_steps without warning.", RuntimeWarning, stacklevel=3)
        elif not recording:
            for q, values, seed in finishing:
                q.copy_(values, seed=seed)
    finally:
        opt._pending_steps = None
        if pending:
            torch._foreach_add_(pending, 1.0)
