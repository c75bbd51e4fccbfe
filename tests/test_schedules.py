"""Schedules against closed forms written out here, against torch's schedulers, and in LambdaLR."""

import math
import pickle

import pytest
import torch
from torch.optim import lr_scheduler

from adamkit import schedules

BASE_LR = 0.5


def lrs_of(make_scheduler, steps, base_lr=BASE_LR):
    """The lr of an SGD optimizer at steps 0..steps-1 under the scheduler make_scheduler builds."""
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def lambda_lrs(schedule, steps, base_lr=BASE_LR):
    return lrs_of(lambda optimizer: lr_scheduler.LambdaLR(optimizer, schedule), steps, base_lr)


def assert_close_lists(actual, expected, rel=1e-9, abs=1e-15):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=rel, abs=abs), f"step {step}: {a} != {e}"


# ---------------------------------------------------------------------------------------------
# Closed forms, restated independently from the formulas in the docstrings.


def ref_warmup_cosine(step, warmup, total, floor):
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return floor
    progress = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def ref_wsd(step, warmup, stable, decay, floor, shape):
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + stable:
        return 1.0
    if decay == 0 or step >= warmup + stable + decay:
        return floor
    x = (step - warmup - stable) / decay
    f = {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "sqrt": 1 - math.sqrt(x)}
    return floor + (1 - floor) * f[shape]


def ref_inverse_sqrt(step, warmup):
    if warmup == 0:
        return 1 / math.sqrt(step + 1)
    return min((step + 1) / warmup, 1.0) if step < warmup else math.sqrt(warmup / step)


CLOSED_FORMS = [
    (schedules.constant(), lambda s: 1.0),
    (schedules.linear_warmup(0), lambda s: 1.0),
    (schedules.linear_warmup(1), lambda s: 1.0),
    (schedules.linear_warmup(7), lambda s: min(1.0, (s + 1) / 7)),
    (schedules.step_decay(4), lambda s: 0.1 ** (s // 4)),
    (schedules.step_decay(3, gamma=0.5), lambda s: 0.5 ** (s // 3)),
    (schedules.multi_step([2, 5, 9], 0.3), lambda s: 0.3 ** sum(s >= m for m in (2, 5, 9))),
    (schedules.multi_step([]), lambda s: 1.0),
    (schedules.exponential(0.9), lambda s: 0.9**s),
    (schedules.polynomial(10), lambda s: max(0.0, 1 - s / 10)),
    (
        schedules.polynomial(10, power=2.0, end=0.1),
        lambda s: 0.1 + 0.9 * (1 - min(s, 10) / 10) ** 2,
    ),
    (schedules.cosine(12), lambda s: ref_warmup_cosine(s, 0, 12, 0.0)),
    (schedules.cosine(12, min_ratio=0.2), lambda s: ref_warmup_cosine(s, 0, 12, 0.2)),
    (schedules.warmup_cosine(5, 20), lambda s: ref_warmup_cosine(s, 5, 20, 0.0)),
    (schedules.warmup_cosine(5, 20, 0.1), lambda s: ref_warmup_cosine(s, 5, 20, 0.1)),
    (schedules.warmup_cosine(0, 9), lambda s: ref_warmup_cosine(s, 0, 9, 0.0)),
    (schedules.inverse_sqrt(), lambda s: ref_inverse_sqrt(s, 0)),
    (schedules.inverse_sqrt(6), lambda s: ref_inverse_sqrt(s, 6)),
    (schedules.warmup_stable_decay(3, 4, 5), lambda s: ref_wsd(s, 3, 4, 5, 0.0, "linear")),
    (
        schedules.warmup_stable_decay(3, 4, 5, min_ratio=0.1, decay="cosine"),
        lambda s: ref_wsd(s, 3, 4, 5, 0.1, "cosine"),
    ),
    (
        schedules.warmup_stable_decay(0, 2, 8, 0.05, "sqrt"),
        lambda s: ref_wsd(s, 0, 2, 8, 0.05, "sqrt"),
    ),
    (schedules.warmup_stable_decay(2, 3, 0, 0.3), lambda s: ref_wsd(s, 2, 3, 0, 0.3, "linear")),
    (
        schedules.triangular(4, 5.0),
        lambda s: 1 + 4 * (1 - abs((s % 8) - 4) / 4),
    ),
    (
        schedules.triangular2(4, 5.0),
        lambda s: 1 + 4 * (1 - abs((s % 8) - 4) / 4) / 2 ** (s // 8),
    ),
    (
        schedules.exp_range(4, 5.0, 0.9),
        lambda s: 1 + 4 * (1 - abs((s % 8) - 4) / 4) * 0.9**s,
    ),
]


@pytest.mark.parametrize(
    ("schedule", "reference"), CLOSED_FORMS, ids=[repr(case[0]) for case in CLOSED_FORMS]
)
def test_matches_closed_form(schedule, reference):
    for step in range(40):
        assert schedule(step) == pytest.approx(reference(step), rel=1e-12, abs=1e-15), step
        assert isinstance(schedule(step), float)


# ---------------------------------------------------------------------------------------------
# Against torch's own schedulers, through LambdaLR with a real optimizer.


TORCH_EQUIVALENTS = [
    (schedules.step_decay(7), lambda o: lr_scheduler.StepLR(o, step_size=7), 30),
    (schedules.step_decay(3, 0.5), lambda o: lr_scheduler.StepLR(o, 3, gamma=0.5), 30),
    (
        schedules.multi_step([3, 10, 11], 0.2),
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, 10, 11], gamma=0.2),
        20,
    ),
    (schedules.exponential(0.95), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.95), 50),
    (schedules.polynomial(25), lambda o: lr_scheduler.PolynomialLR(o, total_iters=25), 40),
    (
        schedules.polynomial(25, power=2.5),
        lambda o: lr_scheduler.PolynomialLR(o, total_iters=25, power=2.5),
        40,
    ),
    (schedules.cosine(30), lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=30), 31),
    (
        schedules.cosine(30, min_ratio=0.1),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.1 * BASE_LR),
        31,
    ),
]


