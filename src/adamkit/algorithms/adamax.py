"""Adamax: Adam with the infinity norm (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import absolute, fma, lerp, maximum
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement


class AdamaxScalars(NamedTuple):
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clr: float  # lr / (1 - beta1^t)
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class Adamax(Cautious, Optimizer):
    r"""Adamax (Kingma & Ba, 2015, §7.1); torch semantics and checkpoint layout.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\frac{m_t}{u_t}

    (:math:`\epsilon` inside the max, as torch). Coupled decay.

    Defaults: lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.
    State: ``step``, ``exp_avg``, ``exp_inf``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_inf")
    scalars_from_step = True
    nonnegative_slots = ("exp_inf",)
    supports_complex = True

    def __init__(
        self,
        params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> AdamaxScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        return AdamaxScalars(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            clr=value(group["lr"]) / (1 - beta1**t),
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: AdamaxScalars, p, g, exp_avg, exp_inf):
        if s.weight_decay != 0:
            g = fma(s.weight_decay, p, g)  # torch's add(alpha=): rounded once
        exp_avg = lerp(exp_avg, g, 1 - s.beta1)
        exp_inf = maximum(exp_inf * s.beta2, absolute(g) + s.eps)
        # addcdiv_(exp_avg, exp_inf, value=-clr): product, quotient and sum rounded apart
        d = (-s.clr * exp_avg) / exp_inf
        if s.cautious:
            keep = agreement(-d, g)
            return p + d * (keep * s.cautious_scale), exp_avg, exp_inf, keep
        else:
            return p + d, exp_avg, exp_inf
