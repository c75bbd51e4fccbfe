"""Front-end behaviour every optimizer shares: torch.optim compatibility, validation,
non-finite gradients, dtypes, state_dict round trips, helpers."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings

import pytest
import torch

import adamkit
from optim_table import DENSE, OPTIMIZERS, assert_tensor_close

ALL_CLASSES = [adamkit.SGD, adamkit.Adagrad, adamkit.RMSprop, adamkit.Adam, adamkit.AdamW,
               adamkit.NAdam, adamkit.RAdam, adamkit.Adamax, adamkit.SparseAdam, adamkit.AdaBound,
               adamkit.AdaMod, adamkit.AdaBelief, adamkit.Lion, adamkit.FAdam, adamkit.Adafactor]


def dense_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def loss_of(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 4, generator=gen).to(dtype)
    y = torch.randn(16, 2, generator=gen).to(dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def train(opt, model, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()


# ---------------------------------------------------------------- registry and helpers

def test_available_lists_every_optimizer_sorted():
    names = adamkit.available()
    assert names == sorted(names)
    assert set(names) == {info.name for info in OPTIMIZERS}
    assert len(names) == 21


def test_create_is_case_insensitive_and_passes_hyperparameters():
    p = torch.zeros(3, requires_grad=True)
    opt = adamkit.create("AdaBound", [p], lr=0.01, final_lr=0.2)
    assert type(opt) is adamkit.AdaBound
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["final_lr"] == 0.2


def test_create_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        adamkit.create("adamm", [torch.zeros(1, requires_grad=True)])
    message = str(err.value)
    assert "'adamm'" in message
    for name in adamkit.available():
        assert name in message


def test_create_unknown_hyperparameter_names_valid_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'momentum'.*Adam takes: lr, betas"):
        adamkit.create("adam", [torch.zeros(1, requires_grad=True)], momentum=0.9)


def test_readme_example_runs():
    model = torch.nn.Linear(10, 2)
    opt = adamkit.AdaBound(adamkit.param_groups(model, weight_decay=1e-4), lr=1e-3, final_lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, adamkit.schedules.warmup_cosine(100, 1000))
    before = model.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 10)).square().mean().backward()
        opt.step()
        sched.step()
    assert not torch.equal(before, model.weight)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 100)


# ---------------------------------------------------------------- torch.optim compatibility

@pytest.mark.parametrize("cls", [c for c in ALL_CLASSES if c is not adamkit.SparseAdam], ids=lambda c: c.__name__)
def test_closure_hooks_zero_grad_and_scheduler(cls):
    model = dense_model()
    opt = cls(model.parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert calls == ["pre", "post"]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_param_groups_use_their_own_hyperparameters():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = adamkit.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert torch.allclose(a, torch.full((3,), 0.9)) and torch.allclose(b, torch.full((3,), 0.5))


def test_add_param_group_fills_defaults_and_validates():
    opt = adamkit.Adam([torch.zeros(2, requires_grad=True)], lr=0.01, betas=(0.8, 0.9))
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "eps": 1e-6})
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match=re.escape("Invalid beta2: 1.0 (must be in [0, 1))")):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "betas": (0.9, 1.0)})
    assert len(opt.param_groups) == 2  # the rejected group left no trace


def test_adabound_base_lr_survives_state_dict_and_added_groups():
    p = torch.zeros(2, requires_grad=True)
    opt = adamkit.AdaBound([p], lr=1e-3)
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 2e-3})
    assert [g["base_lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    opt.param_groups[0]["lr"] = 5e-4  # a schedule moved lr; base_lr stays the creation value
    sd = opt.state_dict()
    opt2 = adamkit.AdaBound([torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)])
    # rebuild with the same group structure, then load
    opt2 = adamkit.AdaBound([{"params": [torch.zeros(2, requires_grad=True)]},
                             {"params": [torch.zeros(1, requires_grad=True)]}])
    opt2.load_state_dict(sd)
    assert [g["base_lr"] for g in opt2.param_groups] == [1e-3, 2e-3]
    assert opt2.param_groups[0]["lr"] == 5e-4


@pytest.mark.parametrize("info", DENSE, ids=lambda i: i.name)
def test_state_dict_round_trip_continues_identically(info):
    cfg = info.configs[-1]
    model = dense_model(1)
    opt = info.cls(model.parameters(), **cfg)
    train(opt, model, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    clone = copy.deepcopy(model)
    opt2 = info.cls(clone.parameters(), **cfg)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    train(opt, model, 4, start=4)
    train(opt2, clone, 4, start=4)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_optimizer_pickles_with_its_settings():
    p = torch.zeros(2, requires_grad=True)
    opt = adamkit.Adam([p], on_nonfinite="skip", backend="reference")
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.on_nonfinite == "skip" and clone.backend == "reference" and clone.skipped_steps == 0


# ---------------------------------------------------------------- dtypes and storage

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("info", DENSE, ids=lambda i: i.name)
def test_parameter_dtypes_keep_state_in_param_dtype(info, dtype):
    model = dense_model(2, dtype)
    opt = info.cls(model.parameters(), **info.configs[0])
    before = [p.detach().clone() for p in model.parameters()]
    train(opt, model, 3)
    # AdaMod's first steps are ~1e-3 of Adam's (its step-size average starts at 0); in 16-bit
    # parameters such updates round away (what stochastic rounding is for), so it may not move yet.
    if not (info.name == "adamod" and dtype in (torch.bfloat16, torch.float16)):
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and key not in ("step", "mu_product"):
                assert value.dtype == dtype, f"state {key} is {value.dtype}"


def test_low_precision_params_track_float32_run():
    # The rule computes in float32 for bfloat16 parameters, so the trajectory stays close.
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = dense_model(3, dtype)
        opt = adamkit.Adam(model.parameters(), lr=1e-2)
        train(opt, model, 20)
        results[dtype] = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert (results[torch.bfloat16] - results[torch.float32]).abs().max() < 0.05


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_state_dtype_sets_storage(state_dtype):
    model = dense_model(4, torch.bfloat16 if state_dtype == "float32" else torch.float32)
    opt = adamkit.AdamW(model.parameters(), state_dtype=state_dtype)
    train(opt, model, 2)
    expected = getattr(torch, state_dtype)
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == expected and opt.state[p]["exp_avg_sq"].dtype == expected
    # a checkpoint loaded into the same optimizer keeps the chosen storage
    opt2 = adamkit.AdamW(model.parameters(), state_dtype=state_dtype)
    opt2.load_state_dict(opt.state_dict())
    assert all(opt2.state[p]["exp_avg"].dtype == expected for p in model.parameters())


@pytest.mark.parametrize("cls", [adamkit.AdaBound, adamkit.AdaMod, adamkit.AdaBelief, adamkit.Lion,
                                 adamkit.FAdam, adamkit.Adafactor, adamkit.SparseAdam], ids=lambda c: c.__name__)
def test_complex_parameters_rejected_where_unsupported(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__} does not support complex parameters .*view_as_real"):
        cls([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


def test_integer_parameters_rejected():
    with pytest.raises(ValueError, match=r"Invalid parameter 0 of param group 0: dtype torch.int64"):
        adamkit.Adam([torch.zeros(3, dtype=torch.long)])


# ---------------------------------------------------------------- sparse gradients

@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW, adamkit.Lion, adamkit.RMSprop], ids=lambda c: c.__name__)
def test_sparse_gradient_error_names_capable_optimizers(cls):
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert f"{cls.__name__} does not support sparse gradients" in message
    for capable in ("SparseAdam", "Adagrad (weight_decay=0)", "SGD (momentum=0, weight_decay=0)"):
        assert capable in message


def test_sparse_gradient_with_weight_decay_on_adagrad_is_an_error():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = adamkit.Adagrad(emb.parameters(), weight_decay=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="Adagrad does not support sparse gradients with these settings"):
        opt.step()


def test_sparse_adam_rejects_dense_gradients():
    p = torch.zeros(3, requires_grad=True)
    opt = adamkit.SparseAdam([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients, please consider Adam instead"):
        opt.step()


# ---------------------------------------------------------------- non-finite gradients

def _poisoned(opt_cls, mode, **kw):
    a = torch.ones(4, requires_grad=True)
    b = torch.ones(2, 3, requires_grad=True)
    opt = opt_cls([{"params": [a]}, {"params": [b]}], on_nonfinite=mode, **kw)
    return a, b, opt


@pytest.mark.parametrize("info", DENSE, ids=lambda i: i.name)
def test_skip_leaves_everything_unchanged_and_counts(info):
    a, b, opt = _poisoned(info.cls, "skip")
    a.grad, b.grad = torch.ones(4), torch.ones(2, 3)
    opt.step()
    snapshot = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()))
    a.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    b.grad = torch.ones(2, 3)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    b.grad = torch.full((2, 3), float("inf"))
    a.grad = torch.ones(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        opt.step()
    assert opt.skipped_steps == 2
    assert torch.equal(a, snapshot[0]) and torch.equal(b, snapshot[1])
    after = opt.state_dict()
    for key, state in snapshot[2]["state"].items():
        for name, value in state.items():
            other = after["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_raise_names_group_index_and_shape_and_changes_nothing():
    a, b, opt = _poisoned(adamkit.Adam, "raise")
    a.grad = torch.ones(4)
    b.grad = torch.ones(2, 3)
    b.grad[1, 2] = float("-inf")
    with pytest.raises(FloatingPointError, match=re.escape("parameter 0 of param group 1 (shape (2, 3))")):
        opt.step()
    assert torch.equal(a, torch.ones(4)) and len(opt.state) == 0


def test_apply_is_torch_behaviour():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt_a = adamkit.Adam([a])
    opt_b = torch.optim.Adam([b])
    for x, o in ((a, opt_a), (b, opt_b)):
        x.grad = torch.tensor([1.0, float("nan"), 2.0])
        o.step()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.allclose(a[[0, 2]], b[[0, 2]])


# ---------------------------------------------------------------- validation messages

BAD = [
    (adamkit.Adam, dict(lr=-1.0), "Invalid lr: -1.0 (must be >= 0)"),
    (adamkit.Adam, dict(betas=(1.5, 0.999)), "Invalid beta1: 1.5 (must be in [0, 1))"),
    (adamkit.Adam, dict(betas=(0.9, -0.1)), "Invalid beta2: -0.1 (must be in [0, 1))"),
    (adamkit.Adam, dict(betas=0.9), "Invalid betas: 0.9 (must be a pair (beta1, beta2))"),
    (adamkit.Adam, dict(eps=-1e-8), "Invalid eps: -1e-08 (must be >= 0)"),
    (adamkit.Adam, dict(weight_decay=-0.1), "Invalid weight_decay: -0.1 (must be >= 0)"),
    (adamkit.Adam, dict(amsgrad="yes"), "Invalid amsgrad: 'yes' (must be True or False)"),
    (adamkit.Adam, dict(lr=float("nan")), "Invalid lr: nan (must be a number)"),
    (adamkit.Adam, dict(lr="0.1"), "Invalid lr: '0.1' (must be a real number)"),
    (adamkit.AdamW, dict(maximize=1), "Invalid maximize: 1 (must be True or False)"),
    (adamkit.SGD, dict(momentum=-0.5), "Invalid momentum: -0.5 (must be >= 0)"),
    (adamkit.SGD, dict(nesterov=True), "Invalid nesterov=True with momentum=0.0 and dampening=0.0 "
                                       "(Nesterov momentum requires momentum > 0 and dampening = 0)"),
    (adamkit.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "Invalid nesterov=True with momentum=0.9"),
    (adamkit.SGD, dict(dampening=1.5), "Invalid dampening: 1.5 (must be in [0, 1])"),
    (adamkit.Adagrad, dict(lr_decay=-1), "Invalid lr_decay: -1 (must be >= 0)"),
    (adamkit.Adagrad, dict(initial_accumulator_value=-1), "Invalid initial_accumulator_value: -1 (must be >= 0)"),
    (adamkit.RMSprop, dict(alpha=-0.1), "Invalid alpha: -0.1 (must be >= 0)"),
    (adamkit.RMSprop, dict(centered=None), "Invalid centered: None (must be True or False)"),
    (adamkit.NAdam, dict(momentum_decay=-1e-3), "Invalid momentum_decay: -0.001 (must be >= 0)"),
    (adamkit.RAdam, dict(decoupled_weight_decay="no"), "Invalid decoupled_weight_decay: 'no' (must be True or False)"),
    (adamkit.Adamax, dict(betas=(0.9, 1.0)), "Invalid beta2: 1.0 (must be in [0, 1))"),
    (adamkit.SparseAdam, dict(eps=0.0), "Invalid eps: 0.0 (must be > 0)"),
    (adamkit.AdaBound, dict(final_lr=-0.1), "Invalid final_lr: -0.1 (must be >= 0)"),
    (adamkit.AdaBound, dict(gamma=1.0), "Invalid gamma: 1.0 (must be in [0, 1))"),
    (adamkit.AdaBound, dict(gamma=-0.1), "Invalid gamma: -0.1 (must be in [0, 1))"),
    (adamkit.AdaMod, dict(beta3=1.0), "Invalid beta3: 1.0 (must be in [0, 1))"),
    (adamkit.AdaBelief, dict(rectify=1), "Invalid rectify: 1 (must be True or False)"),
    (adamkit.Lion, dict(betas=(0.9, 1.2)), "Invalid beta2: 1.2 (must be in [0, 1))"),
    (adamkit.FAdam, dict(clip=0.0), "Invalid clip: 0.0 (must be > 0)"),
    (adamkit.FAdam, dict(p=-0.5), "Invalid p: -0.5 (must be > 0)"),
    (adamkit.Adafactor, dict(beta2_decay=0.5), "Invalid beta2_decay: 0.5 (must be in [-inf, 0])"),
    (adamkit.Adafactor, dict(d=0.5), "Invalid d: 0.5 (must be >= 1)"),
    (adamkit.Adafactor, dict(eps=(-1.0, 1e-3)), "Invalid eps1: -1.0 (must be >= 0)"),
    (adamkit.Adafactor, dict(eps=1e-3), "Invalid eps: 0.001 (must be a pair (eps1 or None, eps2))"),
    (adamkit.Adam, dict(backend="gpu"), "Invalid backend: 'gpu' (must be one of 'auto', 'fused', 'reference', 'triton')"),
    (adamkit.Adam, dict(state_dtype="float16"),
     "Invalid state_dtype: 'float16' (must be one of None, 'float32', 'bfloat16', 'int8')"),
    (adamkit.Adam, dict(on_nonfinite="ignore"),
     "Invalid on_nonfinite: 'ignore' (must be one of 'apply', 'skip', 'raise')"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in BAD])
def test_invalid_hyperparameters_raise_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_hyperparameter_is_checked(cls):
    """Every declared hyperparameter has a check, and every constructor argument is declared."""
    import inspect

    args = [n for n in inspect.signature(cls.__init__).parameters
            if n not in ("self", "params", "backend", "state_dtype", "on_nonfinite",
                         "stochastic_rounding")]
    opt = cls([torch.zeros(2, requires_grad=True)])
    assert set(cls.checks) == set(opt.defaults), cls.checks.keys() ^ opt.defaults.keys()
    assert set(args) <= set(cls.checks) | {"decoupled_weight_decay"}
    with pytest.raises(ValueError, match=r"Invalid lr: -1 \(must be >= 0\)"):
        cls([torch.zeros(2, requires_grad=True)], lr=-1)


# ---------------------------------------------------------------- convergence

def _quadratic(x):
    return 0.5 * (x * x * torch.logspace(0, 2, x.numel(), dtype=x.dtype)).sum()


def _beale(x):
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


FUNCTIONS = {
    # name: (function, start, optimum, steps, tolerance on the distance to the optimum)
    "quadratic": (_quadratic, [1.0] * 10, [0.0] * 10, 1000, 1e-2),
    "beale": (_beale, [1.0, 1.0], [3.0, 0.5], 2000, 1e-2),
    # the curved valley is slow for Adagrad's ever-growing denominator: a looser bound there
    "rosenbrock": (_rosenbrock, [-1.0, 1.5], [1.0, 1.0], 5000, 5e-2),
}
CONVERGENCE = [(info, fn) for info in OPTIMIZERS for fn in info.converge]


@pytest.mark.parametrize("info,function", CONVERGENCE, ids=[f"{i.name}-{f}" for i, f in CONVERGENCE])
def test_converges(info, function):
    f, start, optimum, steps, tol = FUNCTIONS[function]
    if info.name == "adagrad" and function == "rosenbrock":
        tol = 0.1
    hyper, schedule = info.converge[function]
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = info.cls([x], **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    f0 = f(x.detach()).item()
    for _ in range(steps):
        opt.zero_grad()
        f(x).backward()
        opt.step()
        sched.step()
    distance = (x.detach() - torch.tensor(optimum, dtype=torch.float64)).norm().item()
    assert distance < tol, f"{info.name} on {function}: distance {distance:.3g} after {steps} steps"
    assert f(x.detach()).item() < 1e-3 * f0


# ---- stochastic rounding of bfloat16 values -------------------------------------------------

def _bf16_sgd_walk(backend: str, stochastic: bool, steps: int = 100) -> torch.Tensor:
    # every update (1e-3) is under half a bfloat16 step at 1.0 (2**-8 below 1.0)
    p = torch.ones(10_000, dtype=torch.bfloat16, requires_grad=True)
    opt = adamkit.SGD([p], lr=1e-3, backend=backend, stochastic_rounding=stochastic)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach().float()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_stochastic_rounding_keeps_small_updates(backend):
    nearest = _bf16_sgd_walk(backend, False)
    assert torch.equal(nearest, torch.ones_like(nearest))  # rounded away every time
    stochastic = _bf16_sgd_walk(backend, True)
    # unbiased: E[p] = 1 - 100 * 1e-3. One element's spread after 100 steps is about
    # 2**-8 * sqrt(100 * 0.26 * 0.74) = 0.017; the mean of 10,000 elements is 100x tighter.
    assert abs(stochastic.mean().item() - 0.9) < 0.002
    assert 0.01 < stochastic.std().item() < 0.03  # fresh random bits every step


def test_stochastic_rounding_leaves_other_dtypes_alone():
    results = []
    for stochastic in (False, True):
        torch.manual_seed(0)
        p = torch.randn(64, requires_grad=True)
        opt = adamkit.AdamW([p], lr=1e-2, stochastic_rounding=stochastic)
        for _ in range(3):
            p.grad = torch.randn(64)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def test_stochastic_rounding_is_validated():
    with pytest.raises(ValueError, match=r"Invalid stochastic_rounding: 1 \(must be True or False\)"):
        adamkit.Adam([torch.zeros(2, requires_grad=True)], stochastic_rounding=1)
