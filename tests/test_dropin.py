"""Drop-in means drop-in (issue 21): what a torch.optim user does, done with adamkit, behaves as
torch does. Each test is written from the user's side: the snippet, then what torch does with
the same snippet (torch.optim is the oracle)."""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit.engines import cpu
from adamkit.registry import OPTIMIZERS as REGISTRY
from optim_table import BY_NAME

ROOT = Path(__file__).resolve().parents[1]
FUSED = cpu.available()
needs_fused = pytest.mark.skipif(not FUSED, reason="numba is not importable here")
BACKENDS = ["reference", pytest.param("fused", marks=needs_fused)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (NaN where NaN)."""
    a, b = a.detach(), b.detach()
    if a.is_sparse:
        a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float64:  # bits, so that -0.0 != 0.0 and NaN == NaN
        a, b = a.contiguous().view(torch.int64), b.contiguous().view(torch.int64)
    return torch.equal(a, b)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to 1e-13 relative (where the test is not about last-bit agreement: an update
    applied twice or with coupled decay is off by far more)."""
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=0)
    return True


# ---- 1. a checkpoint whose step is a plain number ----------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_1_checkpoint_with_numeric_step_loads_as_torch(backend):
    def run(cls, **kw):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        p.grad = torch.ones(3, dtype=torch.float64)
        opt = cls([p], **kw)
        opt.step()
        sd = opt.state_dict()
        sd["state"][0]["step"] = 1.0  # what older torch and many frameworks save
        opt.load_state_dict(sd)
        opt.step()
        return p, opt

    p, opt = run(adamkit.Adam, backend=backend)
    p_torch, opt_torch = run(torch.optim.Adam)
    step = opt.state[p]["step"]
    assert torch.is_tensor(step) and step.dtype == opt_torch.state[p_torch]["step"].dtype
    assert step.item() == 2.0 == opt_torch.state[p_torch]["step"].item()
    assert close(p, p_torch)
    assert close(opt.state[p]["exp_avg_sq"], opt_torch.state[p_torch]["exp_avg_sq"])


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "adamw", "nadam", "radam",
                                  "adamax", "adafactor", "adabound", "lion", "fadam"])
def test_1_every_tensor_step_optimizer_converts_numeric_steps(name):
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.ones(2, 3)
    opt = adamkit.create(name, [p])
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = 1
    opt.load_state_dict(sd)
    assert torch.is_tensor(opt.state[p]["step"]) and opt.state[p]["step"].item() == 1
    opt.step()
    assert opt.state[p]["step"].item() == 2


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def _unchanged(opt, params, snapshot):
    values, states = snapshot
    if not all(same(p, v) for p, v in zip(params, values)):
        return False
    for p in params:
        before = states.get(id(p), {})
        after = opt.state.get(p, {})
        if set(before) != set(after):
            return False
        for k, v in before.items():
            if torch.is_tensor(v) and not same(after[k], v):
                return False
            if not torch.is_tensor(v) and after[k] != v:
                return False
    return True


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_1_a_step_that_raises_changes_nothing_and_a_retry_applies_once(backend):
    # torch converts numeric steps on load; a step count set to a number by hand afterwards is
    # an error, reported before any parameter moves, so that fixing it and retrying applies
    # exactly one update
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = adamkit.Adam(params, backend=backend)
    oracle = torch.optim.Adam(twins)
    for ps in (params, twins):
        for p in ps:
            p.grad = torch.ones_like(p)
    opt.step()
    oracle.step()
    opt.state[params[2]]["step"] = 1.0  # the last parameter: the others come first
    snapshot = _snapshot(opt, params)
    with pytest.raises(TypeError, match="parameter 2 of param group 0.*nothing was updated"):
        opt.step()
    assert _unchanged(opt, params, snapshot)
    opt.state[params[2]]["step"] = torch.tensor(1.0)
    opt.step()
    oracle.step()
    for p, q in zip(params, twins):
        assert close(p, q)
        assert opt.state[p]["step"].item() == oracle.state[q]["step"].item() == 2


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_1_unsupported_gradient_late_in_the_list_changes_nothing(backend):
    params = [torch.nn.Parameter(torch.randn(5, 2)) for _ in range(3)]
    opt = adamkit.Adam(params, backend=backend)
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    params[2].grad = torch.randn(5, 2).to_sparse()  # Adam takes no sparse gradients
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert _unchanged(opt, params, snapshot) and len(opt.state) == 0
    # torch raises too (its own message), also before it touches the first parameter
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    with pytest.raises(RuntimeError):
        torch.optim.Adam(twins).step()


