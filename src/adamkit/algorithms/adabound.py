"""AdaBound and AMSBound (Luo et al., 2019), following the authors' code (Luolc/AdaBound)."""

from __future__ import annotations

import math
from typing import NamedTuple

from .. import validation as v
from ..engines.ops import clamp, maximum, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked


class AdaBoundScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsbound: bool
    step_size: float  # lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    lower: float
    upper: float
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class AdaBound(Cautious, Optimizer):
    r"""AdaBound / AMSBound: Adam whose per-element step size is clipped into bounds that
    converge to ``final_lr``, so training ends like SGD. Follows the official code.

    .. math::
        \eta = \mathrm{clip}\!\left(\frac{\gamma\sqrt{1-\beta_2^t}/(1-\beta_1^t)}
               {\sqrt{v_t}+\epsilon},\ \ell_t,\ u_t\right), \quad
        \theta_t = \theta_{t-1} - \eta\, m_t, \\
        \ell_t = \alpha^*\left(1 - \frac{1}{\mathrm{gamma}\,t + 1}\right), \quad
        u_t = \alpha^*\left(1 + \frac{1}{\mathrm{gamma}\,t}\right), \quad
        \alpha^* = \mathrm{final\_lr}\cdot\gamma/\gamma_0

    where :math:`\gamma_0` is the group's lr when the group was created (kept in the group as
    ``base_lr``), so an lr schedule moves the bounds too. :math:`m` is used raw (not
    bias-corrected), as in the official code. ``amsbound=True`` replaces :math:`v_t` by
    :math:`\max(\hat v_{t-1}, v_t)` over the raw :math:`v`. Coupled decay unless
    ``decoupled_weight_decay=True`` (:math:`\theta(1-\gamma\lambda)`).

    Departure from the official code: :math:`\gamma_0` lives in the param group (the official
    code keeps a list that misses groups added later and is lost by ``state_dict``).

    Defaults: lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
    weight_decay=0, amsbound=False. State: ``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (amsbound only).
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "final_lr": v.non_negative,
        "gamma": v.unit_interval,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "amsbound": v.flag,
        "decoupled_weight_decay": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, amsbound=amsbound,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def setup_group(self, group):
        super().setup_group(group)
        group.setdefault("base_lr", value(group["lr"]))

    def state_slots(self, group, p):
        return self.slot_names if group["amsbound"] else self.slot_names[:2]

    def scalars(self, group, state) -> AdaBoundScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        lr = value(group["lr"])
        base_lr = group["base_lr"]
        final_lr = group["final_lr"] * lr / base_lr if base_lr != 0 else 0.0
        gamma_t = group["gamma"] * t
        return AdaBoundScalars(
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            amsbound=group["amsbound"],
            step_size=lr * sqrt(1 - beta2**t) / (1 - beta1**t),
            lower=final_lr * (1 - 1 / (gamma_t + 1)),
            # gamma = 0 leaves the step unbounded above (1 / 0 read as +inf)
            upper=final_lr * (1 + 1 / gamma_t) if group["gamma"] > 0 else math.inf,  # t >= 1
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: AdaBoundScalars, p, g, exp_avg, exp_avg_sq, max_exp_avg_sq):
        if s.weight_decay != 0:
            if s.decoupled:
                p = p * (1 - s.lr * s.weight_decay)
            else:
                g = g + s.weight_decay * p
        exp_avg = exp_avg * s.beta1 + (1 - s.beta1) * g
        exp_avg_sq = exp_avg_sq * s.beta2 + (1 - s.beta2) * (g * g)
        if s.amsbound:
            max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
            denom = sqrt(max_exp_avg_sq) + s.eps
        else:
            denom = sqrt(exp_avg_sq) + s.eps
        step = clamp(s.step_size / denom, s.lower, s.upper)
        u = step * exp_avg
        if s.cautious:
            return (p - masked(u, g, s.cautious_scale), exp_avg, exp_avg_sq, max_exp_avg_sq,
                    agreement(u, g))
        else:
            return p - u, exp_avg, exp_avg_sq, max_exp_avg_sq
