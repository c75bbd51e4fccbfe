"""Schedule-Free AdamW and SGD against the reference package (``schedulefree`` 1.4.1, its
non-foreach path) in float64: >= 20 steps, several shapes (a zero-size and a non-contiguous one
among them), two param groups, every hyperparameter, the train point y after every step and the
eval point x, warm-up, state and param-group keys, and the eval-mode error."""

from __future__ import annotations

import copy

import pytest
import torch

import adamkit

schedulefree = pytest.importorskip("schedulefree")

STEPS = 24
RTOL = 1e-12  # FMA vs separate multiply-add in torch's CPU kernels: a few ulps over 24 steps
BACKENDS = ["reference", "auto"]

PAIRS = {
    "adamw": (adamkit.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree),
    "sgd": (adamkit.ScheduleFreeSGD, schedulefree.SGDScheduleFree),
}
CONFIGS = {
    "adamw": [dict(), dict(weight_decay=0.1), dict(warmup_steps=10), dict(r=1.0),
              dict(weight_lr_power=0.0, betas=(0.8, 0.99), eps=1e-3),
              dict(warmup_steps=7, r=0.5, weight_lr_power=1.0, weight_decay=0.05,
                   betas=(0.95, 0.9))],
    "sgd": [dict(), dict(weight_decay=0.1), dict(warmup_steps=10), dict(r=1.0),
            dict(weight_lr_power=0.0, momentum=0.5),
            dict(warmup_steps=7, r=0.5, weight_lr_power=1.0, weight_decay=0.05, momentum=0.95)],
}
LR = {"adamw": 0.02, "sgd": 0.05}
SECOND = {"adamw": dict(lr=0.005, weight_decay=0.2, betas=(0.85, 0.995)),
          "sgd": dict(lr=0.01, weight_decay=0.2, momentum=0.8)}
CASES = [pytest.param(kind, cfg, backend, id=f"{kind}-{i}-{backend}")
         for kind in PAIRS for i, cfg in enumerate(CONFIGS[kind]) for backend in BACKENDS]


def _params():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    transposed = rnd(9, 6).t()
    assert not transposed.is_contiguous()
    return [[rnd(33, 17), rnd(1), rnd(0)], [rnd(5, 3, 4), transposed, rnd(2, 1)]]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    # the last parameter's gradients are tiny: eps and the second moment's scale matter there
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) * (1e-4 if i == 5 else 1.0)
            for i, p in enumerate(params)]


def _pair(kind, cfg, backend):
    ours, theirs = PAIRS[kind]
    groups = _params()
    twins = [[p.clone() for p in group] for group in groups]
    hyper = dict(cfg, lr=LR[kind])
    opt = ours([{"params": groups[0]}, {"params": groups[1], **SECOND[kind]}], backend=backend,
               **hyper)
    ref = theirs([{"params": twins[0]}, {"params": twins[1], **SECOND[kind]}], foreach=False,
                 **hyper)
    return opt, ref, [p for g in groups for p in g], [p for g in twins for p in g]


def _close(a: torch.Tensor, e: torch.Tensor, what: str):
    assert a.shape == e.shape and a.dtype == e.dtype, what
    if e.numel() == 0:
        return
    scale = float(e.abs().max())
    err = float((a - e).abs().max())
    assert err <= RTOL * max(scale, 1e-300), f"{what}: max error {err:g} (scale {scale:g})"


def _compare(opt, ref, params, twins, what):
    for i, (p, q) in enumerate(zip(params, twins)):
        _close(p.detach(), q.detach(), f"{what} param {i} {tuple(p.shape)}")
        for key, value in ref.state[q].items():
            _close(opt.state[p][key], value, f"{what} state {key!r} of param {i}")
        assert set(opt.state[p]) == set(ref.state[q]), (what, set(opt.state[p]))
    for ga, gb in zip(opt.param_groups, ref.param_groups):
        for key in ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"):
            assert ga[key] == pytest.approx(gb[key], rel=1e-15), (what, key)


def _step(opt, ref, params, twins, step):
    for p, q, g in zip(params, twins, _grads(params, step)):
        p.grad = g.clone()
        q.grad = g.clone()
    opt.step()
    ref.step()


