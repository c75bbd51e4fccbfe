"""Math helpers that per-element update rules are written with.

Every helper works on torch tensors (the reference engine evaluates a rule on whole tensors in
eager mode) and on Python/NumPy scalars (the form a compiled per-element kernel sees). A rule
that only uses arithmetic operators and these helpers can therefore run on any engine.
:func:`sqrt`, :func:`minimum` and :func:`maximum` also take NumPy arrays, which is how a
generator ``apply``'s per-tensor arithmetic on its sums runs for a whole param group at once
(``Optimizer.vectorized_apply``).

Scalar arguments that stand for hyperparameters or per-step quantities (``w`` in :func:`lerp`,
the bounds of :func:`clamp`) are always plain Python floats.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import torch

Tensor = torch.Tensor


def sqrt(x):
    """Square root (NaN for negative input, as torch)."""
    if isinstance(x, Tensor):
        return torch.sqrt(x)
    if isinstance(x, np.ndarray):
        return np.sqrt(x, where=x >= 0, out=np.full(x.shape, np.nan))
    return math.sqrt(x) if x >= 0 else math.nan


def absolute(x):
    """Absolute value."""
    if isinstance(x, Tensor):
        return torch.abs(x)
    return abs(x)


def sign(x):
    """Sign with sign(0) = 0 (and NaN for NaN)."""
    if isinstance(x, Tensor):
        return torch.sign(x)
    if x > 0:
        return 1.0
    if x < 0:
        return -1.0
    return x * 0.0  # 0 for 0, NaN for NaN


def maximum(a, b):
    """Elementwise maximum; NaN propagates."""
    a_is_t, b_is_t = isinstance(a, Tensor), isinstance(b, Tensor)
    if a_is_t and b_is_t:
        return torch.maximum(a, b)
    if a_is_t:
        return torch.clamp(a, min=b)
    if b_is_t:
        return torch.clamp(b, min=a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)  # NaN propagates
    if a != a or b != b:
        return math.nan
    return a if a >= b else b


def minimum(a, b):
    """Elementwise minimum; NaN propagates."""
    a_is_t, b_is_t = isinstance(a, Tensor), isinstance(b, Tensor)
    if a_is_t and b_is_t:
        return torch.minimum(a, b)
    if a_is_t:
        return torch.clamp(a, max=b)
    if b_is_t:
        return torch.clamp(b, max=a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)  # NaN propagates
    if a != a or b != b:
        return math.nan
    return a if a <= b else b


def clamp(x, low: float, high: float):
    """Clamp ``x`` into [low, high] (scalar bounds; ``high`` may be ``inf``)."""
    if isinstance(x, Tensor):
        return torch.clamp(x, min=low, max=high)
    if x != x:
        return x
    return low if x < low else (high if x > high else x)


def _float32_nearest(exact) -> np.float32:
    """The float32 nearest to a Fraction (ties to even): its float64 rounding, corrected where
    rounding twice would not give it."""
    x = np.float32(float(exact))
    best = x
    for y in (np.nextafter(x, np.float32(-np.inf)), np.nextafter(x, np.float32(np.inf))):
        if not np.isfinite(y):
            continue
        d, e = abs(Fraction(float(y)) - exact), abs(Fraction(float(best)) - exact)
        if d < e or (d == e and int(y.view(np.int32)) & 1 == 0):
            best = y
    return best


def _fma_scalar(a, b, c):
    """``a * b + c`` rounded once, for scalars: exact rational arithmetic, then one rounding
    (float32 when every operand is a NumPy float32, else float64)."""
    single = all(isinstance(x, np.float32) for x in (a, b, c))
    a, b, c = float(a), float(b), float(c)
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        r = a * b + c  # an Inf or NaN operand: the product's rounding cannot matter
        return np.float32(r) if single else r
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:
        r = a * b + c  # a signed zero: the product of finite operands is then exact or 0
        return np.float32(r) if single else r
    if single:
        return _float32_nearest(exact)
    try:
        return float(exact)  # correctly rounded
    except OverflowError:
        return math.copysign(math.inf, exact)


def fma(a, b, c):
    """``a * b + c`` rounded once (fused multiply-add).

    This is what torch's CPU kernels compute for ``c.add(b, alpha=a)`` and
    ``c.addcmul(a, b)`` (measured: every float64 and float32 result equals the exactly rounded
    ``a * b + c``), so a rule follows torch.optim bit for bit by writing those ops as
    ``fma``. Tensor operands run the torch op itself; a Python float operand is rounded to the
    tensors' dtype first, as torch rounds ``alpha``.
    """
    tensors = [x for x in (a, b, c) if isinstance(x, Tensor)]
    if not tensors:
        return _fma_scalar(a, b, c)
    like = tensors[0]
    if not isinstance(a, Tensor):
        a, b = b, a  # the product commutes: the tensor first
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if not isinstance(a, Tensor):  # only c is a tensor
        a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    if isinstance(b, Tensor):
        return torch.addcmul(c, a, b)
    return torch.add(c, a, alpha=b)


def lerp(start, end, weight: float):
    """``start + weight * (end - start)``, evaluated the way torch.lerp does on CPU.

    torch switches to ``end - (end - start) * (1 - weight)`` for weights of at least 0.5 so that
    ``weight = 1`` returns ``end`` exactly, and rounds each form once after the difference:
    ``fma(weight, end - start, start)`` or ``fma(weight - 1, end - start, end)`` (measured on
    float64 and float32). Matching that keeps adamkit's moments equal to torch.optim's, which
    update them with ``lerp_``.
    """
    if isinstance(start, Tensor) and isinstance(end, Tensor):
        return torch.lerp(start, end, weight)
    if isinstance(start, Tensor) or isinstance(end, Tensor):
        like = start if isinstance(start, Tensor) else end
        return torch.lerp(torch.as_tensor(start, dtype=like.dtype, device=like.device),
                          torch.as_tensor(end, dtype=like.dtype, device=like.device), weight)
    single = isinstance(start, np.float32) and isinstance(end, np.float32)
    w = np.float32(weight) if single else float(weight)
    diff = end - start
    if abs(w) < 0.5:
        return _fma_scalar(w, diff, start)
    return _fma_scalar(w - (np.float32(1.0) if single else 1.0), diff, end)


# these are the element helpers the rule compiler lets a rule call
from ..compiler import element_helpers  # noqa: E402  (the compiler imports no engine)

element_helpers(sys.modules[__name__])
