"""Adafactor (Shazeer & Stern, 2018), with torch.optim's semantics and checkpoint layout."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .. import storage
from .. import validation as v
from ..engines.ops import lerp, maximum, minimum, sign, sqrt
from ..engines.reference import compute_dtype
from ..optimizer import Optimizer, value


class AdafactorScalars(NamedTuple):
    lr: float
    one_minus_beta2: float  # t ** beta2_decay, the EMA weight of the new g^2
    rho: float  # min(lr, 1 / sqrt(t))
    eps1: float  # eps[0], or the parameter dtype's machine epsilon
    eps2: float
    d: float
    weight_decay: float
    step_size: float  # alpha / max(1, RMS(U) / d), set after the pass that sums U^2 and p^2
    max_rsqrt: float  # 1 / eps1 (inf for eps1 = 0)


def _ema_rsqrt(s: AdafactorScalars, average, new):
    # the row factor's EMA and a = 1/sqrt(R), written over the row means it was made from
    average = lerp(average, new, s.one_minus_beta2)
    return average, 1 / sqrt(average)


def _ema_scaled_rsqrt(s: AdafactorScalars, average, new, norm):
    # the column factor's EMA and b = 1/sqrt(C / norm), written over the column means
    average = lerp(average, new, s.one_minus_beta2)
    return average, 1 / sqrt(average / norm)


def _ema_of_square(s: AdafactorScalars, average, g):
    return lerp(average, g * g, s.one_minus_beta2)


def _scaled_update(s: AdafactorScalars, g, a, b):
    # U = g / max(sqrt(V), eps1) with V = row * col / norm: a = 1/sqrt(row) per row and
    # b = 1/sqrt(col / norm) per column (computed once per step on the small factors), and
    # 1/max(sqrt(V), eps1) = min(a * b, 1/eps1): no division or square root per element.
    return g * minimum(a * b, s.max_rsqrt)


def _update_sq(s: AdafactorScalars, p, g, a, b):
    # sums for RMS(U) and RMS(p) (the step size's), in one pass over g and p
    u = _scaled_update(s, g, a, b)
    return u * u, p * p


def _scaled_update_sq(s: AdafactorScalars, g, a, b):
    # sum(U^2) alone, where sum(p^2) is known
    u = _scaled_update(s, g, a, b)
    return u * u


def _factored_update_sq(s: AdafactorScalars, b, w, a_max, a_min):
    # sum(U^2) per column from W_j = sum_i (a_i g_ij)^2 (made in the pass over g): b_j^2 W_j.
    # Exact unless a nonzero g_ij has a_i b_j > 1/eps1 (the clamp of _scaled_update): the
    # second sum counts the columns where that can happen (b_j max(a) > 1/eps1, max over
    # the rows whose g is not all 0; NaN counts too). Where instead every nonzero g_ij is
    # clamped (no column has b_j min(a) < 1/eps1, the third sum; a_i b_j rounds monotonically
    # in a_i), U = g / eps1 and sum(U^2) = sum(g^2) / eps1^2.
    return (b * b * w, sign(w) * maximum(sign(b * a_max - s.max_rsqrt), 0.0),
            sign(w) * maximum(sign(s.max_rsqrt - b * a_min), 0.0))


def _choose(flag, yes, no):
    """``yes`` where ``flag`` holds, else ``no`` (numbers, or arrays of one value per tensor)."""
    chosen = np.where(flag, yes, no)
    return float(chosen) if chosen.ndim == 0 else chosen


def _apply_update(s: AdafactorScalars, p, g, a, b):
    return p * (1 - s.lr * s.weight_decay) - s.step_size * _scaled_update(s, g, a, b)


# Unfactored tensors: the new V is computed in the sum pass and again in the update pass, which
# stores it, so that the update uses it unrounded even when V is kept in 8 bits (and V is read
# twice and written once instead of having a pass of its own).


def _unfactored_update(s: AdafactorScalars, g, variance):
    # torch's order: variance.lerp_(g * g), then clamp_min(eps1^2), rsqrt_(), times g
    return (1 / sqrt(maximum(_ema_of_square(s, variance, g), s.eps1 * s.eps1))) * g


def _unfactored_sq(s: AdafactorScalars, p, g, variance):
    u = _unfactored_update(s, g, variance)
    return u * u, p * p


def _unfactored_apply(s: AdafactorScalars, p, g, variance):
    u = _unfactored_update(s, g, variance)
    return (p * (1 - s.lr * s.weight_decay) - s.step_size * u,
            _ema_of_square(s, variance, g))


def _step_size(s: AdafactorScalars, u_sq, p_sq, n):
    """alpha_t / max(1, RMS(U) / d) with alpha_t = max(eps2, RMS(p)) rho_t (numbers, or arrays
    of one value per tensor: see Optimizer.vectorized_apply)."""
    # torch's order: norm / sqrt(n) (not sqrt(sum / n)), and norm / (sqrt(n) d)
    alpha = maximum(s.eps2, sqrt(p_sq) / n ** 0.5) * s.rho
    return alpha / maximum(1.0, sqrt(u_sq) / (n ** 0.5 * s.d))


def _row_norm(mean, eps1: float, dtype: torch.dtype):
    """max(mean(R), eps1) per matrix from the mean of R over its rows, in the compute dtype: a
    number for one matrix (a 2-D weight: its maps are then batched with the number), else a
    (..., 1, 1) tensor."""
    norm = mean.clamp_(min=eps1).to(compute_dtype(dtype))
    return norm.item() if norm.numel() == 1 else norm


def _eps_pair(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (must be a pair (eps1 or None, eps2))")
    v.optional(v.non_negative)("eps1", value[0])
    v.non_negative("eps2", value[1])


class Adafactor(Optimizer):
    r"""Adafactor: Adam-like steps with a factored second moment (memory-lean); torch semantics.

    .. math::
        \hat\beta_t = 1 - t^{\mathrm{beta2\_decay}}, \quad
        \rho_t = \min(\gamma, 1/\sqrt t), \quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta))\,\rho_t

    Tensors with two or more dimensions keep row and column means of :math:`g^2` (over the
    last two dimensions) as EMAs :math:`R, C` and use
    :math:`\hat V = R C / \max(\mathrm{mean}(R), \epsilon_1)`; others keep a full EMA
    :math:`\hat V` of :math:`g^2`. Then :math:`U = g/\max(\sqrt{\hat V}, \epsilon_1)`,
    :math:`\hat U = U/\max(1, \mathrm{RMS}(U)/d)`, decoupled decay
    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` and
    :math:`\theta \leftarrow \theta - \alpha_t \hat U`. ``eps1=None`` means the parameter
    dtype's machine epsilon. No first moment (torch's variant).

    Defaults: lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.
    State: ``step``, ``row_var`` and ``col_var`` (≥ 2-D) or ``variance``.
    """

    checks = {
        "lr": v.non_negative,
        "beta2_decay": v.in_range(-math.inf, 0.0, closed_high=True),
        "eps": _eps_pair,
        "d": v.at_least(1.0),
        "weight_decay": v.non_negative,
        "maximize": v.flag,
    }
    slot_names = ("row_var", "col_var", "variance")
    nonnegative_slots = ("row_var", "col_var", "variance")
    unquantized_slots = ("row_var", "col_var")
    scalars_from_step = True
    # runs once for a group's vectors and once for its 2-D weights (a conv kernel's norm is a
    # tensor, and small matrices' maps run at once: those keep the per-tensor path)
    vectorized_apply = True

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def state_slots(self, group, p):
        return self.slot_names[:2] if p.dim() > 1 else self.slot_names[2:]

    def new_slot(self, group, p, name):
        if name == "variance":
            return super().new_slot(group, p, name)
        shape = list(p.shape)
        shape[-1 if name == "row_var" else -2] = 1
        return storage.make_state(self.slot_storage(name), p, shape, 0.0, signed=False)

    def scalars(self, group, state) -> AdafactorScalars:
        t = self.advance_step(state)
        lr = value(group["lr"])
        eps1, eps2 = group["eps"]
        return AdafactorScalars(
            lr=lr, one_minus_beta2=t ** group["beta2_decay"], rho=min(lr, 1 / t**0.5),
            eps1=math.nan if eps1 is None else eps1, eps2=eps2, d=group["d"],
            weight_decay=group["weight_decay"], step_size=math.nan, max_rsqrt=math.nan,
        )

    def apply(self, engine, s: AdafactorScalars, p, g, slots):
        if math.isnan(s.eps1):
            s = s._replace(eps1=torch.finfo(p.dtype).eps)
        s = s._replace(max_rsqrt=1 / s.eps1 if s.eps1 > 0 else math.inf)
        # a generator: each yield waits for the sums or for the maps before it to have run
        # (see Optimizer.apply)
        n = p.numel()
        if "variance" in slots:
            variance = slots["variance"]
            u_sq, p_sq = yield engine.map(_unfactored_sq, s, [p, g, variance], [], n_sums=2)
            s = s._replace(step_size=_step_size(s, u_sq, p_sq, n))
            engine.map(_unfactored_apply, s, [p, g, variance], [p, variance])
            return
        row, col = slots["row_var"], slots["col_var"]
        # the factors' EMAs also leave a = 1/sqrt(R) and b = 1/sqrt(C / norm) in place of the
        # row and column means of g^2 (in the compute dtype, from the unrounded R and C). An
        # engine that reads each row of g once (the fused one) runs R's EMA as it goes and
        # also makes w, the column sums of (a g)^2, with sum(p^2) and the largest a in stats.
        a, b, w, stats = engine.sq_stats_last_dims(_ema_rsqrt, s, row, g, p)
        stats = yield stats  # R's EMA has run (for every tensor: lockstep)
        norm = engine.per_tensor(_row_norm, engine.mean_rows(row), s.eps1, p.dtype)
        yield engine.map(_ema_scaled_rsqrt, s, [col, b, norm], [col, b])
        if w is None:
            u_sq, p_sq = yield engine.map(_update_sq, s, [p, g, a, b], [], n_sums=2)
        else:
            # sum(U^2) = sum_j b_j^2 w_j: a pass over columns instead of over g and p, or
            # sum(g^2) / eps1^2 where the clamp acts on every element (bfloat16 parameters'
            # eps1 = 2^-7 with gradients under about 0.01). Where the clamp acts on some
            # elements only, the sum is not finite, or an all-zero row of g has a = inf with
            # 1/eps1 = inf (0 * inf: NaN, as the per-element pass gives), the per-element
            # pass over g runs for that tensor.
            p_sq, a_max, a_zero, g_sq, a_min = stats
            u_sq, clamped, unclamped = yield engine.map(
                _factored_update_sq, s, [b, w, a_max, a_min], [], n_sums=3)
            u_sq = _choose(np.equal(clamped, 0), u_sq, g_sq * s.max_rsqrt**2)
            redo = ((np.not_equal(clamped, 0) & np.not_equal(unclamped, 0))
                    | ~np.isfinite(u_sq) | (np.isinf(a_zero) & (s.max_rsqrt == math.inf)))
            (exact,) = engine.sums_where(redo, _scaled_update_sq, s, [g, a, b], 1)
            u_sq = _choose(redo, exact, u_sq)
        s = s._replace(step_size=_step_size(s, u_sq, p_sq, n))
        engine.map(_apply_update, s, [p, g, a, b], [p])
