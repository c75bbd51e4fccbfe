"""Numba implementations of the math helpers in :mod:`adamkit.engines.ops`, and scalar codecs.

Importing this module (it needs numba) registers ``numba.extending.overload`` implementations
of ``ops.sqrt``, ``ops.lerp``, ... for scalars, so the per-element rules written with those
helpers compile unchanged inside a fused kernel. Every overload keeps the element's float type:
a ``float32`` element stays ``float32`` and Python-float arguments (``lerp``'s weight, ``clamp``'s
bounds) are rounded to it first, exactly as torch rounds a Python scalar to the tensor's dtype.

The codecs turn stored values into compute values and back inside the kernel's loop:

* bfloat16 (kept in ``int16`` arrays): decode is exact; encode rounds to nearest-even, or
  stochastically with caller-supplied random bits;
* 8-bit blockwise codes (see :mod:`adamkit.storage` for the format): ``signed`` codes are
  sign + 4-bit exponent + 3-bit mantissa, ``unsigned`` codes 4-bit exponent + 4-bit mantissa;
  both are relative to one ``absmax`` per block.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

from .. import ops

# ---- bit casts -----------------------------------------------------------------------------


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``x``."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(_i32(builder, args[0]), ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def add_reassoc(typingctx, a, b):
    """a + b for two float64 or two float32, marked reassociable: a loop summing with it
    vectorizes (partial sums in each vector lane, added at the end), which a strict
    left-to-right sum cannot. Only the addition is flagged: NaN and Inf still propagate."""
    if a != b or a not in (types.float64, types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc",))

    return a(a, b), codegen


# ---- 32-bit unsigned integer arithmetic ------------------------------------------------------
# Numba widens integer arithmetic to 64 bits, and LLVM can then vectorize the codecs only with
# 64-bit lanes (half as many per instruction, and no 64-bit min or conversion in AVX2). These
# intrinsics take any integers, use their low 32 bits (zero-extending narrower ones) and compute
# in uint32 with wraparound, so the codec loops vectorize with 32-bit lanes.


def _i32(builder, value):
    width = value.type.width
    if width > 32:
        return builder.trunc(value, ir.IntType(32))
    if width < 32:
        return builder.zext(value, ir.IntType(32))
    return value


def _u32_intrinsic(make, doc):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            return make(builder, _i32(builder, args[0]), _i32(builder, args[1]))

        return types.uint32(a, b), codegen

    op.__doc__ = doc
    return op


u32_add = _u32_intrinsic(lambda b, x, y: b.add(x, y), "a + b modulo 2**32")
u32_sub = _u32_intrinsic(lambda b, x, y: b.sub(x, y), "a - b modulo 2**32")
u32_mul = _u32_intrinsic(lambda b, x, y: b.mul(x, y), "a * b modulo 2**32")
u32_and = _u32_intrinsic(lambda b, x, y: b.and_(x, y), "a & b")
u32_or = _u32_intrinsic(lambda b, x, y: b.or_(x, y), "a | b")
u32_xor = _u32_intrinsic(lambda b, x, y: b.xor(x, y), "a ^ b")
u32_shl = _u32_intrinsic(lambda b, x, y: b.shl(x, y), "a << b (b < 32)")
u32_shr = _u32_intrinsic(lambda b, x, y: b.lshr(x, y), "a >> b, logical (b < 32)")
u32_min = _u32_intrinsic(lambda b, x, y: b.select(b.icmp_unsigned("<", x, y), x, y),
                         "min(a, b) as unsigned")
u32_max = _u32_intrinsic(lambda b, x, y: b.select(b.icmp_unsigned(">", x, y), x, y),
                         "max(a, b) as unsigned")


def _pointer_intrinsic(element):
    """An intrinsic turning an integer address into a ``CPointer(element)``, so a kernel can view
    many tensors' memory (``numba.carray(ptr, n)``) from one table of addresses."""

    @intrinsic
    def pointer(typingctx, address):
        if not isinstance(address, types.Integer):
            return None
        ptr_type = types.CPointer(element)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr_type))

        return ptr_type(address), codegen

    return pointer


