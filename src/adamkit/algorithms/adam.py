"""Adam, AMSGrad and AdamW (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import fma, lerp, maximum, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement


class AdamScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    step_size: float  # lr / bias_correction1
    bias_correction2_sqrt: float
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class Adam(Cautious, Optimizer):
    r"""Adam (Kingma & Ba, 2015), with torch.optim's semantics and checkpoint layout.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
        \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    (the "epsilon-after" form of the paper's Algorithm 1). ``weight_decay`` is coupled
    (:math:`g \leftarrow g + \lambda\theta`) unless ``decoupled_weight_decay=True``, which
    multiplies :math:`\theta` by :math:`1-\gamma\lambda` first (AdamW). ``amsgrad=True`` keeps
    :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` over the raw :math:`v` and uses it in the
    denominator, still divided by the current :math:`\sqrt{1-\beta_2^t}` (torch's AMSGrad).

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, as the paper and torch.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad only).
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas_floats_or_tensors,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "amsgrad": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
        "decoupled_weight_decay": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_sq", "max_exp_avg_sq")
    supports_complex = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def state_slots(self, group, p):
        return self.slot_names if group["amsgrad"] else self.slot_names[:2]

    def scalars(self, group, state) -> AdamScalars:
        t = self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        lr = value(group["lr"])
        return AdamScalars(
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"], cautious=group["cautious"],
            step_size=lr / (1 - beta1**t),
            bias_correction2_sqrt=(1 - beta2**t) ** 0.5,
        )

    @staticmethod
    def update(s: AdamScalars, p, g, exp_avg, exp_avg_sq, max_exp_avg_sq):
        if s.weight_decay != 0:
            if s.decoupled:
                p = p * (1 - s.lr * s.weight_decay)
            else:
                g = fma(s.weight_decay, p, g)  # torch's add(alpha=): rounded once
        exp_avg = lerp(exp_avg, g, 1 - s.beta1)
        # mul_(beta2).addcmul_(g, g, value=1 - beta2): fma((1 - beta2) * g, g, v * beta2)
        exp_avg_sq = fma((1 - s.beta2) * g, g, exp_avg_sq * s.beta2)
        if s.amsgrad:
            max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
            denom = sqrt(max_exp_avg_sq) / s.bias_correction2_sqrt + s.eps
        else:
            denom = sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps
        # addcdiv_(exp_avg, denom, value=-step_size): each of product, quotient, sum rounded
        d = (-s.step_size * exp_avg) / denom
        if s.cautious:
            keep = agreement(-d, g)
            # scale 1 (every sign agreeing) leaves d, and the step, bit for bit
            return (p + d * (keep * s.cautious_scale), exp_avg, exp_avg_sq, max_exp_avg_sq,
                    keep)
        else:
            return p + d, exp_avg, exp_avg_sq, max_exp_avg_sq


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, torch semantics.

    :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam step. As in torch the decay
    is scaled by the current lr; the paper scales :math:`\lambda` by the schedule multiplier only,
    so the paper's :math:`\lambda` equals torch's :math:`\lambda` times the base lr.

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2 (torch's). Decay stays
    decoupled when an ``Adam`` checkpoint is loaded (as torch's AdamW).
    """

    class_flags = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = True,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        # accepted so that AdamW(params, **opt.defaults) rebuilds an AdamW (its defaults hold
        # the flag, as torch's do); only its one value is valid
        if decoupled_weight_decay is not True:
            raise ValueError(
                f"Invalid decoupled_weight_decay: {decoupled_weight_decay!r} (AdamW's decay is "
                "always decoupled; use Adam(..., decoupled_weight_decay=False) for coupled decay)"
            )
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         cautious=cautious,
                         backend=backend, state_dtype=state_dtype, on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)
