"""adamkit against independent float64 NumPy statements of ALGORITHMS.md (tests/numpy_oracles.py).

For the algorithms torch.optim does not have (AdaBound/AMSBound, AdaMod, AdaBelief, Lion, FAdam)
and for Adafactor, every flag combination runs ≥ 20 steps on the same float64 parameters
(several shapes, a zero-size one and a non-contiguous one, two param groups with different
hyperparameters) with fixed seeded gradients, and the parameters and every state tensor are
compared after every step.

Tolerance: rtol=1e-12 with atol=0. Both sides compute in float64 with the same formulas in
possibly different operation orders; over ~24 steps that costs a few tens of ulps (~1e-14
relative), two orders of magnitude inside rtol, while any misread formula (a missing bias
correction, ε in the wrong place, a wrong clamp bound) moves values by far more than 1e-12.
atol is 0 because no compared quantity here is a difference that cancels to near zero at the
roundoff level for these seeds; were one to, a scale-tied atol would be the right remedy, not a
looser rtol.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import pytest
import torch

try:  # tests/ on sys.path (pytest's default "prepend" import mode, no tests/__init__.py)
    from numpy_oracles import (
        AdaBeliefOracle,
        AdaBoundOracle,
        AdafactorOracle,
        AdaModOracle,
        FAdamOracle,
        LionOracle,
    )
except ImportError:  # tests/ is a package
    from tests.numpy_oracles import (
        AdaBeliefOracle,
        AdaBoundOracle,
        AdafactorOracle,
        AdaModOracle,
        FAdamOracle,
        LionOracle,
    )

RTOL = 1e-12
ATOL = 0.0

# Oracle state name -> adamkit state name, per adamkit class. The oracles use the names the brief
# lists; an entry here records where adamkit turned out to differ. Identity when absent.
LIB_STATE_NAME: dict[str, dict[str, str]] = {}

# "auto" picks the fastest engine that can run (the fused one once it exists), so both engines
# are held to the oracle without this file having to know which exist.
BACKENDS = ["reference", "auto"]

# ---------------------------------------------------------------------------------------------
# Parameters and gradients
# ---------------------------------------------------------------------------------------------

# (shape of the parameter as the optimizer sees it, non-contiguous?)
PARAM_SPECS: list[tuple[tuple[int, ...], bool]] = [
    ((5, 3), False),
    ((7,), False),
    ((1,), False),
    ((0, 4), False),  # zero-size
    ((6, 4), True),  # a transposed (4, 6) tensor: .t() of a contiguous one
    ((2, 3, 4), False),
]
GROUP_OF_PARAM = [0, 0, 1, 0, 1, 1]  # two groups, each with a mix of shapes


@dataclasses.dataclass(frozen=True)
class GradProfile:
    """How one parameter's gradients are drawn: N(0,1)·scale·10^U(−spread, spread)."""

    scale: float = 1.0
    spread: float = 1.5  # log10 spread of element magnitudes inside the tensor
    zero_frac: float = 0.1  # fraction of elements exactly 0 at each step
    always_zero: bool = True  # element 0 (flat) is 0 at every step (Lion: sign(0) = 0 forever)
    spike_step: int | None = None  # this step's gradient is 1e3 times larger
    sign_bias: float = 0.0  # a constant offset (× scale) so momentum does not average out


DEFAULT_PROFILES = [
    GradProfile(scale=1.0),
    GradProfile(scale=1e-3),
    GradProfile(scale=10.0),
    GradProfile(scale=1.0),
    GradProfile(scale=0.1, sign_bias=0.5),
    GradProfile(scale=100.0, spread=2.5),
]

# FAdam: parameter 1 has small gradients (f small ⇒ RMS(w) ≫ 1, the w clip triggers), parameter 5
# large, dense gradients (f large ⇒ RMS(w) < 1, no clip), parameter 4 a 1e3× spike at step 12
# (ḡ = g/√f jumps ⇒ the ḡ clip triggers), parameter 0 ordinary.
FADAM_PROFILES = [
    GradProfile(scale=1.0),
    GradProfile(scale=1e-3),
    GradProfile(scale=10.0, spread=0.5, zero_frac=0.0, always_zero=False),
    GradProfile(scale=1.0),
    GradProfile(scale=1.0, spread=0.3, zero_frac=0.0, always_zero=False, spike_step=12),
    GradProfile(scale=100.0, spread=0.3, zero_frac=0.0, always_zero=False),
]


