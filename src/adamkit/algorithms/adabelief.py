"""AdaBelief (Zhuang et al., 2020), following the authors' code, version 0.2."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import maximum, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked
from .radam import rectification


class AdaBeliefScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    rectify: bool
    rectified: bool  # rectify and rho_t >= 5
    step_size: float  # lr / (1 - beta1^t)
    bias_correction2_sqrt: float
    rectified_step_size: float  # lr * r_t * sqrt(1 - beta2^t) / (1 - beta1^t)
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class AdaBelief(Cautious, Optimizer):
    r"""AdaBelief: Adam whose second moment tracks the "belief" :math:`(g - m)^2`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon

    (the new :math:`m`; :math:`\epsilon` is added into the state every step, as the official
    code does). ``amsgrad=True`` keeps :math:`\hat s_t = \max(\hat s_{t-1}, s_t)`.
    ``rectify=False``: :math:`\theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}
    \frac{m_t}{\sqrt{\hat s_t}/\sqrt{1-\beta_2^t} + \epsilon}`.
    ``rectify=True``: RAdam's rule with threshold :math:`\rho_t \ge 5` using
    :math:`\sqrt{s_t} + \epsilon` (epsilon-hat form; like the official code the rectified
    branch uses :math:`s_t` even with amsgrad), and below the threshold the momentum-SGD step
    :math:`\theta \leftarrow \theta - \gamma m_t/(1-\beta_1^t)`.
    Decay decoupled (:math:`\theta(1-\gamma\lambda)`) unless ``decoupled_weight_decay=False``.

    Defaults (v0.2): lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0,
    decoupled_weight_decay=True, rectify=True, amsgrad=False.
    State: ``step``, ``exp_avg``, ``exp_avg_var``, ``max_exp_avg_var`` (amsgrad only).
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "amsgrad": v.flag,
        "decoupled_weight_decay": v.flag,
        "rectify": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_var", "max_exp_avg_var")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_var", "max_exp_avg_var")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = True,
        rectify: bool = True,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                        rectify=rectify, maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def state_slots(self, group, p):
        return self.slot_names if group["amsgrad"] else self.slot_names[:2]

    def scalars(self, group, state) -> AdaBeliefScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        lr = value(group["lr"])
        bias_correction1 = 1 - beta1**t
        rectified = False
        rectified_step_size = 0.0
        if group["rectify"]:
            rho_t, rect = rectification(beta2, t)
            rectified = rho_t >= 5
            if rectified:
                rectified_step_size = lr * rect * (1 - beta2**t) ** 0.5 / bias_correction1
        return AdaBeliefScalars(
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"], rectify=group["rectify"], rectified=rectified,
            step_size=lr / bias_correction1,
            bias_correction2_sqrt=(1 - beta2**t) ** 0.5,
            rectified_step_size=rectified_step_size,
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: AdaBeliefScalars, p, g, exp_avg, exp_avg_var, max_exp_avg_var):
        if s.weight_decay != 0:
            if s.decoupled:
                p = p * (1 - s.lr * s.weight_decay)
            else:
                g = g + s.weight_decay * p
        exp_avg = exp_avg * s.beta1 + (1 - s.beta1) * g
        residual = g - exp_avg
        exp_avg_var = exp_avg_var * s.beta2 + (1 - s.beta2) * (residual * residual) + s.eps
        if s.amsgrad:
            max_exp_avg_var = maximum(max_exp_avg_var, exp_avg_var)
        if not s.rectify:
            second = max_exp_avg_var if s.amsgrad else exp_avg_var
            u = s.step_size * (exp_avg / (sqrt(second) / s.bias_correction2_sqrt + s.eps))
        elif s.rectified:
            u = s.rectified_step_size * (exp_avg / (sqrt(exp_avg_var) + s.eps))
        else:
            u = s.step_size * exp_avg
        if s.cautious:
            return (p - masked(u, g, s.cautious_scale), exp_avg, exp_avg_var, max_exp_avg_var,
                    agreement(u, g))
        else:
            return p - u, exp_avg, exp_avg_var, max_exp_avg_var
