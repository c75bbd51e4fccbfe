"""Vectorized multi-pass steps: a param group's generator ``apply`` (FAdam, Adafactor: rules
with ``vectorized_apply = True``) run once for the whole group on arrays of per-tensor sums.

The group's tensors form a :class:`_Cohort` (their stacked scalars, seeds and launch tables);
:class:`_BlockEngine` is the engine the generator talks to there: each ``map`` it yields is one
block of the cohort's tensors in a single launch, its sums come back as arrays.
:class:`_GroupLockstepPlan` records and repeats such a run from step to step (see
:mod:`adamkit.engines.plans` for the per-tensor and single-pass group plans).
"""

from __future__ import annotations

import torch

from ..compiler import block_outcomes
from .cpu import FusedEngine, KernelBatch, Pending, operand_column, operand_columns
from .cpu.batch import _PerTensor
from .cpu.factored import row_stats_tables
from .cpu.runtime import _KINDS
from .plans import (_U64, _GroupPlan, _LockstepPlan, _plans_by, _scalar_rows, _seed_base,
                    _seeds, _vectorizes)
from .reference import ReferenceEngine, compute_dtype

Tensor = torch.Tensor


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
    def record(cls, opt, group: dict, gi: int,
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

    def repeat(self, opt, group: dict, batch) -> bool:
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
        if type(call) is _PerTensor:
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
        if type(recorded) is _PerTensor:
            cohort.calls.append(("per_tensor", recorded.fn))
            continue
        call = _CohortCall()
        spec = recorded.spec
        call.spec_base = spec[:-1]
        call.fn, call.kinds, call.stores, call.n_results, call.dtype = \
            spec[0], spec[1], spec[2], spec[3], spec[4]
        call.n_sums = spec[10]
        call.roles = recorded.roles
        call.column = [operand_column(call.kinds, j) for j in range(len(call.kinds))]
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
        call.columns = operand_columns(call.kinds, operands)
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
        self.kind = _KINDS.get(tensors[0].dtype) if tensors else None


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
        engine = FusedEngine(self.cohort.dtype, batch=self.batch)
        return _Scratch([engine.mean_rows(t) for t in self._tensors(x)])

    def mean_sq_last_dims(self, x):
        engine = FusedEngine(self.cohort.dtype, batch=self.batch)
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
        groups = block_outcomes(fn, s, compute_dtype(self.cohort.dtype),
                                          self.rows)
        if len(groups) != 1:  # the kernel is one per outcome of the rule's branches
            raise self._unfit(self._call, "the row rule's scalars differ between tensors")
        self.keep.append(scratch)  # the maps queued after may read them: alive until the flush
        grads = self.grad_addresses
        batch = self.batch
        if batch.writes and not (batch.writes.isdisjoint(reads)
                                 and batch.writes.isdisjoint(grads.tolist())):
            batch.flush()
        sums = Pending()
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

        engine = FusedEngine(self.cohort.dtype)
        members = list(zip(self._tensors(state), self._tensors(x), self._tensors(y)))
        roles = tuple(getattr(t, "role", None) for t in (state, x, y))
        fast = [engine.makes_row_stats(*member) for member in members]
        if not any(fast):
            return (fn, roles, None)
        if not all(fast) or len({st.dtype for st, _, _ in members}) != 1:
            raise self._unfit(self._call, "sq_stats_last_dims cannot take one path for all")
        kinds = (_KINDS[members[0][1].dtype], _KINDS[members[0][0].dtype])
        dtype = compute_dtype(self.cohort.dtype)
        made = [[], [], []]
        for st, xt, yt in members:
            lead, n, m = tuple(xt.shape[:-2]), xt.shape[-2], xt.shape[-1]
            both = torch.empty((2,) + lead + (1, m), dtype=dtype)
            made[0].append(torch.empty(lead + (n, 1), dtype=dtype))
            made[1].append(both[0])
            made[2].append(both[1])
        tables = row_stats_tables(
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
            batch = KernelBatch()
            found = []
            for i in np.flatnonzero(where).tolist():
                row = [x[i] if isinstance(x, (list, np.ndarray)) else x for x in columns]
                engine = FusedEngine(
                    self.cohort.dtype, negate=grads[i] if self.cohort.maximize else None,
                    batch=batch, batch_sums=True)
                found.append((i, engine.map(fn, self._row_scalars(s, i), row, [], n_sums)))
            batch.flush()
            for i, value in found:
                sums[:, i] = value.value if isinstance(value, Pending) else value
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
            sums = Pending()
            sums.value = [np.empty(rows, dtype=np.float64) for _ in range(n_sums)]
        for outcomes, chosen in block_outcomes(fn, s, call.dtype, rows):
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