@needs_fused
def test_1_fused_backend_refuses_before_it_changes_anything():
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    opt = adamkit.AdamW(params, backend="fused")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    params[2].grad = torch.randn(3, 4).t()  # non-contiguous: the fused engine cannot read it
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match="parameter 2 of param group 0.*nothing was updated"):
        opt.step()
    assert _unchanged(opt, params, snapshot)


# ---- 3. load_state_dict adds no keys; state_dict round trips; rebuild from defaults ---------

def _stepped(name, dtype=torch.float32, steps=2):
    info = BY_NAME.get(name)
    if name == "sparseadam":
        emb = torch.nn.Embedding(6, 2, sparse=True)
        opt = adamkit.SparseAdam(emb.parameters())
        for _ in range(steps):
            opt.zero_grad()
            emb(torch.tensor([1, 3])).sum().backward()
            opt.step()
        return list(emb.parameters()), opt
    params = [torch.nn.Parameter(torch.randn(3, 2, dtype=dtype)),
              torch.nn.Parameter(torch.randn(4, dtype=dtype))]
    cfg = info.configs[-1] if info is not None and info.configs else {}
    second = {"params": params[1:], "lr": 1e-4}
    if name == "muon":  # a 1-D parameter goes to an AdamW group
        second["use_muon"] = False
    opt = adamkit.create(name, [{"params": params[:1]}, second], **cfg)
    if hasattr(opt, "train"):  # Schedule-Free steps in train mode
        opt.train()
    def closure():  # C-Adam asks for a second gradient; others call it once
        for p in params:
            p.grad = torch.randn_like(p)
        return torch.zeros(())

    for _ in range(steps):
        closure()
        opt.step(closure if getattr(opt, "requires_closure", False) else None)
    return params, opt


def _equal_state_dicts(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for k in a["state"]:
        assert set(a["state"][k]) == set(b["state"][k])
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), (k, name)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_3_state_dict_round_trip_is_exact_and_defaults_rebuild(name):
    params, opt = _stepped(name)
    sd = copy.deepcopy(opt.state_dict())
    defaults = dict(opt.defaults)
    def fresh_groups():
        # the params of each group, and Muon's AdamW-group switch (as the user passes it)
        return [{"params": [torch.nn.Parameter(p.detach().clone()) for p in group["params"]],
                 **({"use_muon": group["use_muon"]} if "use_muon" in group else {})}
                for group in opt.param_groups]

    twin = type(opt)(fresh_groups(), **opt.defaults)
    twin.load_state_dict(sd)
    _equal_state_dicts(twin.state_dict(), sd)
    assert twin.defaults == defaults  # nothing added (torch's __setstate__ adds differentiable)
    # and again after the load: the loaded optimizer's defaults still rebuild one
    type(twin)(fresh_groups(), **twin.defaults)
    opt.load_state_dict(sd)
    _equal_state_dicts(opt.state_dict(), sd)
    assert opt.defaults == defaults


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adam", "adamw", "nadam", "radam",
                                  "adamax", "adafactor"])
def test_3_a_torch_checkpoint_adds_no_torch_only_keys(name):
    info = BY_NAME[name]
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    theirs = info.torch_cls([p], **info.configs[-1])
    theirs.step()
    opt = info.cls([torch.nn.Parameter(p.detach().clone())], **info.configs[-1])
    before = dict(opt.defaults)
    opt.load_state_dict(theirs.state_dict())
    group = opt.state_dict()["param_groups"][0]
    for key in ("foreach", "fused", "capturable", "differentiable"):
        assert key not in group and key not in opt.defaults
    assert set(group) - {"params"} == set(before)
    assert opt.defaults == before
    type(opt)([p], **opt.defaults)


# ---- 2. AdamW loading an Adam checkpoint stays AdamW ------------------------------------------

def test_2_adamw_loading_an_adam_checkpoint_stays_decoupled():
    def run(adam_cls, adamw_cls):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
        adam = adam_cls([p], lr=0.1, weight_decay=0.5)
        p.grad = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
        adam.step()
        adamw = adamw_cls([p], lr=0.1, weight_decay=0.5)
        adamw.load_state_dict(adam.state_dict())
        for _ in range(3):
            adamw.step()
        return p, adamw

    p, opt = run(adamkit.Adam, adamkit.AdamW)
    q, oracle = run(torch.optim.Adam, torch.optim.AdamW)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert oracle.param_groups[0]["decoupled_weight_decay"] is True
    assert close(p, q)


def test_2_adamw_takes_its_flag_only_with_its_own_value():
    p = torch.nn.Parameter(torch.ones(2))
    adamkit.AdamW([p], decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="AdamW's decay is always decoupled"):
        adamkit.AdamW([p], decoupled_weight_decay=False)


