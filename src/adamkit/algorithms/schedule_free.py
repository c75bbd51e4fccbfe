"""Schedule-Free AdamW and SGD (Defazio et al., NeurIPS 2024), following the reference code
(facebookresearch/schedule_free, the ``schedulefree`` package: ``AdamWScheduleFree`` and
``SGDScheduleFree``, their non-foreach path).

Three sequences: ``z`` (the base iterate, in the state), ``x`` (the average of the z's, the point
to evaluate) and ``y = (1-β)z + βx`` (where gradients are taken). Only one of x and y is stored:
the parameter holds y in train mode and x in eval mode; ``train()`` / ``eval()`` switch between
them. The per-group counters (``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr``,
``train_mode``) live in the param groups, as in the reference, so ``state_dict`` carries over in
both directions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import validation as v
from ..engines.ops import lerp, sqrt
from ..optimizer import _STORAGE, Optimizer

_EVAL_MODE_ERROR = ("{name}: step() was called in eval mode (the parameters hold the averaged "
                    "point x); call optimizer.train() before training steps and "
                    "optimizer.eval() before evaluation and checkpointing")


def _non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")


def _momentum(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be between 0 and 1 exclusive)")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a number)")


class _ScheduleFree(Optimizer):
    """What both Schedule-Free optimizers share: the group counters, the interpolation weight
    c_{t+1}, the train/eval switch and the eval-mode guard."""

    step_kind = "none"  # the step count is the group's ``k``, as in the reference
    #: z is an iterate, not a moment: 8-bit codes would move the parameters themselves
    unquantized_slots = ("z",)
    #: the coefficient β of y = (1-β)z + βx: ``betas[0]`` (AdamW) or ``momentum`` (SGD)
    def _beta(self, group: dict) -> float:
        raise NotImplementedError

    def _rule_scalars(self, group: dict, k: int, lr: float, ckp1: float):
        raise NotImplementedError

    def new_slot(self, group: dict, p: torch.Tensor, name: str) -> torch.Tensor:
        if name != "z":
            return super().new_slot(group, p, name)
        # z starts at the parameter (the reference's torch.clone(p))
        dtype = _STORAGE.get(self.slot_storage(name), p.dtype)
        return p.detach().clone(memory_format=torch.preserve_format).to(dtype)

    @torch.no_grad()
    def eval(self) -> None:
        """Store x, the averaged point, in the parameters (for evaluation and checkpoints):
        x = y + (1 - 1/β)(z - y), the reference's ``p.lerp_(z, 1 - 1/β)``."""
        for group in self.param_groups:
            if group["train_mode"]:
                self._switch(group, 1 - 1 / self._beta(group))
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Store y, the gradient point, in the parameters (before training steps):
        y = x + (1 - β)(z - x), the reference's ``p.lerp_(z, 1 - β)``."""
        for group in self.param_groups:
            if not group["train_mode"]:
                self._switch(group, 1 - self._beta(group))
                group["train_mode"] = True

    def _switch(self, group: dict, weight: float) -> None:
        for p in group["params"]:
            state = self.state.get(p)
            if state and "z" in state:
                z = state["z"]
                p.lerp_(z.to(device=p.device, dtype=p.dtype), weight)
        # the fused engine's plans hold no values of p, but drop them anyway: cheap, and the
        # next step then checks every tensor afresh
        self.__dict__.pop("_plans", None)
        self.__dict__.pop("_group_plans", None)

    def _counters(self, group: dict) -> tuple[dict[str, Any], Any]:
        """The group's counters after this step and the step's rule scalars (the reference's
        arithmetic, in Python floats)."""
        k = group["k"]
        warmup_steps = group["warmup_steps"]
        sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        lr = float(group["lr"]) * sched
        lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0.0
        counters = dict(k=k + 1, scheduled_lr=lr, lr_max=lr_max, weight_sum=weight_sum)
        return counters, self._rule_scalars(group, k, lr, ckp1)

    def scalars(self, group: dict, state: dict):
        return self._step_scalars[id(group)]

    @torch.no_grad()
    def step(self, closure=None):
        """One step at y (train mode only: in eval mode a ``RuntimeError``, before anything
        changes, as the reference raises); returns ``closure()``'s loss when given one."""
        if not self.param_groups[0]["train_mode"]:  # the reference checks the first group
            raise RuntimeError(_EVAL_MODE_ERROR.format(name=type(self).__name__))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        computed = [self._counters(group) for group in self.param_groups]
        self._step_scalars = {id(g): s for g, (_, s) in zip(self.param_groups, computed)}
        skipped = self.skipped_steps
        try:
            super().step()
        finally:
            self._step_scalars = None
        if self.skipped_steps == skipped:  # a skipped step (on_nonfinite="skip") counts nothing
            for group, (counters, _) in zip(self.param_groups, computed):
                group.update(counters)
        return loss

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._step_scalars = None

    def setup_group(self, group: dict) -> None:
        # the reference's per-group counters: group keys (so state_dict carries them), not
        # defaults, so that type(opt)(params, **opt.defaults) rebuilds an optimizer
        for key, value in _GROUP_COUNTERS.items():
            group.setdefault(key, value)


_GROUP_COUNTERS = dict(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)


