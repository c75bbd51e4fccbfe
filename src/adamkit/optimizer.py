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
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, ClassVar, Iterable

import torch

from . import storage, validation
from .engines import fused_cpu
from .engines.reference import ReferenceEngine
from .storage import BlockQuantized

Tensor = torch.Tensor

BACKENDS = ("auto", "fused", "reference")
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
ON_NONFINITE = ("apply", "skip", "raise")
_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


#: keys of torch.optim's param groups that select its implementation (adamkit's is ``backend``)
_TORCH_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def scalar_dtype() -> torch.dtype:
    """dtype of the ``step`` counter tensor, as torch.optim chooses it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(torch.optim.Optimizer):
    """Base class of every adamkit optimizer (a ``torch.optim.Optimizer``).

    Args common to all optimizers (keyword-only):
        backend: ``"auto"`` (the fastest engine that can run: the fused CPU engine for
            contiguous float32/float64/bfloat16 CPU tensors when numba is installed, the
            reference engine otherwise), ``"reference"`` (torch ops on whole tensors, any
            device) or ``"fused"`` (a ``ValueError`` where it cannot run: without numba, or for
            CUDA, complex or non-contiguous parameters).
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
        if self.on_nonfinite != "apply" and not self._gradients_finite():
            return loss
        self._steps_taken = getattr(self, "_steps_taken", 0) + 1
        # Single-pass rules on the fused engine are collected and run at the end, one kernel
        # launch for all tensors that share a kernel (see fused_cpu.KernelBatch).
        # Multi-pass rules written as generators run their passes in lockstep across tensors.
        default_apply = type(self).apply is Optimizer.apply
        lockstep = inspect.isgeneratorfunction(type(self).apply)
        batch = None
        if self.backend in ("fused", "auto") and (default_apply or lockstep) \
                and fused_cpu.available():
            batch = fused_cpu.KernelBatch()
        self._batch = batch
        self._lockstep = [] if batch is not None and lockstep else None
        # A parameter whose tensors are where they were at its last step takes a fast path
        # that re-adds that step's map with new scalars (see _Plan); others take the full one.
        # A generator apply's plan (_LockstepPlan) re-runs the generator on an engine that
        # repeats its maps.
        plans = None if batch is None or not (default_apply or lockstep) \
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
        """Advance every tensor's generator ``apply`` to its next ``yield``, run the maps they
        deferred (one launch per kernel), send each its sums, and repeat until all are done."""
        values = [None] * len(programs)
        active = list(range(len(programs)))
        while active:
            waiting = []
            for i in active:
                try:
                    values[i] = programs[i].send(values[i])
                    waiting.append(i)
                except StopIteration:
                    pass
            batch.flush()
            for i in waiting:
                if isinstance(values[i], fused_cpu.Pending):
                    values[i] = values[i].value
            active = waiting

    def _gradients_finite(self) -> bool:
        flags = []
        fast = self.backend != "reference" and fused_cpu.available()
        batched = []  # read by one multithreaded pass (torch.isfinite would allocate masks)
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    g = g._values()
                if fast and fused_cpu.unsupported_reason(g) is None:
                    batched.append(g)
                else:
                    flags.append(torch.isfinite(g).all())
        finite = not batched or not fused_cpu.any_nonfinite(batched)
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
        seed = self._seed(state, p, where)
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

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.__dict__.pop("_plans", None)  # they hold the replaced state tensors
        self.__dict__.pop("_group_plans", None)
        # torch casts loaded floating state to the parameter's dtype and keeps other values as
        # they are; convert every slot to this optimizer's storage (8-bit codes <-> floats).
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
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
        t = float(step) + 1.0
        pending = getattr(self, "_pending_steps", None)
        if pending is None:
            step += 1
        else:
            pending.append(step)
        self._last_step = t
        return t


def _run_to_end(program) -> None:
    """Run a generator ``apply`` on an engine that executes its maps at once."""
    if program is None:  # a plain apply has run already
        return
    value = None
    try:
        while True:
            value = program.send(value)
    except StopIteration:
        pass


def _addresses(value) -> tuple[int, ...]:
    if isinstance(value, BlockQuantized):
        return (value.codes.data_ptr(), value.absmax.data_ptr())
    return (value.data_ptr(),)