@pytest.mark.parametrize(
    ("schedule", "make_torch", "steps"),
    TORCH_EQUIVALENTS,
    ids=[repr(case[0]) for case in TORCH_EQUIVALENTS],
)
def test_matches_torch_scheduler(schedule, make_torch, steps):
    assert_close_lists(lambda_lrs(schedule, steps), lrs_of(make_torch, steps))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=100),
        dict(total_steps=1000, pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
        dict(total_steps=97, anneal_strategy="linear"),
        dict(total_steps=120, three_phase=True),
        dict(total_steps=55, pct_start=0.4, anneal_strategy="linear", three_phase=True),
        dict(total_steps=7, pct_start=0.5),
    ],
    ids=repr,
)
def test_one_cycle_matches_torch(kwargs):
    total = kwargs["total_steps"]
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "total_steps"}
    expected = lrs_of(
        lambda o: lr_scheduler.OneCycleLR(
            o, max_lr=BASE_LR, total_steps=total, cycle_momentum=False, **torch_kwargs
        ),
        total,
    )
    assert_close_lists(lambda_lrs(schedules.one_cycle(**kwargs), total), expected)


def test_one_cycle_boundaries():
    schedule = schedules.one_cycle(1000)
    assert schedule(0) == pytest.approx(1 / 25, rel=1e-12)
    assert schedule(299) == pytest.approx(1.0, rel=1e-12)  # end of the rise: 0.3 * 1000 - 1
    assert max(schedule(s) for s in range(1000)) == schedule(299)
    final = 1 / (25 * 1e4)
    assert schedule(999) == pytest.approx(final, rel=1e-9)
    assert schedule(1000) == schedule(999) == schedule(10**6)
    assert schedules.one_cycle(10, pct_start=0.1)(0) == pytest.approx(1.0)  # rise of zero length


@pytest.mark.parametrize(
    ("schedule", "mode", "extra"),
    [
        (schedules.triangular(5, 6.0), "triangular", {}),
        (schedules.triangular2(5, 6.0), "triangular2", {}),
        (schedules.exp_range(5, 6.0, 0.97), "exp_range", {"gamma": 0.97}),
        (schedules.triangular(3, 2.5, step_size_down=7), "triangular", {"step_size_down": 7}),
        (schedules.triangular2(4, 3.0, step_size_down=2), "triangular2", {"step_size_down": 2}),
        (
            schedules.exp_range(6, 4.0, 0.99, step_size_down=3),
            "exp_range",
            {"gamma": 0.99, "step_size_down": 3},
        ),
    ],
    ids=repr,
)
def test_cyclic_matches_torch(schedule, mode, extra):
    base = 0.01
    expected = lrs_of(
        lambda o: lr_scheduler.CyclicLR(
            o,
            base_lr=base,
            max_lr=base * schedule.kwargs["max_multiplier"],
            step_size_up=schedule.kwargs["step_size"],
            mode=mode,
            cycle_momentum=False,
            **extra,
        ),
        60,
        base_lr=base,
    )
    assert_close_lists(lambda_lrs(schedule, 60, base_lr=base), expected)


