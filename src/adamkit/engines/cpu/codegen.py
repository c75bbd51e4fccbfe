"""The Numba target of the rule compiler: a rule's kernel module for a layout.

:func:`_kernel_source` wraps a rule's compiled scalar functions (:mod:`adamkit.compiler`) in a
``numba.prange`` loop for one layout (a single tensor, many tensors in one launch, 8-bit
blockwise state, row and column factors broadcast against matrices), with every operand's
stored format decoded on load and encoded on store; :func:`_load_kernel` generates, caches
and imports it (one kernel per rule, operand formats, outputs, sums, compute dtype, layout and
outcomes).
"""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

from ...compiler import _rule_program
from .runtime import _KERNELS, _load_module, _lock

#: the decorator of a rule's scalar functions inside a kernel module
RULE_DECORATOR = '@numba.njit(error_model="numpy")\n'

# operand formats: "f32" / "f64" float arrays, "b16" bfloat16 bits in int16, "q8s" / "q8u"
# 8-bit blockwise codes with one absmax per block, "num" a Python number, "none" no operand
_FLOAT_ARRAYS = ("f32", "f64", "b16")
#: the numba_ops pointer intrinsic a generated kernel reads each operand format through
_POINTERS = {"f32": "_ptr_f32", "f64": "_ptr_f64", "b16": "_ptr_i16", "q8s": "_ptr_i8",
             "q8u": "_ptr_u8"}
#: the formats of x, y and the row state that sq_stats_last_dims's kernel takes
_ROW_STATS_KINDS = ("f32", "f64", "b16")
BLOCK = 256
GROUP = 64  # blocks per parallel work item of the blockwise layout
CHUNK = BLOCK * GROUP  # elements per parallel work item of the multi-tensor layouts
# Per-tensor kernels (rules with reductions, sparse rows) for fewer elements than this run on
# the calling thread. With the OpenMP layer a launch costs a few us and 2**14 or 2**17 measure
# the same (FAdam, Adafactor on GPT-2 and ResNet-18 shapes); on the workqueue layer, Numba's
# fallback, a launch costs 50-200 us, the time one core takes to update about 100k elements.
SERIAL_BELOW = 1 << 17
MEAN_ROWS_ITEM = 1 << 14  # matrices per work item of FusedEngine.mean_rows
ROW_BLOCK = 4096  # elements per work item of the bcast layout (whole rows, at least one)
# Broadcast maps over matrices of at most this many elements (the last two dimensions: a conv
# kernel's 3x3) get kernels with the matrix's sizes and every operand's strides compiled in,
# one per shape: the loops over a matrix then unroll. On 512x512x3x3 (Adafactor's two
# factored passes, float32) that measured 2-3x faster than runtime sizes and strides.
SMALL_BCAST = 64
# ... and their broadcast operands (the factors) are spread over SHUFFLE_MATRICES matrices at a
# time (fewer where that is over SHUFFLE_WINDOW elements) by one vector permute
# (numba_ops.shuffled_copy) where the source elements those matrices read span at most
# SHUFFLE_WINDOW elements: on 512x512x3x3 float32 Adafactor's update-sums kernel took 1.0 ms
# instead of 2.0 ms with element-by-element copies (the flat loop alone 0.7 ms), measured
# standalone.
SHUFFLE_MATRICES = 16
SHUFFLE_WINDOW = 256


