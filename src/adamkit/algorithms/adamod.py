"""AdaMod (Ding et al., 2019), following the authors' code (lancopku/AdaMod)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import minimum, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked


class AdaModScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    beta3: float
    eps: float
    weight_decay: float
    step_size: float  # lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class AdaMod(Cautious, Optimizer):
    r"""AdaMod: Adam whose per-element step size is capped by its own running average.

    .. math::
        \eta_t = \frac{\gamma\sqrt{1-\beta_2^t}/(1-\beta_1^t)}{\sqrt{v_t}+\epsilon}, \quad
        s_t = \beta_3 s_{t-1} + (1-\beta_3)\eta_t, \quad
        \theta_t = \theta_{t-1} - \min(\eta_t, s_t)\, m_t

    with :math:`s_0 = 0` and no bias correction of :math:`s` (this acts as a built-in
    warm-up), :math:`m, v` as Adam's. If :math:`\lambda \ne 0`,
    :math:`\theta \leftarrow \theta - \lambda\gamma\theta` before the update (official code).

    Defaults: lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_lr``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "beta3": v.unit_interval,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq", "exp_avg_lr")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_sq", "exp_avg_lr")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
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
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> AdaModScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        lr = value(group["lr"])
        return AdaModScalars(
            lr=lr, beta1=beta1, beta2=beta2, beta3=group["beta3"], eps=group["eps"],
            weight_decay=group["weight_decay"],
            step_size=lr * sqrt(1 - beta2**t) / (1 - beta1**t),
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: AdaModScalars, p, g, exp_avg, exp_avg_sq, exp_avg_lr):
        if s.weight_decay != 0:
            p = p - (s.weight_decay * s.lr) * p
        exp_avg = exp_avg * s.beta1 + (1 - s.beta1) * g
        exp_avg_sq = exp_avg_sq * s.beta2 + (1 - s.beta2) * (g * g)
        step = s.step_size / (sqrt(exp_avg_sq) + s.eps)
        exp_avg_lr = exp_avg_lr * s.beta3 + (1 - s.beta3) * step
        step = minimum(step, exp_avg_lr)
        u = step * exp_avg
        if s.cautious:
            return (p - masked(u, g, s.cautious_scale), exp_avg, exp_avg_sq, exp_avg_lr,
                    agreement(u, g))
        else:
            return p - u, exp_avg, exp_avg_sq, exp_avg_lr
