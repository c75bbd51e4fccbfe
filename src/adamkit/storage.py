"""How optimizer state is stored: float32, bfloat16, or 8-bit blockwise codes.

The rule always computes in float32 (float64 for float64 parameters); the storage decides what
is kept between steps. ``state_dtype`` of every adamkit optimizer:

* ``None``: the parameter's dtype (torch's behaviour); ``"float32"``, ``"bfloat16"``: that dtype.
* ``"int8"``: :class:`BlockQuantized`: one byte per element plus one float32 ``absmax`` per
  block of :data:`BLOCK` = 256 consecutive elements (0.016 bytes per element). Tensors with fewer
  than :data:`MIN_QUANTIZED` = 4096 elements, state that is not shaped like its parameter, and
  slots an algorithm lists in ``unquantized_slots`` (Adafactor's row and column factors, which
  a 1x1 conv kernel's are shaped like it) stay float32.

The 8-bit codes are tiny floating-point numbers relative to the block: with
``unit = absmax / 1.875`` and ``y = |x| / unit`` in [0, 1.875],

* **signed** (first moments, momentum): sign bit + 4-bit exponent + 3-bit mantissa,
  ``y = (1 + m/8) 2^(e-15)`` for e = 1..15 and ``y = m/8 · 2^-14`` for e = 0. Relative error at
  most 2^-4 for ``|x| >= 2^-14 unit`` (about 3.3e-5 of the block's absmax), absolute error at
  most ``2^-18 unit`` below. Code -128 is NaN.
* **unsigned** (second moments and other non-negative state): 4-bit exponent + 4-bit
  mantissa, relative error at most 2^-5 above ``2^-14 unit``; a positive value never encodes as
  zero (its code is at least 1), so a second moment never turns into a division by epsilon.
  Code 255 is NaN.

The optimizers round stochastically when they store 8-bit state (see :func:`encode`), so the
state's moving averages are unbiased; checkpoints and conversions round to nearest. The fused
kernels draw 16 random bits per element and state (one 32-bit word serves two states; a
block's words are a golden-ratio sequence from one hash per block and step), which leaves a
bias below 2**-16 of a code step.

Both cover more than four decades per block, which is what the second moment needs (it spans
many orders of magnitude), and cost a few integer operations to encode or decode, so the fused
engine does both inside its single pass. NaN (and ±Inf, which decodes as NaN) stays in its
element: the block's ``absmax`` is taken over finite values.

Which slots are non-negative is declared by each algorithm (``nonnegative_slots``).
``state_dict()`` saves a :class:`BlockQuantized` slot as its codes (under the slot's name) and
its float32 ``absmax`` (under ``NAME_absmax``): tensors only, about a quarter of the bytes of
float32 state (see :mod:`adamkit.distributed`); ``load_state_dict`` converts between storage
types in either direction.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

BLOCK = 256
MIN_QUANTIZED = 4096
TOP = 1.875  # the largest code's value in units of absmax / 1.875
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
_FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK), n


def _absmax(blocks: Tensor) -> Tensor:
    a = blocks.abs().double()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=torch.float64))
    return a.amax(dim=1).float() if a.numel() else a.new_zeros(0).float()


def _factors(absmax: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block float32 ``scale`` and ``inverse`` with y = (|x| * scale) * inverse: scale is
    2**64 below absmax 2**-60 and 2**-64 above 2**60 (else 1), so that inverse =
    TOP / (absmax * scale) stays a normal float32 for every finite absmax; 0 for zero blocks."""
    a = absmax.double()
    scale = torch.where(a < 2.0**-60, 2.0**64, torch.where(a > 2.0**60, 2.0**-64, 1.0))
    scaled = a * scale
    inverse = torch.where(a > 0, TOP / torch.where(a > 0, scaled, 1.0), 0.0)
    return scale.float(), inverse.float()