def test_cyclic_bottom_and_top():
    schedule = schedules.triangular(10, 4.0)
    assert [schedule(s) for s in (0, 10, 20, 30)] == [1.0, 4.0, 1.0, 4.0]
    halving = schedules.triangular2(10, 5.0)
    assert [halving(s) for s in (10, 30, 50)] == [5.0, 3.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Boundaries of the warmup-using schedules.


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_warmup_cosine_boundaries(min_ratio):
    schedule = schedules.warmup_cosine(100, 1000, min_ratio=min_ratio)
    assert schedule(0) == pytest.approx(0.01)  # the first step trains at 1/warmup
    assert schedule(49) == pytest.approx(0.5)
    assert schedule(99) == 1.0  # end of warmup
    assert schedule(100) == 1.0  # start of the decay
    assert schedule(550) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert schedule(1000) == pytest.approx(min_ratio, abs=1e-15)  # end of total
    assert schedule(1001) == schedule(10**7) == min_ratio  # beyond total: held
    values = [schedule(s) for s in range(1100)]
    assert all(later <= earlier for earlier, later in zip(values[99:], values[100:]))


def test_warmup_cosine_contract_example():
    # DESIGN.md: LambdaLR(opt, adamkit.schedules.warmup_cosine(500, 10_000)).
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([parameter], lr=3e-4)
    scheduler = lr_scheduler.LambdaLR(optimizer, schedules.warmup_cosine(500, 10_000))
    seen = {}
    for step in range(10_002):
        if step in (0, 249, 499, 500, 5250, 10_000, 10_001):
            seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(3e-4 / 500)
    assert seen[249] == pytest.approx(3e-4 / 2)
    assert seen[499] == seen[500] == pytest.approx(3e-4)
    assert seen[5250] == pytest.approx(3e-4 / 2)
    assert seen[10_000] == pytest.approx(0.0, abs=1e-18)
    assert seen[10_001] == 0.0


def test_cosine_equals_warmup_cosine_without_warmup():
    for step in range(60):
        assert schedules.cosine(50, 0.1)(step) == schedules.warmup_cosine(0, 50, 0.1)(step)


def test_inverse_sqrt_boundaries():
    schedule = schedules.inverse_sqrt(warmup_steps=100)
    assert schedule(0) == pytest.approx(0.01)
    assert schedule(99) == schedule(100) == 1.0
    assert schedule(400) == pytest.approx(0.5)  # sqrt(100 / 400)
    values = [schedule(s) for s in range(1000)]
    steps = zip(values, values[1:])
    assert max(abs(b - a) for a, b in steps) <= 0.01 + 1e-12  # continuous: no jump
    no_warmup = schedules.inverse_sqrt()
    assert no_warmup(0) == 1.0 and no_warmup(3) == pytest.approx(0.5)


@pytest.mark.parametrize("decay", ["linear", "cosine", "sqrt"])
def test_warmup_stable_decay_boundaries(decay):
    schedule = schedules.warmup_stable_decay(10, 80, 20, min_ratio=0.1, decay=decay)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == 1.0  # end of warmup
    assert all(schedule(s) == 1.0 for s in range(9, 91))  # stable, through the decay's start
    midpoint = {"linear": 0.5, "cosine": 0.5, "sqrt": 1 - math.sqrt(0.5)}[decay]
    assert schedule(100) == pytest.approx(0.1 + 0.9 * midpoint)
    assert schedule(110) == pytest.approx(0.1, abs=1e-15)  # end of total
    assert schedule(111) == schedule(10**6) == 0.1
    values = [schedule(s) for s in range(9, 120)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))


def test_polynomial_and_cosine_hold_after_total():
    assert schedules.polynomial(10, end=0.25)(10) == 0.25 == schedules.polynomial(10, end=0.25)(99)
    assert schedules.cosine(10, 0.25)(10) == pytest.approx(0.25)
    assert schedules.cosine(10, 0.25)(11) == schedules.cosine(10, 0.25)(500) == 0.25


def test_step_zero_and_negative_step():
    for name in schedules.available():
        assert EXAMPLES[name](0) > 0
    with pytest.raises(ValueError, match=r"^Invalid step: -1 \(must be >= 0\)$"):
        schedules.constant()(-1)