# ---- 5. SGD(momentum=0) keeps no state; SGD on sparse parameters ------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_5_sgd_without_momentum_keeps_no_state(backend):
    def run(cls, **kw):
        params = [torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
                  for _ in range(2)]
        opt = cls(params, lr=0.1, **kw)
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        return opt

    ours, theirs = run(adamkit.SGD, backend=backend), run(torch.optim.SGD)
    assert theirs.state_dict()["state"] == {}
    assert ours.state_dict()["state"] == {}
    assert len(ours.state) == 0


def _sparse_param(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(3, dtype=torch.float64, generator=gen)
    return torch.sparse_coo_tensor([[0, 2, 5]], values, (6,)).requires_grad_()


@pytest.mark.parametrize("cfg", [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
                                 dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.1),
                                 dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)])
def test_5_sgd_on_sparse_parameters_matches_torch(cfg):
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    ours, theirs = _sparse_param(0), _sparse_param(0)
    opt, oracle = adamkit.SGD([ours], **cfg), torch.optim.SGD([theirs], **cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 6, (2, 1), generator=gen).t()
        grad = torch.sparse_coo_tensor(idx, torch.randn(2, dtype=torch.float64, generator=gen),
                                       (6,))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        oracle.step()
        assert same(ours, theirs)
        assert set(opt.state_dict()["state"]) == set(oracle.state_dict()["state"])
        if "momentum_buffer" in oracle.state.get(theirs, {}):
            assert same(opt.state[ours]["momentum_buffer"], oracle.state[theirs]["momentum_buffer"])


def test_5_other_optimizers_reject_sparse_parameters_up_front():
    p = torch.zeros(3).to_sparse()
    with pytest.raises(ValueError, match="Adam requires dense parameter tensors"):
        adamkit.Adam([p])


# ---- 4. validation torch does ------------------------------------------------------------------