ptr_f32 = _pointer_intrinsic(types.float32)
ptr_f64 = _pointer_intrinsic(types.float64)
ptr_i16 = _pointer_intrinsic(types.int16)
ptr_i8 = _pointer_intrinsic(types.int8)
ptr_u8 = _pointer_intrinsic(types.uint8)


# ---- ops helpers ---------------------------------------------------------------------------


def _is_float(t) -> bool:
    return isinstance(t, types.Float)


def _elem_type(*ts):
    """The float type elements are computed in: float32 only when every float argument is."""
    floats = [t for t in ts if _is_float(t)]
    if floats and all(t == types.float32 for t in floats):
        return np.float32
    return np.float64


@overload(ops.sqrt)
def _sqrt(x):
    if isinstance(x, (types.Float, types.Integer)):
        return lambda x: np.sqrt(x)


@overload(ops.absolute)
def _absolute(x):
    if isinstance(x, (types.Float, types.Integer)):
        return lambda x: abs(x)


@overload(ops.sign)
def _sign(x):
    if _is_float(x):
        one = np.float32(1.0) if x == types.float32 else 1.0
        zero = np.float32(0.0) if x == types.float32 else 0.0

        def impl(x):
            if x > zero:
                return one
            if x < zero:
                return -one
            return x * zero  # 0 for 0, NaN for NaN

        return impl


def _extremum(larger: bool):
    """The overload of ops.maximum (``larger``) or ops.minimum: NaN propagates."""

    def typer(a, b):
        if _is_float(a) or _is_float(b):
            cast = _elem_type(a, b)

            def impl(a, b):
                x = cast(a)
                y = cast(b)
                if x != x or y != y:
                    return x + y  # NaN
                if larger:  # a compile-time constant
                    return x if x >= y else y
                return x if x <= y else y

            return impl

    return typer


overload(ops.maximum)(_extremum(True))
overload(ops.minimum)(_extremum(False))


@overload(ops.clamp)
def _clamp(x, low, high):
    if _is_float(x):
        cast = np.float32 if x == types.float32 else np.float64

        def impl(x, low, high):
            lo = cast(low)
            hi = cast(high)
            if x != x:
                return x
            return lo if x < lo else (hi if x > hi else x)

        return impl


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's ``llvm.fma``: the hardware instruction where there is
    one, a correctly rounded library call where not), for three float64 or three float32."""
    if not (a == b == c and a in (types.float64, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


@overload(ops.fma)
def _fma(a, b, c):
    if _is_float(a) or _is_float(b) or _is_float(c):
        cast = _elem_type(a, b, c)

        def impl(a, b, c):
            return fused_multiply_add(cast(a), cast(b), cast(c))

        return impl


@overload(ops.lerp)
def _lerp(start, end, weight):
    if _is_float(start) or _is_float(end):
        cast = _elem_type(start, end)

        def impl(start, end, weight):
            a = cast(start)
            b = cast(end)
            w = cast(weight)
            # torch's CPU lerp: weight in the element type, the symmetric form for w >= 0.5,
            # each form rounded once after the difference (see ops.lerp)
            if abs(w) < 0.5:
                return fused_multiply_add(w, b - a, a)
            return fused_multiply_add(w - cast(1.0), b - a, b)

        return impl


@register_jitable
def scalar_pow(x, y):
    """``x ** y`` with torch's fast paths for the common exponents (exact where torch is)."""
    if y == 0.5:
        return np.sqrt(x)
    if y == 1.0:
        return x
    if y == 2.0:
        return x * x
    return x ** y


@register_jitable
def general_pow(x, y):
    """``x ** y`` for an exponent known to take none of scalar_pow's fast paths."""
    return x ** y


def as_tuple(x):
    """A rule's results as a tuple (a rule with one result may return it bare)."""
    return x if isinstance(x, tuple) else (x,)


@overload(as_tuple)
def _as_tuple(x):
    if isinstance(x, types.BaseTuple):
        return lambda x: x
    return lambda x: (x,)


