"""Learning-rate schedules as pure ``step -> multiplier`` functions.

Every public factory returns a :class:`Schedule`: a small picklable callable that maps the
0-based step counter to a multiplier of the base learning rate, in closed form. It plugs into
:class:`torch.optim.lr_scheduler.LambdaLR`, which calls it with ``0, 1, 2, ...`` and sets
``lr = base_lr * multiplier``::

    opt = adamkit.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, adamkit.schedules.warmup_cosine(500, 10_000))
    for batch in data:
        ...
        opt.step()
        sched.step()

Conventions shared by all schedules
-----------------------------------
* ``step`` is the 0-based number of optimizer steps already taken (LambdaLR's counter).
* Linear warmup over ``W`` steps gives ``(step + 1) / W`` for ``step < W``: the first step
  already trains at ``1/W`` of the base lr and step ``W - 1`` reaches exactly 1.
  ``warmup_steps=0`` means no warmup; ``warmup_steps=1`` differs from it only by one extra step
  at multiplier 1 before the decay starts.
* After the warmup the decay clock ``t = step - W`` starts at 0, where every decay has
  multiplier exactly 1; a decay "over ``N`` steps" reaches its final value at ``t = N`` and holds it
  from there on (no periodic restarts, no extrapolation).
* A :class:`Schedule` only holds its name and its validated arguments (ints, floats, strings,
  tuples), so ``LambdaLR.state_dict()`` can be saved and read back with
  ``torch.load(..., weights_only=True)``, and schedules pass to other processes.
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
from typing import Any, Callable, Iterable

__all__ = [
    "Schedule",
    "available",
    "constant",
    "cosine",
    "exp_range",
    "exponential",
    "get",
    "inverse_sqrt",
    "linear_warmup",
    "multi_step",
    "one_cycle",
    "polynomial",
    "step_decay",
    "triangular",
    "triangular2",
    "warmup_cosine",
    "warmup_stable_decay",
]


class Schedule:
    """A learning-rate multiplier as a closed-form function of the step.

    Built by the factories of this module, which validate the arguments; calling it with the
    0-based step returns a float. Its state is its ``name`` and ``kwargs`` only (plain data), which
    is what ``LambdaLR.state_dict()`` records and ``load_state_dict()`` restores.
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        if name not in _FORMULAS:
            raise ValueError(f"Unknown schedule: {name!r} (valid: {', '.join(available())})")
        self.name = name
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"Invalid step: {step} (must be >= 0)")
        return float(_FORMULAS[self.name](step, **self.kwargs))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.name}({arguments})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.name, self.kwargs) == (other.name, other.kwargs)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.kwargs.items()))))


# ---------------------------------------------------------------------------------------------
# Argument validation: exact messages, e.g. "Invalid warmup_steps: -1 (must be >= 0)".


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer)")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer)") from None
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    return int(value)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite real number)")
    return float(value)


def _check_positive(name: str, value: Any) -> float:
    value = _check_real(name, value)
    if not value > 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")
    return value


def _check_unit_interval(name: str, value: Any) -> float:
    value = _check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1])")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {valid})")
    return value


