"""NAdam: Adam with Nesterov momentum and momentum decay (torch.optim semantics)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import validation as v
from ..engines.ops import fma, lerp, sqrt
from ..optimizer import Optimizer, scalar_dtype, value
from .cautious import Cautious, agreement


class NAdamScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    bias_correction2: float  # 1 - beta2^t
    grad_coef: float  # lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)
    exp_avg_coef: float  # lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
    cautious: bool = False
    cautious_scale: float = 1.0  # 1 / max(mean(mask), 1e-3), set after the mask pass


class NAdam(Cautious, Optimizer):
    r"""NAdam (Dozat, 2016); torch semantics and checkpoint layout.

    .. math::
        \mu_t = \beta_1\left(1 - \tfrac12\, 0.96^{t\psi}\right), \quad
        \Pi_t = \Pi_{t-1}\mu_t, \quad d = \sqrt{v_t / (1-\beta_2^t)} + \epsilon, \\
        \theta_t = \theta_{t-1} - \gamma\frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{d}
                   - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d}

    with :math:`m, v` as in Adam (constant :math:`\beta_1`). The product :math:`\Pi_t` is the
    state ``mu_product``, a 0-dim tensor kept like torch's (so trajectories match bit for bit
    in practice). Coupled decay unless ``decoupled_weight_decay=True``.

    Defaults: lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3.
    State: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "momentum_decay": v.non_negative,
        "decoupled_weight_decay": v.flag,
        "maximize": v.flag,
        "cautious": v.flag,
    }
    slot_names = ("exp_avg", "exp_avg_sq")
    scalars_from_step = True
    nonnegative_slots = ("exp_avg_sq",)
    supports_complex = True

    def __init__(
        self,
        params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        cautious=cautious)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite,
                         stochastic_rounding=stochastic_rounding)

    # scalars() multiplies the parameter's mu_product by the step's mu: tensors whose
    # products are equal share one call, and the others copy its result (exactly what their
    # own multiplication would give)
    def scalars_key(self, state):
        mu_product = state.get("mu_product")
        return None if mu_product is None else float(mu_product)

    def share_scalars(self, state, first):
        if "mu_product" in state:
            state["mu_product"].copy_(first["mu_product"])
        else:
            state["mu_product"] = first["mu_product"].clone()

    def scalars(self, group, state) -> NAdamScalars:
        t = self.advance_step(state)
        if "mu_product" not in state:
            state["mu_product"] = torch.ones((), dtype=scalar_dtype())
        beta1, beta2 = map(float, group["betas"])  # tensor betas too, as torch
        psi = group["momentum_decay"]
        lr = value(group["lr"])
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        # The product is accumulated in the state tensor's own dtype, as torch does.
        state["mu_product"] *= mu
        mu_product = value(state["mu_product"])
        return NAdamScalars(
            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
            bias_correction2=1 - beta2**t,
            grad_coef=lr * (1.0 - mu) / (1.0 - mu_product),
            exp_avg_coef=lr * mu_next / (1.0 - mu_product * mu_next),
            cautious=group["cautious"],
        )

    @staticmethod
    def update(s: NAdamScalars, p, g, exp_avg, exp_avg_sq):
        if s.weight_decay != 0:
            if s.decoupled:
                p = p * (1 - s.lr * s.weight_decay)
            else:
                g = fma(s.weight_decay, p, g)  # torch's add(alpha=): rounded once
        exp_avg = lerp(exp_avg, g, 1 - s.beta1)
        # mul_(beta2).addcmul_(g, g, value=1 - beta2): fma((1 - beta2) * g, g, v * beta2)
        exp_avg_sq = fma((1 - s.beta2) * g, g, exp_avg_sq * s.beta2)
        # torch's order: sqrt(v / bc2) + eps, then two addcdiv_ (product, quotient and sum
        # each rounded): two divisions per element, as torch
        denom = sqrt(exp_avg_sq / s.bias_correction2) + s.eps
        grad_term = (-s.grad_coef * g) / denom
        exp_avg_term = (-s.exp_avg_coef * exp_avg) / denom
        if s.cautious:
            keep = agreement(-(grad_term + exp_avg_term), g)
            p = p + grad_term * (keep * s.cautious_scale) + exp_avg_term * (keep * s.cautious_scale)
            return p, exp_avg, exp_avg_sq, keep
        else:
            return p + grad_term + exp_avg_term, exp_avg, exp_avg_sq
