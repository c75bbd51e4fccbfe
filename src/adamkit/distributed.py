"""What DDP, ZeroRedundancyOptimizer, FSDP2 and torch.distributed.checkpoint need from adamkit.

adamkit adds no communication layer of its own: it runs on PyTorch's distributed engine.

* **DDP** and **ZeroRedundancyOptimizer** hand the optimizer plain tensors (all-reduced
  gradients; ZeRO a partition of the parameters): nothing here is involved but the checkpoint
  form below, and the stochastic-rounding seeds, which depend only on the step, the parameter's
  position and size (never on a rank's generator or on addresses), so replicas stay bitwise
  equal.
* **FSDP2** (``fully_shard``) turns every parameter into a ``DTensor``. The fused engine never
  sees one: :func:`step_parameter` runs the rule on the local shards (``p.to_local()``,
  ``grad.to_local()`` and the state's local shards) and keeps the state as DTensors with the
  parameter's mesh and placements (a slot reduced along a sharded dimension, such as
  Adafactor's column factor under ``Shard(0)``, is ``Replicate`` there); ``step`` stays a plain
  tensor, as torch keeps it. Element-wise rules need nothing else. Rules with per-tensor
  reductions (a generator ``apply``: FAdam's RMS norms, Adafactor's factored statistics and
  RMS) run on a :class:`ShardedEngine`, which all-reduces over the parameter's mesh exactly the
  sums the rule asks for, sees ``numel()`` of the whole tensor, and raises
  :class:`NotShardable` (naming the parameter) for anything it cannot compute correctly from
  shards (``engine.per_tensor`` on a sharded tensor, a ``Partial`` placement, ...). Every rank
  takes part in every collective, also a rank whose shard is empty.
* **int8 state** of a DTensor parameter of two or more dimensions whose *global* shape is
  quantised (:func:`adamkit.storage.quantizable`) is kept as codes shaped like the parameter and
  one float32 scale per block of 256 elements *within a row of dim 0* (``absmax`` of shape
  ``(rows, blocks per row)``, placed like the parameter): blocks never cross a row, so the
  state reshards by rows at any world size without re-quantising. It needs parameters sharded
  on dim 0 only. One-dimensional DTensor state stays float32 under ``state_dtype="int8"``.
* **Checkpoints**: every value of ``state_dict()`` is a tensor or a number. 8-bit state is
  saved as its codes under the slot's name and its float32 scales under ``NAME_absmax``
  (:func:`pack_state_dict`); ``load_state_dict`` reads that form back (:func:`take_scales`,
  :func:`restore_scales`, :func:`convert_state`), and still reads the older form that held
  ``BlockQuantized`` objects. ``torch.distributed.checkpoint`` (``get_state_dict`` /
  ``set_state_dict``, ``dcp.save`` / ``dcp.load``) then works unchanged, at any world size.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from . import storage
from .engines import cpu as fused_cpu
from .engines.plans import _run_to_end
from .engines.reference import ReferenceEngine, compute_dtype
from .storage import BlockQuantized

Tensor = torch.Tensor

try:  # DTensor lives in torch.distributed, which some builds of torch lack
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = Replicate = Shard = None

#: the suffix of an 8-bit slot's per-block scales in ``state_dict()``
SCALES = "_absmax"


class NotShardable(ValueError):
    """A rule (or state storage) that cannot be computed correctly on this sharded parameter."""


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def has_dtensor(param_groups) -> bool:
    """Whether any parameter of these groups is a DTensor (FSDP2, tensor parallel)."""
    if DTensor is None:
        return False
    return any(isinstance(p, DTensor) for group in param_groups for p in group["params"])


def local(t):
    """The local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def all_finite(param_groups, finite: bool) -> bool:
    """``finite`` agreed across the ranks that share DTensor parameters (each rank checked its
    own shards): a step is skipped on all of them or on none."""
    meshes = {}
    for group in param_groups:
        for p in group["params"]:
            if is_dtensor(p) and p.grad is not None:
                meshes.setdefault(id(p.device_mesh), p.device_mesh)
    if not meshes:
        return finite
    import torch.distributed as dist

    flag = torch.tensor([0.0 if finite else 1.0])
    for mesh in meshes.values():
        for k in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(k))
    return float(flag) == 0.0


