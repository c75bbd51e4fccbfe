"""SparseAdam: lazy Adam for sparse gradients (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..engines.ops import sqrt
from ..optimizer import Optimizer


class SparseAdamScalars(NamedTuple):
    beta1: float
    beta2: float
    eps: float
    step_size: float  # lr * sqrt(1 - beta2^t) / (1 - beta1^t)


class SparseAdam(Optimizer):
    r"""Lazy Adam for dense parameters with sparse gradients (``nn.Embedding(sparse=True)``).

    Gradients are coalesced first (duplicate indices sum); only the rows present change, their
    :math:`m`, :math:`v` and :math:`\theta`; other rows are untouched. Epsilon-hat form:

    .. math::
        \theta \leftarrow \theta - \gamma\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
                           \frac{m}{\sqrt{v}+\epsilon}

    with one step counter per tensor, advanced on every step in which it has a gradient.
    No weight decay. Dense gradients are an error, as in torch.

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8. State: ``step`` (an int, as torch),
    ``exp_avg``, ``exp_avg_sq``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.positive,
        "maximize": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq")
    nonnegative_slots = ("exp_avg_sq",)
    requires_sparse = True
    step_kind = "int"
    sparse_note = "SparseAdam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def sparse_ok(self, group):
        return True

    def scalars(self, group, state) -> SparseAdamScalars:
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        return SparseAdamScalars(
            beta1=beta1, beta2=beta2, eps=group["eps"],
            step_size=float(group["lr"]) * (1 - beta2**t) ** 0.5 / (1 - beta1**t),
        )

    @staticmethod
    def update(s: SparseAdamScalars, p, g, exp_avg, exp_avg_sq):
        exp_avg = exp_avg + (g - exp_avg) * (1 - s.beta1)
        exp_avg_sq = exp_avg_sq + (g * g - exp_avg_sq) * (1 - s.beta2)
        return p - s.step_size * (exp_avg / (sqrt(exp_avg_sq) + s.eps)), exp_avg, exp_avg_sq
