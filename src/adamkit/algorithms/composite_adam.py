"""C-Adam (composite-gradient Adam): adamkit's statement of the seed's description (ALGORITHMS.md,
"C-Adam"), after Liu et al. 2023 (ACGB-Adam) whose formulas could not be read."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import validation as v
from ..engines.ops import fma, lerp, sqrt
from ..optimizer import Optimizer

_NO_CLOSURE = ("CompositeAdam.step() needs a closure: C-Adam evaluates the gradient a second time "
               "at the look-ahead point. Pass one that zeroes the gradients, computes the loss, "
               "calls backward() and returns the loss, as for LBFGS: "
               "optimizer.step(closure); nothing was updated")


class CompositeAdamScalars(NamedTuple):
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step_size: float  # lr / (1 - beta1^t)
    bias_correction2_sqrt: float


class CompositeAdam(Optimizer):
    r"""C-Adam: Adam whose first moment takes the composite of the current gradient and a
    predicted gradient at a gradient-descent look-ahead point.

    .. math::
        g = \nabla f(\theta), \quad \tilde\theta = \theta - \gamma g, \quad
        u = \nabla f(\tilde\theta), \quad c = \tfrac12 (g + u), \\
        m \leftarrow \beta_1 m + (1-\beta_1) c, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \quad \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    :math:`\theta` is restored after the second gradient, so the update starts from it. When
    :math:`u = g` this is Adam exactly (:class:`adamkit.Adam`, bit for bit). ``step(closure)``
    is required: the closure is called twice (at :math:`\theta`, then at :math:`\tilde\theta`;
    gradients are cleared before the second call) and the first loss is returned; without one,
    ``step()`` raises a ``TypeError`` before anything changes. ``weight_decay`` is coupled
    (:math:`\lambda\theta` added to both :math:`c` and :math:`g`, so it too reduces to Adam's).

    Source: the seed's description of composite gradient descent, after Liu et al., "An
    Improved Adam Optimization Algorithm Combining Adaptive Coefficients and Composite Gradients
    Based on Randomized Block Coordinate Descent" (2023). adamkit's choices (ALGORITHMS.md): the
    look-ahead step :math:`\gamma g`, the composite :math:`\tfrac12(g+u)`, constant
    :math:`\beta_1`, :math:`g^2` (not :math:`c^2`) in :math:`v`; the randomized block-coordinate
    part of ACGB-Adam is not included. Defaults (Adam's): lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=0. State: ``step``, ``exp_avg``, ``exp_avg_sq``,
    ``predicted_grad`` (the last u, kept in the parameter's dtype).
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "maximize": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq", "predicted_grad")
    nonnegative_slots = ("exp_avg_sq",)
    unquantized_slots = ("predicted_grad",)
    scalars_from_step = True
    #: step() needs a closure (the test tables' drivers call step() without one)
    requires_closure = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite, stochastic_rounding=stochastic_rounding)

    def slot_storage(self, name: str) -> str | None:
        # u is an input of the step, rewritten every step: the parameter's dtype
        return None if name == "predicted_grad" else super().slot_storage(name)

    def scalars(self, group, state) -> CompositeAdamScalars:
        t = self.advance_step(state)
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        return CompositeAdamScalars(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step_size=lr / (1 - beta1**t), bias_correction2_sqrt=(1 - beta2**t) ** 0.5)

    @staticmethod
    def update(s: CompositeAdamScalars, p, g, exp_avg, exp_avg_sq, predicted_grad):
        # Adam's arithmetic in adam.py's (torch's) order, so that u = g is Adam bit for bit
        c = 0.5 * (g + predicted_grad)
        if s.weight_decay != 0:
            c = fma(s.weight_decay, p, c)
            g = fma(s.weight_decay, p, g)
        exp_avg = lerp(exp_avg, c, 1 - s.beta1)
        exp_avg_sq = fma((1 - s.beta2) * g, g, exp_avg_sq * s.beta2)
        denom = sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps
        return p + (-s.step_size * exp_avg) / denom, exp_avg, exp_avg_sq, predicted_grad

    @torch.no_grad()
    def step(self, closure=None):
        """Evaluate ``closure`` at θ and at the look-ahead θ − γg, then take the Adam step on the
        composite gradient; returns the first loss."""
        if closure is None:
            raise TypeError(_NO_CLOSURE)
        with torch.enable_grad():
            loss = closure()
        active = [(group, p) for group in self.param_groups for p in group["params"]
                  if p.grad is not None]
        grads = [p.grad.clone() for _, p in active]
        saved = [p.detach().clone() for _, p in active]
        for (group, p), g in zip(active, grads):  # the look-ahead: a descent step
            direction = -g if group["maximize"] else g
            p.sub_(direction.to(p.dtype), alpha=float(group["lr"]))
            p.grad = None
        try:
            with torch.enable_grad():
                closure()
            predicted = [p.grad for _, p in active]
        finally:
            for (_, p), theta, g in zip(active, saved, grads):
                p.copy_(theta)
                p.grad = g
        for (group, p), g, u in zip(active, grads, predicted):
            u = g if u is None else u  # not reached from the look-ahead point: u = g
            if group["maximize"]:
                u = -u  # the engine negates g itself; u arrives as a state tensor
            state = self.state[p]
            if "predicted_grad" in state and state["predicted_grad"].shape == p.shape:
                state["predicted_grad"].copy_(u)
            else:
                state["predicted_grad"] = u.to(p.dtype).clone(
                    memory_format=torch.preserve_format)
        super().step()
        return loss
