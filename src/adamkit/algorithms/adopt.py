"""ADOPT (Taniguchi et al., NeurIPS 2024), following the official code (iShohei220/adopt)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from .. import validation as v
from ..engines.ops import clamp, lerp, maximum, sqrt
from ..optimizer import Optimizer, value
from .cautious import Cautious, agreement, masked


class ADOPTScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decouple: bool
    first: bool  # the first step only initialises exp_avg_sq
    clipped: bool  # clip_lambda is not None
    clip: float  # clip_lambda(t - 1)
    cautious: bool = False
    cautious_scale: float = 1.0


def _quarter_power(step: int) -> float:
    """The official default clipping schedule, ``step ** 0.25``."""
    return step**0.25


class ADOPT(Cautious, Optimizer):
    r"""ADOPT: Adam whose second moment lags the gradient by one step, so it converges for any
    :math:`\beta_2`.

    .. math::
        t = 1:\ v \leftarrow g^2 \ (\theta \text{ and } m \text{ unchanged}); \qquad
        t > 1:\ m \leftarrow \beta_1 m + (1-\beta_1)\,
            \mathrm{clip}\Big(\frac{g}{\max(\sqrt v, \epsilon)}, c_{t-1}\Big), \quad
        \theta \leftarrow \theta - \gamma m, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2

    ``v`` is updated after the step, so it never contains the current gradient. ``clip`` clamps
    into :math:`[-c, c]` with :math:`c_{t-1}` = ``clip_lambda(t - 1)`` (the number of earlier
    steps; default :math:`(t-1)^{1/4}`); ``clip_lambda=None`` is the unclipped algorithm of the
    paper's first version. ``weight_decay`` is coupled (:math:`g \leftarrow g + \lambda\theta`,
    also on the first step) unless ``decouple=True``, which multiplies :math:`\theta` by
    :math:`1-\gamma\lambda` before each update after the first (AdamW-style).
    ``cautious=True`` applies the Cautious mask (:mod:`adamkit.algorithms.cautious`).

    Reference: the official ``adopt.py`` at commit c621db2 (Dec 2024), whose clipping (added
    Nov 2024) is not in the paper's first version. Defaults: lr=1e-3, betas=(0.9, 0.9999),
    eps=1e-6, clip_lambda=step**0.25, weight_decay=0, decouple=False (the official code's).
    State: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "decouple": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq")
    nonnegative_slots = ("exp_avg_sq",)
    scalars_from_step = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Callable[[int], float] | None = _quarter_power,
        weight_decay: float = 0.0,
        decouple: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        if clip_lambda is not None and not callable(clip_lambda):
            raise ValueError(f"Invalid clip_lambda: {clip_lambda!r} (must be a function of the "
                             "step count returning the clipping value, or None)")
        # kept on the optimizer, not in the groups, as the official code does (a function does
        # not belong in a state_dict)
        self.clip_lambda = clip_lambda
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        maximize=maximize, cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite, stochastic_rounding=stochastic_rounding)

    def scalars(self, group, state) -> ADOPTScalars:
        t = self.advance_step(state)
        beta1, beta2 = group["betas"]
        clipped = self.clip_lambda is not None and t > 1
        return ADOPTScalars(
            lr=value(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decouple=group["decouple"], first=t == 1,
            clipped=clipped, clip=float(self.clip_lambda(t - 1.0)) if clipped else math.inf,
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: ADOPTScalars, p, g, exp_avg, exp_avg_sq):
        if s.weight_decay != 0 and not s.decouple:
            g = g + s.weight_decay * p
        if s.first:
            if s.cautious:
                return p, exp_avg, g * g, g * 0.0
            else:
                return p, exp_avg, g * g
        if s.weight_decay != 0 and s.decouple:
            p = p * (1 - s.lr * s.weight_decay)
        normed = g / maximum(sqrt(exp_avg_sq), s.eps)
        if s.clipped:
            normed = clamp(normed, -s.clip, s.clip)
        exp_avg = lerp(exp_avg, normed, 1 - s.beta1)
        exp_avg_sq = exp_avg_sq * s.beta2 + (1 - s.beta2) * (g * g)
        u = s.lr * exp_avg
        if s.cautious:
            return p - masked(u, g, s.cautious_scale), exp_avg, exp_avg_sq, agreement(u, g)
        else:
            return p - u, exp_avg, exp_avg_sq