class _Plan:
    """A parameter's last fused, batched step, kept to repeat it cheaply (small models have
    hundreds of tensors, and the full path cost ~16 us of Python for each).

    :meth:`record` keeps the map that the full path added to the step's KernelBatch, with what
    it depended on: the parameter's address, dtype and shape, its state objects and their
    addresses, ``maximize`` and the optimizer's storage settings. :meth:`repeat` checks all of
    that and the new gradient (dense, CPU, contiguous, the parameter's dtype and shape), then
    runs the rule's ``scalars`` (step counts advance as usual) and adds the same map with the
    new scalars, seed and gradient address. Any difference sends the parameter down the full
    path, which records a new plan.
    """

    __slots__ = ("address", "dtype", "shape", "names", "slots", "checks", "maximize",
                 "settings", "last")

    @classmethod
    def record(cls, opt: Optimizer, group: dict, p: Tensor, grad: Tensor, last) -> "_Plan | None":
        if last is None or p.is_complex() or grad.is_sparse:
            return None
        spec, n, operands = last
        if operands[0][0] != p.data_ptr() or operands[1][0] != grad.data_ptr():
            return None  # not the default apply's map of (p, grad, *slots)
        return cls._new(opt, group, p, last)

    @classmethod
    def _new(cls, opt: Optimizer, group: dict, p: Tensor, last) -> "_Plan":
        plan = cls()
        plan.address = p.data_ptr()
        plan.dtype = p.dtype
        plan.shape = p.shape
        plan.names = opt.state_slots(group, p)
        state = opt.state[p]
        plan.slots = tuple(state[name] for name in plan.names)
        # per slot: (name, object, quantized, address, second address)
        plan.checks = tuple((name, v, isinstance(v, BlockQuantized), *_addresses(v), 0)[:5]
                            for name, v in zip(plan.names, plan.slots))
        plan.maximize = group["maximize"]
        plan.settings = (opt.state_dtype, opt.stochastic_rounding, opt.round_int8_stochastically)
        plan.last = last
        return plan

    def same_settings(self, opt: Optimizer, group: dict) -> bool:
        return group["maximize"] == self.maximize and self.settings == (
            opt.state_dtype, opt.stochastic_rounding, opt.round_int8_stochastically)

    def unchanged_state(self, opt: Optimizer, group: dict, p: Tensor, grad: Tensor):
        """``p``'s state dict if nothing this plan depends on changed (None otherwise), given
        :meth:`same_settings`. This runs for every tensor and step: identity tests where
        they suffice (dtypes are singletons)."""
        dtype, shape = self.dtype, self.shape
        if (grad.layout is not torch.strided or not grad.is_cpu or grad.dtype is not dtype
                or grad.shape != shape or not grad.is_contiguous()
                or p.data_ptr() != self.address or p.dtype is not dtype or p.shape != shape
                or not p.is_contiguous()):
            return None
        state = opt.state[p]
        if opt.state_slots(group, p) != self.names:
            return None
        for name, value, quantized, address, second in self.checks:
            if state.get(name) is not value:
                return None
            if quantized:
                if value.codes.data_ptr() != address or value.absmax.data_ptr() != second:
                    return None
            elif value.data_ptr() != address:
                return None
        return state

    def repeat(self, opt: Optimizer, group: dict, p: Tensor, grad: Tensor,
               where: tuple[int, int], batch) -> bool:
        """Add this step of ``p`` to ``batch`` if nothing changed; False (and no effect) if
        something did."""
        state = self.unchanged_state(opt, group, p, grad) if self.same_settings(opt, group) \
            else None
        if state is None:
            return False
        opt._last_step = None
        s = opt.scalars(group, state)
        self._add(opt, s, p, grad, opt._seed(state, p, where), batch)
        return True

    def _add(self, opt: Optimizer, s, p: Tensor, grad: Tensor, seed: int, batch) -> None:
        batch.repeat(self.last, s, seed, grad.data_ptr(), (p, grad, *self.slots))


class _LockstepPlan(_Plan):
    """A parameter's last fused step with a generator ``apply`` (FAdam, Adafactor), kept to
    repeat it cheaply: :meth:`repeat` checks what :class:`_Plan` checks, then runs the rule's
    ``scalars`` and a new generator on an engine given the maps it queued last step
    (``FusedEngine(calls=...)``), which re-queues each map that still fits without the
    per-operand checks and kernel lookup. (The generator itself still runs: its scalars
    depend on the sums of the passes before.) ``last`` is that list of maps."""

    __slots__ = ()

    @classmethod
    def record(cls, opt: Optimizer, group: dict, p: Tensor, grad: Tensor,
               calls) -> "_LockstepPlan | None":
        if calls is None or p.is_complex() or grad.is_sparse:
            return None
        return cls._new(opt, group, p, calls)

    def _add(self, opt: Optimizer, s, p: Tensor, grad: Tensor, seed: int, batch) -> None:
        engine = fused_cpu.FusedEngine(
            p.dtype, negate=grad if self.maximize else None, seed=seed,
            stochastic_int8=opt.round_int8_stochastically,
            stochastic_bf16=opt.stochastic_rounding, batch=batch, batch_sums=True,
            calls=self.last, trusted=(p, grad, *self.slots))
        program = opt.apply(engine, s, p, grad, dict(zip(self.names, self.slots)))
        if program is not None:
            opt._lockstep.append(program)


_U64 = (1 << 64) - 1
# stochastic-rounding seeds: (count * _SEED_STEP + _seed_base(numel, (group, index))) masked,
# a different stream per step, tensor size and position (Optimizer._seed, _GroupPlan)
_SEED_STEP = 0x9E3779B1
_SEED_MASK = 0x3FFFFFFF


def _seed_base(numel: int, where: tuple[int, int]) -> int:
    return numel + (where[0] * 7919 + where[1]) * 0x632BE5AB


