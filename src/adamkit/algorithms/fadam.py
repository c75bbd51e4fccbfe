"""FAdam (Hwang, 2024), as implemented by the paper's reference code ("v3" algorithm)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import validation as v
from ..engines.ops import maximum, minimum, sqrt
from ..optimizer import Optimizer, value


class FAdamScalars(NamedTuple):
    lr: float
    beta1: float
    fisher_beta: float  # beta2 (1 - beta2^(t-1)) / (1 - beta2^t); 0 at t = 1
    eps: float
    power: float  # the hyperparameter ``p``
    clip: float
    weight_decay: float
    eps_t: float  # eps * min(1, RMS(g)), set after the first pass
    grad_scale: float  # clip / max(1, RMS(g_bar)), set after the second pass
    weight_scale: float  # clip / max(1, RMS(w)), set after the second pass


def _where(flag, yes, no):
    """``yes`` where ``flag`` holds, else ``no`` (numbers, or arrays of one value per tensor)."""
    chosen = np.where(flag, yes, no)
    return float(chosen) if chosen.ndim == 0 else chosen


def _square(s, x):
    return x * x


def _fisher(s: FAdamScalars, g, fim):
    return s.fisher_beta * fim + (1 - s.fisher_beta) * (g * g)


def _clip_sums_pass(s: FAdamScalars, p, g, fim):
    # The new Fisher is computed here for the clip sums and again in the update pass, which
    # stores it: within a step the update then uses it unrounded even when it is kept in 8
    # bits, for the same bytes moved (a pass that stored it would write what this one skips).
    # One division per element: g / denom and p / denom as products with 1 / denom (the
    # kernels are bound by the divider, not by memory, with three divisions per element).
    inv = 1 / (_fisher(s, g, fim) ** s.power + s.eps_t)
    g_bar = g * inv
    w = p * inv
    return g_bar * g_bar, w * w


def _update_pass(s: FAdamScalars, p, g, fim, exp_avg):
    fim = _fisher(s, g, fim)
    inv = 1 / (fim**s.power + s.eps_t)
    g_bar = (g * inv) * s.grad_scale
    exp_avg = s.beta1 * exp_avg + (1 - s.beta1) * g_bar
    w = (p * inv) * s.weight_scale
    return p - s.lr * (exp_avg + s.weight_decay * w), fim, exp_avg


class FAdam(Optimizer):
    r"""FAdam: Adam read as natural gradient with a diagonal empirical Fisher.

    .. math::
        \hat\beta_2 = \beta_2\frac{1-\beta_2^{t-1}}{1-\beta_2^t}, \quad
        f \leftarrow \hat\beta_2 f + (1-\hat\beta_2) g^2, \quad
        \epsilon_t = \epsilon\min(1, \mathrm{RMS}(g)), \\
        \bar g = \frac{g}{f^p + \epsilon_t}, \quad
        \bar g \leftarrow \bar g \Big/ \frac{\max(1, \mathrm{RMS}(\bar g))}{\mathrm{clip}}, \quad
        m \leftarrow \beta_1 m + (1-\beta_1)\bar g, \\
        w = \frac{\theta}{f^p + \epsilon_t}, \quad
        w \leftarrow w \Big/ \frac{\max(1, \mathrm{RMS}(w))}{\mathrm{clip}}, \quad
        \theta \leftarrow \theta - \gamma(m + \lambda w)

    RMS is over the whole tensor; :math:`m` is not bias-corrected; the Fisher's own bias
    correction is folded into :math:`\hat\beta_2`. The two RMS clips make this a three-pass
    rule: RMS(g); the sums for RMS(ḡ) and RMS(w); the update, which stores the new Fisher.

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, clip=1.0, p=0.5, weight_decay=0.1
    (the reference code's). State: ``step``, ``exp_avg`` (m), ``fim`` (f).
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "clip": v.positive,
        "p": v.positive,
        "weight_decay": v.non_negative,
        "maximize": v.flag,
    }
    slot_names = ("exp_avg", "fim")
    nonnegative_slots = ("fim",)
    scalars_from_step = True
    vectorized_apply = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = 1.0,
        p: float = 0.5,
        weight_decay: float = 0.1,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, clip=clip, p=p, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> FAdamScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        return FAdamScalars(
            lr=value(group["lr"]), beta1=beta1,
            fisher_beta=beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t),
            eps=group["eps"], power=group["p"], clip=group["clip"],
            weight_decay=group["weight_decay"],
            eps_t=math.nan, grad_scale=math.nan, weight_scale=math.nan,
        )

    def apply(self, engine, s: FAdamScalars, p, g, slots):
        # a generator: each yield waits for the sums (see Optimizer.apply). Vectorized (see
        # Optimizer.vectorized_apply): on the fused fast path n and the sums are arrays with
        # one value per tensor of the group, hence ops' minimum, maximum and sqrt.
        n = p.numel()
        fim, exp_avg = slots["fim"], slots["exp_avg"]
        (g_sq,) = yield engine.map(_square, s, [g], [], n_sums=1)
        # an all-zero gradient (torch.distributed.checkpoint's lr=0 initialisation step) would
        # give eps_t = 0 and 0/0: eps_t = eps there keeps the state and parameter finite
        s = s._replace(eps_t=s.eps * _where(g_sq > 0, minimum(1.0, sqrt(g_sq / n)), 1.0))
        g_bar_sq, w_sq = yield engine.map(_clip_sums_pass, s, [p, g, fim], [], n_sums=2)
        s = s._replace(
            grad_scale=s.clip / maximum(1.0, sqrt(g_bar_sq / n)),
            weight_scale=s.clip / maximum(1.0, sqrt(w_sq / n)),
        )
        engine.map(_update_pass, s, [p, g, fim, exp_avg], [p, fim, exp_avg])
