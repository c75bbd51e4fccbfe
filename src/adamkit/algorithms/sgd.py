"""SGD with momentum and Nesterov momentum (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

from .. import validation as v
from ..optimizer import Optimizer, value
from ..engines.ops import fma
from .cautious import Cautious, agreement


class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    first: bool  # no momentum buffer yet: it starts as the gradient itself
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class SGD(Cautious, Optimizer):
    r"""Stochastic gradient descent, optionally with (Nesterov) momentum; torch semantics.

    Coupled decay :math:`g \leftarrow g + \lambda\theta`. With momentum :math:`\mu`:
    :math:`b_1 = g_1` (no dampening on the first step), then
    :math:`b_t = \mu b_{t-1} + (1-\tau) g_t`; the step direction is :math:`g + \mu b` with
    ``nesterov=True``, otherwise :math:`b`. :math:`\theta \leftarrow \theta - \gamma\,d`.
    Full-batch gradient descent is SGD with the whole data set as one batch.

    Defaults: lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False (torch's).
    Nesterov needs momentum > 0 and dampening = 0. State: ``momentum_buffer`` (momentum > 0
    only; like torch there is no ``step``, and without momentum no state entry at all). Sparse
    gradients of dense parameters are accepted with momentum=0 and weight_decay=0; sparse
    parameters (with sparse gradients) take any setting, as in torch, the rule running on
    torch's sparse arithmetic.
    """

    checks = {
        "lr": v.non_negative,
        "momentum": v.non_negative,
        "dampening": v.in_range(0.0, 1.0, closed_high=True),
        "weight_decay": v.non_negative,
        "nesterov": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("momentum_buffer",)
    scalars_from_step = True
    supports_complex = True
    sparse_note = "SGD (momentum=0, weight_decay=0)"
    sparse_params = True
    step_kind = "none"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    def validate_group(self, group):
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={group['momentum']} and "
                f"dampening={group['dampening']} (Nesterov momentum requires momentum > 0 "
                "and dampening = 0)"
            )

    def sparse_ok(self, group):
        return group["momentum"] == 0 and group["weight_decay"] == 0

    def state_slots(self, group, p):
        return self.slot_names if group["momentum"] != 0 else ()

    def scalars(self, group, state) -> SGDScalars:
        return SGDScalars(
            lr=value(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            first="momentum_buffer" not in state, cautious=group["cautious"],
        )

    def step_sparse_parameter(self, group, p, grad, state):
        # torch's own loop, op for op: on sparse tensors ``add_`` with ``alpha`` rounds
        # differently from ``p - lr * g``, and torch supports every setting here
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-float(group["lr"]))

    @staticmethod
    def update(s: SGDScalars, p, g, momentum_buffer):
        # torch's single-tensor order; its add_(alpha=) rounds once (fma)
        if s.weight_decay != 0:
            g = fma(s.weight_decay, p, g)
        grad = g  # what the Cautious mask compares with
        if s.momentum != 0:
            if s.first:
                momentum_buffer = g
            else:
                momentum_buffer = fma(1 - s.dampening, g, momentum_buffer * s.momentum)
            if s.nesterov:
                g = fma(s.momentum, momentum_buffer, g)
            else:
                g = momentum_buffer
        if s.cautious:
            u = s.lr * g
            keep = agreement(u, grad)
            # with every sign agreeing (scale 1) this is the plain step bit for bit
            return fma(-s.lr, g * (keep * s.cautious_scale), p), momentum_buffer, keep
        else:
            return fma(-s.lr, g, p), momentum_buffer
