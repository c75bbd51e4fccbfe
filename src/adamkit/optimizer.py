"""The torch.optim.Optimizer front end shared by every adamkit algorithm.

An algorithm subclasses :class:`Optimizer` and declares, in its own file:

* ``checks``: one validation function per hyperparameter (see :mod:`adamkit.validation`);
* ``slot_names``: the per-element state tensors its ``update`` takes, in argument order, with
  torch's names where torch has the algorithm; ``state_slots(group, p)`` says which of them a
  group uses (``max_exp_avg_sq`` only with ``amsgrad=True``, ...);
* ``scalars(group, state)``: advances the step counter and returns the per-step scalars
  (bias corrections, bounds, ...) as a named tuple of floats and bools;
* ``update(s, p, g, *slots)``: the per-element rule, written with arithmetic and
  :mod:`adamkit.engines.ops` only, returning the new ``(p, *slots)``;
* optionally ``scalars_from_step = True`` when ``scalars`` reads nothing of the state but the
  step count (a param group then computes them once per step on the fused fast path), with
  ``scalars_key``/``share_scalars`` where it also reads and updates per-parameter values
  (NAdam's ``mu_product``);
* optionally ``apply(engine, s, p, g, slots)`` when the rule needs per-tensor reductions
  (FAdam, Adafactor): a short program of ``engine.map`` passes, written as a generator that
  yields each map whose sums it needs (``(total,) = yield engine.map(..., n_sums=1)``) and
  yields before it reads a tensor an earlier map wrote. On the fused engine every tensor's
  program then advances in lockstep: each ``yield`` is a point where the step runs all tensors'
  pending maps with one launch per kernel (see :meth:`Optimizer._run_in_lockstep`); with
  ``vectorized_apply = True`` it is also run once for a whole param group on arrays (FAdam,
  Adafactor: see ``vectorized_apply``).

Everything else lives here, once: param groups and their validation, lazy state creation,
``maximize``, complex parameters (as real views, like torch), sparse gradients (the rule runs on
the gathered rows), non-finite gradient handling, state storage dtype and engine choice.
How the fused CPU engine repeats and batches steps (step plans, cohorts) is the engines'
business: :mod:`adamkit.engines.plans` and :mod:`adamkit.engines.cohort`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, ClassVar, Iterable

import torch

from . import distributed, storage, validation
from .engines import cpu as fused_cpu
from .engines import gpu as triton_gpu
from .engines.cohort import _GroupLockstepPlan
from .engines.plans import (_SEED_MASK, _SEED_STEP, _GroupPlan, _LockstepPlan, _Plan,
                            _run_to_end, _seed_base, _vectorizes, run_in_lockstep)
from .engines.reference import ReferenceEngine
from .storage import BlockQuantized

Tensor = torch.Tensor

BACKENDS = ("auto", "fused", "reference", "triton")
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
ON_NONFINITE = ("apply", "skip", "raise")
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


#: keys of torch.optim's param groups that select its implementation (adamkit's is ``backend``)
_TORCH_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def value(x):
    """A hyperparameter (``lr``, ...) as the rule's ``scalars`` use it: ``float(x)``, except that
    under ``torch.compile`` a tensor stays a 0-dim tensor (reading its value would be a graph
    break, and a changing tensor lr must not recompile; torch's compiled optimizers do the
    same). Eager steps are unchanged."""
    if isinstance(x, Tensor) and torch.compiler.is_compiling():
        return x.to(torch.float64)  # float(x) is exact in a Python float (a double)
    return float(x)


def _pending_value(value):
    """A sum the fused engine deferred to the step's batch, now known."""
    return value.value if isinstance(value, fused_cpu.Pending) else value