# ---- random bits (counter-based, so results do not depend on thread scheduling) ------------


@register_jitable
def random32(i, seed):
    """32 well-mixed bits (uint32) from an element index and a per-call seed (lowbias32
    finaliser of ``i * 0x9E3779B9 + seed`` modulo 2**32)."""
    x = u32_add(u32_mul(i, 0x9E3779B9), seed)
    x = u32_xor(x, u32_shr(x, 16))
    x = u32_mul(x, 0x7FEB352D)
    x = u32_xor(x, u32_shr(x, 15))
    x = u32_mul(x, 0x846CA68B)
    return u32_xor(x, u32_shr(x, 16))


# ---- bfloat16 ------------------------------------------------------------------------------


@register_jitable
def bf16_decode(h):
    """bfloat16 bits (stored as int16) to float32, exactly."""
    return bits_f32(u32_shl(h, 16))  # u32_* zero-extend the int16


@register_jitable
def bf16_encode(x):
    """float32 to bfloat16 bits (int16), rounding to nearest-even; NaN stays NaN."""
    b = f32_bits(np.float32(x))
    rounded = u32_shr(u32_add(u32_add(b, 0x7FFF), u32_and(u32_shr(b, 16), 1)), 16)
    quiet_nan = u32_or(u32_shr(b, 16), 0x40)  # sign kept
    return np.int16(quiet_nan if x != x else rounded)


@register_jitable
def bf16_encode_stochastic(x, bits):
    """float32 to bfloat16 bits, rounding up with probability equal to the dropped fraction."""
    b = f32_bits(np.float32(x))
    rounded = u32_shr(u32_add(b, u32_and(bits, 0xFFFF)), 16)
    quiet_nan = u32_or(u32_shr(b, 16), 0x40)
    return np.int16(quiet_nan if x != x else rounded)


# ---- 8-bit blockwise codes -----------------------------------------------------------------
# y = |x| / unit with unit = absmax / 1.875, so y lies in [0, 1.875], the largest code's value.
# Normal codes: y = (1 + mantissa / 2**M) * 2**(e - 15), e = 1..15; subnormal (e = 0):
# y = mantissa / 2**M * 2**-14. In float32 bits that is a shift of (23 - M) bits and an
# exponent offset of 112. Encoding computes y = (|x| * scale) * inverse in float32 with the
# block's two factors from block_factors(); a subnormal y is encoded from the bits of
# y + 2**-14, whose mantissa then holds y in units of 2**-37.

TWO_M14 = 6.103515625e-05  # 2**-14


@register_jitable
def block_unit(absmax):
    """The value of y = 1 in a block whose largest finite magnitude is ``absmax`` (float32)."""
    return np.float32(np.float64(absmax) / 1.875)


@register_jitable
def block_factors(absmax):
    """(scale, inverse), float32, with y = (|x| * scale) * inverse: ``scale`` is 2**64 for a
    block with absmax < 2**-60, 2**-64 above 2**60, else 1, so that ``inverse`` =
    1.875 / (absmax * scale) is a normal float32; both are 0 for an all-zero block."""
    a = np.float64(absmax)
    scale = 18446744073709551616.0 if a < 8.673617379884035e-19 else (
        5.421010862427522e-20 if a > 1.152921504606847e18 else 1.0)
    inverse = 1.875 / (a * scale) if a > 0 else 0.0
    return np.float32(scale), np.float32(inverse)


# Encoders and decoders are written as selects without early returns, in 32-bit integers,
# so that the kernel loops around them vectorize.


@register_jitable
def signed_decode(c, unit):
    code = np.int32(c)
    negative = code < 0
    mag = u32_sub(0, code) if negative else u32_and(code, 0xFF)
    normal = bits_f32(u32_shl(u32_add(mag, 896), 20))
    sub = np.float32(mag) * np.float32(7.62939453125e-06)  # 2**-17
    y = normal if mag >= np.uint32(8) else sub
    v = y * unit
    v = -v if negative else v
    return np.float32(np.nan) if code == -128 else v