@functools.lru_cache(maxsize=None)
def _vectorizes(cls: type) -> bool:
    """``cls.vectorized_apply`` (with ``scalars_from_step``), unless ``apply`` is overridden
    below the class that set it."""
    flag = next(k for k in cls.__mro__ if "vectorized_apply" in vars(k))
    rule = next(k for k in cls.__mro__ if "apply" in vars(k))
    return bool(cls.vectorized_apply) and issubclass(flag, rule) and _shares_scalars(cls)


@functools.lru_cache(maxsize=None)
def _shares_scalars(cls: type) -> bool:
    """``cls.scalars_from_step``, unless ``scalars`` is overridden below the class that set it
    (a subclass whose scalars read more of the state must not inherit the promise)."""
    flag = next(k for k in cls.__mro__ if "scalars_from_step" in vars(k))
    rule = next(k for k in cls.__mro__ if "scalars" in vars(k))
    return bool(cls.scalars_from_step) and issubclass(flag, rule)


class _Part:
    """The tensors of a :class:`_GroupPlan` that share a kernel, as the arrays a
    :class:`~adamkit.engines.fused_cpu.KernelBatch` block needs."""

    __slots__ = ("spec_base", "fn", "dtype", "positions", "ns", "seed_bases", "columns",
                 "grad_column", "writes")


def _plans_by(params: list, plans: dict, key: Callable) -> tuple[list, list, dict]:
    """A group's parameters sorted for a group plan: per parameter its entry (its plan, None
    without a gradient, ``_REST`` where it has no plan or ``key(plan)`` is None), the indices
    of those ``_REST`` ones, and the others grouped by ``key(plan)`` as (position among the
    parameters with gradients, index, parameter, plan)."""
    entries, rest, grouped = [], [], {}
    position = 0
    for pi, p in enumerate(params):
        if p.grad is None:
            entries.append(None)
            continue
        plan = plans.get(p)
        k = None if plan is None else key(plan)
        if k is None:
            entries.append(_REST)
            rest.append(pi)
            continue
        grouped.setdefault(k, []).append((position, pi, p, plan))
        entries.append(plan)
        position += 1
    return entries, rest, grouped


