"""The engine contract, and the reference engine that is its executable statement.

A rule's ``apply`` talks to an engine through the primitives listed in :class:`ReferenceEngine`
(``map``, ``sums_where``, ``mean_sq_last_dims``, ``sq_stats_last_dims``, ``mean_rows``,
``per_tensor``, ``orthogonalize``); every backend implements exactly these (the fused CPU engine in
:mod:`adamkit.engines.cpu`), and is tested against this one. The reference engine evaluates a
rule with torch operations on whole tensors; it runs on any device and any floating dtype and
is the oracle every other engine is tested against. Readability beats speed here: each ``map`` materialises its results and copies them
into the output tensors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule is evaluated in: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def round_bfloat16_stochastic(x: Tensor, seed: int) -> Tensor:
    """``x`` (computed in float32) rounded to bfloat16, up with probability equal to the dropped
    fraction of a bfloat16 step, down otherwise: E[result] = x. NaN and Inf pass unchanged.

    The 16 low bits of the float32 pattern are what bfloat16 drops; adding 16 uniform random
    bits to the pattern carries into the kept bits exactly with that probability (for either
    sign, as the pattern is sign and magnitude). Random bits come from a generator seeded with
    ``seed``, so the global RNG is untouched and a step is reproducible.
    """
    x = x.to(torch.float32).contiguous()
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32,
                          device=x.device)
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def newton_schulz(u: Tensor, coefficients, steps: int, eps: float) -> Tensor:
    """The Newton–Schulz orthogonalisation of a matrix, as ``torch.optim.Muon`` computes it.

    In bfloat16: ``X = u / max(||u||_F, eps)`` (transposed first when ``u`` has more rows than
    columns, so that the Gram matrix is the smaller one), then ``steps`` times
    ``A = X Xᵀ``, ``B = b·A + c·A·A``, ``X = a·X + B·X`` with ``(a, b, c) = coefficients``;
    transposed back. Returns a bfloat16 tensor of ``u``'s shape (a transposed view for tall
    ``u``, as torch's). The same torch operations in the same order as torch's
    ``_zeropower_via_newtonschulz``, so the result is torch's bit for bit on the same device.
    ``u`` is never written (torch's divides a bfloat16 ``u`` in place: its momentum buffer
    where ``nesterov=False``; adamkit copies it).
    """
    a, b, c = (float(x) for x in coefficients)
    tall = u.size(0) > u.size(1)
    x = u.to(torch.bfloat16, copy=True)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(int(steps)):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


class ReferenceEngine:
    """Executes the primitives a rule's ``apply`` is written with, in eager torch.

    Primitives:

    * ``map(fn, s, ins, outs, n_sums=0)``: ``fn(s, *ins)`` elementwise; the first ``len(outs)``
      results are written into ``outs`` (``None`` entries are skipped), the remaining ``n_sums``
      results are summed over all elements and returned as Python floats.
    * ``mean_sq_last_dims(x)``: row and column means of ``x**2`` over the last two dimensions,
      with ``keepdim`` shapes ``(..., n, 1)`` and ``(..., 1, m)``.
    * ``mean_rows(x)``: ``x.mean(dim=-2, keepdim=True)`` of a ``(..., n, 1)`` tensor (Adafactor's
      mean of its row factor), in x's dtype.
    * ``sq_stats_last_dims(fn, s, state, x, y)``: ``mean_sq_last_dims(x)``, then the row rule
      ``fn(s, state, row_means) -> (new state, a)`` as a map (``state`` written, ``a`` written
      over the row means); returns ``(a, column means, w, sums)``. An engine that reads each
      row of ``x`` once may also return ``w``, the column sums of ``(a * x)**2``, and ``sums``,
      to be yielded (``[sum of y**2, max a over rows whose mean of x**2 is not 0, max a over
      the others, sum of x**2, min a over rows whose mean is not 0]``); this one returns
      both as None (Adafactor's one-pass sum of its update's squares, which the rule checks
      against its per-element pass).
    * ``sums_where(where, fn, s, ins, n_sums)``: the sums of ``map(fn, s, ins, [], n_sums)``
      where ``where`` holds, ``n_sums`` zeros otherwise (a vectorized run gives an array of
      flags and gets arrays of sums: see ``Optimizer.vectorized_apply``).
    * ``per_tensor(fn, t, *args)``: ``fn(t, *args)``, torch code on one whole tensor (Adafactor's
      norm from that mean); a vectorized run of a generator ``apply`` gets an array of its
      values, one per tensor ``t`` stands for, so ``fn`` must return a number there.
    * ``orthogonalize(u, coefficients, steps, eps)``: a whole-matrix stage (matrix multiplies,
      not an element rule): :func:`newton_schulz` of the 2-D tensor ``u``, a bfloat16 tensor of
      its shape (Muon). ``u`` must hold what the maps before it wrote (an engine that defers
      maps runs them first). Every engine computes it with these torch matmuls, so the result
      does not depend on the engine.
    """

    name = "reference"

    def __init__(self, dtype: torch.dtype, stochastic_seed: int | None = None):
        self.dtype = compute_dtype(dtype)
        #: when set, bfloat16 outputs are rounded stochastically (random bits from this seed)
        self.stochastic_seed = stochastic_seed

    def _load(self, t):
        if t is None or not isinstance(t, Tensor):
            return t
        return t.to(self.dtype)

    def map(
        self,
        fn: Callable,
        s,
        ins: Sequence,
        outs: Sequence,
        n_sums: int = 0,
    ) -> list[float]:
        results = fn(s, *[self._load(t) for t in ins])
        if not isinstance(results, tuple):
            results = (results,)
        if len(results) != len(outs) + n_sums:
            raise RuntimeError(
                f"{getattr(fn, '__qualname__', fn)} returned {len(results)} values, "
                f"expected {len(outs)} outputs + {n_sums} sums"
            )
        for k, (out, value) in enumerate(zip(outs, results)):
            if out is None:
                continue
            if (self.stochastic_seed is not None and out.dtype == torch.bfloat16
                    and isinstance(value, Tensor)):
                value = round_bfloat16_stochastic(value, self.stochastic_seed + k)
            out.copy_(value)
        sums = []
        for value in results[len(outs):]:
            sums.append(float(value.sum()) if isinstance(value, Tensor) else float(value))
        return sums

    def per_tensor(self, fn: Callable, t: Tensor, *args):
        return fn(t, *args)

    def sq_stats_last_dims(self, fn: Callable, s, state: Tensor, x: Tensor, y: Tensor):
        a, cols = self.mean_sq_last_dims(x)
        self.map(fn, s, [state, a], [state, a])
        return a, cols, None, None

    def sums_where(self, where, fn: Callable, s, ins: Sequence, n_sums: int) -> list:
        if not where:
            return [0.0] * n_sums
        return self.map(fn, s, ins, [], n_sums)

    def mean_rows(self, x: Tensor) -> Tensor:
        return x.mean(dim=-2, keepdim=True)

    def orthogonalize(self, u: Tensor, coefficients, steps: int, eps: float) -> Tensor:
        return newton_schulz(u, coefficients, steps, eps)

    def mean_sq_last_dims(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._load(x)
        sq = x * x
        return sq.mean(dim=-1, keepdim=True), sq.mean(dim=-2, keepdim=True)
