"""ADOPT and the Cautious modifier against float64 NumPy statements of ALGORITHMS.md (issue 25).

The oracles (tests/numpy_oracles.py: ADOPTOracle, CautiousAdamOracle, CautiousSGDOracle,
cautious_update) are written from the formulas, not from adamkit's code. Each case runs >= 20
steps on the shapes of test_numpy_oracles (a zero-size and a non-contiguous parameter among
them) in two param groups, on the reference engine and on "auto" (the fused engine where it can
run), comparing parameters and every state tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adamkit

try:
    from numpy_oracles import (ADOPTOracle, CautiousAdamOracle, CautiousSGDOracle,
                               cautious_update)
    from test_numpy_oracles import (DEFAULT_PROFILES, GROUP_OF_PARAM, PARAM_SPECS, GradProfile,
                                    make_grads, make_initial_params, to_torch_grad,
                                    to_torch_param)
except ImportError:  # tests/ is a package
    from tests.numpy_oracles import (ADOPTOracle, CautiousAdamOracle, CautiousSGDOracle,
                                     cautious_update)
    from tests.test_numpy_oracles import (DEFAULT_PROFILES, GROUP_OF_PARAM, PARAM_SPECS,
                                          GradProfile, make_grads, make_initial_params,
                                          to_torch_grad, to_torch_param)

RTOL = 1e-12
BACKENDS = ["reference", "auto"]
STEPS = 24

# sign-biased gradients so that the momentum mostly agrees with the gradient and the mask mean
# is neither 0 nor 1; parameter 1 has tiny gradients (ADOPT's eps and clip matter there)
CAUTIOUS_PROFILES = [
    GradProfile(scale=1.0, sign_bias=0.3),
    GradProfile(scale=1e-3, sign_bias=0.3),
    GradProfile(scale=10.0),
    GradProfile(scale=1.0),
    GradProfile(scale=0.1, sign_bias=0.5),
    GradProfile(scale=100.0, spread=2.5, sign_bias=-0.2),
]


def _close(actual, expected, what):
    # relative to the tensor's scale: elements passing near 0 keep absolute rounding errors
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def _run(lib_cls, oracle_cls, groups, backend, seed, profiles=CAUTIOUS_PROFILES, steps=STEPS,
         lr_schedule=None, has_step=True):
    initial = make_initial_params(seed)
    grads = make_grads(seed + 1000, steps, list(profiles))
    params_np = [x.copy() for x in initial]
    oracles = []
    for gi, hyper in enumerate(groups):
        members = [params_np[i] for i, g in enumerate(GROUP_OF_PARAM) if g == gi]
        oracles.append(oracle_cls(members, **hyper))
    params = [to_torch_param(x, nc) for x, (_, nc) in zip(initial, PARAM_SPECS)]
    opt = lib_cls([{"params": [p for p, g in zip(params, GROUP_OF_PARAM) if g == gi], **hyper}
                   for gi, hyper in enumerate(groups)], backend=backend)
    for k in range(steps):
        lrs = lr_schedule(k + 1) if lr_schedule else None
        if lrs:
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        for p, g, (_, nc) in zip(params, grads[k], PARAM_SPECS):
            p.grad = to_torch_grad(g, nc)
        opt.step()
        for gi, oracle in enumerate(oracles):
            oracle.step([grads[k][i] for i, g in enumerate(GROUP_OF_PARAM) if g == gi],
                        lr=None if lrs is None else lrs[gi])
        for i, p in enumerate(params):
            where = f"{lib_cls.__name__} [{backend}] step {k + 1} param {i} {tuple(p.shape)}"
            _close(p.detach().numpy(), params_np[i], where)
            gi = GROUP_OF_PARAM[i]
            pos = [j for j, g in enumerate(GROUP_OF_PARAM) if g == gi].index(i)
            expected = oracles[gi].state[pos]
            state = opt.state[p]
            if has_step:
                assert float(state["step"]) == oracles[gi].t, where
            assert set(state) - {"step"} == set(expected), f"{where}: {sorted(state)}"
            for name, value in expected.items():
                _close(state[name].numpy(), value, f"{where} {name}")
    return opt


# ---- ADOPT --------------------------------------------------------------------------------

ADOPT_B = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-3)
ADOPT_CASES = {
    "default": dict(),
    "coupled-decay": dict(weight_decay=0.1),
    "decouple": dict(weight_decay=0.1, decouple=True),
    "maximize": dict(maximize=True, weight_decay=0.05, decouple=True),
    "cautious": dict(cautious=True, weight_decay=0.1, decouple=True),
    "cautious-coupled-maximize": dict(cautious=True, weight_decay=0.1, maximize=True),
}


def _lr_schedule(step):
    return 1e-2 * min(1.0, step / 5) * (0.3 if step > 15 else 1.0), 3e-3 * (1 - step / 40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADOPT_CASES))
def test_adopt_matches_numpy_oracle(case, backend):
    flags = ADOPT_CASES[case]
    _run(adamkit.ADOPT, ADOPTOracle, (dict(lr=1e-2, **flags), dict(ADOPT_B, **flags)), backend,
         seed=11 + len(case), lr_schedule=_lr_schedule)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adopt_unclipped(backend):
    # clip_lambda=None is the paper's first version; the oracle's clip=None likewise. Tiny
    # gradients (1e-3 scale over eps=1e-6) make g / sqrt(v) large, where the clip would bite.
    initial = make_initial_params(5)
    params = [to_torch_param(x, False) for x, (shape, _) in zip(initial, PARAM_SPECS)]
    oracle = ADOPTOracle([x.copy() for x in initial], lr=1e-2, clip_lambda=None)
    opt = adamkit.ADOPT(params, lr=1e-2, clip_lambda=None, backend=backend)
    clipped = adamkit.ADOPT([p.detach().clone().requires_grad_() for p in params], lr=1e-2,
                            backend=backend)
    grads = make_grads(7, 20, [GradProfile(scale=1e-3, spread=3.0)] * len(PARAM_SPECS))
    for row in grads:
        for p, q, g in zip(params, clipped.param_groups[0]["params"], row):
            p.grad = torch.from_numpy(g.copy())
            q.grad = torch.from_numpy(g.copy())
        opt.step()
        clipped.step()
        oracle.step(row)
    for p, expected in zip(params, oracle.params):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=RTOL, atol=0)
    assert any(not torch.allclose(p, q) for p, q in zip(params, clipped.param_groups[0]["params"])
               if p.numel()), "the default clip never bit: the test would not see it break"


def test_adopt_first_step_only_initialises():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = adamkit.ADOPT([p], lr=0.1, weight_decay=0.5, decouple=True)
    p.grad = torch.tensor([0.5, 0.0, -4.0], dtype=torch.float64)
    opt.step()
    assert p.tolist() == [1.0, -2.0, 3.0]  # no update, no decoupled decay
    assert opt.state[p]["exp_avg"].tolist() == [0.0, 0.0, 0.0]
    assert opt.state[p]["exp_avg_sq"].tolist() == [0.25, 0.0, 16.0]
    # second step by hand: decay, g / max(sqrt(v), eps), clip at 1**0.25 = 1, m = 0.1 n
    p.grad = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    opt.step()
    decayed = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * (1 - 0.1 * 0.5)
    normed = torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64)  # 2 and 1e6 clipped to 1
    torch.testing.assert_close(p.detach(), decayed - 0.1 * 0.1 * normed, rtol=1e-15, atol=0)


def test_adopt_validation():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="clip_lambda"):
        adamkit.ADOPT(p, clip_lambda=1.0)
    with pytest.raises(ValueError, match="beta"):
        adamkit.ADOPT(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="cautious"):
        adamkit.ADOPT(p, cautious="yes")


# ---- Cautious -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [
    dict(), dict(amsgrad=True, weight_decay=0.1), dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
], ids=["plain", "amsgrad-coupled", "coupled-maximize", "decoupled"])
def test_cautious_adam_matches_numpy_oracle(flags, backend):
    _run(adamkit.Adam, CautiousAdamOracle,
         (dict(lr=1e-2, cautious=True, **flags), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                                     cautious=True, **flags)),
         backend, seed=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cautious_adamw_second_group_plain(backend):
    # one cautious group and one plain group in the same optimizer
    opt = _run(adamkit.Adam, CautiousAdamOracle,
               (dict(lr=1e-2, cautious=True, weight_decay=0.1, decoupled_weight_decay=True),
                dict(lr=3e-3, cautious=False, weight_decay=0.0, decoupled_weight_decay=True)),
               backend, seed=31)
    assert isinstance(opt, adamkit.Adam) and type(opt).__name__ == "Adam"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flags", [
    dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.8, dampening=0.3, maximize=True),
], ids=["momentum", "nesterov-decay", "dampening-maximize"])
def test_cautious_sgd_matches_numpy_oracle(flags, backend):
    _run(adamkit.SGD, CautiousSGDOracle,
         (dict(lr=1e-2, cautious=True, **flags), dict(lr=3e-3, cautious=True, **flags)),
         backend, seed=41, has_step=False)


CAUTIOUS_NAMES = ["sgd", "adam", "adamw", "nadam", "radam", "adamax", "adabound", "adamod",
                  "adabelief", "lion", "adopt"]


def _extra(name):
    return {"sgd": dict(momentum=0.9, lr=0.01), "adamw": dict(weight_decay=0.0)}.get(name, {})


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name", CAUTIOUS_NAMES)
def test_cautious_with_all_signs_agreeing_is_bit_identical(name, backend):
    # positive, growing gradients: every moment and update keeps the gradient's sign
    results = []
    for cautious in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.rand(257) + 1)
        opt = adamkit.create(name, [p], backend=backend, cautious=cautious, **_extra(name))
        for k in range(8):
            p.grad = torch.linspace(0.5, 1.5, 257) * (1 + 0.1 * k)
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                             if isinstance(v, torch.Tensor)}))
    assert torch.equal(results[0][0], results[1][0]), f"{name}: parameter differs"
    assert not torch.equal(results[0][0], torch.rand(257) + 1)
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key]), f"{name}: state {key} differs"


@pytest.mark.parametrize("name", CAUTIOUS_NAMES)
def test_cautious_masks_and_rescales_each_optimizer(name):
    # float64, no weight decay: the cautious step equals the plain step's update u masked by
    # 1(u * g > 0) and scaled by 1 / max(mean, 1e-3) (cautious_update), from the same state
    rng = np.random.default_rng(3)
    p0 = torch.from_numpy(rng.standard_normal((6, 9)))
    plain_p = torch.nn.Parameter(p0.clone())
    caut_p = torch.nn.Parameter(p0.clone())
    plain = adamkit.create(name, [plain_p], cautious=False, **_extra(name))
    caut = adamkit.create(name, [caut_p], cautious=True, **_extra(name))
    masked_any = False
    for k in range(22):
        g = torch.from_numpy(rng.standard_normal((6, 9)) + 0.3)
        before = caut_p.detach().clone()
        # the plain optimizer steps from the cautious one's parameter and state
        plain_p.data.copy_(before)
        plain.state[plain_p] = {k: v.clone() for k, v in caut.state[caut_p].items()}
        plain_p.grad, caut_p.grad = g.clone(), g.clone()
        plain.step()
        caut.step()
        u = (before - plain_p.detach()).numpy()
        gg = g.numpy()
        expected = before.numpy() - cautious_update(u, gg)
        masked_any |= bool(((u * gg) <= 0).any())
        np.testing.assert_allclose(caut_p.detach().numpy(), expected, rtol=1e-12, atol=1e-15,
                                   err_msg=f"{name} step {k + 1}")
        for key, value in plain.state[plain_p].items():
            if isinstance(value, torch.Tensor) and value.dim():
                torch.testing.assert_close(caut.state[caut_p][key], value, rtol=0, atol=0)
    assert masked_any


def test_cautious_flag_validation_and_state_dict_roundtrip():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="cautious"):
        adamkit.Adam(p, cautious=1)
    opt = adamkit.Lion(p, cautious=True)
    p[0].grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["cautious"] is True
    other = adamkit.Lion(p)
    other.load_state_dict(sd)
    assert other.param_groups[0]["cautious"] is True
    assert type(other)._cautious_base is adamkit.Lion  # loading switched it to two passes
    import copy
    import pickle

    clone = pickle.loads(pickle.dumps(opt))
    assert type(clone).__name__ == "Lion" and copy.deepcopy(opt).param_groups[0]["cautious"]