def scalar_dtype() -> torch.dtype:
    """dtype of the ``step`` counter tensor, as torch.optim chooses it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base class of every adamkit optimizer (a ``torch.optim.Optimizer``).

    Args common to all optimizers (keyword-only):
        backend: ``"auto"`` (the fastest engine that can run: the fused CPU engine for
            contiguous float32/float64/bfloat16 CPU tensors when numba is installed, the
            reference engine otherwise; the Triton engine for CUDA parameters when Triton is
            installed), ``"reference"`` (torch ops on whole tensors, any device),
            ``"fused"`` (a ``ValueError`` where it cannot run: without numba, or for CUDA,
            complex or non-contiguous parameters) or ``"triton"`` (generated Triton kernels,
            :mod:`adamkit.engines.gpu`: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``; a ``ValueError`` without Triton).
        state_dtype: ``None`` keeps state in the parameter's dtype (torch's behaviour);
            ``"float32"`` or ``"bfloat16"`` store it in that dtype (the rule still computes in
            float32, float64 for float64 parameters); ``"int8"`` keeps state of 4096 elements
            or more as 8-bit blockwise codes (:mod:`adamkit.storage`).
        on_nonfinite: what a step does when any gradient holds NaN or +-Inf: ``"apply"``
            (torch's behaviour: the step goes ahead), ``"skip"`` (nothing changes, not even step
            counts; ``skipped_steps`` goes up and a warning is issued once) or ``"raise"``
            (``FloatingPointError`` naming the group, parameter index and shape).
        stochastic_rounding: ``False`` (default) rounds the float32 result of a bfloat16
            parameter's update to the nearest bfloat16 (ties to even, as torch); ``True``
            rounds up with probability equal to the dropped fraction, so updates smaller than
            half a bfloat16 step still move the parameter on average. It applies to every
            bfloat16 value a step writes (the parameter and ``state_dtype="bfloat16"`` state)
            and has no effect on other dtypes. Random bits are a deterministic function of the
            step, the tensor and the element index (the two engines draw different bits).
    """

    # ---- declared by each algorithm -------------------------------------------------------
    checks: ClassVar[dict[str, validation.Check]] = {}
    slot_names: ClassVar[tuple[str, ...]] = ()
    supports_complex: ClassVar[bool] = False
    #: slots that are never negative (second moments, accumulators): 8-bit state uses the
    #: unsigned code map for them, the signed one for the others
    nonnegative_slots: ClassVar[tuple[str, ...]] = ()
    #: slots kept in float32 under ``state_dtype="int8"`` even where their shape is the
    #: parameter's (Adafactor's factors: a 1x1 conv kernel's are)
    unquantized_slots: ClassVar[tuple[str, ...]] = ()
    #: 8-bit state is stored with stochastic rounding (unbiased moving averages); set False on
    #: an instance to round to nearest (both engines then agree bit for bit)
    round_int8_stochastically: bool = True
    #: ``scalars(group, state)`` depends on nothing in ``state`` but the step count, which
    #: slots exist and ``scalars_key(state)``, and changes nothing in it but the step count
    #: (through ``advance_step``) and what ``share_scalars`` repeats: the tensors of a group
    #: with the same step count and key can then share one call (the fused engine's fast path
    #: for repeated steps, see _GroupPlan). A subclass that overrides ``scalars`` does not
    #: inherit it (it must say so again).
    scalars_from_step: ClassVar[bool] = False
    #: a generator ``apply`` that also runs once for a whole param group on the fused fast
    #: path (see _GroupLockstepPlan): ``p``, ``g`` and the slots then stand for all the
    #: group's tensors (only ``numel()``, an array of sizes, and ``dtype`` are available;
    #: ``engine.mean_sq_last_dims``, ``sq_stats_last_dims``, ``sums_where``, ``mean_rows`` and
    #: ``per_tensor`` work on them), the sums and
    #: ``per_tensor`` values arrive as NumPy arrays with one value per tensor, and the
    #: scalars it computes from them may be such arrays, so its arithmetic must be written
    #: with operators and ``ops``' ``sqrt``, ``minimum`` and ``maximum``, without branches
    #: on sums or sizes. Needs ``scalars_from_step``. A subclass that overrides ``apply``
    #: does not inherit it.
    vectorized_apply: ClassVar[bool] = False
    requires_sparse: ClassVar[bool] = False
    #: how the algorithm accepts sparse gradients, for error messages ("" = it does not)
    sparse_note: ClassVar[str] = ""
    #: sparse *parameters* (not only gradients) are updated by evaluating ``update`` with
    #: torch's sparse tensor arithmetic, as torch's own loop does (SGD); others reject them
    #: when the param group is added
    sparse_params: ClassVar[bool] = False
    #: how ``state["step"]`` is kept: ``"tensor"`` (a 0-dim tensor, as torch), ``"int"``
    #: (SparseAdam, as torch) or ``"none"`` (SGD keeps no step, and no state at all without
    #: momentum: no empty entry is left in ``self.state``, as torch)
    step_kind: ClassVar[str] = "tensor"
    #: param group flags that define the class (AdamW's ``decoupled_weight_decay=True``): they
    #: are the class's, whatever a loaded checkpoint says, as torch's AdamW does
    class_flags: ClassVar[dict[str, Any]] = {}

    def state_slots(self, group: dict, p: Tensor) -> tuple[str, ...]:
        """The slots this group keeps for ``p`` (default: all of ``slot_names``)."""
        return self.slot_names

    def scalars_key(self, state: dict):
        """What ``scalars`` reads from ``state`` besides the step count (see
        ``scalars_from_step``; default: nothing)."""
        return None

    def share_scalars(self, state: dict, first: dict) -> None:
        """Do to ``state`` what ``scalars`` did to ``first`` besides advancing its step count,
        for a tensor that shares ``first``'s scalars (same step count and ``scalars_key``;
        default: nothing)."""

    def slot_fill(self, group: dict, name: str) -> float:
        """Initial value of a slot (default 0)."""
        return 0.0

    def slot_storage(self, name: str) -> str | None:
        """The storage (``state_dtype``) of slot ``name``: the optimizer's, but float32 for
        ``unquantized_slots`` under int8."""
        if self.state_dtype == "int8" and name in self.unquantized_slots:
            return "float32"
        return self.state_dtype

    def new_slot(self, group: dict, p: Tensor, name: str) -> Tensor:
        """A fresh state tensor for slot ``name`` of ``p`` (default: shaped like ``p``)."""
        fill = self.slot_fill(group, name)
        if p.is_complex():
            return torch.full_like(p, complex(fill, fill), memory_format=torch.preserve_format)
        state_dtype = self.slot_storage(name)
        if state_dtype == "int8":
            return storage.make_state("int8", p, p.shape, fill,
                                      signed=name not in self.nonnegative_slots)
        dtype = _STORAGE.get(state_dtype, p.dtype)
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)

    def sparse_ok(self, group: dict) -> bool:
        """Whether this group can take sparse gradients."""
        return False

    def scalars(self, group: dict, state: dict):
        raise NotImplementedError

    @staticmethod
    def update(s, p, g, *slots):
        raise NotImplementedError

    def apply(self, engine, s, p: Tensor, g: Tensor, slots: dict[str, Tensor]) -> None:
        """Run the rule on one tensor: a single elementwise pass by default."""
        tensors = [slots.get(name) for name in self.slot_names]
        engine.map(self.update, s, [p, g, *tensors], [p, *tensors])

    def apply_now(self, engine, s, p: Tensor, g: Tensor, slots: dict[str, Tensor]) -> None:
        """``apply`` on one tensor, run to its end (a generator ``apply`` is driven through its
        yields) on an engine that executes maps at once: for callers outside ``step()``."""
        _run_to_end(self.apply(engine, s, p, g, slots))

    # ---- front end ----------------------------------------------------------------------
    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        validation.choice(*BACKENDS)("backend", backend)
        validation.flag("stochastic_rounding", stochastic_rounding)
        validation.choice(*STATE_DTYPES)("state_dtype", state_dtype)
        validation.choice(*ON_NONFINITE)("on_nonfinite", on_nonfinite)
        # hyperparameters are checked before ``params`` is read (as torch does): a bad value
        # is reported as such even when the parameters are bad too
        for name, check in self.checks.items():
            if name in defaults:
                check(name, defaults[name])
        self.validate_group(defaults)
        if backend == "fused" and not fused_cpu.available():
            raise ValueError(
                "backend='fused' needs numba, which could not be imported "
                f"({fused_cpu.unavailable_reason()}); numba is a dependency of adamkit: "
                "reinstall it (pip install numba) or use backend='auto'"
            )
        if backend == "triton":
            triton_gpu.check_backend()
        self.backend = backend
        self.state_dtype = state_dtype
        self.on_nonfinite = on_nonfinite
        self.stochastic_rounding = stochastic_rounding
        self.skipped_steps = 0
        self._warned_nonfinite = False
        #: the engines that have updated this optimizer's parameters ("fused", "reference")
        self.engines_used: set[str] = set()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(
            backend=self.backend,
            state_dtype=self.state_dtype,
            on_nonfinite=self.on_nonfinite,
            stochastic_rounding=self.stochastic_rounding,
            skipped_steps=self.skipped_steps,
        )
        return state

    def __setstate__(self, state: dict) -> None:
        # Called by load_state_dict with groups saved by another optimizer (torch.optim's or an
        # older adamkit's): fill in any hyperparameter the saved groups lack.
        state = dict(state)
        for attr, default in (("backend", "auto"), ("state_dtype", None),
                              ("on_nonfinite", "apply"), ("stochastic_rounding", False),
                              ("skipped_steps", 0)):
            if not hasattr(self, attr):
                setattr(self, attr, state.pop(attr, default))
            else:
                state.pop(attr, None)
        if not hasattr(self, "_warned_nonfinite"):
            self._warned_nonfinite = False
        if not hasattr(self, "engines_used"):
            self.engines_used = set()
        super().__setstate__(state)
        # torch.optim.Optimizer.__setstate__ adds ``differentiable`` to ``defaults``, and torch's
        # checkpoints carry its implementation switches in every group: adamkit has none of
        # them (the engine is ``backend``), so they are dropped. A loaded optimizer's
        # state_dict() then equals the one it was loaded from, and
        # ``type(opt)(params, **opt.defaults)`` builds a twin.
        for key in _TORCH_IMPLEMENTATION_KEYS:
            self.defaults.pop(key, None)
        for group in self.param_groups:
            for key in _TORCH_IMPLEMENTATION_KEYS:
                group.pop(key, None)
            for name, default in self.defaults.items():
                group.setdefault(name, default)
            group.update(self.class_flags)
            self.setup_group(group)
            if self.step_kind != "tensor":
                continue
            # older torch and many training frameworks save the step count as a plain number;
            # torch converts it on load, and so does adamkit
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=scalar_dtype())

    def setup_group(self, group: dict) -> None:
        """Hook for group keys derived at creation (AdaBound's ``base_lr``)."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for name, check in self.checks.items():
                check(name, group[name])
            self.validate_group(group)
            if not self.supports_complex:
                for i, p in enumerate(group["params"]):
                    if p.is_complex():
                        # a ValueError (a bad argument), and a RuntimeError for code written
                        # against torch, whose Adafactor raises one at step()
                        raise validation.UnsupportedParameterError(
                            f"{type(self).__name__} does not support complex parameters "
                            f"(parameter {i} of param group {len(self.param_groups) - 1} is "
                            f"{p.dtype}); pass torch.view_as_real(p) as a real parameter instead"
                        )
            for i, p in enumerate(group["params"]):
                if p.layout is not torch.strided and not self.sparse_params:
                    raise ValueError(
                        f"{type(self).__name__} requires dense parameter tensors (parameter {i} "
                        f"of param group {len(self.param_groups) - 1} has layout {p.layout})"
                        + ("; sparse gradients of dense parameters are what it takes"
                           if self.requires_sparse else "; optimizers that take sparse "
                           "parameters: SGD")
                    )
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(
                        f"Invalid parameter {i} of param group {len(self.param_groups) - 1}: "
                        f"dtype {p.dtype} (optimizers need floating-point or complex parameters)"
                    )
                if p.is_complex() and self.state_dtype is not None:
                    raise ValueError(
                        f"state_dtype={self.state_dtype!r} is not supported for complex "
                        "parameters; use state_dtype=None"
                    )
                if self.backend == "triton":
                    triton_gpu.check_param(p, f"parameter {i} of param group "
                                              f"{len(self.param_groups) - 1}")
                if self.backend == "fused":
                    reason = fused_cpu.unsupported_reason(p)
                    if reason is not None:
                        raise ValueError(
                            f"backend='fused' cannot update parameter {i} of param group "
                            f"{len(self.param_groups) - 1} (shape {tuple(p.shape)}): {reason}; "
                            "use backend='auto' to fall back to the reference engine"
                        )
        except Exception:
            self.param_groups.pop()  # an invalid group must leave the optimizer as it was
            raise
        self.setup_group(group)

    def validate_group(self, group: dict) -> None:
        """Checks that involve several hyperparameters (override where needed)."""

    # ---- stepping -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimisation step; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # everything that can be checked is checked before anything changes: a step that
        # raises has changed nothing, so a retry cannot apply an update twice
        self._check_step()
        if triton_gpu.chosen(self):  # one launch per kernel for the step (engines/gpu)
            triton_gpu.step(self)
            return loss
        if self.on_nonfinite != "apply" and not self._gradients_finite():
            return loss
        self._steps_taken = getattr(self, "_steps_taken", 0) + 1
        # Single-pass rules on the fused engine are collected and run at the end, one kernel
        # launch for all tensors that share a kernel (see fused_cpu.KernelBatch).
        # Multi-pass rules written as generators run their passes in lockstep across tensors.
        default_apply = type(self).apply is Optimizer.apply
        lockstep = inspect.isgeneratorfunction(type(self).apply)
        # DTensor (FSDP2) parameters step one by one on their local shards, without plans or
        # lockstep: adamkit.distributed.step_parameter (called by _step_parameter)
        sharded = distributed.has_dtensor(self.param_groups)
        batch = None
        if self.backend in ("fused", "auto") and (default_apply or lockstep) \
                and fused_cpu.available():
            batch = fused_cpu.KernelBatch()
        self._batch = batch
        self._lockstep = [] if batch is not None and lockstep and not sharded else None
        # A parameter whose tensors are where they were at its last step takes a fast path
        # that re-adds that step's map with new scalars (see _Plan); others take the full one.
        # A generator apply's plan (_LockstepPlan) re-runs the generator on an engine that
        # repeats its maps.
        plans = None if batch is None or not (default_apply or lockstep) or sharded \
            else self.__dict__.setdefault("_plans", {})
        plan_type = _Plan if default_apply else _LockstepPlan
        # ... and a whole param group whose tensors all do, one that repeats as a block (for
        # a generator apply: one vectorized run of the generator, see _GroupLockstepPlan)
        vectorized = lockstep and _vectorizes(type(self))
        group_plans = None if plans is None or not (default_apply or vectorized) \
            else self.__dict__.setdefault("_group_plans", {})
        unplanned = []  # groups that took the per-tensor path, to record after their maps ran
        # parameters' step counters, incremented together at the end (see advance_step)
        pending = self._pending_steps = []
        try:
            for gi, group in enumerate(self.param_groups):
                rest = None  # with a group plan taken: the tensors it leaves to this loop
                if group_plans is not None:
                    group_plan = group_plans.pop(gi, None)
                    if group_plan is not None and group_plan.repeat(self, group, batch):
                        group_plans[gi] = group_plan
                        rest = group_plan.rest
                        if not rest:
                            continue
                params = group["params"]
                for pi in range(len(params)) if rest is None else rest:
                    p = params[pi]
                    grad = p.grad
                    if grad is None:
                        continue
                    if plans is None:
                        self._step_parameter(group, p, (gi, pi))
                        continue
                    plan = plans.get(p)
                    if plan is not None and plan.repeat(self, group, p, grad, (gi, pi), batch):
                        continue
                    batch.last = None
                    self._calls = None
                    self._step_parameter(group, p, (gi, pi))
                    plans[p] = plan_type.record(
                        self, group, p, grad, batch.last if default_apply else self._calls)
                if rest is not None:  # the group plan stays
                    continue
                if group_plans is not None and default_apply:
                    group_plan = _GroupPlan.record(self, group, gi, plans)
                    if group_plan is not None:
                        group_plans[gi] = group_plan
                elif group_plans is not None:
                    unplanned.append(gi)
            if self._lockstep:
                self._run_in_lockstep(self._lockstep, batch)
            for gi in unplanned:  # their generators' maps are all recorded now
                group_plan = _GroupLockstepPlan.record(self, self.param_groups[gi], gi, plans)
                if group_plan is not None:
                    group_plans[gi] = group_plan
        finally:
            self._batch = self._pending_steps = self._lockstep = self._calls = None
            if pending:
                torch._foreach_add_(pending, 1.0)
            if batch is not None:
                batch.flush()
            if self.step_kind == "none":
                # a parameter that keeps nothing has no entry (torch's state_dict()["state"]
                # is {} for SGD without momentum); lookups through the defaultdict made some
                for p in [p for p, entry in self.state.items() if not entry]:
                    del self.state[p]
        return loss

    def _check_step(self) -> None:
        """Raise, before anything changes, for every problem ``step()`` would meet part-way:
        gradients the algorithm cannot take, a step count that is not a tensor, a tensor
        ``backend="fused"`` cannot update."""
        tensor_step = self.step_kind == "tensor"
        fused = self.backend == "fused"
        for gi, group in enumerate(self.param_groups):
            sparse_ok = None
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    if sparse_ok is None:
                        sparse_ok = self.sparse_ok(group)
                    # a sparse parameter (sparse_params) takes any setting, as in torch
                    if not sparse_ok and p.layout is torch.strided:
                        raise RuntimeError(self._sparse_error(group))
                elif self.requires_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support dense gradients, please "
                        "consider Adam instead"
                    )
                state = self.state.get(p)
                if state and tensor_step and not isinstance(state.get("step", p), Tensor):
                    raise TypeError(
                        f"state['step'] of parameter {pi} of param group {gi} is "
                        f"{state['step']!r}, not a tensor; nothing was updated. Set it to "
                        f"torch.tensor({float(state['step'])!r}) (load_state_dict converts "
                        "numbers itself)"
                    )
                if fused and not p.is_sparse:
                    slots = {} if not state else {
                        k: v for k, v in state.items() if isinstance(v, Tensor) and k != "step"}
                    blocker = self._fused_blocker(p, grad, slots)
                    if blocker is not None:
                        raise ValueError(
                            f"backend='fused' cannot update parameter {pi} of param group "
                            f"{gi} (shape {tuple(p.shape)}): {blocker}; nothing was updated. "
                            "Use backend='auto' to fall back to the reference engine"
                        )

    @staticmethod
    def _run_in_lockstep(programs: list, batch) -> None:
        """Advance every tensor's generator ``apply`` in lockstep: one launch per kernel at
        each ``yield`` (:func:`adamkit.engines.plans.run_in_lockstep`)."""
        run_in_lockstep(programs, batch, _pending_value)

    def _gradients_finite(self) -> bool:
        flags = []
        fast = self.backend != "reference" and fused_cpu.available()
        batched = []  # read by one multithreaded pass (torch.isfinite would allocate masks)
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                g = distributed.local(g)  # a DTensor's shard (never read by the kernels whole)
                if g.is_sparse:
                    g = g._values()
                if fast and fused_cpu.unsupported_reason(g) is None:
                    batched.append(g)
                else:
                    flags.append(torch.isfinite(g).all())
        finite = not batched or not fused_cpu.any_nonfinite(batched)
        # every rank of a DTensor parameter's mesh skips, or none does
        finite = distributed.all_finite(self.param_groups, finite and (
            not flags or bool(torch.stack(flags).all())))
        if finite and (not flags or bool(torch.stack(flags).all())):
            return True
        if self.on_nonfinite == "raise":
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    g = p.grad._values() if p.grad.is_sparse else p.grad
                    if not bool(torch.isfinite(g).all()):
                        raise FloatingPointError(
                            f"Non-finite gradient (NaN or Inf) for parameter {pi} of param "
                            f"group {gi} (shape {tuple(p.shape)}); nothing was updated. Use "
                            "on_nonfinite='skip' to skip such steps instead."
                        )
        self.skipped_steps += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: a gradient holds NaN or Inf; the step was skipped "
                "(on_nonfinite='skip'). Further skips are counted in optimizer.skipped_steps "
                "without warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _engine(self, p: Tensor):
        return ReferenceEngine(p.dtype)

    def _fused_blocker(self, p: Tensor, grad: Tensor, slots: dict) -> str | None:
        """Why this step of ``p`` cannot run on the fused engine (None: it can)."""
        if not fused_cpu.available():
            return "numba is not installed"
        reason = fused_cpu.unsupported_reason(p)
        if reason is not None:
            return f"the parameter: {reason}"
        if grad.is_sparse:
            if grad.dtype != p.dtype:
                return f"its gradient's dtype is {grad.dtype}"
        else:
            reason = fused_cpu.unsupported_reason(grad)
            if reason is not None:
                return f"its gradient: {reason}"
            if grad.dtype != p.dtype or grad.shape != p.shape:
                return f"its gradient is {grad.dtype} {tuple(grad.shape)}"
        for name, value in slots.items():
            if isinstance(value, Tensor):
                reason = fused_cpu.unsupported_reason(value)
                if reason is not None:
                    return f"its state {name!r}: {reason}"
        return None

    def _step_parameter(self, group: dict, p: Tensor, where: tuple[int, int] = (0, 0)) -> None:
        if distributed.is_dtensor(p):  # FSDP2: the rule runs on local shards (never a DTensor)
            return distributed.step_parameter(self, group, p, where)
        grad = p.grad  # what it can take was checked by _check_step
        state = self.state.get(p)
        if state is None:
            state = {}
        self._last_step = None
        if p.layout is not torch.strided:
            self._step_sparse_parameter(group, p, grad, state)
            if state:
                self.state[p] = state
            return
        s = self.scalars(group, state)
        names = self.state_slots(group, p)
        if names or state:
            self.state[p] = state
        for name in names:
            if name not in state:
                state[name] = self.new_slot(group, p, name)
        if p.numel() == 0:
            return
        slots = {name: state[name] for name in names}
        fused = False
        lockstep = None
        if self.backend in ("fused", "auto"):
            blocker = self._fused_blocker(p, grad, slots)
            if blocker is not None and self.backend == "fused":
                raise ValueError(
                    f"backend='fused' cannot update parameter {where[1]} of param group "
                    f"{where[0]} (shape {tuple(p.shape)}): {blocker}; use backend='auto' to "
                    "fall back to the reference engine"
                )
            fused = blocker is None
        # steps a plan repeats later run on the engine that ran when it was recorded
        self.engines_used.add("fused" if fused else "reference")
        # 8-bit state is decoded and encoded inside the fused pass; every other path works on
        # float32 copies that are encoded back afterwards.
        quantized = {}
        if self.state_dtype == "int8":
            quantized = {k: v for k, v in slots.items() if isinstance(v, BlockQuantized)}
        if quantized and (not fused or grad.is_sparse):
            slots.update({k: v.dequantize() for k, v in quantized.items()})
        else:
            quantized = {}
        # seeds stochastic rounding of 8-bit state: deterministic, different every step
        # and of bfloat16 values (stochastic_rounding); optimizers without a step count (SGD)
        # use the number of step() calls
        # under torch.compile the seed is computed only where it is used (it reads the step
        # count's value: a graph break); the reference engine without stochastic rounding
        # and without 8-bit state never reads it
        seed = 0 if (torch.compiler.is_compiling() and not fused and not quantized
                     and not self.stochastic_rounding) else self._seed(state, p, where)
        if group["maximize"] and (grad.is_sparse or not fused):
            grad = -grad
        if fused:
            # maximize costs no extra pass: the kernel reads the gradient with its sign flipped
            lockstep = None if grad.is_sparse else getattr(self, "_lockstep", None)
            # what a _LockstepPlan needs to repeat this step's maps (see FusedEngine)
            calls = [] if lockstep is not None and not p.is_complex() else None
            engine = fused_cpu.FusedEngine(
                p.dtype, negate=grad if group["maximize"] and not grad.is_sparse else None,
                seed=seed, stochastic_int8=self.round_int8_stochastically,
                stochastic_bf16=self.stochastic_rounding,
                # sparse steps run on gathered copies that are scattered back right away
                batch=None if grad.is_sparse else getattr(self, "_batch", None),
                batch_sums=lockstep is not None, calls=calls,
                trusted=(p, grad, *slots.values()) if calls is not None else ())
        else:
            # complex parameters run as real views: the engine computes in their real dtype
            engine = self._engine(torch.view_as_real(p) if p.is_complex() else p)
            if self.stochastic_rounding:
                engine.stochastic_seed = seed
        if grad.is_sparse:
            self._apply_sparse(engine, s, p, grad, slots)
            program = None
        elif p.is_complex():
            p = torch.view_as_real(p)
            grad = torch.view_as_real(grad)
            slots = {k: torch.view_as_real(v) if v.is_complex() else v for k, v in slots.items()}
            program = self.apply(engine, s, p, grad, slots)
        else:
            program = self.apply(engine, s, p, grad, slots)
        if program is not None and lockstep is not None:  # a generator apply, batched
            lockstep.append(program)  # step() runs it alongside the other tensors
            self._calls = engine.calls
            return
        _run_to_end(program)
        for i, (k, q) in enumerate(quantized.items()):
            q.copy_(slots[k], seed=seed + i if self.round_int8_stochastically else None)

    def _step_sparse_parameter(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        # A sparse parameter (``sparse_params``): the algorithm's torch-op statement of its rule
        # for sparse tensors, which follows torch's own loop op for op (sparse sums of
        # uncoalesced tensors round as torch's kernels do only when the same ops run)
        if group["maximize"]:
            grad = -grad
        self.engines_used.add("reference")
        self.step_sparse_parameter(group, p, grad, state)

    def step_sparse_parameter(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        """Update a sparse parameter in place with torch's sparse ops (``sparse_params``
        algorithms only); ``grad`` is already negated for ``maximize``."""
        raise NotImplementedError

    def _seed(self, state: dict, p: Tensor, where: tuple[int, int]) -> int:
        if self._last_step is not None:  # the count advance_step returned for this step
            count = int(self._last_step)
        else:
            count = int(float(state["step"])) if "step" in state else self._steps_taken
        return (count * _SEED_STEP + _seed_base(p.numel(), where)) & _SEED_MASK

    def _apply_sparse(self, engine, s, p: Tensor, grad: Tensor, slots: dict[str, Tensor]) -> None:
        # The rule runs on the rows the gradient touches; other rows and their state are left
        # alone (lazy update). Duplicate indices are summed by coalesce().
        grad = grad.coalesce()
        indices, values = grad._indices(), grad._values()
        if values.numel() == 0:
            return
        sparse_shape = grad.shape[: grad.sparse_dim()]
        rows = torch.zeros(indices.shape[1], dtype=torch.long, device=indices.device)
        for d, size in enumerate(sparse_shape):
            rows = rows * size + indices[d]
        dense_shape = tuple(grad.shape[grad.sparse_dim():])
        targets = {"p": p, **slots}
        flat = {k: v.reshape(-1, *dense_shape) for k, v in targets.items()}
        gathered = {k: v.index_select(0, rows) for k, v in flat.items()}
        self.apply_now(engine, s, gathered["p"], values,
                       {k: v for k, v in gathered.items() if k != "p"})
        for k, v in flat.items():
            v.index_copy_(0, rows, gathered[k])
            if v.data_ptr() != targets[k].data_ptr() or not targets[k].is_contiguous():
                targets[k].copy_(v.view_as(targets[k]))

    def _sparse_error(self, group: dict) -> str:
        from .registry import OPTIMIZERS  # late import: the registry imports every algorithm

        capable = [cls.sparse_note for cls in OPTIMIZERS.values() if cls.sparse_note]
        return (
            f"{type(self).__name__} does not support sparse gradients with these settings; "
            f"optimizers that do: {', '.join(capable)}"
        )

    def state_dict(self) -> dict:
        # every value a tensor or a number: 8-bit state as codes and scales (adamkit.distributed)
        return distributed.pack_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        scales = distributed.take_scales(self, state_dict)  # 8-bit scales, kept float32
        super().load_state_dict(state_dict)
        distributed.restore_scales(self, scales)
        self.__dict__.pop("_plans", None)  # they hold the replaced state tensors
        self.__dict__.pop("_group_plans", None)
        # torch casts loaded floating state to the parameter's dtype and keeps other values as
        # they are; convert every slot to this optimizer's storage (8-bit codes <-> floats).
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if distributed.is_dtensor(p):  # shard by shard (adamkit.distributed)
                    distributed.convert_state(self, group, p, state)
                    continue
                for name in self.state_slots(group, p):
                    if name in state:
                        state[name] = storage.convert(
                            state[name], self.slot_storage(name), p,
                            signed=name not in self.nonnegative_slots)

    # ---- helpers for algorithms ---------------------------------------------------------
    def advance_step(self, state: dict) -> float:
        """Count one more step for a parameter and return the new count.

        ``state["step"]`` is a 0-dim tensor, as in torch. Inside ``step()`` the counters of all
        parameters are incremented together at the end (one foreach call instead of a tensor
        op per parameter); elsewhere at once."""
        step = state.get("step")
        if step is None:
            step = state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        if torch.compiler.is_compiling():
            # torch.compile: the count stays a 0-dim tensor (float(step) is a graph break), in
            # float64 so that scalars computed from it (beta**t, ...) round as the eager
            # path's Python floats do
            t = step.to(torch.float64) + 1.0
        else:
            t = float(step) + 1.0
        pending = getattr(self, "_pending_steps", None)
        if pending is None:
            step += 1
        else:
            pending.append(step)
        self._last_step = t
        return t
