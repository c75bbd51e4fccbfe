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


def lerp(start, end, weight: float):
    """``start + weight * (end - start)``, evaluated the way torch.lerp does on CPU.

    torch switches to ``end - (end - start) * (1 - weight)`` for weights of at least 0.5 so that
    ``weight = 1`` returns ``end`` exactly; matching that keeps adamkit's moments bit-close to
    torch.optim's, which update them with ``lerp_``.
    """
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


# these are the element helpers the rule compiler lets a rule call
from ..compiler import element_helpers  # noqa: E402  (the compiler imports no engine)

element_helpers(sys.modules[__name__])