@register_jitable
def signed_encode(x, scale, inverse, half):
    """Code of ``x`` (see block_factors); ``half`` in [0, 2**20): 2**19 rounds to nearest,
    uniform random bits round stochastically."""
    xf = np.float32(x)
    ax = bits_f32(u32_and(f32_bits(xf), 0x7FFFFFFF))
    y = (ax * scale) * inverse
    small = y < np.float32(TWO_M14)
    y = y + np.float32(TWO_M14) if small else y
    mag = u32_sub(u32_shr(u32_add(f32_bits(y), half), 20), 904 if small else 896)
    mag = u32_min(mag, 127)
    code = u32_sub(0, mag) if xf < 0 else mag
    return np.int8(code if ax < np.float32(np.inf) else np.uint32(0x80))


@register_jitable
def unsigned_decode(c, unit):
    code = u32_and(c, 0xFF)
    normal = bits_f32(u32_shl(u32_add(code, 1792), 19))
    sub = np.float32(code) * np.float32(3.814697265625e-06)  # 2**-18
    y = normal if code >= np.uint32(16) else sub
    v = y * unit
    return np.float32(np.nan) if code == np.uint32(255) else v


@register_jitable
def unsigned_encode(x, scale, inverse, half):
    """Code of ``x`` >= 0 (negative values encode as 0); a positive value never encodes as 0,
    so a second moment never decodes to zero. ``half`` in [0, 2**19)."""
    xf = np.float32(x)
    y = (xf * scale) * inverse
    small = y < np.float32(TWO_M14)
    y = y + np.float32(TWO_M14) if small else y
    mag = u32_sub(u32_shr(u32_add(f32_bits(y), half), 19), 1808 if small else 1792)
    mag = u32_min(u32_max(mag, 1), 254)
    mag = mag if xf > 0 else np.uint32(0)
    finite = abs(xf) < np.float32(np.inf)
    return np.uint8(mag if finite else np.uint32(255))


@register_jitable
def finite_abs_bits(x):
    """IEEE bits of |float32(x)| if finite, else 0: their unsigned max is the finite absmax."""
    b = u32_and(f32_bits(np.float32(x)), 0x7FFFFFFF)
    return b if b < np.uint32(0x7F800000) else np.uint32(0)


# ---- constant-pattern copies -------------------------------------------------------------


def shuffled_copy(window: int, pattern: tuple[int, ...]):
    """An intrinsic ``copy(src, i, dst, j)`` for 1-D arrays of one dtype that sets
    ``dst[j + e] = src[i + pattern[e]]`` for every ``e``, where every ``pattern[e] < window``.

    It loads ``src[i : i + window]`` as one vector, permutes it with the constant pattern (one
    LLVM ``shufflevector``, lowered to a few register permutes) and stores one vector: what
    element-by-element copies take a load and a store per element for. The small-matrix bcast
    kernels use it to spread a conv kernel's row and column factors over 16 of its 3x3
    matrices at a time. The caller keeps both ranges inside the arrays (no bounds checks).
    """
    pattern = tuple(int(e) for e in pattern)
    if not pattern or min(pattern) < 0 or max(pattern) >= window:
        raise ValueError(f"shuffled_copy: pattern entries must lie in [0, {window})")

    @intrinsic
    def copy(typingctx, src, i, dst, j):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
                and src.dtype == dst.dtype and src.ndim == dst.ndim == 1
                and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            element = context.get_data_type(signature.args[0].dtype)
            align = context.get_abi_sizeof(element)
            source = ir.VectorType(element, window)
            target = ir.VectorType(element, len(pattern))
            src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            dst_data = context.make_array(signature.args[2])(context, builder, args[2]).data
            src_ptr = builder.bitcast(builder.gep(src_data, [args[1]]), source.as_pointer())
            dst_ptr = builder.bitcast(builder.gep(dst_data, [args[3]]), target.as_pointer())
            loaded = builder.load(src_ptr, align=align)
            mask = ir.Constant(ir.VectorType(ir.IntType(32), len(pattern)), list(pattern))
            moved = builder.shuffle_vector(loaded, ir.Constant(source, ir.Undefined), mask)
            builder.store(moved, dst_ptr, align=align)
            return context.get_dummy_value()

        return types.none(src, i, dst, j), codegen

    return copy