@pytest.mark.parametrize("kind,cfg,backend", CASES)
def test_matches_schedulefree(kind, cfg, backend):
    opt, ref, params, twins = _pair(kind, cfg, backend)
    opt.train()
    ref.train()
    for step in range(STEPS):
        _step(opt, ref, params, twins, step)
        _compare(opt, ref, params, twins, f"step {step + 1} (y)")
        if step % 8 == 7:  # the averaged point x, then back to y and on
            opt.eval()
            ref.eval()
            _compare(opt, ref, params, twins, f"step {step + 1} (x, eval)")
            opt.train()
            ref.train()
            _compare(opt, ref, params, twins, f"step {step + 1} (y, train again)")
    if backend == "auto":
        assert "fused" in opt.engines_used  # the rule ran on the fused engine where it can


@pytest.mark.parametrize("kind", PAIRS)
def test_warmup_and_weights_follow_the_reference(kind):
    # the warmed-up lr and the weight c_{t+1} are what move y: check the group counters directly
    opt, ref, params, twins = _pair(kind, dict(warmup_steps=5, r=1.0, weight_lr_power=1.0),
                                    "reference")
    opt.train()
    ref.train()
    lrs = []
    for step in range(8):
        _step(opt, ref, params, twins, step)
        lrs.append(opt.param_groups[0]["scheduled_lr"])
        _compare(opt, ref, params, twins, f"step {step + 1}")
    lr = LR[kind]
    assert lrs == pytest.approx([lr * t / 5 for t in range(1, 6)] + [lr] * 3, rel=1e-15)


@pytest.mark.parametrize("kind", PAIRS)
def test_step_in_eval_mode_is_an_error_and_changes_nothing(kind):
    opt, _, params, _ = _pair(kind, {}, "reference")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()  # a new optimizer is in eval mode, as the reference's
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert opt.param_groups[0]["k"] == 0 and not opt.state
    opt.train()
    opt.step()
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    assert opt.param_groups[0]["k"] == 1


@pytest.mark.parametrize("kind", PAIRS)
def test_state_dict_carries_over_both_ways(kind):
    opt, ref, params, twins = _pair(kind, dict(weight_decay=0.1, warmup_steps=3), "auto")
    opt.train()
    ref.train()
    for step in range(6):
        _step(opt, ref, params, twins, step)
    opt.eval()
    ref.eval()  # checkpoints are taken in eval mode, as the reference recommends
    ours, theirs = PAIRS[kind]
    # the reference's checkpoint loads into adamkit's optimizer and the other way round
    mine = copy.deepcopy(ref.state_dict())
    loaded = ours([{"params": [p.clone() for p in params[:3]]},
                   {"params": [p.clone() for p in params[3:]], **SECOND[kind]}], lr=LR[kind])
    loaded.load_state_dict(mine)
    back = theirs([{"params": [q.clone() for q in twins[:3]]},
                   {"params": [q.clone() for q in twins[3:]], **SECOND[kind]}], lr=LR[kind],
                  foreach=False)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in back.param_groups:  # adamkit's groups have no ``foreach`` (its engine is
        group["foreach"] = False      # ``backend``); torch's load drops keys the saved lacks
    a_params = [p for g in loaded.param_groups for p in g["params"]]
    b_params = [p for g in back.param_groups for p in g["params"]]
    for opt_x in (loaded, back):
        opt_x.train()
    for step in range(6, 12):
        _step(loaded, back, a_params, b_params, step)
        _compare(loaded, back, a_params, b_params, f"after loading, step {step + 1}")


@pytest.mark.parametrize("kind", PAIRS)
def test_maximize_is_descent_on_the_negated_gradient(kind):
    ours, _ = PAIRS[kind]
    a = [torch.randn(4, 3, dtype=torch.float64)]
    b = [a[0].clone()]
    oa = ours(a, lr=0.1, maximize=True, weight_decay=0.1)
    ob = ours(b, lr=0.1, weight_decay=0.1)
    oa.train()
    ob.train()
    for step in range(5):
        g = torch.randn(4, 3, dtype=torch.float64)
        a[0].grad, b[0].grad = g.clone(), -g
        oa.step()
        ob.step()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", PAIRS)
def test_defaults_and_docstring(kind):
    import inspect

    ours, theirs = PAIRS[kind]
    mine = {k: p.default for k, p in inspect.signature(ours).parameters.items()}
    ref = {k: p.default for k, p in inspect.signature(theirs).parameters.items()
           if k not in ("params", "foreach")}
    assert {k: mine[k] for k in ref} == ref
    assert "No schedule is needed" in ours.__doc__
    assert kind.replace("adamw", "schedulefreeadamw").replace("sgd", "schedulefreesgd") \
        in adamkit.available()
