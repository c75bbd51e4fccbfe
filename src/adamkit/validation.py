"""Hyperparameter checks shared by the algorithms.

Each check takes the argument's name and value and raises ``ValueError`` with a message that
names the argument, the value and the valid range, e.g. ``Invalid beta1: 1.5 (must be in
[0, 1))``. Algorithms declare one check per hyperparameter; the front end runs them when a
param group is added (at construction and in ``add_param_group``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

Check = Callable[[str, Any], None]


class UnsupportedParameterError(ValueError, RuntimeError):
    """A parameter the optimizer cannot update (complex where it has no complex form), raised
    when the param group is added. It is a ``ValueError`` (a bad argument) and also a
    ``RuntimeError``, which is what torch raises for some of these cases at ``step()``, so code
    written against either catches it."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor of shape {tuple(value.shape)} (must be a single number)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number)")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: nan (must be a number)")
    return value


def at_least(low: float) -> Check:
    """value >= low (finite)."""

    def check(name: str, value: Any) -> None:
        v = _number(name, value)
        if not (low <= v < math.inf):
            raise ValueError(f"Invalid {name}: {value} (must be >= {low:g})")

    return check


def greater_than(low: float) -> Check:
    """value > low (finite)."""

    def check(name: str, value: Any) -> None:
        v = _number(name, value)
        if not (low < v < math.inf):
            raise ValueError(f"Invalid {name}: {value} (must be > {low:g})")

    return check


def in_range(low: float, high: float, *, closed_high: bool = False) -> Check:
    """low <= value < high (or <= high)."""
    bracket = "]" if closed_high else ")"

    def check(name: str, value: Any) -> None:
        v = _number(name, value)
        ok = low <= v <= high if closed_high else low <= v < high
        if not ok:
            raise ValueError(f"Invalid {name}: {value} (must be in [{low:g}, {high:g}{bracket})")

    return check


non_negative = at_least(0.0)
positive = greater_than(0.0)
unit_interval = in_range(0.0, 1.0)  # [0, 1): betas, momentum-like averaging constants


def flag(name: str, value: Any) -> None:
    """A bool."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def betas(name: str, value: Any) -> None:
    """A pair (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair (beta1, beta2))")
    unit_interval("beta1", value[0])
    unit_interval("beta2", value[1])


def betas_floats_or_tensors(name: str, value: Any) -> None:
    """:func:`betas`, both numbers or both tensors (torch's Adam and AdamW reject a mix)."""
    betas(name, value)
    if isinstance(value[0], torch.Tensor) != isinstance(value[1], torch.Tensor):
        raise ValueError(
            f"Invalid {name}: {value!r} (betas must be either both floats or both Tensors)"
        )


def choice(*options: Any) -> Check:
    """One of the given values."""

    def check(name: str, value: Any) -> None:
        if value not in options:
            listed = ", ".join(repr(o) for o in options)
            raise ValueError(f"Invalid {name}: {value!r} (must be one of {listed})")

    return check


def optional(inner: Check) -> Check:
    """None or a value passing ``inner``."""

    def check(name: str, value: Any) -> None:
        if value is not None:
            inner(name, value)

    return check