def test_4_sparse_adam_rejects_sparse_parameters_up_front():
    sparse = torch.zeros(3, layout=torch.sparse_coo)
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        torch.optim.SparseAdam([sparse])
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        adamkit.SparseAdam([sparse])
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        adamkit.SparseAdam([{"params": [sparse]}])


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.99)), (torch.tensor(0.9), 0.99)])
def test_4_adam_rejects_betas_mixing_floats_and_tensors(cls, betas):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        getattr(torch.optim, cls)([p], betas=betas)
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        getattr(adamkit, cls)([p], betas=betas)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_4_hyperparameters_are_checked_before_params_is_read(name):
    # torch reports a bad lr even when params is not even an iterable (its error inputs pass
    # params=None); so does adamkit, for every optimizer
    with pytest.raises(ValueError, match="lr"):
        adamkit.create(name, None, lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        adamkit.create(name, None, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        torch.optim.Adam(None, lr=-1.0)  # the oracle's behaviour (wording differs)


@pytest.mark.parametrize("name,kw", [
    ("adam", dict(betas=(torch.tensor(0.8, dtype=torch.float64),
                         torch.tensor(0.99, dtype=torch.float64)))),
    ("adamw", dict(betas=(torch.tensor(0.8, dtype=torch.float64),
                          torch.tensor(0.99, dtype=torch.float64)))),
    ("adam", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("adamw", dict(lr=torch.tensor(0.01, dtype=torch.float64), amsgrad=True)),
    ("sgd", dict(lr=torch.tensor(0.01, dtype=torch.float64), momentum=0.9)),
    ("adagrad", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("rmsprop", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("adamax", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("nadam", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("radam", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
    ("adafactor", dict(lr=torch.tensor(0.01, dtype=torch.float64))),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_4_tensor_lr_and_betas_work_as_in_torch(name, kw, backend):
    info = BY_NAME[name]
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(7, dtype=torch.float64, generator=gen)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = info.cls([ours], backend=backend, **kw)
    oracle = info.torch_cls([theirs], **kw)
    for _ in range(10):
        g = torch.randn(7, dtype=torch.float64, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        oracle.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


# ---- 7. the default install is the fast one ----------------------------------------------------

def test_7_numba_is_a_regular_dependency_and_fused_a_compatible_alias():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "numba"
               for dep in project["dependencies"])
    assert project["optional-dependencies"]["fused"] == []  # `adamkit[fused]` still installs


@needs_fused
def test_7_engines_used_says_what_ran():
    fast = torch.nn.Parameter(torch.randn(4))
    slow = torch.nn.Parameter(torch.randn(4, dtype=torch.float16))  # fused has no float16
    opt = adamkit.Adam([fast])
    fast.grad = torch.randn(4)
    opt.step()
    assert opt.engines_used == {"fused"}
    both = adamkit.Adam([fast, slow])
    slow.grad = torch.randn(4, dtype=torch.float16)
    both.step()
    assert both.engines_used == {"fused", "reference"}
    ref = adamkit.Adam([fast], backend="reference")
    ref.step()
    assert ref.engines_used == {"reference"}


@pytest.mark.parametrize("backend,param_dtype,expected", [
    ("reference", "float32", "reference"),
    pytest.param("auto", "float32", "fused", marks=needs_fused),
])
def test_7_speed_prints_the_engine_each_optimizer_used(backend, param_dtype, expected,
                                                       monkeypatch, capsys):
    from adamkit.bench import speed

    # the machine's bandwidth is not what this test is about: a cheap stand-in
    monkeypatch.setattr(speed, "copy_bandwidth", lambda: 10.0)
    monkeypatch.setattr(speed, "memory_bandwidth", lambda: speed.Bandwidth(10.0, 0.0))
    args = argparse.Namespace(shapes="uniform", scale=0.001, steps=1, warmup=0,
                              optimizers=["sgd"], backend=backend, compare=False,
                              param_dtype=[param_dtype])
    data = speed.run_benchmark(args, out=print)
    rows = [r for r in data["rows"] if r["implementation"] == "adamkit"]
    assert [r["engine"] for r in rows] == [expected]
    table = capsys.readouterr().out
    line = next(line for line in table.splitlines() if line.startswith("sgd"))
    assert line.split()[:3] == ["sgd", "adamkit", expected]


# ---- torch's own table of error inputs (torch/testing/_internal/common_optimizers.py) ---------

def _torch_error_cases():
    from torch.testing._internal.common_optimizers import optim_db

    shared = {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax",
              "SparseAdam", "Adafactor"}
    cases, ids = [], []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in shared or info.optim_error_inputs_func is None:
            continue
        for k, error in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            cases.append((getattr(adamkit, name), error))
            ids.append(f"{name}-{k}-{error.optimizer_error_input.desc}")
    return cases, ids


TORCH_ERROR_CASES, TORCH_ERROR_IDS = _torch_error_cases()
#: torch's implementation switches; adamkit has none (its engine is ``backend``), so an input that
#: passes one is refused as an unknown keyword (TypeError) before anything else
TORCH_ONLY_KWARGS = {"foreach", "fused", "capturable", "differentiable"}


def test_torch_error_table_covers_every_shared_algorithm():
    covered = {cls.__name__ for cls, _ in TORCH_ERROR_CASES}
    assert covered == {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax",
                       "SparseAdam", "Adafactor"}


@pytest.mark.parametrize("cls,error", TORCH_ERROR_CASES, ids=TORCH_ERROR_IDS)
def test_torch_error_inputs_raise_the_same_exception_type(cls, error):
    from torch.testing._internal.common_optimizers import OptimizerErrorEnum

    optim_input = error.optimizer_error_input
    params, kwargs = optim_input.params, dict(optim_input.kwargs)
    torch_only = TORCH_ONLY_KWARGS & set(kwargs)
    if torch_only:
        with pytest.raises(TypeError, match=sorted(torch_only)[0]):
            cls(params, **kwargs)
        return
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            cls(params, **kwargs)
        return
    with pytest.raises(error.error_type):
        if error.error_on == OptimizerErrorEnum.STEP_ERROR:
            # adamkit refuses what it cannot update when the param group is added, before any
            # step (torch's Adafactor waits for step()); the exception type is torch's
            cls(params, **kwargs).step()
        else:
            cls(params, **kwargs)


@pytest.mark.parametrize("cls,error", [c for c in TORCH_ERROR_CASES
                                       if c[1].error_on.name == "STEP_ERROR"],
                         ids=[i for c, i in zip(TORCH_ERROR_CASES, TORCH_ERROR_IDS)
                              if c[1].error_on.name == "STEP_ERROR"])
def test_torch_step_errors_are_raised_before_any_step(cls, error):
    optim_input = error.optimizer_error_input
    with pytest.raises(error.error_type):
        cls(optim_input.params, **optim_input.kwargs)


def _torch_documented_behaviours():
    from torch.testing._internal.common_optimizers import optim_db

    return [info for info in optim_db if info.optim_cls.__name__ in
            {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax",
             "SparseAdam", "Adafactor"}]


@pytest.mark.parametrize("info", _torch_documented_behaviours(), ids=lambda i: i.name)
def test_torch_documented_capabilities_hold(info):
    """torch's OptimizerInfo flags: complex support, sparse gradients, sparse-only, and each
    of its sample configurations (without torch's implementation switches) runs and matches
    torch in float64 for a few steps."""
    cls = getattr(adamkit, info.name)
    ours = BY_NAME[info.name.lower()]
    assert ours.complex_ok == (info.supports_complex and not info.only_supports_sparse_grads)
    assert cls.requires_sparse == info.only_supports_sparse_grads
    assert ours.sparse_grads == (info.supports_sparse or info.only_supports_sparse_grads)
    for optim_input in info.optim_inputs_func(device="cpu"):
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in TORCH_ONLY_KWARGS}
        if info.only_supports_sparse_grads:
            continue  # SparseAdam's configurations: test_against_torch's embedding test
        gen = torch.Generator().manual_seed(0)
        start = torch.randn(3, 2, dtype=torch.float64, generator=gen)
        a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        opt, oracle = cls([a], **kwargs), info.optim_cls([b], **optim_input.kwargs)
        for _ in range(3):
            g = torch.randn(3, 2, dtype=torch.float64, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            oracle.step()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=optim_input.desc)


# ---- float64 trajectories against torch: 1,000 steps on Rosenbrock -----------------------------

#: per-algorithm learning rates at which Rosenbrock's trajectory from (-1.5, 2) stays finite
ROSENBROCK_LR = {"sgd": 1e-4, "adagrad": 1e-2, "rmsprop": 1e-3, "adam": 1e-2, "adamw": 1e-2,
                 "nadam": 1e-2, "radam": 1e-2, "adamax": 1e-2, "adafactor": 1e-2}


def _rosenbrock(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _trajectory_cases():
    from optim_table import torch_cases

    cases, ids = [], []
    for (info, cfg), case_id in zip(*torch_cases()):
        for backend in ("reference", "fused"):
            marks = [needs_fused] if backend == "fused" else []
            key = (info.name, case_id.split("-", 1)[1])
            cause = TRAJECTORY_NOT_BITWISE.get(key, TRAJECTORY_NOT_BITWISE.get((*key, backend)))
            if cause is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=cause))
            cases.append(pytest.param(info, cfg, backend, marks=marks))
            ids.append(f"{case_id}-{backend}")
    return cases, ids


#: (name, config id) -> why adamkit's trajectory is not yet torch's bit for bit. strict xfail:
#: the test fails when one of them starts to match, so this list cannot go stale.
_FMA = ("torch's CPU kernels for addcmul_, add_(alpha=) and lerp_ round once (fused multiply-"
        "add); the rule rounds the product and the sum apart: a one-ulp difference that "
        "Rosenbrock amplifies (needs an fma helper in engines.ops and the Numba ops)")
_FUSED = ("equal to torch on the reference engine (fma rules), not on the fused one: the fused "
          "kernel for this configuration differs from the reference rule (not yet found why)")
TRAJECTORY_NOT_BITWISE: dict[tuple, str] = {
    ('sgd', 'lr=0.1,momentum=0.9,nesterov=True,weight_decay=0.05,maximize=True'): _FMA,
    ('adam', 'default', 'fused'): _FUSED,
    ('radam', 'default', 'fused'): _FUSED,
    ('radam', 'weight_decay=0.1', 'fused'): _FUSED,
    ('radam', 'weight_decay=0.1,decoupled_weight_decay=True', 'fused'): _FUSED,
    ('adafactor', 'default'): _FMA,
    ('adafactor', 'weight_decay=0.1'): _FMA,
    ('adafactor', 'maximize=True,d=2.0,beta2_decay=-0.5'): _FMA,
    ('adafactor', 'eps=(1e-30, 0.01)'): _FMA,
}


TRAJECTORY_CASES, TRAJECTORY_IDS = _trajectory_cases()


@pytest.mark.parametrize("info,cfg,backend", TRAJECTORY_CASES, ids=TRAJECTORY_IDS)
def test_rosenbrock_1000_steps_equal_torch_bitwise(info, cfg, backend):
    cfg = {**cfg, "lr": ROSENBROCK_LR[info.name]}
    ours = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    opt = info.cls([ours], backend=backend, **cfg)
    oracle = info.torch_cls([theirs], **cfg)
    for step in range(1000):
        for p, o in ((ours, opt), (theirs, oracle)):
            o.zero_grad()
            _rosenbrock(p).backward()
            o.step()
        assert same(ours, theirs), (
            f"step {step + 1}: {ours.tolist()} != torch's {theirs.tolist()}")
    assert torch.isfinite(theirs).all()