def _shuffle_matrices(rows: int, cols: int) -> int:
    """How many small (rows, cols) matrices one shuffled copy covers (numba_ops.shuffled_copy):
    SHUFFLE_MATRICES, fewer where their elements would exceed SHUFFLE_WINDOW."""
    return max(1, min(SHUFFLE_MATRICES, SHUFFLE_WINDOW // (rows * cols)))


def _kernel_source(rule_src: str, imports: list[str], fields: Sequence[str], kinds: Sequence[str],
                   stores: Sequence[tuple[int, int]], n_sums: int, n_results: int, dtype: str,
                   layout: str, negated: Sequence[int] = (), parallel: bool = True,
                   last_strides: Sequence[int | None] = (),
                   small: tuple | None = None) -> str:
    """Generate the kernel module. ``stores``: (result index, input index) pairs; ``negated``:
    inputs read with their sign flipped (the gradient under ``maximize=True``); ``parallel``:
    whether the outer loop runs on Numba's threads (else ``prange`` is a plain loop);
    ``last_strides``: for the bcast layout, each operand's stride along the last dimension when
    it is 0 or 1 (compiled in, so the inner loop vectorizes), None when it is a runtime value;
    ``small``: for the bcast layout over small matrices, ``(rows, cols, strides)`` compiled in
    (``strides``: each operand's (batch, row, column) strides, None for non-arrays).
    ``layout`` is ``("mfact", roles)`` for the multi-tensor layout of maps that broadcast
    factors against matrices (see :func:`factor_roles`)."""
    E = "np.float32" if dtype == "float32" else "np.float64"
    roles = None
    if isinstance(layout, tuple):
        layout, roles = layout
    multi = layout in ("mflat", "mblock", "mfact")
    if multi:
        # one launch for many tensors: per-tensor scalars, sizes, seeds and operand addresses
        # in tables; the iteration space is every tensor's chunks of CHUNK elements. Sums are
        # written per chunk (``part``, one row per chunk) and added up per tensor by the caller.
        args = ["svs", "ns", "starts", "seeds", "sr_b16", "sr_q8"] + (["part"] if n_sums else [])
        if layout == "mfact":
            args += ["ms", "nns"]  # per tensor: columns, and rows per matrix
    else:
        args = ["sv", "n", "seed", "sr_b16", "sr_q8"]
    if layout == "bcast":
        args += ["nb_", "nn_", "nm_"]
    # per operand: an array (a), 8-bit codes and their absmax (a, x) or a number (c); the
    # multi-tensor kernels take tables of addresses (pa, px) and numbers (cs) instead
    array, scales, number = ("pa", "px", "cs") if multi else ("a", "x", "c")
    for j, kind in enumerate(kinds):
        if kind in _FLOAT_ARRAYS:
            args.append(f"{array}{j}")
            if layout == "bcast":
                args += [f"st{j}_0", f"st{j}_1", f"st{j}_2"]
        elif kind in ("q8s", "q8u"):
            args += [f"{array}{j}", f"{scales}{j}"]
        elif kind == "num":
            args.append(f"{number}{j}")

    def sign(j):
        return "-" if j in negated else ""

    # small bcast: operands that broadcast are gathered per work item into contiguous copies
    # t{j} (their element k is element k of the work item), so that the rule's loop is flat
    gathered = set()
    shuffles: dict[int, tuple[int, tuple[int, ...]]] = {}  # gathered operand -> window, pattern
    per_copy = 0  # matrices per shuffled copy
    if small is not None:
        per_copy = _shuffle_matrices(small[0], small[1])
        flat_strides = (small[0] * small[1], small[1], 1)
        gathered = {j for j, kind in enumerate(kinds)
                    if kind in _FLOAT_ARRAYS and small[2][j] != flat_strides}
        for j in gathered:
            sb, sr, sc = small[2][j]
            pattern = tuple(bb * sb + jj * sr + kk * sc for bb in range(per_copy)
                            for jj in range(small[0]) for kk in range(small[1]))
            shuffles[j] = (max(pattern) + 1, pattern)
        if any(window > SHUFFLE_WINDOW for window, _ in shuffles.values()):
            shuffles = {}

    def load(j, kind, index):
        array = f"t{j}" if j in gathered else f"a{j}"
        if kind in ("f32", "f64"):
            return f"{sign(j)}_E({array}[{index}])"
        if kind == "b16":
            return f"{sign(j)}_E(_bf16_decode({array}[{index}]))"
        if kind == "q8s":
            return f"_E(_signed_decode(a{j}[{index}], u{j}))"
        if kind == "q8u":
            return f"_E(_unsigned_decode(a{j}[{index}], u{j}))"
        if kind == "num":
            return f"_E(c{j})"
        return "_E(0.0)"

    def gather_index(j):
        """Operand j's element (bb, jj, kk) of a small bcast map."""
        terms = [f"{v} * {s_}" for v, s_ in zip(("bb", "jj", "kk"), small[2][j]) if s_]
        return " + ".join(f"np.uint64({t})" for t in terms) or "np.uint64(0)"

    def index(j, flat_index):
        if j in gathered:
            return "k"
        if roles is not None and kinds[j] in _FLOAT_ARRAYS:
            # full: the element's own index; row: its row's; col: its column's in its matrix
            return {"full": flat_index, "row": "ri", "col": "cb + kk"}[roles[j]]
        if small is not None and kinds[j] in _FLOAT_ARRAYS:
            return flat_index
        if layout == "bcast" and kinds[j] in _FLOAT_ARRAYS:
            last = last_strides[j] if j < len(last_strides) else None
            step = {0: "", 1: " + kk"}.get(last, f" + kk * np.uint64(st{j}_2)")
            return f"np.uint64(bb * st{j}_0 + jj * st{j}_1){step}"
        return flat_index

    def body(ind, flat_index):
        call_args = ", ".join(load(j, k, index(j, flat_index)) for j, k in enumerate(kinds))
        lines = [f"r = _as_tuple(rule(s, {call_args}))"]
        for k, j in stores:
            kind = kinds[j]
            target = f"a{j}[{index(j, flat_index)}]"
            if kind in ("f32", "f64"):
                lines.append(f"{target} = r[{k}]")
            elif kind == "b16":
                lines.append(f"if sr_b16:")
                lines.append(f"    {target} = _bf16_encode_stochastic(r[{k}], "
                             f"_u32_add(bh{j}, _u32_mul({flat_index}, 0x9E3779B9)))")
                lines.append("else:")
                lines.append(f"    {target} = _bf16_encode(r[{k}])")
            else:  # 8-bit: keep the block's new values and their finite absmax (IEEE bits)
                lines.append(f"buf{j}[{flat_index} - np.uint64(lo)] = r[{k}]")
                lines.append(f"amax{j} = _u32_max(amax{j}, _finite_abs_bits(r[{k}]))")
        for q in range(n_sums):  # per work item; added to acc{q} at its end
            value = f"_E(r[{n_results - n_sums + q}])"
            lines.append(f"lacc{q} = _add_reassoc(lacc{q}, {value})")
        return textwrap.indent("\n".join(lines), " " * ind)

    fields_src = ", ".join(f"sv[{i}]" for i in range(len(fields)))
    buf_type = "np.float32" if dtype == "float32" else "np.float64"

    quantized = [(k, j) for k, j in stores if kinds[j] in ("q8s", "q8u")]

    def encode_loop(stochastic: bool) -> list[str]:
        """Encode the block's buffered values. With stochastic rounding one 32-bit random
        word per element serves two states (16 random bits each): element k of the block
        gets ``h + k * 0x9E3779B9`` (mod 2**32), where ``h`` is one well-mixed hash
        (numba_ops.random32) of the step's seed, the block's position and the pair of states.
        Over steps each element's word is uniform, so the rounding stays unbiased; within a
        block the words form a golden-ratio (Weyl) sequence with a random start, a dither of
        low discrepancy. A full hash per element (3 vector multiplies and 6 shifts and xors
        per 16 elements) made a 16M-element int8 AdamW step 1.64-1.77x torch's fused AdamW
        instead of 1.46-1.57x (kernel timed alone, alternated with torch's)."""
        lines = []
        if stochastic:
            lines += [f"                h{q // 2} = _random32(0, _u32_add(bseed, "
                      f"{q // 2 * 0x3C6EF372}))" for q in range(0, len(quantized), 2)]
        lines += ["                for k0 in range(hi - lo):",
                  "                    k = np.uint64(k0)"]
        for q, (k, j) in enumerate(quantized):
            which = "signed" if kinds[j] == "q8s" else "unsigned"
            if stochastic:
                if q % 2 == 0:
                    lines.append(f"                    rnd{q // 2} = _u32_add(h{q // 2}, "
                                 "_u32_mul(k0, 0x9E3779B9))")
                # the random bits go below the code's rounding position (bit 20 or 19)
                bits = (f"_u32_shl(_u32_and(rnd{q // 2}, 0xFFFF), {4 if which == 'signed' else 3})"
                        if q % 2 == 0 else
                        f"_u32_shl(_u32_shr(rnd{q // 2}, 16), {4 if which == 'signed' else 3})")
            else:
                bits = "524288" if which == "signed" else "262144"
            lines.append(f"                    a{j}[np.uint64(lo) + k] = _{which}_encode("
                         f"buf{j}[k], sc{j}, iv{j}, {bits})")
        return lines

    def finish_sum(q: int) -> str:
        """Where a work item's sum goes: its chunk's row of ``part`` (multi-tensor kernels) or
        the kernel's float64 reduction."""
        return f"part[c, {q}] = np.float64(lacc{q})" if multi else f"acc{q} += np.float64(lacc{q})"

    def block_group(first_block: str) -> list[str]:
        """One parallel work item of the blockwise layouts: GROUP blocks from ``first_block``
        (``nblk`` blocks in all). The element loop writes each 8-bit state's new values to a
        scratch buffer (allocated once per group) and tracks their absmax; a second loop over
        the block then encodes all of them."""
        lines = [f"        buf{j} = np.empty({BLOCK}, {buf_type})" for k, j in quantized]
        lines += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
        lines.append(f"        for b in range({first_block}, min({first_block} + {GROUP}, nblk)):")
        lines.append(f"            lo = b * {BLOCK}")
        lines.append(f"            hi = min(lo + {BLOCK}, n)")
        lines += [f"            u{j} = _block_unit(x{j}[b])"
                  for j, kind in enumerate(kinds) if kind in ("q8s", "q8u")]
        lines += [f"            amax{j} = np.uint32(0)" for k, j in quantized]
        # unsigned indices: Numba then skips negative-index wraparound, which would stop the
        # loop from vectorizing
        lines.append("            for i0 in range(lo, hi):")
        lines.append("                i = np.uint64(i0)")
        lines.append(body(16, "i"))
        if quantized:
            for k, j in quantized:
                lines.append(f"            x{j}[b] = _bits_f32(amax{j})")
                lines.append(f"            sc{j}, iv{j} = _block_factors(x{j}[b])")
            # the block's seed: the step's seed with the block's position mixed in
            lines.append("            if sr_q8:")
            lines.append("                bseed = _u32_add(seed + 0x1B873593, "
                         "_u32_mul(lo, 0x9E3779B9))")
            lines += encode_loop(True)
            lines.append("            else:")
            lines += encode_loop(False)
        lines += [f"        {finish_sum(q)}" for q in range(n_sums)]
        return lines
    out = [f"_x{j} = _shuffled_copy({window}, {pattern})" for j, (window, pattern)
           in sorted(shuffles.items())]
    out += ["", ""] if out else []
    out += [f"@numba.njit(parallel={parallel}, cache=True, error_model=\"numpy\", nogil=True)",
            f"def kernel({', '.join(args)}):"]
    # stochastic rounding of bfloat16 results: element i of a tensor gets the random word
    # bh + i * 0x9E3779B9 (mod 2**32), bh one hash of the step's seed per tensor and result (a
    # function of the element's index, so every layout draws the same bits). Over steps each
    # element's word is uniform, so the rounding is unbiased; a full hash per element cost
    # 3 vector multiplies and 6 shifts and xors per 16 elements (AdamW on bfloat16 GPT-2
    # shapes at --scale 0.5: stochastic rounding +19% over nearest with it).
    seeded = [f"bh{j} = _random32(0, seed + {j * 0x3C6EF372})"
              for k, j in stores if kinds[j] == "b16"]
    if not multi:
        out.append(f"    s = _S({fields_src})")
        out += [f"    {line}" for line in seeded]
    out += [f"    acc{q} = 0.0" for q in range(n_sums)]
    if multi:
        out.append("    for c in numba.prange(starts[-1]):")
        out.append("        t = np.searchsorted(starts, c, side=\"right\") - 1")
        out.append("        sv = svs[t]")
        out.append(f"        s = _S({fields_src})")
        out.append("        n = ns[t]")
        out.append("        seed = seeds[t]")
        out += [f"        {line}" for line in seeded]
        if layout != "mfact":
            out.append("        first = (c - starts[t]) * CHUNK")
        else:
            out += ["        m = ms[t]",
                    "        nn = nns[t]",
                    # whole rows, about CHUNK elements' worth (the rows' count is n // m)
                    "        rb = max(1, CHUNK // m)",
                    "        row0 = (c - starts[t]) * rb"]
        for j, kind in enumerate(kinds):
            if kind in _FLOAT_ARRAYS:
                size = {"row": "n // m", "col": "n // nn"}.get(roles[j], "n") if roles else "n"
                out.append(f"        a{j} = numba.carray({_POINTERS[kind]}(pa{j}[t]), {size})")
            elif kind in ("q8s", "q8u"):
                out.append(f"        a{j} = numba.carray({_POINTERS[kind]}(pa{j}[t]), n)")
                out.append(f"        x{j} = numba.carray(_ptr_f32(px{j}[t]), "
                           f"(n + {BLOCK - 1}) // {BLOCK})")
            elif kind == "num":
                out.append(f"        c{j} = cs{j}[t]")
        if layout == "mflat":
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out.append("        for i0 in range(first, min(first + CHUNK, n)):")
            out.append("            i = np.uint64(i0)")
            out.append(body(12, "i"))
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        elif layout == "mfact":
            # unsigned indices (see block_group); the flat index is the element's, so
            # stochastic rounding draws what the per-tensor bcast kernel draws
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += ["        for row in range(row0, min(row0 + rb, n // m)):",
                    "            ri = np.uint64(row)",
                    "            fb = np.uint64(row * m)",
                    "            cb = np.uint64((row // nn) * m)",
                    "            for kk0 in range(m):",
                    "                kk = np.uint64(kk0)",
                    body(16, "fb + kk")]
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        else:  # CHUNK = GROUP blocks: a chunk is one group of the tensor's blocks
            out.append(f"        nblk = (n + {BLOCK - 1}) // {BLOCK}")
            out += block_group(f"first // {BLOCK}")
        out.append("    return ()")
    elif layout == "block":  # prange over groups of GROUP blocks
        out.append(f"    nblk = (n + {BLOCK - 1}) // {BLOCK}")
        out.append(f"    ngroups = (nblk + {GROUP - 1}) // {GROUP}")
        out.append("    for grp in numba.prange(ngroups):")
        out += block_group(f"grp * {GROUP}")
    else:
        # each work item sums into its own lacc (in the element dtype, so the loop vectorizes
        # at full width), added to the reduction in float64 at its end
        if layout == "flat":  # prange over chunks of CHUNK elements
            out += ["    for c in numba.prange((n + CHUNK - 1) // CHUNK):"]
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += ["        for i0 in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):",
                    "            i = np.uint64(i0)", body(12, "i")]
            out += [f"        {finish_sum(q)}" for q in range(n_sums)]
        elif small is not None:
            # bcast over small matrices (a conv kernel's 3x3): sizes and strides compiled in.
            # A work item takes whole matrices, about ROW_BLOCK elements' worth: the operands
            # that broadcast are first copied out element by element (loops over a matrix
            # that unroll), then the rule runs in a flat loop that vectorizes (2x faster
            # than the rule in the unrolled loops on 512x512x3x3, measured standalone).
            # bb, jj, kk, k are unsigned (see block_group).
            rows, cols = small[0], small[1]
            rc = rows * cols
            per = max(1, ROW_BLOCK // rc)
            out += [f"    for blk in numba.prange((nb_ + {per - 1}) // {per}):",
                    f"        b0 = blk * {per}",
                    f"        b1 = min(b0 + {per}, nb_)"]
            out += [f"        t{j} = np.empty({per * rc}, a{j}.dtype)" for j in sorted(gathered)]
            first = "b0"
            if shuffles:
                # per_copy matrices per copy, element by element for the rest
                out += [f"        nfull = (b1 - b0) // {per_copy}",
                        "        for sh in range(nfull):"]
                out += [f"            _x{j}(a{j}, np.uint64((b0 + sh * {per_copy}) * "
                        f"{small[2][j][0]}), t{j}, np.uint64(sh * {per_copy * rc}))"
                        for j in sorted(shuffles)]
                first = f"b0 + nfull * {per_copy}"
            if gathered:
                out += [f"        for bb0 in range({first}, b1):",
                        "            bb = np.uint64(bb0)",
                        f"            o = np.uint64((bb0 - b0) * {rc})",
                        f"            for jj0 in range({rows}):",
                        "                jj = np.uint64(jj0)",
                        f"                for kk0 in range({cols}):",
                        "                    kk = np.uint64(kk0)"]
                out += [f"                    t{j}[o + jj * np.uint64({cols}) + kk] = "
                        f"a{j}[{gather_index(j)}]" for j in sorted(gathered)]
            out += [f"        base = np.uint64(b0 * {rc})"]
            out += [f"        lacc{q} = _E(0.0)" for q in range(n_sums)]
            out += [f"        for k0 in range((b1 - b0) * {rc}):",
                    "            k = np.uint64(k0)", body(12, "base + k")]
            out += [f"        acc{q} += np.float64(lacc{q})" for q in range(n_sums)]
        else:
            # bcast: iterate (batch, rows, cols) with per-operand strides (0 = broadcast). A
            # work item takes a block of about ROW_BLOCK elements' worth of rows (short rows,
            # like a conv kernel's 3x3, would otherwise cost a division and a loop each) and
            # steps (batch, row) along them; long rows are summed in CHUNK segments.
            flat_index = "np.uint64(row * nm_) + kk"
            out += ["    nrows = nb_ * nn_",
                    f"    rb_ = max(1, {ROW_BLOCK} // nm_)",
                    "    for blk in numba.prange((nrows + rb_ - 1) // rb_):",
                    "        row0 = blk * rb_",
                    "        bb = row0 // nn_",
                    "        jj = row0 - bb * nn_"]
            out += [f"        bacc{q} = 0.0" for q in range(n_sums)]
            out.append("        for row in range(row0, min(row0 + rb_, nrows)):")
            if n_sums:
                out.append("            for seg in range(0, nm_, CHUNK):")
                out += [f"                lacc{q} = _E(0.0)" for q in range(n_sums)]
                out += ["                for kk0 in range(seg, min(seg + CHUNK, nm_)):",
                        "                    kk = np.uint64(kk0)", body(20, flat_index)]
                out += [f"                bacc{q} += np.float64(lacc{q})" for q in range(n_sums)]
            else:
                out += ["            for kk0 in range(nm_):",
                        "                kk = np.uint64(kk0)", body(16, flat_index)]
            out += ["            jj += 1",
                    "            if jj == nn_:",
                    "                jj = 0",
                    "                bb += 1"]
            out += [f"        acc{q} += bacc{q}" for q in range(n_sums)]
    if not multi:
        out.append(f"    return ({''.join(f'acc{q}, ' for q in range(n_sums))})")
    header = _module_header(imports, E, fields)
    return "\n".join(header) + rule_src + "\n\n\n" + "\n".join(out) + "\n"


def _module_header(imports: Sequence[str], E: str, fields: Sequence[str]) -> list[str]:
    """The first lines of a generated kernel module: its imports, the element type ``_E``,
    ``CHUNK`` and the scalars' type ``_S``."""
    return [
        "# Generated by adamkit.engines.cpu; do not edit (regenerated when rules change).",
        "import numba",
        "import numpy as np",
        "from collections import namedtuple as _namedtuple",
        "from adamkit.engines.cpu.numba_ops import as_tuple as _as_tuple",
        "from adamkit.engines.cpu.numba_ops import bf16_decode as _bf16_decode",
        "from adamkit.engines.cpu.numba_ops import bf16_encode as _bf16_encode",
        "from adamkit.engines.cpu.numba_ops import bf16_encode_stochastic as _bf16_encode_stochastic",
        "from adamkit.engines.cpu.numba_ops import random32 as _random32",
        "from adamkit.engines.cpu.numba_ops import scalar_pow as _pow",
        "from adamkit.engines.cpu.numba_ops import general_pow as _pow_general",
        "_sqrt = np.sqrt",
        "from adamkit.engines.cpu.numba_ops import block_unit as _block_unit",
        "from adamkit.engines.cpu.numba_ops import signed_decode as _signed_decode",
        "from adamkit.engines.cpu.numba_ops import unsigned_decode as _unsigned_decode",
        "from adamkit.engines.cpu.numba_ops import block_factors as _block_factors",
        "from adamkit.engines.cpu.numba_ops import finite_abs_bits as _finite_abs_bits",
        "from adamkit.engines.cpu.numba_ops import signed_encode as _signed_encode",
        "from adamkit.engines.cpu.numba_ops import unsigned_encode as _unsigned_encode",
        "from adamkit.engines.cpu.numba_ops import bits_f32 as _bits_f32",
        "from adamkit.engines.cpu.numba_ops import add_reassoc as _add_reassoc",
        "from adamkit.engines.cpu.numba_ops import u32_add as _u32_add",
        "from adamkit.engines.cpu.numba_ops import u32_and as _u32_and",
        "from adamkit.engines.cpu.numba_ops import u32_max as _u32_max",
        "from adamkit.engines.cpu.numba_ops import u32_mul as _u32_mul",
        "from adamkit.engines.cpu.numba_ops import u32_shl as _u32_shl",
        "from adamkit.engines.cpu.numba_ops import u32_shr as _u32_shr",
        "from adamkit.engines.cpu.numba_ops import ptr_f32 as _ptr_f32",
        "from adamkit.engines.cpu.numba_ops import ptr_f64 as _ptr_f64",
        "from adamkit.engines.cpu.numba_ops import ptr_i16 as _ptr_i16",
        "from adamkit.engines.cpu.numba_ops import ptr_i8 as _ptr_i8",
        "from adamkit.engines.cpu.numba_ops import ptr_u8 as _ptr_u8",
        "from adamkit.engines.cpu.numba_ops import shuffled_copy as _shuffled_copy",
        *imports,
        "",
        f"_E = {E}",
        f"CHUNK = {CHUNK}",
        f"_S = _namedtuple('_S', {list(fields)!r})",
        "",
        "",
    ]


def _load_kernel(key: tuple, fn: Callable, fields, kinds, stores, n_sums, n_results, dtype,
                 layout, negated=(), parallel: bool = True, last_strides=(),
                 outcomes: tuple = (), small: tuple | None = None) -> Callable:
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            return kernel
        program = _rule_program(fn)
        rule_src, imports, module_sources = (program.source(outcomes, RULE_DECORATOR), program.imports,
                                             program.module_sources)
        source = _kernel_source(rule_src, imports, fields, kinds, stores, n_sums, n_results,
                                dtype, layout, negated, parallel, last_strides, small)
        module = _load_module(f"# rule: {fn.__module__}.{fn.__qualname__}\n" + source,
                              module_sources)
        kernel = module.kernel
        _KERNELS[key] = kernel
        return kernel
