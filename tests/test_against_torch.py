"""adamkit against torch.optim, the external oracle for every algorithm torch also has.

float64, 20+ steps, several shapes (a zero-size and a non-contiguous one among them), two param
groups with different hyperparameters, every flag of the table; parameters and every state
tensor compared after each step to 1e-12 relative.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import adamkit
from optim_table import BY_NAME, OPTIMIZERS, assert_tensor_close, torch_cases

CASES, CASE_IDS = torch_cases()
RTOL = 1e-12


def make_params(seed: int, dtype=torch.float64, complex_=False, for_adafactor=False):
    gen = torch.Generator().manual_seed(seed)
    if complex_:
        shapes = [(4, 3), (5,)]
        return [torch.randn(*s, dtype=torch.complex128, generator=gen) for s in shapes]
    shapes = [(5, 3), (7,), (1,), (2, 3, 4)]
    if not for_adafactor:  # torch's Adafactor divides by numel() and fails on zero-size params
        shapes.append((0, 4))
    params = [torch.randn(*s, dtype=dtype, generator=gen) for s in shapes]
    params.append(torch.randn(6, 4, dtype=dtype, generator=gen).t())  # non-contiguous
    assert not params[-1].is_contiguous()
    return params


def grads_for(params, gen):
    out = []
    for p in params:
        g = torch.randn(p.shape, dtype=p.dtype, generator=gen) * 3
        if not p.is_contiguous():
            g = torch.randn(tuple(reversed(p.shape)), dtype=p.dtype, generator=gen).t()
        out.append(g)
    return out


def build_pair(info, cfg, params):
    """The same two-group setup for adamkit and torch."""
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    half = len(params) // 2
    groups_a = [{"params": a[:half]}, {"params": a[half:], **info.second_group}]
    groups_b = [{"params": b[:half]}, {"params": b[half:], **info.second_group}]
    return a, b, info.cls(groups_a, **cfg), info.torch_cls(groups_b, **cfg)


def compare(opt_a, opt_b, a, b, where):
    for i, (x, y) in enumerate(zip(a, b)):
        assert_tensor_close(x, y, RTOL, f"{where} param {i}")
        state_a, state_b = opt_a.state[x], opt_b.state[y]
        assert set(state_a) == set(state_b), f"{where} param {i}: state keys {set(state_a)} != {set(state_b)}"
        for key, value in state_b.items():
            if torch.is_tensor(value):
                assert_tensor_close(state_a[key], value, RTOL, f"{where} param {i} state {key!r}")
            else:
                assert state_a[key] == value, f"{where} param {i} state {key!r}"


@pytest.mark.parametrize("info,cfg", CASES, ids=CASE_IDS)
def test_matches_torch(info, cfg):
    params = make_params(0, for_adafactor=info.name == "adafactor")
    a, b, opt_a, opt_b = build_pair(info, cfg, params)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        for x, y, g in zip(a, b, grads_for(params, gen)):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        compare(opt_a, opt_b, a, b, f"step {step + 1}")


@pytest.mark.parametrize("info,cfg", [c for c in CASES if c[0].complex_ok],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0].complex_ok])
def test_complex_matches_torch(info, cfg):
    params = make_params(2, complex_=True)
    a, b, opt_a, opt_b = build_pair(info, cfg, params)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, dtype=x.dtype, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        compare(opt_a, opt_b, a, b, f"step {step + 1}")


@pytest.mark.parametrize("name", ["adafactor"])
def test_adafactor_zero_size_param_is_left_alone(name):
    # torch's Adafactor raises ZeroDivisionError here; adamkit advances the step and changes nothing.
    p = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    opt = adamkit.Adafactor([p])
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[p]["step"].item() == 1
    assert opt.state[p]["row_var"].shape == (0, 1) and opt.state[p]["col_var"].shape == (1, 4)


def _embedding_pair(cls_a, cls_b, cfg):
    torch.manual_seed(0)
    emb_a = torch.nn.Embedding(20, 3, sparse=True).double()
    emb_b = copy.deepcopy(emb_a)
    return emb_a, emb_b, cls_a(emb_a.parameters(), **cfg), cls_b(emb_b.parameters(), **cfg)


@pytest.mark.parametrize("name,cfg", [("sparseadam", {}), ("sparseadam", dict(maximize=True, lr=0.01)),
                                      ("adagrad", {}), ("adagrad", dict(lr_decay=0.1)),
                                      ("sgd", dict(lr=0.1))])
def test_sparse_embedding_matches_torch(name, cfg):
    info = BY_NAME[name]
    emb_a, emb_b, opt_a, opt_b = _embedding_pair(info.cls, info.torch_cls, cfg)
    gen = torch.Generator().manual_seed(4)
    untouched = torch.arange(15, 20)  # never looked up: must not change (lazy update)
    before = emb_a.weight.detach()[untouched].clone()
    for step in range(25):
        # repeated indices: their gradient rows are summed by coalesce()
        idx = torch.randint(0, 15, (8,), generator=gen)
        idx[1] = idx[0]
        for emb, opt in ((emb_a, opt_a), (emb_b, opt_b)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        compare(opt_a, opt_b, [emb_a.weight], [emb_b.weight], f"step {step + 1}")
    assert torch.equal(emb_a.weight.detach()[untouched], before)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.torch_cls is not None and i.name != "sparseadam"
                                  and i.elsewhere is None],
                         ids=lambda i: i.name)
def test_checkpoints_move_both_ways(info):
    """A torch.optim checkpoint loads into adamkit and training continues as torch would; and back."""
    cfg = info.configs[-1]
    params = make_params(5, for_adafactor=info.name == "adafactor")
    gen = torch.Generator().manual_seed(6)
    grads = [grads_for(params, gen) for _ in range(10)]

    def run(opt, ps, steps):
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()

    for first, second in ((info.torch_cls, info.cls), (info.cls, info.torch_cls)):
        ps_ref = [p.clone().requires_grad_() for p in params]
        opt_ref = first(ps_ref, **cfg)
        run(opt_ref, ps_ref, grads[:5])
        buffer = io.BytesIO()
        torch.save(opt_ref.state_dict(), buffer)
        ps_new = [p.detach().clone().requires_grad_() for p in ps_ref]
        opt_new = second(ps_new, **cfg)
        buffer.seek(0)
        opt_new.load_state_dict(torch.load(buffer, weights_only=True))
        run(opt_ref, ps_ref, grads[5:])
        run(opt_new, ps_new, grads[5:])
        for x, y in zip(ps_new, ps_ref):
            assert_tensor_close(x, y, RTOL, f"{first.__module__}.{first.__name__} -> {second.__name__}")
        if second is info.cls:
            assert set(opt_new.state_dict()["state"][0]) == set(opt_ref.state_dict()["state"][0])
