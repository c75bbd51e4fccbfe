"""The fused CPU engine: :class:`FusedEngine` runs a rule's primitives (the contract in
:mod:`adamkit.engines.reference`) with generated Numba kernels, one pass over memory per map."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ...compiler import KernelUnsupported, block_outcomes, rule_outcomes
from ..reference import ReferenceEngine, compute_dtype, newton_schulz
from .batch import (KernelBatch, Pending, _broadcast_shape, _Call, _collapse_strides, _negated,
                    _numpy, _PerTensor)
from .codegen import (_FLOAT_ARRAYS, _ROW_STATS_KINDS, CHUNK, MEAN_ROWS_ITEM, SERIAL_BELOW,
                      SMALL_BCAST, _load_kernel)
from .factored import _row_stats, _sq_means, _sq_means_small_kernel, factor_roles
from .runtime import (_KERNELS, _KINDS, SUPPORTED_DTYPES, _block_quantized, _lock,
                      _serialize_calls, available, unavailable_reason)

Tensor = torch.Tensor

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
        from ...storage import BlockQuantized

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

    def orthogonalize(self, u: Tensor, coefficients, steps: int, eps: float) -> Tensor:
        """The contract's whole-matrix stage (:func:`~adamkit.engines.reference.newton_schulz`):
        matrix multiplies are torch's (its BLAS), not element rules, so this engine delegates
        to them after running any queued map that writes ``u``. The result is made contiguous
        so that the kernels can read it."""
        self._after_queued_writes([u])
        return newton_schulz(u, coefficients, steps, eps).contiguous()