# ---------------------------------------------------------------------------------------------
# Closed forms. Arguments are already validated; each returns the multiplier at `step`.


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def _cosine_shape(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(step: int) -> float:
    return 1.0


def _linear_warmup(step: int, *, warmup_steps: int) -> float:
    return _warmup(step, warmup_steps)


def _step_decay(step: int, *, step_size: int, gamma: float) -> float:
    return gamma ** (step // step_size)


def _multi_step(step: int, *, milestones: tuple[int, ...], gamma: float) -> float:
    # bisect_right: the decay applies from the milestone step itself on, as in MultiStepLR.
    return gamma ** bisect.bisect_right(milestones, step)


def _exponential(step: int, *, gamma: float) -> float:
    return gamma**step


def _polynomial(step: int, *, total_steps: int, power: float, end: float) -> float:
    remaining = 1.0 - min(step, total_steps) / total_steps
    return end + (1.0 - end) * remaining**power


def _cosine(step: int, *, total_steps: int, min_ratio: float) -> float:
    progress = min(step, total_steps) / total_steps
    return min_ratio + (1.0 - min_ratio) * _cosine_shape(progress)


def _warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_steps = total_steps - warmup_steps
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return min_ratio + (1.0 - min_ratio) * _cosine_shape(progress)


def _inverse_sqrt(step: int, *, warmup_steps: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    # Without warmup the reference scale is one step, so the decay is 1/sqrt(step + 1).
    scale = max(warmup_steps, 1)
    return math.sqrt(scale / (scale + step - warmup_steps))


_WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": _cosine_shape,
    "sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


def _warmup_stable_decay(
    step: int,
    *,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    min_ratio: float,
    decay: str,
) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_start = warmup_steps + stable_steps
    if step < decay_start:
        return 1.0
    progress = min(step - decay_start, decay_steps) / decay_steps if decay_steps > 0 else 1.0
    return min_ratio + (1.0 - min_ratio) * _WSD_SHAPES[decay](progress)


def _anneal(start: float, end: float, progress: float, anneal_strategy: str) -> float:
    if anneal_strategy == "cos":
        return end + (start - end) * _cosine_shape(progress)
    return start + (end - start) * progress


def _one_cycle(
    step: int,
    *,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    anneal_strategy: str,
    three_phase: bool,
) -> float:
    initial = 1.0 / div_factor
    final = initial / final_div_factor
    # Phase ends are fractional steps, placed exactly where OneCycleLR places them.
    rise_end = pct_start * total_steps - 1.0
    if three_phase:
        phases = (
            (rise_end, initial, 1.0),
            (2.0 * pct_start * total_steps - 2.0, 1.0, initial),
            (total_steps - 1.0, initial, final),
        )
    else:
        phases = ((rise_end, initial, 1.0), (total_steps - 1.0, 1.0, final))
    step = min(step, total_steps - 1)
    phase_start = 0.0
    for index, (phase_end, start, end) in enumerate(phases):
        if step <= phase_end or index == len(phases) - 1:
            length = phase_end - phase_start
            # A phase of zero length is over as soon as it begins.
            progress = (step - phase_start) / length if length > 0 else 1.0
            return _anneal(start, end, progress, anneal_strategy)
        phase_start = phase_end
    raise AssertionError("unreachable: the last phase always matches")


def _triangle(step: int, step_size: int, step_size_down: int) -> float:
    """Position in the current cycle as a height in [0, 1]: 0 at the bottom, 1 at the top."""
    position = step % (step_size + step_size_down)
    if position <= step_size:
        return position / step_size
    return (step_size + step_size_down - position) / step_size_down


def _triangular(step: int, *, step_size: int, max_multiplier: float, step_size_down: int) -> float:
    return 1.0 + (max_multiplier - 1.0) * _triangle(step, step_size, step_size_down)


def _triangular2(step: int, *, step_size: int, max_multiplier: float, step_size_down: int) -> float:
    cycle = step // (step_size + step_size_down)
    amplitude = 0.5**cycle
    return 1.0 + (max_multiplier - 1.0) * _triangle(step, step_size, step_size_down) * amplitude


def _exp_range(
    step: int, *, step_size: int, max_multiplier: float, gamma: float, step_size_down: int
) -> float:
    amplitude = gamma**step
    return 1.0 + (max_multiplier - 1.0) * _triangle(step, step_size, step_size_down) * amplitude


_FORMULAS: dict[str, Callable[..., float]] = {
    "constant": _constant,
    "linear_warmup": _linear_warmup,
    "step_decay": _step_decay,
    "multi_step": _multi_step,
    "exponential": _exponential,
    "polynomial": _polynomial,
    "cosine": _cosine,
    "warmup_cosine": _warmup_cosine,
    "inverse_sqrt": _inverse_sqrt,
    "warmup_stable_decay": _warmup_stable_decay,
    "one_cycle": _one_cycle,
    "triangular": _triangular,
    "triangular2": _triangular2,
    "exp_range": _exp_range,
}


# ---------------------------------------------------------------------------------------------
# Public factories.


def constant() -> Schedule:
    """The base learning rate at every step.

    .. math:: m(s) = 1
    """
    return Schedule("constant")


def linear_warmup(warmup_steps: int) -> Schedule:
    """Linear warmup to the base learning rate, then constant.

    .. math:: m(s) = \\min\\left(1, \\frac{s + 1}{W}\\right)

    Args:
        warmup_steps: ``W >= 0``, the number of warmup steps; step ``W - 1`` is the first at the
            full base lr. ``0`` means no warmup (always 1).
    """
    return Schedule("linear_warmup", warmup_steps=_check_int("warmup_steps", warmup_steps, 0))


def step_decay(step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``).

    .. math:: m(s) = \\gamma^{\\lfloor s / N \\rfloor}

    Args:
        step_size: ``N >= 1``, the period of the decay in steps.
        gamma: ``> 0``, the factor applied at each period; default 0.1.
    """
    return Schedule(
        "step_decay",
        step_size=_check_int("step_size", step_size, 1),
        gamma=_check_positive("gamma", gamma),
    )


def multi_step(milestones: Iterable[int], gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` at each milestone (``torch.optim.lr_scheduler.MultiStepLR``).

    .. math:: m(s) = \\gamma^{|\\{i : M_i \\le s\\}|}

    Args:
        milestones: strictly increasing steps ``M_i >= 0``; the decay applies from step ``M_i``
            on. Unlike MultiStepLR, a repeated milestone is rejected rather than applied twice.
        gamma: ``> 0``, the factor applied at each milestone; default 0.1.
    """
    try:
        values = tuple(milestones)
    except TypeError:
        raise ValueError(
            f"Invalid milestones: {milestones!r} (must be a sequence of integers)"
        ) from None
    checked = tuple(_check_int("milestone", milestone, 0) for milestone in values)
    if any(later <= earlier for earlier, later in zip(checked, checked[1:])):
        raise ValueError(f"Invalid milestones: {list(checked)} (must be strictly increasing)")
    return Schedule("multi_step", milestones=checked, gamma=_check_positive("gamma", gamma))


def exponential(gamma: float) -> Schedule:
    """Multiply by ``gamma`` every step (``torch.optim.lr_scheduler.ExponentialLR``).

    .. math:: m(s) = \\gamma^{s}

    Args:
        gamma: ``> 0``, the per-step factor (e.g. 0.999).
    """
    return Schedule("exponential", gamma=_check_positive("gamma", gamma))


def polynomial(total_steps: int, power: float = 1.0, end: float = 0.0) -> Schedule:
    """Polynomial decay from 1 to ``end`` over ``total_steps``, then constant.

    .. math:: m(s) = e + (1 - e)\\left(1 - \\frac{\\min(s, T)}{T}\\right)^{p}

    With ``end=0`` this is ``torch.optim.lr_scheduler.PolynomialLR(total_iters=T, power=p)``.

    Args:
        total_steps: ``T >= 1``, the step at which ``end`` is reached.
        power: ``p > 0``; default 1.0 (linear decay).
        end: ``e`` in ``[0, 1]``, the final multiplier; default 0.0.
    """
    return Schedule(
        "polynomial",
        total_steps=_check_int("total_steps", total_steps, 1),
        power=_check_positive("power", power),
        end=_check_unit_interval("end", end),
    )


def cosine(total_steps: int, min_ratio: float = 0.0) -> Schedule:
    """Cosine annealing from 1 to ``min_ratio`` over ``total_steps``, then constant.

    .. math:: m(s) = r + \\frac{1 - r}{2}\\left(1 + \\cos\\frac{\\pi \\min(s, T)}{T}\\right)

    Equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T, eta_min=r * base_lr)`` for
    ``s <= T``; past ``T`` it holds ``r`` instead of rising again.

    Args:
        total_steps: ``T >= 1``, the step at which ``min_ratio`` is reached.
        min_ratio: ``r`` in ``[0, 1]``, the final multiplier; default 0.0.
    """
    return Schedule(
        "cosine",
        total_steps=_check_int("total_steps", total_steps, 1),
        min_ratio=_check_unit_interval("min_ratio", min_ratio),
    )


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Schedule:
    """Linear warmup, then cosine annealing to ``min_ratio`` at ``total_steps`` (nanoGPT's).

    .. math::
        m(s) = \\begin{cases}
            \\frac{s + 1}{W} & s < W \\\\
            r + \\frac{1 - r}{2}\\left(1 + \\cos\\frac{\\pi \\min(s - W, T - W)}{T - W}\\right)
                & s \\ge W
        \\end{cases}

    Args:
        warmup_steps: ``W >= 0``; ``0`` means no warmup (then it equals :func:`cosine`).
        total_steps: ``T > W``, the step at which ``min_ratio`` is reached (and then held).
        min_ratio: ``r`` in ``[0, 1]``, the final multiplier; default 0.0.
    """
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    total_steps = _check_int("total_steps", total_steps, 1)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"Invalid total_steps: {total_steps} (must be > warmup_steps={warmup_steps})"
        )
    return Schedule(
        "warmup_cosine",
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_ratio=_check_unit_interval("min_ratio", min_ratio),
    )


def inverse_sqrt(warmup_steps: int = 0) -> Schedule:
    """Linear warmup, then decay as the inverse square root of the step (Vaswani et al. 2017).

    .. math::
        m(s) = \\begin{cases}
            \\frac{s + 1}{W} & s < W \\\\
            \\sqrt{W / s} & s \\ge W \\ge 1 \\\\
            1 / \\sqrt{s + 1} & W = 0
        \\end{cases}

    The Transformer's ``d^{-1/2} min(s^{-1/2}, s W^{-3/2})`` normalised to peak at 1, with this
    module's 0-based warmup: the multiplier is 1 at steps ``W - 1`` and ``W``, then decays.
    Without warmup the reference scale is one step.

    Args:
        warmup_steps: ``W >= 0``; default 0 (no warmup).
    """
    return Schedule("inverse_sqrt", warmup_steps=_check_int("warmup_steps", warmup_steps, 0))


def warmup_stable_decay(
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    min_ratio: float = 0.0,
    decay: str = "linear",
) -> Schedule:
    """Warmup-stable-decay (WSD, "trapezoidal"): warmup, a long plateau, then a short cooldown.

    .. math::
        m(s) = \\begin{cases}
            \\frac{s + 1}{W} & s < W \\\\
            1 & W \\le s < W + S \\\\
            r + (1 - r)\\, f\\!\\left(\\frac{\\min(s - W - S, D)}{D}\\right) & s \\ge W + S
        \\end{cases}

    with the cooldown shape ``f(x) = 1 - x`` (``"linear"``), ``(1 + cos(pi x)) / 2``
    (``"cosine"``) or ``1 - sqrt(x)`` (``"sqrt"``, the "1-sqrt" cooldown of Hägele et al. 2024).
    ``min_ratio`` is reached at step ``W + S + D`` and held afterwards; with ``D = 0`` the
    multiplier drops to ``min_ratio`` at step ``W + S``.

    Args:
        warmup_steps: ``W >= 0``; 0 means no warmup.
        stable_steps: ``S >= 0``, steps at multiplier 1 after the warmup.
        decay_steps: ``D >= 0``, length of the cooldown.
        min_ratio: ``r`` in ``[0, 1]``, the final multiplier; default 0.0.
        decay: ``"linear"`` (default), ``"cosine"`` or ``"sqrt"``.
    """
    return Schedule(
        "warmup_stable_decay",
        warmup_steps=_check_int("warmup_steps", warmup_steps, 0),
        stable_steps=_check_int("stable_steps", stable_steps, 0),
        decay_steps=_check_int("decay_steps", decay_steps, 0),
        min_ratio=_check_unit_interval("min_ratio", min_ratio),
        decay=_check_choice("decay", decay, tuple(_WSD_SHAPES)),
    )


def one_cycle(
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle policy (Smith & Topin 2017) with the base lr as the peak.

    The shape of ``torch.optim.lr_scheduler.OneCycleLR(max_lr=base_lr, ...)`` for the learning
    rate (momentum is not cycled): with ``a = 1/div_factor`` and ``z = a/final_div_factor``,
    and phase ends ``e_1 = pct_start * T - 1``, ``e_2 = T - 1``,

    .. math::
        m(s) = \\begin{cases}
            \\mathrm{anneal}(a, 1, s / e_1) & s \\le e_1 \\\\
            \\mathrm{anneal}(1, z, (s - e_1) / (e_2 - e_1)) & s > e_1
        \\end{cases}

    where ``anneal(x, y, p) = y + (x - y)(1 + cos(pi p))/2`` (``"cos"``) or ``x + (y - x) p``
    (``"linear"``). With ``three_phase=True`` the phases are ``a -> 1`` until
    ``pct_start * T - 1``, ``1 -> a`` until ``2 pct_start * T - 2``, then ``a -> z`` until
    ``T - 1``. Steps past ``T - 1`` hold the final value (OneCycleLR raises there instead).

    Args:
        total_steps: ``T >= 1``, the number of steps in the cycle.
        pct_start: fraction of the cycle spent rising, in ``[0, 1]`` (``[0, 0.5]`` with
            ``three_phase``); default 0.3.
        div_factor: ``> 0``, peak / initial multiplier; default 25.
        final_div_factor: ``> 0``, initial / final multiplier; default 1e4.
        anneal_strategy: ``"cos"`` (default) or ``"linear"``.
        three_phase: default False, as in OneCycleLR.
    """
    three_phase = bool(three_phase)
    pct_start = _check_unit_interval("pct_start", pct_start)
    if three_phase and pct_start > 0.5:
        raise ValueError(
            f"Invalid pct_start: {pct_start} (must be in [0, 0.5] when three_phase=True)"
        )
    return Schedule(
        "one_cycle",
        total_steps=_check_int("total_steps", total_steps, 1),
        pct_start=pct_start,
        div_factor=_check_positive("div_factor", div_factor),
        final_div_factor=_check_positive("final_div_factor", final_div_factor),
        anneal_strategy=_check_choice("anneal_strategy", anneal_strategy, ("cos", "linear")),
        three_phase=three_phase,
    )


def _check_cycle(
    step_size: int, max_multiplier: float, step_size_down: int | None
) -> tuple[dict[str, Any], int]:
    step_size = _check_int("step_size", step_size, 1)
    max_multiplier = _check_real("max_multiplier", max_multiplier)
    if max_multiplier < 1.0:
        raise ValueError(f"Invalid max_multiplier: {max_multiplier} (must be >= 1)")
    step_size_down = (
        step_size if step_size_down is None else _check_int("step_size_down", step_size_down, 1)
    )
    return {"step_size": step_size, "max_multiplier": max_multiplier}, step_size_down


def triangular(
    step_size: int, max_multiplier: float, step_size_down: int | None = None
) -> Schedule:
    """Cyclical learning rate, triangular policy (Smith 2017; ``CyclicLR(mode="triangular")``).

    The base lr is the bottom of the cycle and ``max_multiplier * base_lr`` the top. With
    ``U = step_size``, ``D = step_size_down``, ``x = s mod (U + D)``:

    .. math::
        h(s) = \\begin{cases} x / U & x \\le U \\\\ (U + D - x) / D & x > U \\end{cases},
        \\qquad m(s) = 1 + (M - 1)\\, h(s)

    Args:
        step_size: ``U >= 1``, steps from the bottom to the top of a cycle.
        max_multiplier: ``M >= 1``, the multiplier at the top.
        step_size_down: ``D >= 1``, steps from the top back to the bottom; default ``U``.
    """
    cycle, step_size_down = _check_cycle(step_size, max_multiplier, step_size_down)
    return Schedule("triangular", **cycle, step_size_down=step_size_down)


def triangular2(
    step_size: int, max_multiplier: float, step_size_down: int | None = None
) -> Schedule:
    """Cyclical learning rate whose amplitude halves every cycle (``CyclicLR(mode="triangular2")``).

    With ``h(s)`` the triangle of :func:`triangular` and ``c = floor(s / (U + D))`` the 0-based
    cycle:

    .. math:: m(s) = 1 + (M - 1)\\, h(s)\\, 2^{-c}

    Args:
        step_size: ``U >= 1``, steps from the bottom to the top of a cycle.
        max_multiplier: ``M >= 1``, the multiplier at the top of the first cycle.
        step_size_down: ``D >= 1``, steps from the top back to the bottom; default ``U``.
    """
    cycle, step_size_down = _check_cycle(step_size, max_multiplier, step_size_down)
    return Schedule("triangular2", **cycle, step_size_down=step_size_down)


def exp_range(
    step_size: int, max_multiplier: float, gamma: float, step_size_down: int | None = None
) -> Schedule:
    """Cyclical learning rate whose amplitude decays as ``gamma**step`` (``mode="exp_range"``).

    With ``h(s)`` the triangle of :func:`triangular`:

    .. math:: m(s) = 1 + (M - 1)\\, h(s)\\, \\gamma^{s}

    Args:
        step_size: ``U >= 1``, steps from the bottom to the top of a cycle.
        max_multiplier: ``M >= 1``, the multiplier the top would have at step 0.
        gamma: in ``(0, 1]``, the per-step decay of the amplitude (e.g. 0.99994).
        step_size_down: ``D >= 1``, steps from the top back to the bottom; default ``U``.
    """
    cycle, step_size_down = _check_cycle(step_size, max_multiplier, step_size_down)
    gamma = _check_real("gamma", gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"Invalid gamma: {gamma} (must be in (0, 1])")
    return Schedule("exp_range", **cycle, gamma=gamma, step_size_down=step_size_down)


_FACTORIES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "linear_warmup": linear_warmup,
    "step_decay": step_decay,
    "multi_step": multi_step,
    "exponential": exponential,
    "polynomial": polynomial,
    "cosine": cosine,
    "warmup_cosine": warmup_cosine,
    "inverse_sqrt": inverse_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
    "one_cycle": one_cycle,
    "triangular": triangular,
    "triangular2": triangular2,
    "exp_range": exp_range,
}


def available() -> list[str]:
    """The sorted names that :func:`get` accepts."""
    return sorted(_FACTORIES)


def get(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name (case-insensitive), e.g. ``get("warmup_cosine", warmup_steps=100,
    total_steps=1000)``; the keyword arguments are those of the factory of that name.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _FACTORIES:
        raise ValueError(f"Unknown schedule: {name!r} (valid: {', '.join(available())})")
    return _FACTORIES[key](**kwargs)