class _GroupPlan:
    """A param group's last step, when every tensor in it with a gradient took the fused fast
    path (:class:`_Plan`) and the optimizer's ``scalars`` depend on nothing but the group,
    the step count and which slots exist (``Optimizer.scalars_from_step``).

    :meth:`repeat` still runs every tensor's :meth:`_Plan.unchanged_state` check, but calls
    ``scalars`` once per distinct step count (and ``scalars_key``) instead of once per
    tensor, and adds the group's
    maps to the batch as one block of ready-made arrays per kernel (new gradient addresses,
    scalars and seeds filled in with array operations) instead of one entry per tensor. A
    small model's step is mostly this per-tensor Python time. Anything it does not cover
    (a gradient appearing or disappearing, a changed tensor, a replaced group) returns False
    before any effect, and the group takes the per-tensor path, which records a new plan.
    """

    __slots__ = ("group", "params", "plans", "parts", "rest")

    @classmethod
    def record(cls, opt: Optimizer, group: dict, gi: int, plans: dict) -> "_GroupPlan | None":
        import numpy as np

        if not _shares_scalars(type(opt)):
            return None
        params = list(group["params"])
        entries, rest, by_spec = _plans_by(params, plans, lambda plan: plan.last[0][:-1])
        if rest or not by_spec:
            return None
        self = cls._new(group, params, entries, rest)
        for spec_base, members in by_spec.items():
            part = _Part()
            part.spec_base = spec_base
            part.fn, kinds, stores, part.dtype = spec_base[0], spec_base[1], spec_base[2], \
                spec_base[4]
            part.positions = [m[0] for m in members]
            part.ns = np.array([m[3].last[1] for m in members], dtype=np.int64)
            part.seed_bases = np.array(
                [_seed_base(p.numel(), (gi, pi)) & _U64 for _, pi, p, _ in members],
                dtype=np.uint64)
            # the operand tables in kernel argument order; operand 1 is the gradient
            part.columns = fused_cpu.operand_columns(kinds, [m[3].last[2] for m in members])
            part.grad_column = fused_cpu.operand_column(kinds, 1)
            part.writes = [m[3].last[2][j][0] for m in members for _, j in stores]
            self.parts.append(part)
        return self

    @classmethod
    def _new(cls, group: dict, params: list, entries: list, rest: list):
        self = cls()
        self.group = group
        self.params = params
        self.plans = entries
        self.rest = tuple(rest)
        self.parts = []
        return self

    def _checked(self, opt: Optimizer, group: dict):
        """(states, gradients) of the group's tensors with gradients if nothing this plan
        depends on changed; None (and no effect) if something did."""
        params = group["params"]
        if group is not self.group or len(params) != len(self.params):
            return None
        checked = set()  # settings of maximize and storage, once per distinct value
        states, grads = [], []
        for p, q, plan in zip(params, self.params, self.plans):
            g = p.grad
            if p is not q:
                return None
            if plan is None:
                if g is not None:
                    return None
                continue
            if plan is _REST:  # left to the per-tensor path
                continue
            if g is None:
                return None
            if (plan.maximize, plan.settings) not in checked:
                if not plan.same_settings(opt, group):
                    return None
                checked.add((plan.maximize, plan.settings))
            state = plan.unchanged_state(opt, group, p, g)
            if state is None:
                return None
            states.append(state)
            grads.append(g)
        return states, grads

    @staticmethod
    def _scalars(opt: Optimizer, group: dict, states: list):
        """The step's scalars (advancing every tensor's step count): ``found`` maps each
        distinct (step count, scalars_key) to (index, scalars, count, counted, first state);
        ``which`` gives each tensor's index."""
        # the scalars, once per distinct step count and scalars_key (the tensors of a group
        # usually share one)
        pending = opt._pending_steps
        found: dict = {}
        which = []  # per tensor, its index in ``found``
        for state in states:
            step = state.get("step")
            count = None if step is None else float(step)
            key = (count, opt.scalars_key(state))
            entry = found.get(key)
            if entry is None:
                opt._last_step = None
                s = opt.scalars(group, state)
                advanced = opt._last_step  # None: this rule keeps no step count
                count = int(advanced) if advanced is not None else (
                    opt._steps_taken if step is None else int(count))
                entry = found[key] = (len(found), s, count, advanced is not None, state)
            else:  # what scalars() did for the first one, for this one
                if entry[3]:
                    if step is None:
                        opt.advance_step(state)
                    else:
                        pending.append(step)
                opt.share_scalars(state, entry[4])
            which.append(entry[0])
        return found, which

    def _prepare(self, opt: Optimizer, group: dict):
        """The checks, then the scalars (advancing step counts): (gradients, gradient
        addresses, per tensor subset of one step count) or None (and no effect) if something
        changed. The subsets: ``subsets(positions)`` yields ``(scalars, count, select)`` per
        distinct step count among those tensors (``select`` a mask, None for all)."""
        import numpy as np

        checked = self._checked(opt, group)
        if checked is None:
            return None
        states, grads = checked
        found, which = self._scalars(opt, group, states)

        def subsets(chosen):
            for index, s, count, _, _ in found.values():
                select = None
                if len(found) > 1:
                    select = np.array([which[i] == index for i in chosen])
                    if not select.any():
                        continue
                yield s, count, select

        return grads, np.array([g.data_ptr() for g in grads], dtype=np.uint64), subsets

    def repeat(self, opt: Optimizer, group: dict, batch) -> bool:
        """Add this step of the group's tensors to ``batch`` if nothing changed; False (and
        no effect) if something did."""
        prepared = self._prepare(opt, group)
        if prepared is None:
            return False
        grads, addresses, subsets = prepared
        for part in self.parts:
            chosen = part.positions
            for s, count, select in subsets(chosen):
                k = len(chosen) if select is None else int(select.sum())
                spec = part.spec_base + (fused_cpu.rule_outcomes(part.fn, s, part.dtype),)
                svs = _scalar_rows(s, k)
                seeds = _seeds(part.seed_bases, count)
                columns = list(part.columns)
                if part.grad_column is not None:
                    columns[part.grad_column] = addresses[chosen]
                ns = part.ns
                if select is not None:
                    ns, seeds = ns[select], seeds[select]
                    columns = [c[select] for c in columns]
                batch.add_block(spec, svs, ns, seeds, columns, grads, part.writes)
        return True


def _seeds(seed_bases, count: int):
    """Stochastic-rounding seeds of a block's tensors at step ``count`` (as Optimizer._seed)."""
    import numpy as np

    return ((seed_bases + np.uint64((count * _SEED_STEP) & _U64))
            & np.uint64(_SEED_MASK)).astype(np.int64)


def _scalar_rows(s, rows: int):
    """A block's scalars table: one row per tensor, each field a number (the same in every
    row) or an array of one value per tensor (a vectorized apply's)."""
    import numpy as np

    svs = np.empty((rows, len(s)), dtype=np.float64)
    for c, value in enumerate(s):
        svs[:, c] = value
    return svs


class _Stack:
    """One tensor role (the parameter, the gradient or a state slot) of all the tensors of a
    cohort, as a vectorized generator ``apply`` sees it (see ``Optimizer.vectorized_apply``):
    ``numel()`` is an array of their sizes, ``dtype`` the parameters' (None for state);
    passed to ``engine.map`` it stands for each."""

    __slots__ = ("role", "sizes", "dtype")

    def __init__(self, role: int, sizes, dtype: torch.dtype | None = None):
        self.role = role
        self.sizes = sizes
        self.dtype = dtype

    def numel(self):
        return self.sizes


