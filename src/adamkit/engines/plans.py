"""Step plans: how the front end repeats a step on the fused CPU engine without redoing its
checks, and batches a param group's tensors into blocks.

A parameter whose tensors are where they were at its last step re-adds that step's map with
new scalars (:class:`_Plan`; a generator ``apply`` re-runs on an engine that repeats its maps:
:class:`_LockstepPlan`). A param group whose tensors all did repeats as one block
(:class:`_GroupPlan`), and a generator ``apply`` with ``vectorized_apply`` runs once for a whole
group on arrays of per-tensor sums (:class:`_GroupLockstepPlan` over a :class:`_Cohort`,
driven by :class:`_BlockEngine`). The front end (:mod:`adamkit.optimizer`) records and repeats
plans; ``opt`` arguments here are that optimizer, which this module never imports.
Also here: the stochastic-rounding seed of a tensor at a step (:func:`_seed_base`), which
every path shares.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ..compiler import rule_outcomes
from ..storage import BlockQuantized
from .cpu import FusedEngine, operand_column, operand_columns

Tensor = torch.Tensor


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


def run_in_lockstep(programs: list, batch, resolve: Callable) -> None:
    """Advance every tensor's generator ``apply`` to its next ``yield``, run the maps they
    deferred (``batch.flush()``: one launch per kernel), send each what it yielded through
    ``resolve`` (the backend's deferred sums, now known), and repeat until all are done."""
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
            values[i] = resolve(values[i])
        active = waiting


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
    def record(cls, opt, group: dict, p: Tensor, grad: Tensor, last) -> "_Plan | None":
        if last is None or p.is_complex() or grad.is_sparse:
            return None
        spec, n, operands = last
        if operands[0][0] != p.data_ptr() or operands[1][0] != grad.data_ptr():
            return None  # not the default apply's map of (p, grad, *slots)
        return cls._new(opt, group, p, last)

    @classmethod
    def _new(cls, opt, group: dict, p: Tensor, last) -> "_Plan":
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

    def same_settings(self, opt, group: dict) -> bool:
        return group["maximize"] == self.maximize and self.settings == (
            opt.state_dtype, opt.stochastic_rounding, opt.round_int8_stochastically)

    def unchanged_state(self, opt, group: dict, p: Tensor, grad: Tensor):
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

    def repeat(self, opt, group: dict, p: Tensor, grad: Tensor,
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

    def _add(self, opt, s, p: Tensor, grad: Tensor, seed: int, batch) -> None:
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
    def record(cls, opt, group: dict, p: Tensor, grad: Tensor,
               calls) -> "_LockstepPlan | None":
        if calls is None or p.is_complex() or grad.is_sparse:
            return None
        return cls._new(opt, group, p, calls)

    def _add(self, opt, s, p: Tensor, grad: Tensor, seed: int, batch) -> None:
        engine = FusedEngine(
            p.dtype, negate=grad if self.maximize else None, seed=seed,
            stochastic_int8=opt.round_int8_stochastically,
            stochastic_bf16=opt.stochastic_rounding, batch=batch, batch_sums=True,
            calls=self.last, trusted=(p, grad, *self.slots))
        program = opt.apply(engine, s, p, grad, dict(zip(self.names, self.slots)))
        if program is not None:
            opt._lockstep.append(program)


_U64 = (1 << 64) - 1
_REST = object()  # a group plan's mark for a parameter it leaves to the per-tensor path
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
    :class:`~adamkit.engines.KernelBatch` block needs."""

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
    def record(cls, opt, group: dict, gi: int, plans: dict) -> "_GroupPlan | None":
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
            part.columns = operand_columns(kinds, [m[3].last[2] for m in members])
            part.grad_column = operand_column(kinds, 1)
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

    def _checked(self, opt, group: dict):
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
    def _scalars(opt, group: dict, states: list):
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

    def _prepare(self, opt, group: dict):
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

    def repeat(self, opt, group: dict, batch) -> bool:
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
                spec = part.spec_base + (rule_outcomes(part.fn, s, part.dtype),)
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