class ScheduleFreeAdamWScalars(NamedTuple):
    lr: float  # the warmed-up lr
    beta2: float
    eps: float
    weight_decay: float
    ckp1: float  # c_{t+1}: the weight of z in y's interpolation
    y_coeff: float  # lr * (beta1 * (1 - ckp1) - 1)
    bias_correction2: float


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-Free AdamW: AdamW without a learning-rate schedule. No schedule is needed
    (nor should one be used): the averaging replaces it; ``warmup_steps`` gives a linear
    warm-up.

    With :math:`\gamma_t` = lr (times :math:`t/T_w` during warm-up), the weights
    :math:`w_t = t^r \max_{i\le t}\gamma_i^{p}` (:math:`p` = ``weight_lr_power``) and
    :math:`c_{t+1} = w_t / \sum_{i\le t} w_i`:

    .. math::
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        \hat g = \frac{g}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda y, \\
        y \leftarrow (1-c_{t+1})\, y + c_{t+1} z + \gamma_t(\beta_1(1-c_{t+1}) - 1)\,\hat g,
        \quad z \leftarrow z - \gamma_t \hat g

    where the parameter holds :math:`y = (1-\beta_1) z + \beta_1 x` in train mode. Call
    ``optimizer.train()`` before training and ``optimizer.eval()`` before evaluating or saving a
    checkpoint (the parameters then hold x, the averaged point); ``step()`` in eval mode is a
    ``RuntimeError``. Weight decay is taken at y, as the reference does.

    Reference: ``schedulefree.AdamWScheduleFree`` 1.4.1 (facebookresearch/schedule_free),
    non-foreach path. Defaults (the reference's): lr=0.0025, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0, warmup_steps=0, r=0, weight_lr_power=2. State: ``z``, ``exp_avg_sq``; the
    group keys ``k``, ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr`` as the
    reference's. Departures: no ``foreach`` argument (adamkit's engine is ``backend``); adamkit's
    keyword-only ``maximize``; the eval-mode error is a ``RuntimeError`` (the reference raises a
    bare ``Exception``, which it subclasses); ``state_dtype="int8"`` keeps ``z`` in float32.
    """

    checks = {
        "lr": v.non_negative,
        "betas": v.betas,
        "eps": v.non_negative,
        "weight_decay": v.non_negative,
        "warmup_steps": _non_negative_int,
        "r": _number,
        "weight_lr_power": _number,
        "maximize": v.flag,
    }
    slot_names = ("z", "exp_avg_sq")
    nonnegative_slots = ("exp_avg_sq",)

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, warmup_steps=warmup_steps,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite, stochastic_rounding=stochastic_rounding)

    def _beta(self, group: dict) -> float:
        return group["betas"][0]

    def _rule_scalars(self, group, k, lr, ckp1) -> ScheduleFreeAdamWScalars:
        beta1, beta2 = group["betas"]
        return ScheduleFreeAdamWScalars(
            lr=lr, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            ckp1=ckp1, y_coeff=lr * (beta1 * (1 - ckp1) - 1),
            bias_correction2=1 - beta2 ** (k + 1))

    @staticmethod
    def update(s: ScheduleFreeAdamWScalars, p, g, z, exp_avg_sq):
        exp_avg_sq = exp_avg_sq * s.beta2 + (1 - s.beta2) * g * g
        g = g / (sqrt(exp_avg_sq / s.bias_correction2) + s.eps)
        if s.weight_decay != 0:
            g = g + s.weight_decay * p
        p = lerp(p, z, s.ckp1)
        p = p + s.y_coeff * g
        z = z - s.lr * g
        return p, z, exp_avg_sq


class ScheduleFreeSGDScalars(NamedTuple):
    lr: float  # the warmed-up lr
    weight_decay: float
    ckp1: float
    y_coeff: float  # lr * (momentum * (1 - ckp1) - 1)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-Free SGD: SGD with momentum without a learning-rate schedule.
    No schedule is needed (nor should one be used); ``warmup_steps`` gives a linear warm-up.

    With :math:`\gamma_t`, :math:`c_{t+1}` as in :class:`ScheduleFreeAdamW` and
    :math:`\beta` = ``momentum``:

    .. math::
        \hat g = g + \lambda y, \quad
        y \leftarrow (1-c_{t+1})\, y + c_{t+1} z + \gamma_t(\beta(1-c_{t+1}) - 1)\,\hat g,
        \quad z \leftarrow z - \gamma_t \hat g

    The parameter holds :math:`y = (1-\beta) z + \beta x` in train mode and x after
    ``optimizer.eval()`` (call it before evaluating or saving a checkpoint, and
    ``optimizer.train()`` before training); ``step()`` in eval mode is a ``RuntimeError``.

    Reference: ``schedulefree.SGDScheduleFree`` 1.4.1, non-foreach path. Defaults (the
    reference's): lr=1.0, momentum=0.9 (in (0, 1)), weight_decay=0, warmup_steps=0, r=0,
    weight_lr_power=2. State: ``z``; group keys as the reference's. Departures as for
    :class:`ScheduleFreeAdamW`.
    """

    checks = {
        "lr": v.non_negative,
        "momentum": _momentum,
        "weight_decay": v.non_negative,
        "warmup_steps": _non_negative_int,
        "r": _number,
        "weight_lr_power": _number,
        "maximize": v.flag,
    }
    slot_names = ("z",)

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        on_nonfinite: str = "apply",
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, momentum=momentum, r=r, warmup_steps=warmup_steps,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         on_nonfinite=on_nonfinite, stochastic_rounding=stochastic_rounding)

    def _beta(self, group: dict) -> float:
        return group["momentum"]

    def _rule_scalars(self, group, k, lr, ckp1) -> ScheduleFreeSGDScalars:
        return ScheduleFreeSGDScalars(
            lr=lr, weight_decay=group["weight_decay"], ckp1=ckp1,
            y_coeff=lr * (group["momentum"] * (1 - ckp1) - 1))

    @staticmethod
    def update(s: ScheduleFreeSGDScalars, p, g, z):
        if s.weight_decay != 0:
            g = g + s.weight_decay * p
        p = lerp(p, z, s.ckp1)
        p = p + s.y_coeff * g
        z = z - s.lr * g
        return p, z