class _CohortCall:
    """The k-th map of a cohort's generator as the tables of a KernelBatch block: the kernel
    spec without its outcomes, per operand the trusted object it is (its role: 0 the
    parameter, 1 the gradient, 2 + i slot i; -1 for numbers and absent operands) and where
    its table is, and the tables of what does not change from step to step."""

    __slots__ = ("spec_base", "fn", "kinds", "stores", "n_results", "n_sums", "dtype",
                 "roles", "column", "ns", "dims", "columns", "grad_columns", "number_columns",
                 "scratch_columns", "store_columns", "read_columns")


class _Cohort:
    """The tensors of a :class:`_GroupLockstepPlan` whose generators queued the same sequence
    of maps (same kernels and operand roles) last step: one vectorized run serves them all."""

    __slots__ = ("positions", "names", "dtype", "maximize", "params", "slots", "sizes",
                 "seed_bases", "calls", "row_stats", "stochastic_bf16")


class _GroupLockstepPlan(_GroupPlan):
    """A param group's last step for a rule with a generator ``apply`` that declares
    ``vectorized_apply`` (FAdam, Adafactor), covering the tensors that took the fused fast
    path (:class:`_LockstepPlan`) with all of their generator's maps batched over the
    parameter, gradient, state, numbers and the tensors its ``mean_sq_last_dims`` made, and
    all of its ``per_tensor`` calls giving numbers. The others (``rest``: a conv kernel,
    whose small matrices' maps run at once; a stack of matrices, whose Adafactor norm is a
    tensor) keep the per-tensor path, every step.

    :meth:`repeat` makes the checks :class:`_GroupPlan` makes for the covered tensors and
    calls ``scalars`` once per distinct step count, then runs the generator once per cohort
    (tensors whose generators queued the same kernels on the same operand roles) on a
    :class:`_BlockEngine`: ``p``, ``g`` and the slots are :class:`_Stack` objects, the sums
    arrive as arrays with one value per tensor, and each map becomes one block of ready-made
    tables (new gradient addresses, scalars, seeds). A small model's FAdam or Adafactor step
    was mostly the per-tensor Python of its passes. Anything it does not cover returns False
    before any effect, and the whole group takes the per-tensor path, which records a new
    plan."""

    __slots__ = ()

    @classmethod
    def record(cls, opt: Optimizer, group: dict, gi: int,
               plans: dict) -> "_GroupLockstepPlan | None":
        if not _vectorizes(type(opt)):
            return None
        params = list(group["params"])
        entries, rest, by_sequence = _plans_by(params, plans, _sequence)
        if not by_sequence:
            return None
        self = cls._new(group, params, entries, rest)
        self.parts = [_new_cohort(members, gi) for members in by_sequence.values()]
        return self

    def repeat(self, opt: Optimizer, group: dict, batch) -> bool:
        """Queue this step's generators of the group's tensors (in ``opt._lockstep``) if
        nothing changed; False (and no effect) if something did."""
        prepared = self._prepare(opt, group)
        if prepared is None:
            return False
        grads, addresses, subsets = prepared
        for cohort in self.parts:
            chosen = cohort.positions
            for s, count, select in subsets(chosen):
                engine = _BlockEngine(cohort, select, [grads[i] for i in chosen],
                                      addresses[chosen], count, batch, grads)
                stacks = engine.stacks
                program = opt.apply(engine, s, stacks[0], stacks[1],
                                    dict(zip(cohort.names, stacks[2:])))
                opt._lockstep.append(_bind(program, engine))
        return True


_REST = object()  # a _GroupLockstepPlan's mark for a parameter it leaves to the per-tensor path


def _sequence(plan) -> tuple | None:
    """What a tensor's generator did last step, as far as a cohort must share it: its kernels
    and operand roles, and its ``per_tensor`` calls. None (:class:`_GroupLockstepPlan` leaves
    the tensor to the per-tensor path) if a map ran at once (a conv kernel's 3x3 matrices)
    or a ``per_tensor`` call gave a tensor (the Adafactor norm of a stack of matrices)."""
    if not isinstance(plan, _LockstepPlan) or not plan.last:
        return None
    sequence = [plan.names, plan.dtype, plan.maximize, plan.settings]
    for call in plan.last:
        if call is None:
            return None
        if type(call) is fused_cpu._PerTensor:
            if not call.number:
                return None
            sequence.append(("per_tensor", call.fn))
        else:
            sequence.append((call.spec[:-1], call.roles))
    return tuple(sequence)


def _bind(program, engine):
    """``program`` (a generator apply running on ``engine``), checking at its end that it
    queued every map the cohort recorded."""
    yield from program
    engine.finish()