# ---- layout of a DTensor parameter and its state -----------------------------------------------

def _name(where) -> str:
    return f"parameter {where[1]} of param group {where[0]}"


def _shard_dims(p) -> list[int | None]:
    """Per mesh dimension: the tensor dimension it shards (None: replicated)."""
    dims = []
    for placement in p.placements:
        if isinstance(placement, Shard):
            dims.append(placement.dim % max(p.dim(), 1))
        elif isinstance(placement, Replicate):
            dims.append(None)
        else:
            raise NotShardable(f"placement {placement}")
    return dims


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(size), 1)
    return tuple(reversed(stride))


def _wrap(local_tensor: Tensor, p, placements, shape) -> Tensor:
    return DTensor.from_local(local_tensor, p.device_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _slot_layout(opt, group, p, name):
    """Global shape, placements and local shape of slot ``name`` of DTensor ``p``: a probe on the
    meta device with every dimension bigger than 1 tells which dimensions the slot reduces
    (Adafactor's factors), and those are replicated where the parameter is sharded."""
    probe = torch.empty([s + 2 for s in p.shape], dtype=p.dtype, device="meta")
    value = opt.new_slot(group, probe, name)
    probe_shape = tuple(value.shape)
    if len(probe_shape) != p.dim():
        raise NotShardable(f"its state {name!r} has shape {probe_shape}")
    reduced = [probe_shape[d] != probe.shape[d] for d in range(p.dim())]
    shape = [probe_shape[d] if reduced[d] else p.shape[d] for d in range(p.dim())]
    local_p = p.to_local()
    local_shape = [shape[d] if reduced[d] else local_p.shape[d] for d in range(p.dim())]
    placements = []
    for placement, d in zip(p.placements, _shard_dims(p)):
        placements.append(Replicate() if d is not None and reduced[d] else placement)
    return tuple(shape), tuple(placements), tuple(local_shape), reduced


def _quantized_layout(opt, p, name, shape) -> bool:
    """Whether slot ``name`` of DTensor ``p`` is kept as 8-bit row blocks (global shape)."""
    return (opt.slot_storage(name) == "int8" and p.dim() >= 2
            and storage.quantizable(p, shape))


def _row_blocks(shape) -> tuple[int, int]:
    """Rows (dim 0) and blocks per row of 8-bit row-block state of this (local) shape."""
    rows = int(shape[0])
    per_row = math.prod(int(s) for s in shape[1:])
    return rows, -(-per_row // storage.BLOCK)


def encode_rows(x: Tensor, signed: bool, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """8-bit codes shaped like ``x`` and float32 scales ``(rows, blocks per row)``: blocks of
    :data:`adamkit.storage.BLOCK` elements that never cross a row of dim 0."""
    rows, per_row_blocks = _row_blocks(x.shape)
    flat = x.detach().to(torch.float32).reshape(rows, -1)
    width = per_row_blocks * storage.BLOCK
    padded = torch.zeros(rows, width, dtype=torch.float32, device=x.device)
    padded[:, :flat.shape[1]] = flat
    codes, absmax = storage.encode(padded, signed, seed)
    return (codes[:, :flat.shape[1]].reshape(x.shape).contiguous(),
            absmax.reshape(rows, per_row_blocks))


def decode_rows(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 values of :func:`encode_rows`' codes and scales."""
    rows, per_row_blocks = _row_blocks(codes.shape)
    flat = codes.reshape(rows, -1)
    padded = torch.zeros(rows, per_row_blocks * storage.BLOCK, dtype=codes.dtype,
                         device=codes.device)
    padded[:, :flat.shape[1]] = flat
    values = storage.decode(padded, absmax.reshape(-1).float(), signed)
    return values[:, :flat.shape[1]].reshape(codes.shape).contiguous()


def _check_int8_placements(p, where, name) -> None:
    if any(d not in (None, 0) for d in _shard_dims(p)):
        raise NotShardable(
            f"{_name(where)} (shape {tuple(p.shape)}, placements {p.placements}): "
            f"state_dtype='int8' keeps {name!r} in blocks within rows of dim 0 and needs the "
            "parameter sharded on dim 0 only; use state_dtype='bfloat16' or shard on dim 0")


def new_slot(opt, group, p, name, where=(0, 0)) -> dict[str, Tensor]:
    """Fresh state for slot ``name`` of DTensor ``p``: ``{name: DTensor}``, and for 8-bit
    state ``{name: codes, name + SCALES: scales}`` (both DTensors placed like ``p``)."""
    shape, placements, local_shape, _ = _slot_layout(opt, group, p, name)
    local_p = p.to_local()
    value = opt.new_slot(group, local_p, name)
    if isinstance(value, BlockQuantized):  # the local shard's decision; the global one counts
        value = value.dequantize()
    if tuple(value.shape) != local_shape:
        raise NotShardable(f"{_name(where)}: its state {name!r} has local shape "
                           f"{tuple(value.shape)}, expected {local_shape}")
    if _quantized_layout(opt, p, name, shape):
        _check_int8_placements(p, where, name)
        codes, absmax = encode_rows(value, signed=name not in opt.nonnegative_slots)
        rows, per_row = _row_blocks(shape)
        return {name: _wrap(codes, p, placements, shape),
                name + SCALES: _wrap(absmax, p, placements, (rows, per_row))}
    if opt.slot_storage(name) == "int8":
        value = value.to(torch.float32)
    return {name: _wrap(value.contiguous(), p, placements, shape)}


# ---- the sharded engine ------------------------------------------------------------------------

class _Shard:
    """What a rule's ``apply`` sees of a sharded tensor: ``numel()`` and ``shape`` of the whole
    tensor, its ``dtype``; the engine runs on ``local``."""

    __slots__ = ("local", "shape", "dtype", "_numel", "sharded")

    def __init__(self, local_tensor: Tensor, shape, sharded: frozenset):
        self.local = local_tensor
        self.shape = torch.Size(shape)
        self.dtype = local_tensor.dtype
        self._numel = math.prod(self.shape)
        self.sharded = sharded  # mesh dimensions over which its elements are split

    def numel(self) -> int:
        return self._numel

    def dim(self) -> int:
        return len(self.shape)


class ShardedEngine:
    """An engine (see :mod:`adamkit.engines.reference`) for one DTensor parameter's shards: runs
    each primitive on the local tensors with ``inner`` (fused or reference) and all-reduces
    over the parameter's mesh exactly what needs the whole tensor. Every rank calls the same
    primitives in the same order (the rule's branches depend only on all-reduced values), so
    every rank takes part in every collective, also with an empty shard."""

    def __init__(self, inner, p, where):
        self.inner = inner
        self.name = inner.name
        self.dtype = inner.dtype
        self.mesh = p.device_mesh
        self.ndim = p.dim()
        self.shard_dims = _shard_dims(p)
        self.where = where
        self.param_shape = tuple(p.shape)
        self._sharded = {}  # id(local tensor) -> (tensor, mesh dims it is split over)

    # -- bookkeeping
    def _mesh_dims(self, keep) -> frozenset:
        """Mesh dimensions that split a tensor keeping the dimensions ``keep(d)`` holds for."""
        return frozenset(k for k, d in enumerate(self.shard_dims) if d is not None and keep(d))

    def track(self, t: Tensor, sharded: frozenset) -> Tensor:
        self._sharded[id(t)] = (t, sharded)
        return t

    def _unwrap(self, t):
        if isinstance(t, _Shard):
            return t.local, t.sharded
        if isinstance(t, Tensor):
            entry = self._sharded.get(id(t))
            if entry is not None and entry[0] is t:
                return t, entry[1]
            if t.numel() == 1:
                return t, frozenset()
            raise self._error("a map reads a tensor that is not one of its shards")
        return t, frozenset()

    def _error(self, what: str) -> NotShardable:
        return NotShardable(
            f"{_name(self.where)} (shape {self.param_shape}) cannot be updated on shards: "
            f"{what}; the rule needs the whole tensor. Keep this parameter replicated "
            "(e.g. leave its module out of fully_shard) or use another optimizer for it")

    def _all_reduce(self, values: Tensor, mesh_dims) -> Tensor:
        import torch.distributed as dist

        for k in sorted(mesh_dims):
            dist.all_reduce(values, group=self.mesh.get_group(k))
        return values

    # -- primitives
    def map(self, fn, s, ins, outs, n_sums: int = 0):
        loaded, split = [], frozenset()
        for t in ins:
            t, sharded = self._unwrap(t)
            loaded.append(t)
            split |= sharded
        outs = [self._unwrap(t)[0] if t is not None else None for t in outs]
        empty = any(isinstance(t, Tensor) and t.numel() == 0 for t in loaded)
        if empty:  # this rank's shard holds no element of the map
            sums = [0.0] * n_sums
        else:
            sums = self.inner.map(fn, s, loaded, outs, n_sums)
            if isinstance(sums, fused_cpu.Pending):  # pragma: no cover - engines run at once here
                sums = sums.value
        if not n_sums:
            return []
        total = torch.tensor([float(x) for x in sums], dtype=torch.float64)
        return [float(x) for x in self._all_reduce(total, split)]

    def sums_where(self, where, fn, s, ins, n_sums: int):
        # ``where`` comes from all-reduced values: the same on every rank
        if not where:
            return [0.0] * n_sums
        return self.map(fn, s, ins, [], n_sums)

    def mean_sq_last_dims(self, x):
        local_x, sharded = self._unwrap(x)
        if self.ndim < 2:
            raise self._error("row and column statistics of a vector")
        sq = local_x.to(self.dtype) ** 2
        rows_dim, cols_dim = self.ndim - 2, self.ndim - 1
        n, m = self.param_shape[-2], self.param_shape[-1]
        # row means (over the last dimension): all-reduced where that dimension is split
        row = self._all_reduce(sq.sum(dim=-1, keepdim=True, dtype=torch.float64),
                               self._mesh_dims(lambda d: d == cols_dim))
        col = self._all_reduce(sq.sum(dim=-2, keepdim=True, dtype=torch.float64),
                               self._mesh_dims(lambda d: d == rows_dim))
        row = (row / m).to(self.dtype).contiguous()
        col = (col / n).to(self.dtype).contiguous()
        return (self.track(row, self._mesh_dims(lambda d: d != cols_dim)),
                self.track(col, self._mesh_dims(lambda d: d != rows_dim)))

    def sq_stats_last_dims(self, fn, s, state, x, y):
        a, cols = self.mean_sq_last_dims(x)
        self.map(fn, s, [state, a], [state, a])
        return a, cols, None, None

    def mean_rows(self, x):
        local_x, _ = self._unwrap(x)
        rows_dim = self.ndim - 2
        total = self._all_reduce(local_x.sum(dim=-2, keepdim=True, dtype=torch.float64),
                                 self._mesh_dims(lambda d: d == rows_dim))
        mean = (total / self.param_shape[-2]).to(local_x.dtype)
        return self.track(mean, self._mesh_dims(lambda d: d < rows_dim))

    def per_tensor(self, fn, t, *args):
        local_t, sharded = self._unwrap(t)
        if sharded:
            raise self._error(f"engine.per_tensor({getattr(fn, '__name__', fn)}) on a "
                              "sharded tensor")
        return fn(local_t, *args)


# ---- one step of a DTensor parameter -----------------------------------------------------------

def step_parameter(opt, group: dict, p, where: tuple[int, int]) -> None:
    """``Optimizer._step_parameter`` for a DTensor parameter (see the module docstring)."""
    from .optimizer import Optimizer

    grad = p.grad
    try:
        if p.is_complex():
            raise NotShardable("complex DTensor parameters are not supported")
        if not is_dtensor(grad):
            raise NotShardable(f"its gradient is a {type(grad).__name__}, not a DTensor")
        if grad.is_sparse:
            raise NotShardable("sparse gradients")
        if grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements):
            grad = grad.redistribute(p.device_mesh, p.placements)
        shard_dims = _shard_dims(p)
    except NotShardable as error:
        raise NotShardable(f"{_name(where)} (shape {tuple(p.shape)}, placements "
                           f"{tuple(p.placements)}): {error}") from None
    generator = type(opt).apply is not Optimizer.apply
    if not generator and opt.requires_sparse:
        raise RuntimeError(f"{type(opt).__name__} does not support dense gradients")
    state = opt.state[p]
    names = opt.state_slots(group, p)
    for name in names:  # before scalars(): Adagrad's setup_group made plain state
        value = state.get(name)
        if value is None or not is_dtensor(value):
            state.pop(name + SCALES, None)
            state.update(new_slot(opt, group, p, name, where))
    opt._last_step = None
    s = opt.scalars(group, state)
    if p.numel() == 0:
        return
    seed = opt._seed(state, p, where)
    local_p, local_g = p.to_local(), grad.to_local()
    if group["maximize"]:
        local_g = -local_g
    slots, quantized = {}, {}
    for name in names:
        value = state[name].to_local()
        if name + SCALES in state:  # 8-bit row blocks: the rule runs on float32 copies
            signed = name not in opt.nonnegative_slots
            quantized[name] = (value, state[name + SCALES].to_local(), signed)
            value = decode_rows(value, quantized[name][1], signed) if value.numel() else \
                torch.zeros(value.shape)
        slots[name] = value
    fused = opt.backend in ("fused", "auto") and fused_cpu.available() and all(
        fused_cpu.unsupported_reason(t) is None for t in (local_p, local_g, *slots.values()))
    if opt.backend == "fused" and not fused:
        raise ValueError(f"backend='fused' cannot update the local shard of {_name(where)}; "
                         "use backend='auto'")
    batch = getattr(opt, "_batch", None) if not generator and not quantized else None
    if fused:
        inner = fused_cpu.FusedEngine(
            p.dtype, seed=seed, stochastic_int8=opt.round_int8_stochastically,
            stochastic_bf16=opt.stochastic_rounding, batch=batch)
    else:
        inner = ReferenceEngine(p.dtype)
        if opt.stochastic_rounding:
            inner.stochastic_seed = seed
    if not generator:
        if local_p.numel():
            opt.apply(inner, s, local_p, local_g, slots)
    else:
        engine = ShardedEngine(inner, p, where)
        whole = tuple(p.shape)
        split = frozenset(k for k, d in enumerate(shard_dims) if d is not None)
        layouts = {name: _slot_layout(opt, group, p, name) for name in names}
        views = {}
        for name, value in slots.items():
            shape, placements, _, reduced = layouts[name]
            sharded = frozenset(k for k, d in enumerate(shard_dims)
                                if d is not None and not reduced[d])
            views[name] = _Shard(value, shape, sharded)
        _run_to_end(opt.apply(engine, s, _Shard(local_p, whole, split),
                              _Shard(local_g, whole, split), views))
    for i, (name, (codes, absmax, signed)) in enumerate(quantized.items()):
        if codes.numel():
            new_codes, new_absmax = encode_rows(
                slots[name], signed, seed + i if opt.round_int8_stochastically else None)
            codes.copy_(new_codes)
            absmax.copy_(new_absmax)


# ---- checkpoints -------------------------------------------------------------------------------

def pack_state_dict(opt, state_dict: dict) -> dict:
    """``state_dict()`` with every value a tensor or a number: each :class:`BlockQuantized`
    slot becomes its codes (under its name) and float32 scales (under ``NAME_absmax``)."""
    packed = {}
    for key, values in state_dict["state"].items():
        if any(isinstance(v, BlockQuantized) for v in values.values()):
            values = dict(values)
            for name, value in list(values.items()):
                if isinstance(value, BlockQuantized):
                    values[name] = value.codes
                    values[name + SCALES] = value.absmax
        packed[key] = values
    return {**state_dict, "state": packed}


def take_scales(opt, state_dict: dict) -> dict:
    """The 8-bit codes and scales of a state dict about to be loaded, by parameter, as saved
    (torch's ``load_state_dict`` casts every state tensor to the parameter's dtype)."""
    saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = itertools.chain.from_iterable(g["params"] for g in opt.param_groups)
    scales = {}
    for saved_id, p in zip(saved_ids, params):
        values = state_dict["state"].get(saved_id)
        if values:
            found = {k: (values.get(k[: -len(SCALES)]), v) for k, v in values.items()
                     if isinstance(k, str) and k.endswith(SCALES) and isinstance(v, Tensor)}
            if found:
                scales[p] = found
    return scales


def restore_scales(opt, scales: dict) -> None:
    """Put the scales :func:`take_scales` kept back, as float32, and rebuild plain parameters'
    8-bit slots as :class:`BlockQuantized` (from either block layout)."""
    for p, found in scales.items():
        state = opt.state[p]
        for key, (codes, absmax) in found.items():
            name = key[: -len(SCALES)]
            absmax = absmax.to(torch.float32)
            if not isinstance(codes, Tensor):
                continue
            state[name] = codes
            if is_dtensor(p) or is_dtensor(codes):
                state[key] = absmax
                continue
            state.pop(key, None)
            codes, absmax = codes.detach().to(p.device), absmax.detach().to(p.device)
            signed = name not in opt.nonnegative_slots
            if absmax.dim() == 1:  # the flat blocks of a single process
                state[name] = BlockQuantized(codes.clone(), absmax.clone(), signed)
            else:  # the row blocks of a sharded run
                state[name] = decode_rows(codes, absmax, signed)


def convert_state(opt, group: dict, p, state: dict, where=(0, 0)) -> None:
    """Loaded state of DTensor ``p`` converted to this optimizer's storage, shard by shard."""
    for name in opt.state_slots(group, p):
        if name not in state:
            continue
        value = state[name]
        absmax = state.pop(name + SCALES, None)
        shape, placements, local_shape, _ = _slot_layout(opt, group, p, name)
        if not is_dtensor(value):
            raise NotShardable(f"{_name(where)}: loaded state {name!r} is not a DTensor; "
                               "load sharded checkpoints with torch.distributed.checkpoint")
        if tuple(value.placements) != tuple(placements):
            value = value.redistribute(p.device_mesh, placements)
        local_value = value.to_local()
        signed = name not in opt.nonnegative_slots
        if absmax is not None:
            if absmax.dim() != 2:
                raise NotShardable(
                    f"{_name(where)}: state {name!r} holds 8-bit state saved by one process "
                    "(flat blocks); load it into an unsharded optimizer and save it from FSDP2")
            if tuple(absmax.placements) != tuple(placements):
                absmax = absmax.redistribute(p.device_mesh, placements)
            if _quantized_layout(opt, p, name, shape):
                state[name] = value
                state[name + SCALES] = absmax
                continue
            local_value = decode_rows(local_value, absmax.to_local(), signed)
        if _quantized_layout(opt, p, name, shape):
            _check_int8_placements(p, where, name)
            codes, scales = encode_rows(local_value, signed)
            state[name] = _wrap(codes, p, placements, shape)
            state[name + SCALES] = _wrap(scales, p, placements, _row_blocks(shape))
            continue
        storage_dtype = opt.slot_storage(name)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "int8": torch.float32}.get(storage_dtype, p.dtype)
        state[name] = _wrap(local_value.to(dtype).contiguous(), p, placements, shape)


def describe(opt) -> dict[str, Any]:  # pragma: no cover - a debugging aid
    """Per parameter: its placements and its state's types (for logs)."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            out[f"{gi}.{pi}"] = {
                "placements": str(getattr(p, "placements", "plain")),
                "state": {k: type(v).__name__ for k, v in opt.state.get(p, {}).items()},
            }
    return out