# ---------------------------------------------------------------------------------------------
# By name, pickling, state_dict, repr.


EXAMPLES = {
    "constant": schedules.get("constant"),
    "linear_warmup": schedules.get("linear_warmup", warmup_steps=4),
    "step_decay": schedules.get("step_decay", step_size=3, gamma=0.5),
    "multi_step": schedules.get("multi_step", milestones=[2, 6]),
    "exponential": schedules.get("exponential", gamma=0.9),
    "polynomial": schedules.get("polynomial", total_steps=9, power=2.0),
    "cosine": schedules.get("cosine", total_steps=9, min_ratio=0.1),
    "warmup_cosine": schedules.get("warmup_cosine", warmup_steps=2, total_steps=9),
    "inverse_sqrt": schedules.get("inverse_sqrt", warmup_steps=3),
    "warmup_stable_decay": schedules.get(
        "warmup_stable_decay", warmup_steps=2, stable_steps=3, decay_steps=4, decay="sqrt"
    ),
    "one_cycle": schedules.get("one_cycle", total_steps=12),
    "triangular": schedules.get("triangular", step_size=3, max_multiplier=4.0),
    "triangular2": schedules.get("triangular2", step_size=3, max_multiplier=4.0),
    "exp_range": schedules.get("exp_range", step_size=3, max_multiplier=4.0, gamma=0.9),
}


def test_available_is_sorted_and_complete():
    names = schedules.available()
    assert names == sorted(names) == sorted(EXAMPLES)
    for name in names:
        assert callable(getattr(schedules, name))


def test_get_builds_the_same_schedule_as_the_factory():
    assert schedules.get("warmup_cosine", warmup_steps=100, total_steps=1000) == (
        schedules.warmup_cosine(100, 1000)
    )
    assert schedules.get("Cosine", total_steps=5) == schedules.cosine(5)
    assert schedules.get("cosine", total_steps=5) != schedules.cosine(6)


def test_get_unknown_name_lists_valid_names():
    message = r"^Unknown schedule: 'cosin' \(valid: constant, cosine, "
    with pytest.raises(ValueError, match=message) as info:
        schedules.get("cosin")
    for name in schedules.available():
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_pickle_repr_and_state_dict(name, tmp_path):
    schedule = EXAMPLES[name]
    values = [schedule(step) for step in range(30)]
    restored = pickle.loads(pickle.dumps(schedule))
    assert restored == schedule and [restored(step) for step in range(30)] == values
    rebuilt = eval(repr(schedule), vars(schedules))  # the repr is the factory call
    assert rebuilt == schedule and repr(schedule).startswith(f"{name}(")

    # LambdaLR saves a callable object's __dict__; it must load under weights_only=True.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=BASE_LR)
    scheduler = lr_scheduler.LambdaLR(optimizer, schedule)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    state = torch.load(tmp_path / "scheduler.pt", weights_only=True)
    fresh_optimizer = torch.optim.SGD([parameter], lr=BASE_LR)
    fresh = lr_scheduler.LambdaLR(fresh_optimizer, schedules.constant())
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0] == schedule
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * values[6], rel=1e-12)


def test_lambda_lr_with_several_groups():
    weights, biases = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [weights]}, {"params": [biases], "lr": 0.1}], lr=1.0)
    schedule = schedules.linear_warmup(4)
    scheduler = lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(6):
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
            [schedule(step), 0.1 * schedule(step)]
        )
        optimizer.step()
        scheduler.step()


# ---------------------------------------------------------------------------------------------
# Validation, with exact messages.


