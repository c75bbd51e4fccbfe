"""Launch tables: :class:`KernelBatch` queues the maps of a step and runs each kernel once
over all its tensors; :class:`Pending` is a sum that arrives when the batch is flushed.

A step's single-pass maps run as one multi-tensor launch, and so does each pass of a
multi-pass rule (FAdam, Adafactor: their generator ``apply`` advances in lockstep over the
tensors, and a pass's sums come back per tensor). Maps that broadcast row and column factors
against matrices (Adafactor's factored update) are batched the same way (the ``mfact`` layout,
:func:`adamkit.engines.cpu.factored.factor_roles`); other broadcasts, and matrices of at most
``SMALL_BCAST`` elements, run per tensor, those below ``SERIAL_BELOW`` elements on the calling
thread; over small matrices the factors are spread over 16 matrices at a time by one vector
permute (``numba_ops.shuffled_copy``)."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from ...compiler import rule_outcomes
from .codegen import CHUNK, _FLOAT_ARRAYS, _load_kernel
from .factored import _row_stats, _sq_means, run_row_stats
from .runtime import _KERNELS, _lock, _serialize_calls

Tensor = torch.Tensor

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