# ---- helpers called from Python --------------------------------------------------------


@intrinsic
def void_ptr(typingctx, address):
    """An integer address as a ``void*`` (``numba.carray(void_ptr(a), n, dtype)``)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(address), codegen


SMALL_MATRIX = 4096  # matrices with fewer elements are summed whole, many per work item
#: elements per work item of the means of squares (a band of rows of a large matrix, or whole
#: small matrices): equal-sized items keep both threads busy to the end when one launch covers
#: tensors of very different sizes (Numba splits a parallel loop's range evenly)
BAND = 1 << 20
SUM_RUN = 256  # rows (and row segments) summed in the element dtype before adding to float64


@register_jitable
def _per_item(n, m):
    """Whole n x m matrices per work item (n * m < SMALL_MATRIX)."""
    return max(1, BAND // (n * m))


@register_jitable
def _bands(n, m):
    """Bands of rows (work items) of one n x m matrix (n * m >= SMALL_MATRIX)."""
    return min(n, max(1, (n * m + BAND - 1) // BAND))


@register_jitable
def _sq_means_whole(x, rows, cols, b0, b1, n, m):
    """Row and column means of x**2 for matrices b0..b1 of x viewed as (batch, n, m), each
    summed whole in float64 (small matrices: a conv kernel's 3x3)."""
    col = np.empty(m, dtype=np.float64)
    for b in range(b0, b1):
        col[:] = 0.0
        for j in range(n):
            base = (b * n + j) * m
            acc = 0.0
            for k in range(m):
                v = np.float64(x[base + k])
                v = v * v
                acc += v
                col[k] += v
            rows[b * n + j] = acc / m
        for k in range(m):
            cols[b * m + k] = col[k] / n


@register_jitable
def _sq_means_band(x, rows, part, b, r0, r1, n, m):
    """Rows r0..r1 of matrix b of x viewed as (batch, n, m): their means of x**2 into rows,
    their column sums of x**2 added into ``part`` (float64, m).

    One pass in memory order (reading columns directly would stride through memory). The
    inner loop sums in x's dtype, so it vectorizes at full width for float32; runs of at most
    SUM_RUN rows (and row segments of SUM_RUN * 64 elements) are then added in float64."""
    seg = SUM_RUN * 64
    zero = np.zeros(1, x.dtype)[0]
    run = np.zeros(m, x.dtype)  # column sums of the current run of rows
    for j in range(r0, r1):
        base = (b * n + j) * m
        acc = 0.0
        for k1 in range(0, m, seg):
            sacc = zero
            for k0 in range(k1, min(k1 + seg, m)):
                k = np.uint64(k0)
                v = x[np.uint64(base) + k]
                v = v * v
                sacc = add_reassoc(sacc, v)
                run[k] += v
            acc += np.float64(sacc)
        rows[b * n + j] = acc / m
        if (j - r0) % SUM_RUN == SUM_RUN - 1 or j == r1 - 1:
            for k0 in range(m):
                part[k0] += np.float64(run[k0])
                run[k0] = zero


def sq_means_plan(shapes):
    """The tables :func:`sq_means_many` takes for matrices of ``shapes`` ((batch, n, m) each,
    n * m > 0): cumulative work items, float64 partial sums and banded columns per tensor."""
    count = len(shapes)
    items = np.zeros(count + 1, dtype=np.int64)
    parts = np.zeros(count + 1, dtype=np.int64)
    columns = np.zeros(count + 1, dtype=np.int64)
    for t, (batch, n, m) in enumerate(shapes):
        if n * m < SMALL_MATRIX:
            per = _per_item(n, m)
            work, part, cols = (batch + per - 1) // per, 0, 0
        else:
            work = batch * _bands(n, m)
            part, cols = work * m, batch * m
        items[t + 1] = items[t] + work
        parts[t + 1] = parts[t] + part
        columns[t + 1] = columns[t] + cols
    return items, parts, columns


def widened(v):
    """An element as computed: bfloat16 bits (int16) decoded to float32, a float unchanged
    (compiled only; see the overload below)."""
    raise NotImplementedError


@overload(widened)
def _widened(v):
    if isinstance(v, types.Integer):
        return lambda v: bf16_decode(v)
    return lambda v: v


def narrowed(v, out):
    """``v`` as an element of array ``out``: rounded to nearest bfloat16 bits where ``out``
    holds them (int16), unchanged for a float array (compiled only)."""
    raise NotImplementedError


@overload(narrowed)
def _narrowed(v, out):
    if isinstance(out.dtype, types.Integer):
        return lambda v, out: bf16_encode(v)
    return lambda v, out: v


def _mean_rows(x, out, batch, n, divisor, chunk):
    """``out[b] = (x[b * n] + ... + x[b * n + n - 1]) / divisor`` for b < batch, summed left to
    right in x's dtype, float32 for bfloat16 bits (``divisor`` is n in that dtype; a bfloat16
    mean is then rounded to nearest): a (..., n, 1) tensor's mean over its rows, as torch's
    mean takes it over a few values (``chunk`` matrices per work item)."""
    for c in numba.prange((batch + chunk - 1) // chunk):
        for b0 in range(c * chunk, min(c * chunk + chunk, batch)):
            b = np.uint64(b0)
            acc = widened(x[b * np.uint64(n)])
            for i in range(1, n):
                acc += widened(x[b * np.uint64(n) + np.uint64(i)])
            out[b] = narrowed(acc / divisor, out)


mean_rows = numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)(_mean_rows)
mean_rows_serial = numba.njit(cache=True, error_model="numpy", nogil=True)(_mean_rows)


@numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def sq_means_many(xs, row_at, col_at, shapes, items, parts, columns, dtype, out_dtype):
    """Row and column means of x**2 for many tensors x viewed as (batch, n, m), in one launch:
    tensor t has ``shapes[t] = (batch, n, m)`` elements of ``dtype`` at address ``xs[t]`` and
    writes ``out_dtype`` means at ``row_at[t]`` (batch*n) and ``col_at[t]`` (batch*m).

    Matrices under SMALL_MATRIX elements: a work item takes whole matrices, about BAND
    elements' worth. Larger ones are split into bands of rows of about BAND elements; a band
    finishes its rows' means and adds its squares into its own column partial sums, which a
    second loop adds up. The parallel loops run over every tensor's work items (tables from
    :func:`sq_means_plan`), so small and large tensors share the threads."""
    partial = np.zeros(parts[-1], dtype=np.float64)
    for it in numba.prange(items[-1]):
        t = np.searchsorted(items, it, side="right") - 1
        w = it - items[t]
        batch, n, m = shapes[t, 0], shapes[t, 1], shapes[t, 2]
        x = numba.carray(void_ptr(xs[t]), batch * n * m, dtype)
        rows = numba.carray(void_ptr(row_at[t]), batch * n, out_dtype)
        if n * m < SMALL_MATRIX:
            cols = numba.carray(void_ptr(col_at[t]), batch * m, out_dtype)
            per = _per_item(n, m)
            _sq_means_whole(x, rows, cols, w * per, min(w * per + per, batch), n, m)
        else:
            splits = _bands(n, m)
            band = (n + splits - 1) // splits
            b = w // splits
            r0 = (w - b * splits) * band
            at = parts[t] + w * m
            _sq_means_band(x, rows, partial[at:at + m], b, r0, min(r0 + band, n), n, m)
    for u in numba.prange(len(shapes)):
        if columns[u + 1] > columns[u]:
            _finish_columns(partial, parts[u], shapes[u, 0], shapes[u, 1], shapes[u, 2],
                            col_at[u], out_dtype)


@register_jitable
def _finish_columns(partial, at, batch, n, m, address, out_dtype):
    """The column means of a banded tensor from its bands' partial sums at ``partial[at:]``
    (a function, not inline: Numba drops a parallel loop whose only effect is a store
    through a raw pointer). One work item per tensor: a few thousand additions each."""
    splits = _bands(n, m)
    cols = numba.carray(void_ptr(address), batch * m, out_dtype)
    for b in range(batch):
        for k in range(m):
            acc = 0.0
            for w in range(b * splits, b * splits + splits):
                acc += partial[at + w * m + k]
            cols[b * m + k] = acc / n


def nonfinite_in(a, lo, hi):
    """Whether a[lo:hi] holds a NaN or Inf (compiled only; see the overload below)."""
    raise NotImplementedError


@overload(nonfinite_in)
def _nonfinite_in(a, lo, hi):
    # Loops that vectorize and stream at the read bandwidth. Floats: x * 0 is +-0 for finite x
    # and NaN for NaN and +-Inf, so a (reassociable) sum of them is nonzero exactly when one
    # is not finite. int16 elements are bfloat16 bits, non-finite when the exponent is all
    # ones: the largest masked exponent tells. The range is read as four interleaved streams
    # (quarters read side by side): one core keeps more reads in flight that way. Measured
    # against one stream: 11-13% faster over one 124M-element float32 array, 7% (median of
    # five runs) over GPT-2's 148 gradients with runtime.CHECK_CHUNK work items.
    if isinstance(a.dtype, types.Integer):
        def impl(a, lo, hi):
            q = (hi - lo) // 4
            t0 = np.uint32(0)
            t1 = np.uint32(0)
            t2 = np.uint32(0)
            t3 = np.uint32(0)
            for i0 in range(lo, lo + q):
                i = np.uint64(i0)
                t0 = u32_max(t0, u32_and(a[i], 0x7F80))
                t1 = u32_max(t1, u32_and(a[i + np.uint64(q)], 0x7F80))
                t2 = u32_max(t2, u32_and(a[i + np.uint64(2 * q)], 0x7F80))
                t3 = u32_max(t3, u32_and(a[i + np.uint64(3 * q)], 0x7F80))
            for i0 in range(lo + 4 * q, hi):
                t0 = u32_max(t0, u32_and(a[np.uint64(i0)], 0x7F80))
            return u32_max(u32_max(t0, t1), u32_max(t2, t3)) == np.uint32(0x7F80)
    else:
        zero = a.dtype(0)

        def impl(a, lo, hi):
            q = (hi - lo) // 4
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for i0 in range(lo, lo + q):
                i = np.uint64(i0)
                s0 = add_reassoc(s0, a[i] * zero)
                s1 = add_reassoc(s1, a[i + np.uint64(q)] * zero)
                s2 = add_reassoc(s2, a[i + np.uint64(2 * q)] * zero)
                s3 = add_reassoc(s3, a[i + np.uint64(3 * q)] * zero)
            for i0 in range(lo + 4 * q, hi):
                s0 = add_reassoc(s0, a[np.uint64(i0)] * zero)
            return (s0 + s1) + (s2 + s3) != zero
    return impl


@numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def chunks_nonfinite(addresses, ns, starts, chunk, dtype):
    """How many chunks hold a NaN or Inf, over many tensors at once (one parallel pass).

    Tensor ``t`` has ``ns[t]`` elements of ``dtype`` at ``addresses[t]``; the parallel loop runs
    over every tensor's chunks of ``chunk`` elements (``starts``: cumulative chunk counts).
    bfloat16 tensors are passed as their bit patterns (``dtype`` int16).
    """
    bad = 0
    for c in numba.prange(starts[-1]):
        t = np.searchsorted(starts, c, side="right") - 1
        a = numba.carray(void_ptr(addresses[t]), ns[t], dtype)
        lo = (c - starts[t]) * chunk
        hi = min(lo + chunk, ns[t])
        bad += 1 if nonfinite_in(a, lo, hi) else 0
    return bad


_ = math  # math is available to generated kernels through this module