def encode(x: Tensor, signed: bool, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """8-bit codes (int8 if ``signed`` else uint8, shaped like ``x``) and per-block absmax.

    ``seed=None`` rounds to the nearest code; an integer seed rounds stochastically (up with
    probability equal to the dropped fraction), so that an exponential moving average kept in
    8 bits is unbiased: with nearest rounding a second moment whose per-step change is smaller
    than half a code step would never move.
    """
    x = x.detach().to(torch.float32)
    blocks, n = _blocks(x)
    absmax = _absmax(blocks)
    scale, inverse = _factors(absmax)
    # y = (|x| * scale) * inverse in float32, the kernels' arithmetic (numba_ops)
    y = (blocks.abs() * scale[:, None]) * inverse[:, None]
    finite = torch.isfinite(blocks)
    # a subnormal code (y < 2**-14) is read from the bits of y + 2**-14 (mantissa in 2**-37)
    small = y < 2.0**-14
    y = torch.where(small, y + 2.0**-14, y)
    y_bits = y.view(torch.int32).long() & 0xFFFFFFFF
    shift = 20 if signed else 19
    if seed is None:
        half = torch.full((), 1 << (shift - 1), dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(int(seed))
        half = torch.randint(0, 1 << shift, blocks.shape, generator=g)
    if signed:
        offset = torch.where(small, 904, 896)
        mag = (((y_bits + half) >> 20) - offset).clamp(max=127)
        code = torch.where(blocks < 0, -mag, mag)
        code = torch.where(finite, code, torch.full_like(code, -128))
        codes = code.to(torch.int8)
    else:
        offset = torch.where(small, 1808, 1792)
        mag = (((y_bits + half) >> 19) - offset).clamp(min=1, max=254)
        mag = torch.where(blocks > 0, mag, torch.zeros_like(mag))
        code = torch.where(finite, mag, torch.full_like(mag, 255))
        codes = code.to(torch.uint8)
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


def decode(codes: Tensor, absmax: Tensor, signed: bool, dtype=torch.float32) -> Tensor:
    """The values that ``codes`` (with per-block ``absmax``) stand for."""
    blocks, n = _blocks(codes)
    c = blocks.long()
    # the same float32 arithmetic as the fused kernels' decoders (numba_ops), bit for bit
    unit = (absmax.double() / TOP).float()[:, None]
    if signed:
        mag = c.abs()
        normal = ((mag + 896) << 20).to(torch.int32).view(torch.float32)
        y = torch.where(mag >= 8, normal, mag.float() * 2.0**-17)
        v = y * unit
        v = torch.where(c < 0, -v, v)
        v = torch.where(c == -128, torch.full_like(v, math.nan), v)
    else:
        c = c & 0xFF
        normal = ((c + 1792) << 19).to(torch.int32).view(torch.float32)
        y = torch.where(c >= 16, normal, c.float() * 2.0**-18)
        v = y * unit
        v = torch.where(c == 255, torch.full_like(v, math.nan), v)
    return v.reshape(-1)[:n].reshape(codes.shape).to(dtype)


class BlockQuantized:
    """An 8-bit blockwise state tensor: ``codes`` shaped like the parameter and one float32
    ``absmax`` per block of 256 elements (in flattened order). ``signed`` picks the code map.

    It is what ``optimizer.state[p][name]`` holds with ``state_dtype="int8"`` (``state_dict()``
    saves its codes and absmax as two tensors); ``dequantize()`` gives the float values.
    """

    def __init__(self, codes: Tensor, absmax: Tensor, signed: bool):
        self.codes = codes
        self.absmax = absmax
        self.signed = bool(signed)

    @classmethod
    def quantize(cls, x: Tensor, signed: bool) -> "BlockQuantized":
        codes, absmax = encode(x, signed)
        return cls(codes.to(x.device), absmax.to(x.device), signed)

    @classmethod
    def full(cls, shape, fill: float, signed: bool, device=None) -> "BlockQuantized":
        return cls.quantize(torch.full(tuple(shape), float(fill), device=device), signed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return decode(self.codes, self.absmax, self.signed, dtype)

    def copy_(self, x: Tensor, seed: int | None = None) -> "BlockQuantized":
        """Re-encode from float values (same shape), in place (``seed``: see :func:`encode`)."""
        codes, absmax = encode(x, self.signed, seed)
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)
        return self

    def clone(self) -> "BlockQuantized":
        return BlockQuantized(self.codes.clone(), self.absmax.clone(), self.signed)

    def to(self, device=None) -> "BlockQuantized":
        return BlockQuantized(self.codes.to(device), self.absmax.to(device), self.signed)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return self.codes.numel()

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * 4

    def __eq__(self, other) -> bool:
        return (isinstance(other, BlockQuantized) and self.signed == other.signed
                and torch.equal(self.codes, other.codes) and torch.equal(self.absmax, other.absmax))

    __hash__ = None

    def __repr__(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"BlockQuantized(shape={tuple(self.shape)}, {kind}, blocks={self.absmax.numel()})"

    def __getstate__(self):
        return {"codes": self.codes, "absmax": self.absmax, "signed": self.signed}

    def __setstate__(self, state):
        self.codes = state["codes"]
        self.absmax = state["absmax"]
        self.signed = bool(state["signed"])


# torch.load(weights_only=True), the default, refuses unknown classes: allow this one.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([BlockQuantized])


def quantizable(p: Tensor, shape) -> bool:
    """Whether state of ``shape`` for parameter ``p`` is kept as 8-bit codes."""
    return (tuple(shape) == tuple(p.shape) and p.numel() >= MIN_QUANTIZED
            and not p.is_complex())


def make_state(state_dtype: str | None, p: Tensor, shape, fill: float, signed: bool):
    """A fresh state value for ``p`` (``shape`` may differ from ``p.shape``, as Adafactor's)."""
    if state_dtype == "int8":
        if quantizable(p, shape):
            return BlockQuantized.full(shape, fill, signed, device=p.device)
        return torch.full(tuple(shape), float(fill), dtype=torch.float32, device=p.device)
    dtype = _FLOAT_STORAGE.get(state_dtype, p.dtype)
    return torch.full(tuple(shape), float(fill), dtype=dtype, device=p.device)


def convert(value, state_dtype: str | None, p: Tensor, signed: bool):
    """A loaded state value converted to the storage ``state_dtype`` asks for."""
    if isinstance(value, BlockQuantized):
        if state_dtype == "int8" and quantizable(p, value.shape):
            return value.clone().to(p.device)
        dtype = _FLOAT_STORAGE.get(state_dtype, torch.float32 if state_dtype == "int8"
                                   else p.dtype)
        return value.dequantize(dtype).to(p.device)
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return value
    if state_dtype == "int8":
        if quantizable(p, value.shape):
            return BlockQuantized.quantize(value, signed)
        return value.to(torch.float32)
    dtype = _FLOAT_STORAGE.get(state_dtype)
    return value.to(dtype) if dtype is not None else value


def state_nbytes(value) -> int:
    if isinstance(value, BlockQuantized):
        return value.nbytes()
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return 0