def make_initial_params(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape, _ in PARAM_SPECS]


def make_grads(
    seed: int, steps: int, profiles: list[GradProfile]
) -> list[list[np.ndarray]]:
    """grads[k][i]: gradient of parameter i at step k+1 (1-based step)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        step = k + 1
        row = []
        for (shape, _), prof in zip(PARAM_SPECS, profiles):
            g = rng.standard_normal(shape) + prof.sign_bias
            g *= prof.scale * 10.0 ** rng.uniform(-prof.spread, prof.spread, shape)
            g[rng.random(shape) < prof.zero_frac] = 0.0
            if prof.always_zero and g.size >= 3:
                g.reshape(-1)[0] = 0.0
            if prof.spike_step == step:
                g *= 1e3
            row.append(g)
        out.append(row)
    return out


def to_torch_param(x: np.ndarray, noncontiguous: bool) -> torch.Tensor:
    if noncontiguous:
        t = torch.from_numpy(x.T.copy()).t()
        assert not t.is_contiguous()
    else:
        t = torch.from_numpy(x.copy())
    return t.requires_grad_(True)


def to_torch_grad(g: np.ndarray, noncontiguous: bool) -> torch.Tensor:
    if noncontiguous:
        t = torch.from_numpy(g.T.copy()).t()
        assert not t.is_contiguous()
        return t
    return torch.from_numpy(g.copy())


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    lib_name: str
    oracle: type
    groups: tuple[dict, dict]  # hyperparameters of group 0 and group 1, same for both sides
    profiles: tuple[GradProfile, ...] = tuple(DEFAULT_PROFILES)
    steps: int = 24
    # step (1-based) -> lr of each group, applied before that step; None = constant lr
    lr_schedule: Callable[[int], tuple[float, float]] | None = None
    seed: int = 0


def _decaying_lrs(lr0: float, lr1: float) -> Callable[[int], tuple[float, float]]:
    # group 0: a warm-up then step decay (the lr goes up AND down); group 1: cosine decay
    def sched(step: int) -> tuple[float, float]:
        mult0 = min(1.0, step / 5) * (0.3 if step > 15 else 1.0)
        mult1 = 0.5 * (1.0 + math.cos(math.pi * step / 30))
        return lr0 * mult0, lr1 * mult1

    return sched


ADABOUND_A = dict(lr=1e-3, weight_decay=1e-2)  # defaults otherwise
ADABOUND_B = dict(lr=3e-3, betas=(0.8, 0.99), final_lr=0.05, gamma=0.1, eps=1e-6)

CASES: list[Case] = []

for amsbound in (False, True):
    for decoupled in (False, True):
        for maximize in (False, True):
            if maximize and decoupled:
                continue
            flags = dict(amsbound=amsbound, decoupled_weight_decay=decoupled, maximize=maximize)
            CASES.append(
                Case(
                    f"adabound-ams{int(amsbound)}-dec{int(decoupled)}-max{int(maximize)}",
                    "AdaBound",
                    AdaBoundOracle,
                    ({**ADABOUND_A, **flags}, {**ADABOUND_B, **flags}),
                    seed=1 + amsbound + 2 * decoupled,
                )
            )
for amsbound in (False, True):
    CASES.append(
        Case(
            f"adabound-ams{int(amsbound)}-lr-schedule",
            "AdaBound",
            AdaBoundOracle,
            ({**ADABOUND_A, "amsbound": amsbound}, {**ADABOUND_B, "amsbound": amsbound}),
            lr_schedule=_decaying_lrs(1e-3, 3e-3),
            seed=7,
        )
    )
CASES.append(
    Case(
        "adabound-gamma0",  # gamma = 0 is allowed: lower bound 0, no upper bound
        "AdaBound",
        AdaBoundOracle,
        ({**ADABOUND_A, "gamma": 0.0}, {**ADABOUND_B, "gamma": 0.0, "amsbound": True}),
        seed=8,
    )
)

for maximize in (False, True):
    CASES.append(
        Case(
            f"adamod-max{int(maximize)}",
            "AdaMod",
            AdaModOracle,
            (
                dict(lr=1e-3, weight_decay=1e-2, maximize=maximize),
                dict(lr=5e-3, betas=(0.8, 0.99), beta3=0.9, eps=1e-6, maximize=maximize),
            ),
            seed=11 + maximize,
        )
    )
CASES.append(
    Case(
        "adamod-lr-schedule",
        "AdaMod",
        AdaModOracle,
        (dict(lr=1e-3, weight_decay=1e-2), dict(lr=5e-3, beta3=0.9)),
        lr_schedule=_decaying_lrs(1e-3, 5e-3),
        seed=13,
    )
)

for rectify in (True, False):
    for amsgrad in (False, True):
        for decoupled in (True, False):
            flags = dict(rectify=rectify, amsgrad=amsgrad, decoupled_weight_decay=decoupled)
            CASES.append(
                Case(
                    f"adabelief-rect{int(rectify)}-ams{int(amsgrad)}-dec{int(decoupled)}",
                    "AdaBelief",
                    AdaBeliefOracle,
                    (
                        # default eps=1e-16 (ε in s is then below roundoff for most elements)
                        dict(lr=1e-3, weight_decay=1e-2, **flags),
                        # eps=1e-8 so that ε in s matters; β₂=0.99 reaches ρₜ ≥ 5 at t=6 too
                        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0, **flags),
                    ),
                    seed=20 + 4 * rectify + 2 * amsgrad + decoupled,
                )
            )
CASES.append(
    Case(
        "adabelief-maximize-lr-schedule",
        "AdaBelief",
        AdaBeliefOracle,
        (
            dict(lr=1e-3, weight_decay=1e-2, amsgrad=True, maximize=True),
            dict(lr=3e-3, eps=1e-8, weight_decay=5e-2, rectify=False, maximize=True),
        ),
        lr_schedule=_decaying_lrs(1e-3, 3e-3),
        seed=30,
    )
)

for maximize in (False, True):
    CASES.append(
        Case(
            f"lion-max{int(maximize)}",
            "Lion",
            LionOracle,
            (
                dict(lr=1e-4, weight_decay=1e-1, maximize=maximize),
                dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.0, maximize=maximize),
            ),
            seed=40 + maximize,
        )
    )
CASES.append(
    Case(
        "lion-lr-schedule",
        "Lion",
        LionOracle,
        (dict(lr=1e-4, weight_decay=1e-1), dict(lr=3e-4, weight_decay=1e-2)),
        lr_schedule=_decaying_lrs(1e-4, 3e-4),
        seed=42,
    )
)

for maximize in (False, True):
    CASES.append(
        Case(
            f"fadam-max{int(maximize)}",
            "FAdam",
            FAdamOracle,
            (
                dict(lr=1e-3, maximize=maximize),  # weight_decay defaults to 0.1
                dict(
                    lr=3e-3,
                    betas=(0.8, 0.99),
                    eps=1e-6,
                    clip=0.5,
                    p=0.25,
                    weight_decay=0.0,
                    maximize=maximize,
                ),
            ),
            profiles=tuple(FADAM_PROFILES),
            seed=50 + maximize,
        )
    )
CASES.append(
    Case(
        "fadam-lr-schedule",
        "FAdam",
        FAdamOracle,
        (dict(lr=1e-3), dict(lr=3e-3, weight_decay=0.05, clip=2.0)),
        profiles=tuple(FADAM_PROFILES),
        lr_schedule=_decaying_lrs(1e-3, 3e-3),
        seed=52,
    )
)

for maximize in (False, True):
    CASES.append(
        Case(
            f"adafactor-max{int(maximize)}",
            "Adafactor",
            AdafactorOracle,
            (
                dict(lr=1e-2, weight_decay=1e-2, maximize=maximize),
                dict(
                    lr=0.5,  # > 1/√t for t ≥ 5, so ρ = min(γ, 1/√t) takes both values
                    beta2_decay=-0.5,
                    eps=(1e-20, 1e-2),
                    d=1.5,  # torch requires d >= 1
                    weight_decay=0.0,
                    maximize=maximize,
                ),
            ),
            seed=60 + maximize,
        )
    )
CASES.append(
    Case(
        "adafactor-lr-schedule",
        "Adafactor",
        AdafactorOracle,
        (dict(lr=1e-2, weight_decay=1e-1), dict(lr=0.5, d=2.0)),
        lr_schedule=_decaying_lrs(1e-2, 0.5),
        seed=62,
    )
)


# ---------------------------------------------------------------------------------------------
# Running both sides
# ---------------------------------------------------------------------------------------------


def build_oracles(case: Case, initial: list[np.ndarray]) -> tuple[list, list[np.ndarray]]:
    params = [x.copy() for x in initial]
    oracles = []
    for gi, hyper in enumerate(case.groups):
        members = [params[i] for i, g in enumerate(GROUP_OF_PARAM) if g == gi]
        oracles.append(case.oracle(members, **hyper))
    return oracles, params


def oracle_state(oracles: list, index: int) -> tuple[int, dict[str, np.ndarray]]:
    """(t, state dict) of parameter `index` in the oracle of its group."""
    gi = GROUP_OF_PARAM[index]
    pos = [i for i, g in enumerate(GROUP_OF_PARAM) if g == gi].index(index)
    return oracles[gi].t, oracles[gi].state[pos]


def step_oracles(oracles: list, grads: list[np.ndarray], lrs: tuple[float, float] | None) -> None:
    for gi, oracle in enumerate(oracles):
        members = [grads[i] for i, g in enumerate(GROUP_OF_PARAM) if g == gi]
        oracle.step(members, lr=None if lrs is None else lrs[gi])


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def run_case(case: Case, backend: str) -> None:
    import adamkit

    cls = getattr(adamkit, case.lib_name)
    initial = make_initial_params(case.seed)
    grads = make_grads(case.seed + 1000, case.steps, list(case.profiles))
    oracles, oracle_params = build_oracles(case, initial)

    torch_params = [to_torch_param(x, nc) for x, (_, nc) in zip(initial, PARAM_SPECS)]
    groups = [
        {"params": [p for p, g in zip(torch_params, GROUP_OF_PARAM) if g == gi], **hyper}
        for gi, hyper in enumerate(case.groups)
    ]
    opt = cls(groups, backend=backend)
    names = LIB_STATE_NAME.get(case.lib_name, {})

    for k in range(case.steps):
        step = k + 1
        lrs = case.lr_schedule(step) if case.lr_schedule is not None else None
        if lrs is not None:
            for gi, lr in enumerate(lrs):
                opt.param_groups[gi]["lr"] = lr
        for p, g, (_, nc) in zip(torch_params, grads[k], PARAM_SPECS):
            p.grad = to_torch_grad(g, nc)
        opt.step()
        step_oracles(oracles, grads[k], lrs)

        for i, (p, expected_p) in enumerate(zip(torch_params, oracle_params)):
            where = f"{case.id} [{backend}] step {step} param {i} {tuple(p.shape)}"
            _assert_close(p.detach().numpy(), expected_p, where + " param")
            t, expected_state = oracle_state(oracles, i)
            lib_state = opt.state[p]
            assert float(lib_state["step"]) == t, where + " step count"
            expected_keys = {"step"} | {names.get(n, n) for n in expected_state}
            assert set(lib_state) == expected_keys, f"{where}: state keys {sorted(lib_state)}"
            for name, expected in expected_state.items():
                lib_name = names.get(name, name)
                assert lib_name in lib_state, (
                    f"{where}: no state {lib_name!r}; adamkit has {sorted(lib_state)}"
                )
                actual = lib_state[lib_name].detach().numpy()
                if case.lib_name == "Adafactor" and p.numel() == 0:
                    # torch raises ZeroDivisionError on a zero-size parameter, so the contract
                    # fixes no values for its (non-empty) col_var; only the shape is compared.
                    assert actual.shape == expected.shape, f"{where} {name} shape"
                    continue
                _assert_close(actual, expected, f"{where} state {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_numpy_oracle(case: Case, backend: str) -> None:
    run_case(case, backend)


# ---------------------------------------------------------------------------------------------
# The oracles on their own: hand-computed first steps, cross-checks against torch, coverage
# ---------------------------------------------------------------------------------------------

ORACLES_BY_NAME = {
    "AdaBound": AdaBoundOracle,
    "AdaMod": AdaModOracle,
    "AdaBelief": AdaBeliefOracle,
    "Lion": LionOracle,
    "FAdam": FAdamOracle,
    "Adafactor": AdafactorOracle,
}


@pytest.mark.parametrize("name", list(ORACLES_BY_NAME))
def test_oracle_moves_parameters(name: str) -> None:
    initial = make_initial_params(3)
    params = [x.copy() for x in initial]
    oracle = ORACLES_BY_NAME[name](params, lr=1e-2)
    for grads in make_grads(4, 5, DEFAULT_PROFILES):
        oracle.step(grads)
    assert oracle.t == 5
    for before, after in zip(initial, params):
        if before.size:
            assert np.all(np.isfinite(after))
            assert np.max(np.abs(after - before)) > 1e-4
    for st in oracle.state:
        assert st, "exposes its state"
        for arr in st.values():
            assert np.all(np.isfinite(arr))


def test_lion_first_step_is_signed_lr() -> None:
    theta0 = np.array([1.0, -2.0, 0.5, 3.0])
    g = np.array([0.3, -1e-9, 0.0, -5.0])
    theta = theta0.copy()
    LionOracle([theta], lr=0.1, weight_decay=0.0).step([g])
    np.testing.assert_array_equal(theta, theta0 - 0.1 * np.sign(g))
    assert theta[2] == theta0[2]  # sign(0) = 0

    theta = theta0.copy()
    lion = LionOracle([theta], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5, maximize=True)
    lion.step([g])
    np.testing.assert_allclose(theta, theta0 * (1 - 0.05) + 0.1 * np.sign(g), rtol=1e-15)
    np.testing.assert_allclose(lion.state[0]["exp_avg"], -0.01 * g, rtol=1e-15)
    # second step: c = β₁m + (1−β₁)g uses the old m; with g = 0 the sign is that of m
    before = theta.copy()
    lion.step([np.zeros(4)])
    np.testing.assert_allclose(
        theta, before * (1 - 0.05) - 0.1 * np.sign(-0.01 * g), rtol=1e-15
    )


def test_adabound_bounds_and_clamp() -> None:
    theta = np.array([0.0, 0.0, 0.0])
    ab = AdaBoundOracle([theta], lr=1e-3, final_lr=0.1, gamma=1e-3, eps=0.0)
    g = np.array([1e3, 1e-6, 1e-3])
    ab.step([g])
    lower, upper = ab.bounds()
    assert lower == pytest.approx(0.1 * (1 - 1 / 1.001), rel=1e-15)
    assert upper == pytest.approx(0.1 * 1001, rel=1e-15)
    # t = 1: m = 0.1g, v = 0.001g², step/√v = 1e-3·√0.001/0.1/(√0.001|g|) = 1e-2/|g|
    eta_free = 1e-2 / np.abs(g)
    eta = np.clip(eta_free, lower, upper)
    assert eta[0] == lower and eta[1] == upper and eta[2] == eta_free[2]
    np.testing.assert_allclose(theta, -eta * 0.1 * g, rtol=1e-14)

    # an lr schedule moves both bounds by γ/γ₀; γ₀ stays the initial lr
    ab.step([g], lr=5e-4)
    lower2, upper2 = ab.bounds()
    assert ab.initial_lr == 1e-3
    assert lower2 == pytest.approx(0.05 * (1 - 1 / 1.002), rel=1e-15)
    assert upper2 == pytest.approx(0.05 * (1 + 1 / 0.002), rel=1e-15)


def test_adabound_with_loose_bounds_and_eps0_is_torch_adam() -> None:
    # With ε = 0 the ε-hat and ε-after forms agree, and with gamma tiny the bounds never bind,
    # so AdaBound is Adam (coupled decay) and AMSBound is Adam(amsgrad=True).
    for amsbound in (False, True):
        initial = make_initial_params(5)
        grads = make_grads(6, 20, [dataclasses.replace(p, zero_frac=0.0, always_zero=False)
                                   for p in DEFAULT_PROFILES])
        params = [x.copy() for x in initial if x.size]
        ab = AdaBoundOracle(params, lr=1e-3, final_lr=1.0, gamma=1e-12, eps=0.0,
                            weight_decay=1e-2, amsbound=amsbound)
        tparams = [torch.from_numpy(x.copy()) for x in initial if x.size]
        adam = torch.optim.Adam(tparams, lr=1e-3, eps=0.0, weight_decay=1e-2, amsgrad=amsbound)
        for row in grads:
            row = [g for g in row if g.size]
            for p, g in zip(tparams, row):
                p.grad = torch.from_numpy(g.copy())
            adam.step()
            ab.step(row)
            lower, upper = ab.bounds()
            assert lower < 1e-9 and upper > 1e9
            for p, q in zip(tparams, params):
                np.testing.assert_allclose(p.numpy(), q, rtol=1e-12, atol=0)


def test_adabound_cases_reach_both_bounds() -> None:
    # Coverage: in the comparison cases the clamp binds from below and from above somewhere.
    case = next(c for c in CASES if c.id == "adabound-ams0-dec0-max0")
    oracles, _ = build_oracles(case, make_initial_params(case.seed))
    hit_lower = hit_upper = False
    for row in make_grads(case.seed + 1000, case.steps, list(case.profiles)):
        step_oracles(oracles, row, None)
        for oracle in oracles:
            lower, upper = oracle.bounds()
            t = oracle.t
            step_size = oracle.lr * math.sqrt(1 - oracle.beta2**t) / (1 - oracle.beta1**t)
            for st in oracle.state:
                eta = step_size / (np.sqrt(st["exp_avg_sq"]) + oracle.eps)
                hit_lower |= bool(np.any(eta < lower))
                hit_upper |= bool(np.any(eta > upper))
    assert hit_lower and hit_upper


def test_adamod_first_step_by_hand() -> None:
    theta0 = np.array([1.0, -1.0, 2.0])
    g = np.array([0.5, -2.0, 0.0])
    theta = theta0.copy()
    lr, b1, b2, b3, eps, wd = 1e-2, 0.9, 0.999, 0.99, 1e-8, 0.1
    am = AdaModOracle([theta], lr=lr, betas=(b1, b2), beta3=b3, eps=eps, weight_decay=wd)
    am.step([g])
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    eta = lr * math.sqrt(1 - b2) / (1 - b1) / (np.sqrt(v) + eps)
    s = (1 - b3) * eta  # s₀ = 0, no bias correction: s < η, the warm-up
    assert np.all(s < eta)
    np.testing.assert_allclose(theta, theta0 * (1 - wd * lr) - s * m, rtol=1e-15)
    np.testing.assert_allclose(am.state[0]["exp_avg_lr"], s, rtol=1e-15)


def test_adabelief_first_steps_by_hand() -> None:
    theta0 = np.array([1.0, -1.0, 0.25])
    g = np.array([0.5, -2.0, 0.0])
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8

    # rectify=True, t = 1: ρ₁ < 5 ⇒ momentum-SGD step θ − γ·m/bc1 = θ − γg
    theta = theta0.copy()
    ab = AdaBeliefOracle([theta], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    ab.step([g])
    np.testing.assert_allclose(theta, theta0 - lr * g, rtol=1e-15)
    # s uses the NEW m: g − m = β₁g; ε is added into s
    np.testing.assert_allclose(ab.state[0]["exp_avg_var"], (1 - b2) * (b1 * g) ** 2 + eps,
                               rtol=1e-15)

    # ρₜ with β₂ = 0.999 first reaches 5 at t = 6 (ρ₅ ≈ 4.996)
    rhos = {}
    for _ in range(6):
        ab.step([g])
        rhos[ab.t] = ab.rho()[1]
    assert ab.t == 7 and rhos[5] < 5 <= rhos[6]

    # rectify=False, t = 1: θ − (γ/bc1)·m/(√s/√bc2 + ε) with m/bc1 = g, bc2 = 1 − β₂
    theta = theta0.copy()
    ab = AdaBeliefOracle([theta], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.1,
                         rectify=False, decoupled_weight_decay=True)
    ab.step([g])
    s = (1 - b2) * (b1 * g) ** 2 + eps
    expected = theta0 * (1 - lr * 0.1) - lr * g / (np.sqrt(s) / math.sqrt(1 - b2) + eps)
    np.testing.assert_allclose(theta, expected, rtol=1e-15)

    # rectify=True at t = 6, constant gradient: the rectified ε-hat step
    theta = theta0.copy()
    ab = AdaBeliefOracle([theta], lr=lr, betas=(b1, b2), eps=eps)
    m = np.zeros(3)
    s = np.zeros(3)
    expected = theta0.copy()
    for t in range(1, 7):
        ab.step([g])
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bc2
        if t < 6:
            expected = expected - lr * m / bc1
        else:
            r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                          / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            expected = expected - lr * m / bc1 * r * math.sqrt(bc2) / (np.sqrt(s) + eps)
    np.testing.assert_allclose(theta, expected, rtol=1e-14)


def test_adabelief_amsgrad_reading() -> None:
    # A large gradient then small ones: s falls below s_max. rectify=False divides by s_max;
    # the rectified branch (t ≥ 6 with β₂ = 0.9: ρ₅ ≈ 4.6, ρ₆ ≈ 5.4) divides by the running s, as
    # the contract's "√s + ε" and the official v0.2 code do.
    lr, b1, b2, eps = 1e-2, 0.9, 0.9, 1e-8
    grads = [np.array([100.0, -50.0])] + [np.array([0.1, 0.2])] * 6
    for rectify in (False, True):
        theta = np.array([1.0, -1.0])
        ab = AdaBeliefOracle([theta], lr=lr, betas=(b1, b2), eps=eps, rectify=rectify,
                             amsgrad=True)
        m, s, s_max, expected = np.zeros(2), np.zeros(2), np.zeros(2), theta.copy()
        for t, g in enumerate(grads, start=1):
            ab.step([g])
            m = b1 * m + (1 - b1) * g
            s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
            s_max = np.maximum(s_max, s)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if not rectify:
                expected = expected - lr / bc1 * m / (np.sqrt(s_max) / math.sqrt(bc2) + eps)
            elif t < 6:
                expected = expected - lr * m / bc1
            else:
                rho_inf = 2 / (1 - b2) - 1
                rho_t = rho_inf - 2 * t * b2**t / bc2
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                              / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                expected = expected - lr * m / bc1 * r * math.sqrt(bc2) / (np.sqrt(s) + eps)
        assert np.all(s_max > 1.01 * s)
        np.testing.assert_allclose(ab.state[0]["max_exp_avg_var"], s_max, rtol=1e-14)
        np.testing.assert_allclose(theta, expected, rtol=1e-13)


def test_fadam_first_step_by_hand_and_clip_coverage() -> None:
    theta0 = np.array([1.0, -1.0, 0.5, 2.0])
    g = np.array([3.0, -0.5, 0.0, 1.0])
    theta = theta0.copy()
    lr, b1, eps, wd = 1e-2, 0.9, 1e-8, 0.1
    fa = FAdamOracle([theta], lr=lr, betas=(b1, 0.999), eps=eps, weight_decay=wd)
    fa.step([g])
    f = g * g  # β̂₂ = 0 at t = 1
    np.testing.assert_array_equal(fa.state[0]["fim"], f)
    eps_t = eps * min(1.0, math.sqrt(np.mean(g * g)))
    gbar = g / (np.sqrt(f) + eps_t)  # ≈ sign(g): RMS ≤ 1, no clip
    m = (1 - b1) * gbar
    w = theta0 / (np.sqrt(f) + eps_t)  # the element with g = 0 makes RMS(w) huge: clipped
    w = w / math.sqrt(np.mean(w * w))
    np.testing.assert_allclose(fa.state[0]["exp_avg"], m, rtol=1e-15)
    np.testing.assert_allclose(theta, theta0 - lr * (m + wd * w), rtol=1e-14)

    # the comparison cases' FAdam profiles clip ḡ (spike) and w (small f) somewhere, and leave
    # both unclipped elsewhere
    case = next(c for c in CASES if c.id == "fadam-max0")
    oracles, _ = build_oracles(case, make_initial_params(case.seed))
    seen: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(PARAM_SPECS))}
    for row in make_grads(case.seed + 1000, case.steps, list(case.profiles)):
        step_oracles(oracles, row, None)
        for i in range(len(PARAM_SPECS)):
            gi = GROUP_OF_PARAM[i]
            pos = [j for j, g2 in enumerate(GROUP_OF_PARAM) if g2 == gi].index(i)
            seen[i].append(oracles[gi].last_rms[pos])
    assert max(r[0] for r in seen[4]) > 10.0  # ḡ clip triggers at the spike
    assert min(r[0] for r in seen[0]) < 1.0  # and not on ordinary steps
    assert min(r[1] for r in seen[1]) > 1.0  # w clip triggers with small gradients
    assert max(r[1] for r in seen[5]) < 1.0  # never with large dense gradients


@pytest.mark.parametrize("maximize", [False, True])
def test_adafactor_oracle_matches_torch(maximize: bool) -> None:
    # ALGORITHMS.md says "torch semantics": the oracle must agree with torch.optim.Adafactor.
    # (torch raises ZeroDivisionError on a zero-size parameter, so that one is left out.)
    initial = [x for x in make_initial_params(70)]
    keep = [i for i, x in enumerate(initial) if x.size]
    grads = make_grads(71, 24, DEFAULT_PROFILES)
    hyper = [dict(lr=1e-2, weight_decay=1e-2), dict(lr=0.5, beta2_decay=-0.5, eps=(1e-20, 1e-2),
                                                     d=1.5)]
    params = [initial[i].copy() for i in keep]
    tparams = [to_torch_param(initial[i], PARAM_SPECS[i][1]) for i in keep]
    oracles, torch_groups = [], []
    for gi in (0, 1):
        idx = [j for j, i in enumerate(keep) if GROUP_OF_PARAM[i] == gi]
        oracles.append((idx, AdafactorOracle([params[j] for j in idx], maximize=maximize,
                                             **hyper[gi])))
        torch_groups.append({"params": [tparams[j] for j in idx], **hyper[gi]})
    opt = torch.optim.Adafactor(torch_groups, maximize=maximize, foreach=False)
    sched = _decaying_lrs(1e-2, 0.5)
    for k, row in enumerate(grads):
        lrs = sched(k + 1)
        for gi, lr in enumerate(lrs):
            opt.param_groups[gi]["lr"] = lr
        for j, i in enumerate(keep):
            tparams[j].grad = to_torch_grad(row[i], PARAM_SPECS[i][1])
        opt.step()
        for gi, (idx, oracle) in enumerate(oracles):
            oracle.step([row[keep[j]] for j in idx], lr=lrs[gi])
            for pos, j in enumerate(idx):
                np.testing.assert_allclose(tparams[j].detach().numpy(), params[j], rtol=1e-12,
                                           atol=0)
                for name, arr in oracle.state[pos].items():
                    np.testing.assert_allclose(opt.state[tparams[j]][name].numpy(), arr,
                                               rtol=1e-12, atol=0, err_msg=name)