INVALID = [
    (schedules.linear_warmup, (-1,), r"Invalid warmup_steps: -1 \(must be >= 0\)"),
    (schedules.linear_warmup, (2.5,), r"Invalid warmup_steps: 2.5 \(must be an integer\)"),
    (schedules.linear_warmup, (True,), r"Invalid warmup_steps: True \(must be an integer\)"),
    (schedules.step_decay, (0,), r"Invalid step_size: 0 \(must be >= 1\)"),
    (schedules.step_decay, (5, 0.0), r"Invalid gamma: 0.0 \(must be > 0\)"),
    (schedules.step_decay, (5, "a"), r"Invalid gamma: 'a' \(must be a finite real number\)"),
    (
        schedules.multi_step,
        ([5, 3],),
        r"Invalid milestones: \[5, 3\] \(must be strictly increasing\)",
    ),
    (
        schedules.multi_step,
        ([3, 3],),
        r"Invalid milestones: \[3, 3\] \(must be strictly increasing\)",
    ),
    (schedules.multi_step, ([-1],), r"Invalid milestone: -1 \(must be >= 0\)"),
    (schedules.multi_step, (5,), r"Invalid milestones: 5 \(must be a sequence of integers\)"),
    (schedules.exponential, (-0.5,), r"Invalid gamma: -0.5 \(must be > 0\)"),
    (schedules.exponential, (math.nan,), r"Invalid gamma: nan \(must be a finite real number\)"),
    (schedules.polynomial, (0,), r"Invalid total_steps: 0 \(must be >= 1\)"),
    (schedules.polynomial, (10, 0.0), r"Invalid power: 0.0 \(must be > 0\)"),
    (schedules.polynomial, (10, 1.0, 1.5), r"Invalid end: 1.5 \(must be in \[0, 1\]\)"),
    (schedules.cosine, (0,), r"Invalid total_steps: 0 \(must be >= 1\)"),
    (schedules.cosine, (10, -0.1), r"Invalid min_ratio: -0.1 \(must be in \[0, 1\]\)"),
    (schedules.warmup_cosine, (-1, 10), r"Invalid warmup_steps: -1 \(must be >= 0\)"),
    (
        schedules.warmup_cosine,
        (100, 100),
        r"Invalid total_steps: 100 \(must be > warmup_steps=100\)",
    ),
    (schedules.warmup_cosine, (10, 100, 2.0), r"Invalid min_ratio: 2.0 \(must be in \[0, 1\]\)"),
    (schedules.inverse_sqrt, (-3,), r"Invalid warmup_steps: -3 \(must be >= 0\)"),
    (schedules.warmup_stable_decay, (1, -1, 1), r"Invalid stable_steps: -1 \(must be >= 0\)"),
    (schedules.warmup_stable_decay, (1, 1, -1), r"Invalid decay_steps: -1 \(must be >= 0\)"),
    (
        schedules.warmup_stable_decay,
        (1, 1, 1, 0.0, "exp"),
        r"Invalid decay: 'exp' \(must be one of 'linear', 'cosine', 'sqrt'\)",
    ),
    (schedules.one_cycle, (0,), r"Invalid total_steps: 0 \(must be >= 1\)"),
    (schedules.one_cycle, (100, 1.5), r"Invalid pct_start: 1.5 \(must be in \[0, 1\]\)"),
    (schedules.one_cycle, (100, 0.3, 0.0), r"Invalid div_factor: 0.0 \(must be > 0\)"),
    (
        schedules.one_cycle,
        (100, 0.3, 25.0, -1.0),
        r"Invalid final_div_factor: -1.0 \(must be > 0\)",
    ),
    (
        schedules.one_cycle,
        (100, 0.3, 25.0, 1e4, "cosine"),
        r"Invalid anneal_strategy: 'cosine' \(must be one of 'cos', 'linear'\)",
    ),
    (
        schedules.one_cycle,
        (100, 0.6, 25.0, 1e4, "cos", True),
        r"Invalid pct_start: 0.6 \(must be in \[0, 0.5\] when three_phase=True\)",
    ),
    (schedules.triangular, (0, 4.0), r"Invalid step_size: 0 \(must be >= 1\)"),
    (schedules.triangular, (5, 0.5), r"Invalid max_multiplier: 0.5 \(must be >= 1\)"),
    (schedules.triangular2, (5, 2.0, 0), r"Invalid step_size_down: 0 \(must be >= 1\)"),
    (schedules.exp_range, (5, 2.0, 1.5), r"Invalid gamma: 1.5 \(must be in \(0, 1\]\)"),
    (schedules.exp_range, (5, 2.0, 0.0), r"Invalid gamma: 0.0 \(must be in \(0, 1\]\)"),
]


@pytest.mark.parametrize(
    ("factory", "args", "message"), INVALID, ids=[case[2] for case in INVALID]
)
def test_validation_messages(factory, args, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        factory(*args)


def test_integer_like_arguments_are_normalised():
    import numpy as np

    schedule = schedules.warmup_cosine(np.int64(10), np.int32(100), np.float32(0.5))
    assert type(schedule.kwargs["warmup_steps"]) is int
    assert type(schedule.kwargs["min_ratio"]) is float
    assert schedule == schedules.warmup_cosine(10, 100, 0.5)
