"""Lion (Chen et al., 2023), following the authors' code (google/automl)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import sign
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked


class LionScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class Lion(Cautious, Optimizer):
    r"""Lion ("EvoLved Sign Momentum"): the update is the sign of an interpolated momentum.

    .. math::
        \theta \leftarrow \theta(1-\gamma\lambda), \quad
        c = \beta_1 m + (1-\beta_1) g, \quad
        \theta \leftarrow \theta - \gamma\,\mathrm{sign}(c), \quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    with sign(0) = 0; no epsilon, no bias correction. Lion's update has unit magnitude per
    element, so its lr is typically 3-10x smaller than AdamW's and its weight decay larger.

    Defaults: lr=1e-4, betas=(0.9, 0.99), weight_decay=0. State: ``step``, ``exp_avg``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "weight_decay": v.non_negative,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg",)
    scalars_from_step = True

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> LionScalars:
        self.advance_step(state)
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        return LionScalars(lr=value(group["lr"]), beta1=beta1, beta2=beta2,
                           weight_decay=group["weight_decay"], cautious=group["cautious"])

    @staticmethod
    def update(s: LionScalars, p, g, exp_avg):
        if s.weight_decay != 0:
            p = p * (1 - s.lr * s.weight_decay)
        direction = exp_avg * s.beta1 + (1 - s.beta1) * g
        u = s.lr * sign(direction)
        exp_avg = exp_avg * s.beta2 + (1 - s.beta2) * g
        if s.cautious:
            return p - masked(u, g, s.cautious_scale), exp_avg, agreement(u, g)
        else:
            return p - u, exp_avg
