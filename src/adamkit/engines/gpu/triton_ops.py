"""Triton implementations of the element helpers of :mod:`adamkit.engines.ops`, and the few
primitives the rule compiler's output calls (``_E``, ``_pow``, ``_sqrt``, ``_div``).

They are what :mod:`adamkit.engines.cpu.numba_ops` is for the Numba backend: the same
semantics as the eager torch helpers, on blocks of elements. Element values are float32
blocks; scalars (a rule's ``s`` fields) arrive as float64 kernel values and are rounded to
float32 by ``_E`` where they meet elements, as the compiler's casts say. Square roots and
divisions of float32 values are correctly rounded (``sqrt_rn``, ``div_rn``), as torch's are;
Triton's defaults are approximations.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _E(x):
    """A value rounded to the element type (float32)."""
    return tl.cast(x, tl.float32)


@triton.jit
def _Ec(x):
    """A Python constant rounded to the element type (the compiler's ``_E`` of a literal)."""
    return tl.full((), x, tl.float32)


@triton.jit
def _div(a, b):
    """``a / b``; correctly rounded where both are float32 (Triton's ``/`` is approximate)."""
    if a.dtype == tl.float32 and b.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x):
    return tl.sqrt_rn(x)


@triton.jit
def _pow_general(x, y):
    # libdevice's pow takes operands of one shape (the interpreter's too)
    return libdevice.pow(x, tl.zeros_like(x) + tl.cast(y, x.dtype))


@triton.jit
def _pow(x, y):
    """``x ** y`` for an exponent the compiler could not resolve to one of torch's fast paths
    (it resolves them whenever the scalars evaluate, so this is the rare path)."""
    return _pow_general(x, y)


@triton.jit
def sqrt(x):
    return tl.sqrt_rn(x)


@triton.jit
def absolute(x):
    return tl.abs(x)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0))


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def minimum(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp(x, low, high):
    # NaN compares false both ways and comes through unchanged, as torch.clamp
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def fma(a, b, c):
    # a * b + c rounded once, as torch's CPU addcmul_ / add_(alpha=) (see ops.fma)
    return tl.fma(a, b, c)


@triton.jit
def lerp(start, end, weight):
    # torch.lerp's two forms, each rounded once after the difference (see ops.lerp); weight
    # is a scalar, so both sides agree per block
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, tl.fma(weight, diff, start),
                    tl.fma(weight - 1.0, diff, end))
