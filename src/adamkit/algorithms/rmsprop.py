"""RMSprop, plain and centered, with optional momentum (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import fma, lerp, sqrt
from ..optimizer import Optimizer, value


class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton, 2012); torch semantics and checkpoint layout.

    Coupled decay; :math:`v_t = \alpha v_{t-1} + (1-\alpha) g_t^2` (no bias correction).
    ``centered=True`` also keeps :math:`a_t = \alpha a_{t-1} + (1-\alpha) g_t` and uses
    :math:`d = \sqrt{v_t - a_t^2} + \epsilon`, otherwise :math:`d = \sqrt{v_t} + \epsilon`.
    With momentum :math:`\mu > 0`: :math:`b_t = \mu b_{t-1} + g_t/d`,
    :math:`\theta \leftarrow \theta - \gamma b_t`; otherwise
    :math:`\theta \leftarrow \theta - \gamma g_t/d`.

    Defaults: lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False.
    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).
    """

    checks = {
        "lr": v.non_negative,
        "alpha": v.non_negative,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "momentum": v.non_negative,
        "centered": v.flag,
        "maximize": v.flag,
    }
    slot_names = ("square_avg", "momentum_buffer", "grad_avg")
    scalars_from_step = True
    nonnegative_slots = ("square_avg",)
    supports_complex = True

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def state_slots(self, group, p):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return tuple(names)

    def scalars(self, group, state) -> RMSpropScalars:
        self.advance_step(state)
        return RMSpropScalars(
            lr=value(group["lr"]), alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"],
        )

    @staticmethod
    def update(s: RMSpropScalars, p, g, square_avg, momentum_buffer, grad_avg):
        # torch's single-tensor order: add(alpha=) and addcmul(value=v) round once
        # (fma(v * x, y, z)); addcdiv(value=v) is z + (v * x) / y, rounded at each step
        if s.weight_decay != 0:
            g = fma(s.weight_decay, p, g)
        square_avg = fma((1 - s.alpha) * g, g, square_avg * s.alpha)
        if s.centered:
            grad_avg = lerp(grad_avg, g, 1 - s.alpha)
            denom = sqrt(fma(-grad_avg, grad_avg, square_avg)) + s.eps
        else:
            denom = sqrt(square_avg) + s.eps
        if s.momentum > 0:
            momentum_buffer = momentum_buffer * s.momentum + g / denom
            p = fma(-s.lr, momentum_buffer, p)
        else:
            p = p + (-s.lr * g) / denom
        return p, square_avg, momentum_buffer, grad_avg