def _new_cohort(members: list, gi: int) -> _Cohort:
    import numpy as np

    cohort = _Cohort()
    first = members[0][3]
    cohort.positions = [m[0] for m in members]
    cohort.names = first.names
    cohort.dtype = first.dtype
    cohort.maximize = first.maximize
    cohort.stochastic_bf16 = first.settings[1]  # the optimizer's stochastic_rounding
    cohort.row_stats = None  # see _BlockEngine.sq_stats_last_dims
    cohort.params = [p for _, _, p, _ in members]
    cohort.slots = [plan.slots for _, _, _, plan in members]
    cohort.sizes = np.array([p.numel() for _, _, p, _ in members], dtype=np.int64)
    cohort.seed_bases = np.array(
        [_seed_base(p.numel(), (gi, pi)) & _U64 for _, pi, p, _ in members], dtype=np.uint64)
    cohort.calls = []
    for k, recorded in enumerate(first.last):
        if type(recorded) is fused_cpu._PerTensor:
            cohort.calls.append(("per_tensor", recorded.fn))
            continue
        call = _CohortCall()
        spec = recorded.spec
        call.spec_base = spec[:-1]
        call.fn, call.kinds, call.stores, call.n_results, call.dtype = \
            spec[0], spec[1], spec[2], spec[3], spec[4]
        call.n_sums = spec[10]
        call.roles = recorded.roles
        call.column = [fused_cpu.operand_column(call.kinds, j) for j in range(len(call.kinds))]
        call.ns = np.array([m[3].last[k].n for m in members], dtype=np.int64)
        call.dims = None  # maps over whole rows: each matrix's columns and rows per matrix
        if recorded.dims is not None:
            dims = np.array([m[3].last[k].dims for m in members], dtype=np.int64)
            call.dims = [np.ascontiguousarray(dims[:, 0]), np.ascontiguousarray(dims[:, 1])]
        operands = []
        for _, _, p, plan in members:
            row = []
            for role, kind in zip(call.roles, call.kinds):
                if role == 0:
                    row.append((plan.address, 0))
                elif role >= 2:  # (name, object, quantized, address, second address)
                    row.append((plan.checks[role - 2][3], plan.checks[role - 2][4]))
                else:  # the gradient, a number, a tensor made in the step or nothing:
                    row.append((0.0 if kind == "num" else 0, 0))  # filled in at each step
            operands.append(row)
        call.columns = fused_cpu.operand_columns(call.kinds, operands)
        call.grad_columns = [call.column[j] for j, role in enumerate(call.roles) if role == 1]
        call.number_columns = [(j, call.column[j]) for j, kind in enumerate(call.kinds)
                               if kind == "num"]
        call.scratch_columns = [(j, call.column[j]) for j, (role, kind)
                                in enumerate(zip(call.roles, call.kinds))
                                if role < 0 and kind not in ("num", "none")]
        call.store_columns = [call.column[j] for _, j in call.stores]
        call.read_columns = [call.column[j] for j, role in enumerate(call.roles) if role >= 0]
        cohort.calls.append(call)
    return cohort


class _Scratch:
    """Tensors a vectorized run made during the step, one per tensor of the cohort (the row
    and column means of ``mean_sq_last_dims``, the means of ``mean_rows``), as the generator
    sees them."""

    __slots__ = ("tensors", "addresses", "kind")

    def __init__(self, tensors: list):
        import numpy as np

        self.tensors = tensors
        self.addresses = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
        self.kind = fused_cpu._KINDS.get(tensors[0].dtype) if tensors else None


