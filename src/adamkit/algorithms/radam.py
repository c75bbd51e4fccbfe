"""RAdam: Adam with a rectified adaptive learning rate (torch.optim semantics)."""

from __future__ import annotations

import math
from typing import NamedTuple

from .. import validation as v
from ..engines.ops import fma, lerp, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked


def rectification(beta2: float, t: float) -> tuple[float, float]:
    r"""RAdam's :math:`(\rho_t, r_t)`: the SMA length and the variance rectification term.

    :math:`\rho_\infty = 2/(1-\beta_2) - 1`, :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`,
    :math:`r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`
    (NaN where :math:`\rho_t \le 4`; callers only use it above their threshold).
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    return rho_t, math.sqrt(ratio) if ratio >= 0 else math.nan


class RAdamScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    rectified: bool  # rho_t > 5
    bias_correction1: float
    bias_correction2_sqrt: float  # sqrt(1 - beta2^t)
    rect: float  # r_t, used when rectified
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class RAdam(Cautious, Optimizer):
    r"""RAdam (Liu et al., 2020); torch semantics and checkpoint layout.

    With :math:`\rho_t, r_t` from :func:`rectification`: if :math:`\rho_t > 5`,

    .. math::
        \theta_t = \theta_{t-1} - \gamma\,\frac{m_t}{1-\beta_1^t}\, r_t\,
                   \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}

    (epsilon-hat form), otherwise the momentum-SGD step
    :math:`\theta_t = \theta_{t-1} - \gamma\,m_t/(1-\beta_1^t)`. With :math:`\beta_2 = 0.999`
    the rectified branch starts at t = 6. (The paper uses :math:`\rho_t > 4`; torch's 5 is
    followed.) Coupled decay unless ``decoupled_weight_decay=True``.

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "decoupled_weight_decay": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_sq",)
    supports_complex = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> RAdamScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        lr = value(group["lr"])
        rho_t, rect = rectification(beta2, t)
        rectified = rho_t > 5.0
        return RAdamScalars(
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            rectified=rectified, bias_correction1=1 - beta1**t,
            bias_correction2_sqrt=(1 - beta2**t) ** 0.5, rect=rect if rectified else 0.0,
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: RAdamScalars, p, g, exp_avg, exp_avg_sq):
        if s.weight_decay != 0:
            if s.decoupled:
                p = p * (1 - s.lr * s.weight_decay)
            else:
                g = fma(s.weight_decay, p, g)  # torch's add(alpha=): rounded once
        exp_avg = lerp(exp_avg, g, 1 - s.beta1)
        # mul_(beta2).addcmul_(g, g, value=1 - beta2): fma((1 - beta2) * g, g, v * beta2)
        exp_avg_sq = fma((1 - s.beta2) * g, g, exp_avg_sq * s.beta2)
        corrected = exp_avg / s.bias_correction1
        if s.rectified:
            # torch's order: corrected * lr * (sqrt(bc2) / (sqrt(v) + eps)) * r_t
            u = corrected * s.lr * (s.bias_correction2_sqrt / (sqrt(exp_avg_sq) + s.eps)) * s.rect
        else:
            u = corrected * s.lr
        if s.cautious:
            return p - masked(u, g, s.cautious_scale), exp_avg, exp_avg_sq, agreement(u, g)
        else:
            return p - u, exp_avg, exp_avg_sq
