"""Muon (Jordan et al., 2024), with torch.optim's semantics and checkpoint layout, and AdamW
param groups (``use_muon=False``) in the same optimizer."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import validation as v
from ..engines.ops import lerp
from ..optimizer import Optimizer
from .adam import Adam, AdamScalars, AdamW

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

#: what an AdamW group (``use_muon=False``) takes for a key it does not set: torch.optim.AdamW's
#: defaults (its lr is the optimizer's)
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


class MuonScalars(NamedTuple):
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    match_rms_adamw: bool  # adjust_lr_fn == "match_rms_adamw" (else "original")
    adjusted_lr: float  # lr times the shape's ratio, set by apply
    # the orthogonalisation's settings (read by apply, not by the element rules)
    ns_a: float
    ns_b: float
    ns_c: float
    ns_steps: float
    eps: float


def _momentum(s: MuonScalars, g, buf):
    # torch: buf.lerp_(grad, 1 - momentum); update = grad.lerp(buf, momentum) if nesterov
    buf = lerp(buf, g, 1 - s.momentum)
    if s.nesterov:
        return buf, lerp(g, buf, s.momentum)
    return buf


def _apply_update(s: MuonScalars, p, o):
    # torch: param.mul_(1 - lr * weight_decay); param.add_(update, alpha=-adjusted_lr)
    p = p * (1 - s.lr * s.weight_decay)
    return p - s.adjusted_lr * o


def adjust_ratio(match_rms_adamw: bool, shape) -> float:
    """The factor torch's ``adjust_lr_fn`` scales lr by for a matrix of ``shape`` (A, B):
    ``sqrt(max(1, A / B))`` ("original", Keller Jordan's) or ``0.2 sqrt(max(A, B))``
    ("match_rms_adamw", Moonshot's)."""
    rows, cols = shape[:2]
    if match_rms_adamw:
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def _ns_coefficients(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"Invalid {name}: {value!r} (must be a tuple of exactly 3 numbers)")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"Invalid {name}: {value!r} (must be finite numbers)")


def _ns_steps(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 100:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer in [0, 100))")


class Muon(Optimizer):
    r"""Muon: momentum, orthogonalised by a Newton–Schulz iteration, for 2-D weights; torch
    semantics, with AdamW groups for everything else.

    For a 2-D parameter (Jordan et al., "Muon: An optimizer for hidden layers in neural
    networks", 2024; torch.optim.Muon):

    .. math::
        B \leftarrow \mathrm{lerp}(B, g, 1-\mu), \quad
        U = \begin{cases}\mathrm{lerp}(g, B, \mu) & \text{nesterov}\\ B & \text{else}\end{cases},
        \quad O = \mathrm{NS}^{(a,b,c)}_k(U; \epsilon), \\
        \theta \leftarrow \theta(1-\gamma\lambda), \quad
        \theta \leftarrow \theta - \gamma' O

    where :math:`\mathrm{NS}` is ``k`` quintic Newton–Schulz iterations in bfloat16 on
    :math:`U/\max(\|U\|_F, \epsilon)` (the engines' ``orthogonalize`` stage:
    :func:`adamkit.engines.reference.newton_schulz`) and :math:`\gamma'` is ``lr`` adjusted
    for the shape :math:`A \times B`: :math:`\gamma\sqrt{\max(1, A/B)}` for ``adjust_lr_fn``
    None or "original", :math:`0.2\gamma\sqrt{\max(A, B)}` for "match_rms_adamw" (Moonshot,
    "Muon is Scalable for LLM Training", 2025). The momentum and the update are element
    rules (fused engine kernels); the orthogonalisation is a whole-matrix stage between them.

    Param groups with ``use_muon=False`` are updated by AdamW (:class:`adamkit.AdamW`'s rule)
    with the group's ``lr``, ``betas``, ``eps`` and ``weight_decay``; keys such a group does
    not set take torch.optim.AdamW's defaults (betas=(0.9, 0.999), eps=1e-8,
    weight_decay=1e-2) and the optimizer's lr. Their state is AdamW's (``step``, ``exp_avg``,
    ``exp_avg_sq``). :func:`adamkit.param_groups` with ``muon=True`` makes such groups.

    Defaults: lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
    ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None (torch's).
    State: ``momentum_buffer`` (Muon groups: no ``step``, as torch).

    Departures from torch: a parameter that is not 2-D in a Muon group is a ``ValueError``
    naming its group and index when the group is added (torch checks only the constructor's
    groups); ``use_muon``, ``betas`` and ``maximize`` are adamkit's; a bfloat16 momentum
    buffer with ``nesterov=False`` is not normalised in place (torch's
    ``_zeropower_via_newtonschulz`` divides its bfloat16 input in place, which for a bfloat16
    parameter is the buffer itself). The update's ``p - lr'·O`` is a multiply and a subtract
    where torch's ``add_(alpha=)`` fuses them: results agree to an ulp per step.
    """

    checks = {
        "lr": v.non_negative,
        "weight_decay": v.non_negative,
        "momentum": v.non_negative,
        "nesterov": v.flag,
        "ns_coefficients": _ns_coefficients,
        "eps": v.non_negative,
        "ns_steps": _ns_steps,
        "adjust_lr_fn": v.choice(*ADJUST_LR_FNS),
        "use_muon": v.flag,
        "betas": v.betas,
        "maximize": v.flag,
    }
    slot_names = ("momentum_buffer", "exp_avg", "exp_avg_sq")
    nonnegative_slots = ("exp_avg_sq",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        use_muon: bool = True,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, use_muon=use_muon, maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite, stochastic_rounding=stochastic_rounding)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict) and param_group.get("use_muon", True) is False:
            param_group = {**ADAMW_DEFAULTS, **param_group}
        else:
            param_group = dict(param_group) if isinstance(param_group, dict) else param_group
            if isinstance(param_group, dict):  # betas is an AdamW group's key only
                param_group.setdefault("betas", ADAMW_DEFAULTS["betas"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            gi = len(self.param_groups) - 1
            for pi, p in enumerate(group["params"]):
                if p.dim() != 2:
                    self.param_groups.pop()  # an invalid group leaves the optimizer as it was
                    raise ValueError(
                        f"Muon only updates 2-D parameters: parameter {pi} of param group {gi} "
                        f"has shape {tuple(p.shape)}; put it in a group with use_muon=False "
                        "(AdamW), e.g. with adamkit.param_groups(model, muon=True)"
                    )

    def state_slots(self, group, p):
        return self.slot_names[:1] if group["use_muon"] else self.slot_names[1:]

    def scalars(self, group, state):
        if not group["use_muon"]:  # AdamW's scalars, from this group's values
            return Adam.scalars(self, {
                "lr": group["lr"], "betas": group["betas"], "eps": group["eps"],
                "weight_decay": group["weight_decay"], "decoupled_weight_decay": True,
                "amsgrad": False, "cautious": False}, state)
        a, b, c = map(float, group["ns_coefficients"])
        return MuonScalars(
            lr=float(group["lr"]), weight_decay=group["weight_decay"],
            momentum=float(group["momentum"]), nesterov=bool(group["nesterov"]),
            match_rms_adamw=group["adjust_lr_fn"] == "match_rms_adamw", adjusted_lr=math.nan,
            ns_a=a, ns_b=b, ns_c=c, ns_steps=float(group["ns_steps"]), eps=group["eps"])

    def apply(self, engine, s, p, g, slots):
        # a generator (see Optimizer.apply): momentum as an element map; the whole-matrix
        # Newton-Schulz stage once that map has run; the update as an element map
        if isinstance(s, AdamScalars):
            tensors = [slots["exp_avg"], slots["exp_avg_sq"], None]
            engine.map(AdamW.update, s, [p, g, *tensors], [p, *tensors])
            return
        buf = slots["momentum_buffer"]
        if s.nesterov:
            u = torch.empty_like(g)
            yield engine.map(_momentum, s, [g, buf], [buf, u])
        else:
            u = buf
            yield engine.map(_momentum, s, [g, buf], [buf])
        o = engine.orthogonalize(u, (s.ns_a, s.ns_b, s.ns_c), int(s.ns_steps), s.eps)
        s = s._replace(adjusted_lr=s.lr * adjust_ratio(s.match_rms_adamw, p.shape))
        engine.map(_apply_update, s, [p, o], [p])