class _BlockEngine:
    """The engine a vectorized generator ``apply`` runs on for a cohort (see
    :class:`_GroupLockstepPlan`): its k-th call must be the k-th the cohort recorded (a map of
    the same rule on operands of the same roles, numbers where numbers were and tensors made
    by its ``mean_sq_last_dims`` where such tensors were; or ``per_tensor`` of the same
    function), and a map is queued as one block for all the cohort's tensors (those of one
    step count: ``select``)."""

    def __init__(self, cohort: _Cohort, select, grads: list, grad_addresses, count: int,
                 batch, keep):
        self.cohort = cohort
        self.select = select
        self.batch = batch
        self.keep = [keep]  # and the tensors this run makes
        seeds = _seeds(cohort.seed_bases, count)
        self.sizes = cohort.sizes
        self.members = list(range(len(seeds)))
        if select is not None:
            grad_addresses, seeds, self.sizes = \
                grad_addresses[select], seeds[select], self.sizes[select]
            self.members = [i for i in self.members if select[i]]
        self.grads = [grads[i] for i in self.members]
        self.grad_addresses = grad_addresses
        self.seeds = seeds
        self.rows = len(seeds)
        #: what the generator gets for the parameter, the gradient and each slot
        self.stacks = [_Stack(role, self.sizes, cohort.dtype if role < 2 else None)
                       for role in range(2 + len(cohort.names))]
        self._call = 0

    def _unfit(self, call: int, why: str):
        return RuntimeError(
            f"vectorized apply: call {call} of this step does not match the one recorded for "
            f"the param group ({why}); a rule with vectorized_apply = True must make the "
            "same calls on the same operands every step (see Optimizer.vectorized_apply)")

    def _next(self):
        k = self._call
        self._call = k + 1
        calls = self.cohort.calls
        if k >= len(calls):
            raise self._unfit(k, "one call more than recorded")
        return k, calls[k]

    def _tensors(self, stack) -> list:
        """The tensors ``stack`` (one of ``stacks``, or a ``_Scratch``) stands for."""
        if isinstance(stack, _Scratch):
            return stack.tensors
        if not any(stack is x for x in self.stacks):
            raise self._unfit(self._call, "not a tensor of this run")
        role, cohort = stack.role, self.cohort
        if role == 0:
            return [cohort.params[i] for i in self.members]
        if role == 1:
            return self.grads
        return [cohort.slots[i][role - 2] for i in self.members]

    def per_tensor(self, fn, t, *args):
        import numpy as np

        k, call = self._next()
        if call != ("per_tensor", fn):
            raise self._unfit(k, "per_tensor where a map was recorded, or another function")
        if self.batch.writes:  # the maps before may write its tensors
            self.batch.flush()
        values = [fn(x, *args) for x in self._tensors(t)]
        if not all(isinstance(v, (int, float)) for v in values):
            raise self._unfit(k, "per_tensor gave something other than a number")
        return np.array(values, dtype=np.float64)

    def mean_rows(self, x):
        if self.batch.writes:  # the maps before may write its tensors
            self.batch.flush()
        engine = fused_cpu.FusedEngine(self.cohort.dtype, batch=self.batch)
        return _Scratch([engine.mean_rows(t) for t in self._tensors(x)])

    def mean_sq_last_dims(self, x):
        engine = fused_cpu.FusedEngine(self.cohort.dtype, batch=self.batch)
        rows, cols = [], []
        for t in self._tensors(x):
            r, c = engine.mean_sq_last_dims(t)
            rows.append(r)
            cols.append(c)
        self.keep.append((rows, cols))
        return _Scratch(rows), _Scratch(cols)

    def _row_scalars(self, s, i: int):
        """Member i's scalars (a field may hold one value per member)."""
        import numpy as np

        return type(s)(*(float(v[i]) if isinstance(v, np.ndarray) else v for v in s))

    def sq_stats_last_dims(self, fn, s, state, x, y):
        """Queued as one launch for the cohort, with the tables (and the tensors it makes:
        a, the column means, w) kept on the cohort from one step to the next; only the
        gradients' addresses and the scalars are new each step (the tables are made again
        where the cohort is split by step counts). The row rule's scalars must give every
        member the same branches (its fields are numbers here in Adafactor's program)."""
        made = self.cohort.row_stats if self.select is None else None
        roles = tuple(getattr(t, "role", None) for t in (state, x, y))
        if made is None or made[0] is not fn or made[1] != roles:
            made = self._row_stats_tables(fn, state, x, y)
            if self.select is None:
                self.cohort.row_stats = made
        if made[2] is None:  # the reference path, as the per-tensor run took it
            return ReferenceEngine.sq_stats_last_dims(self, fn, s, state, x, y)
        _, _, kinds, tables, address, reads, writes, scratch = made
        groups = fused_cpu.block_outcomes(fn, s, fused_cpu.compute_dtype(self.cohort.dtype),
                                          self.rows)
        if len(groups) != 1:  # the kernel is one per outcome of the rule's branches
            raise self._unfit(self._call, "the row rule's scalars differ between tensors")
        self.keep.append(scratch)  # the maps queued after may read them: alive until the flush
        grads = self.grad_addresses
        batch = self.batch
        if batch.writes and not (batch.writes.isdisjoint(reads)
                                 and batch.writes.isdisjoint(grads.tolist())):
            batch.flush()
        sums = fused_cpu.Pending()
        stochastic = self.cohort.stochastic_bf16 and kinds[1] == "b16"
        batch.add_row_stats_block((fn, groups[0][0], type(s)._fields) + kinds + (stochastic,),
                                  _scalar_rows(s, self.rows), self.seeds, [grads, *address],
                                  tables, writes, sums, self.keep)
        return (*scratch, sums)

    def _row_stats_tables(self, fn, state, x, y) -> tuple:
        """What :meth:`sq_stats_last_dims` keeps on the cohort: ``(fn, roles, kinds, tables,
        address columns of y, state, a, cols and w, the addresses it reads besides the
        gradients, those it writes, the _Scratch of a, cols and w)``; ``kinds`` None where
        the fused engine takes the reference path for these tensors."""
        import numpy as np

        engine = fused_cpu.FusedEngine(self.cohort.dtype)
        members = list(zip(self._tensors(state), self._tensors(x), self._tensors(y)))
        roles = tuple(getattr(t, "role", None) for t in (state, x, y))
        fast = [engine.makes_row_stats(*member) for member in members]
        if not any(fast):
            return (fn, roles, None)
        if not all(fast) or len({st.dtype for st, _, _ in members}) != 1:
            raise self._unfit(self._call, "sq_stats_last_dims cannot take one path for all")
        kinds = (fused_cpu._KINDS[members[0][1].dtype], fused_cpu._KINDS[members[0][0].dtype])
        dtype = fused_cpu.compute_dtype(self.cohort.dtype)
        made = [[], [], []]
        for st, xt, yt in members:
            lead, n, m = tuple(xt.shape[:-2]), xt.shape[-2], xt.shape[-1]
            both = torch.empty((2,) + lead + (1, m), dtype=dtype)
            made[0].append(torch.empty(lead + (n, 1), dtype=dtype))
            made[1].append(both[0])
            made[2].append(both[1])
        tables = fused_cpu.row_stats_tables(
            [(xt.numel() // (xt.shape[-2] * xt.shape[-1]), xt.shape[-2], xt.shape[-1])
             for _, xt, _ in members])
        columns = [[yt for _, _, yt in members], [st for st, _, _ in members], *made]
        address = [np.array([t.data_ptr() for t in column], dtype=np.uint64)
                   for column in columns]
        reads = address[0].tolist() + address[1].tolist()
        writes = [a for column in address[1:] for a in column.tolist()]
        return (fn, roles, kinds, tables, address, reads, writes,
                tuple(_Scratch(column) for column in made))

    def sums_where(self, where, fn, s, ins, n_sums: int):
        import numpy as np

        where = np.broadcast_to(np.asarray(where, dtype=bool), (self.rows,))
        sums = np.zeros((n_sums, self.rows))
        if where.any():
            if self.batch.writes:
                self.batch.flush()
            grads = self.grads
            columns = [x if x is None or isinstance(x, (int, float, np.ndarray))
                       else self._tensors(x) for x in ins]
            # one launch for the tensors that need it (maps of the same kernel batch together)
            batch = fused_cpu.KernelBatch()
            found = []
            for i in np.flatnonzero(where).tolist():
                row = [x[i] if isinstance(x, (list, np.ndarray)) else x for x in columns]
                engine = fused_cpu.FusedEngine(
                    self.cohort.dtype, negate=grads[i] if self.cohort.maximize else None,
                    batch=batch, batch_sums=True)
                found.append((i, engine.map(fn, self._row_scalars(s, i), row, [], n_sums)))
            batch.flush()
            for i, value in found:
                sums[:, i] = value.value if isinstance(value, fused_cpu.Pending) else value
        return list(sums)

    def map(self, fn, s, ins, outs, n_sums: int = 0):
        import numpy as np

        k, call = self._next()
        if not isinstance(call, _CohortCall):
            raise self._unfit(k, "a map where per_tensor was recorded")
        if fn is not call.fn or n_sums != call.n_sums or len(ins) != len(call.kinds) \
                or len(outs) + n_sums != call.n_results:
            raise self._unfit(k, "another rule or arity")
        for a, j in call.stores:
            if outs[a] is not ins[j]:
                raise self._unfit(k, "other stores")
        if sum(out is not None for out in outs) != len(call.stores):
            raise self._unfit(k, "other stores")
        stacks = self.stacks
        for t, role, kind in zip(ins, call.roles, call.kinds):
            if role >= 0:
                if role >= len(stacks) or t is not stacks[role]:
                    raise self._unfit(k, "another operand")
            elif kind == "none":
                if t is not None:
                    raise self._unfit(k, "another operand")
            elif kind == "num":
                if not isinstance(t, (int, float, np.ndarray)):
                    raise self._unfit(k, "a number was expected")
            elif not isinstance(t, _Scratch) or t.kind != kind or len(t.tensors) != self.rows:
                raise self._unfit(k, "a tensor made in this step was expected")
        select = self.select
        columns = call.columns if select is None else [c[select] for c in call.columns]
        columns = list(columns)
        ns = call.ns if select is None else call.ns[select]
        rows = self.rows
        for column in call.grad_columns:
            columns[column] = self.grad_addresses
        for j, column in call.number_columns:
            values = np.empty(rows, dtype=np.float64)
            values[:] = ins[j]
            columns[column] = values
        for j, column in call.scratch_columns:
            columns[column] = ins[j].addresses
        svs = _scalar_rows(s, rows)
        reads = [columns[column] for column in call.read_columns] + [
            columns[column] for _, column in call.scratch_columns]
        stored = [columns[column] for column in call.store_columns]
        if call.dims is not None:  # the mfact layout's tables come first
            columns = [d if select is None else d[select] for d in call.dims] + columns
        sums = None
        if n_sums:
            sums = fused_cpu.Pending()
            sums.value = [np.empty(rows, dtype=np.float64) for _ in range(n_sums)]
        for outcomes, chosen in fused_cpu.block_outcomes(fn, s, call.dtype, rows):
            spec = call.spec_base + (outcomes,)
            if chosen is None:
                self.batch.add_block(spec, svs, ns, self.seeds, columns, self.keep,
                                     [a for c in stored for a in c.tolist()],
                                     sums=sums, reads=reads)
            else:
                self.batch.add_block(
                    spec, svs[chosen], ns[chosen], self.seeds[chosen],
                    [c[chosen] for c in columns], self.keep,
                    [a for c in stored for a in c[chosen].tolist()],
                    sums=sums, rows=chosen, reads=[c[chosen] for c in reads])
        return sums if n_sums else []

    def finish(self) -> None:
        if self._call != len(self.cohort.calls):
            raise self._unfit(self._call, "fewer calls than recorded")
