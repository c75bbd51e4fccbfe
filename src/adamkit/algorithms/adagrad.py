"""Adagrad (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import validation as v
from ..engines.ops import fma, sqrt
from ..optimizer import Optimizer, scalar_dtype, value


class AdagradScalars(NamedTuple):
    clr: float  # lr / (1 + (t - 1) * lr_decay)
    eps: float
    weight_decay: float


class Adagrad(Optimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011); torch semantics and checkpoint layout.

    .. math::
        \tilde\gamma = \frac{\gamma}{1 + (t-1)\,\mathrm{lr\_decay}}, \quad
        s_t = s_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \tilde\gamma\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    with coupled decay :math:`g \leftarrow g + \lambda\theta`. The accumulator starts at
    ``initial_accumulator_value``; like torch, state is created for every parameter at
    construction. Sparse gradients update only the rows present (not with weight_decay != 0).

    Defaults: lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10.
    State: ``step``, ``sum``.
    """

    checks = {
        "lr": v.non_negative,
        "lr_decay": v.non_negative,
        "weight_decay": v.non_negative,
        "initial_accumulator_value": v.non_negative,
        "eps": v.non_negative,
        "maximize": v.flag,
    }
    slot_names = ("sum",)
    scalars_from_step = True
    nonnegative_slots = ("sum",)
    supports_complex = True
    sparse_note = "Adagrad (weight_decay=0)"

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def setup_group(self, group):
        # torch creates Adagrad's state eagerly, so a fresh checkpoint already lists every
        # parameter; do the same so checkpoints match key for key.
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                state["sum"] = self.new_slot(group, p, "sum")

    def slot_fill(self, group, name):
        return group["initial_accumulator_value"]

    def sparse_ok(self, group):
        return group["weight_decay"] == 0

    def scalars(self, group, state) -> AdagradScalars:
        t = self.advance_step(state)
        return AdagradScalars(
            clr=value(group["lr"]) / (1 + (t - 1) * group["lr_decay"]),
            eps=group["eps"], weight_decay=group["weight_decay"],
        )

    @staticmethod
    def update(s: AdagradScalars, p, g, sum_):
        # torch's single-tensor order: add(alpha=) and addcmul_ round once (fma); addcdiv_
        # rounds value * g, then the quotient, then the sum
        if s.weight_decay != 0:
            g = fma(s.weight_decay, p, g)
        sum_ = fma(g, g, sum_)
        return p + (-s.clr * g) / (sqrt(sum_) + s.eps), sum_

