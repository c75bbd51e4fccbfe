"""C-Adam (ALGORITHMS.md, "C-Adam"): the exact reduction to Adam when the predicted gradient
equals the current one (bitwise against adamkit.Adam and torch.optim.Adam), convergence on a
quadratic and on Rosenbrock, the composite against a float64 statement of the formulas, and the
missing-closure error."""

from __future__ import annotations

import pytest
import torch

import adamkit

BACKENDS = ["reference", "auto"]


def _params():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = rnd(9, 6).t()
    assert not t.is_contiguous()
    return [[rnd(33, 17), rnd(1), rnd(0)], [rnd(5, 3, 4), t, rnd(2, 1)]]


def _fixed_grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(), dict(weight_decay=0.1), dict(maximize=True),
                                 dict(betas=(0.8, 0.99), eps=1e-3)], ids=str)
def test_reduces_to_adam_bitwise_when_the_closure_returns_the_same_gradient(cfg, backend):
    runs = {}
    for name, cls in (("c", adamkit.CompositeAdam), ("adamkit", adamkit.Adam),
                      ("torch", torch.optim.Adam)):
        groups = _params()
        params = [p for grp in groups for p in grp]
        kw = {} if cls is torch.optim.Adam else dict(backend=backend)
        opt = cls([{"params": groups[0]}, {"params": groups[1], "lr": 0.003}], lr=0.01,
                  **cfg, **kw)
        for step in range(20):
            grads = _fixed_grads(step, params)

            def closure():  # the same gradient wherever it is evaluated
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                return 0.0
            if cls is adamkit.CompositeAdam:
                opt.step(closure)
            else:
                closure()
                opt.step()
        runs[name] = params
    for a, b, c in zip(runs["c"], runs["adamkit"], runs["torch"]):
        assert torch.equal(a, b)
        if backend == "reference" or a.is_contiguous():
            assert torch.equal(a, c) or torch.allclose(a, c, rtol=1e-13, atol=0)


def test_composite_gradient_follows_the_formulas():
    # f(x) = sum(a x^2 / 2): g = a x, u = a (x - lr g); a float64 statement of ALGORITHMS.md
    a = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    opt = adamkit.CompositeAdam([x], lr=lr, betas=(b1, b2), eps=eps)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (a * x * x / 2).sum()
        loss.backward()
        calls.append(x.detach().clone())
        return loss
    xs, m, v = x.detach().clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 21):
        opt.step(closure)
        g = a * xs
        u = a * (xs - lr * g)
        m = b1 * m + (1 - b1) * 0.5 * (g + u)
        v = b2 * v + (1 - b2) * g * g
        xs = xs - lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
        torch.testing.assert_close(x.detach(), xs, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(calls[-1], calls[-2] - lr * a * calls[-2])  # the look-ahead
    assert len(calls) == 40


@pytest.mark.parametrize("function,lr,steps,tol", [("quadratic", 0.05, 500, 1e-4),
                                                    ("rosenbrock", 5e-3, 5000, 0.05)])
def test_converges(function, lr, steps, tol):
    x = torch.tensor([-1.2, 1.0] if function == "rosenbrock" else [3.0, -2.0],
                     dtype=torch.float64, requires_grad=True)

    def f():
        if function == "rosenbrock":
            return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        return 0.5 * (x[0] ** 2 + 10 * x[1] ** 2)
    opt = adamkit.CompositeAdam([x], lr=lr)

    def closure():
        opt.zero_grad()
        loss = f()
        loss.backward()
        return loss
    start = float(f().detach())
    for _ in range(steps):
        opt.step(closure)
    assert float(f().detach()) < tol * start, float(f().detach())


def test_step_without_closure_is_a_clear_error_and_changes_nothing():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x.grad = torch.ones(4, dtype=torch.float64)
    opt = adamkit.CompositeAdam([x])
    before = x.detach().clone()
    with pytest.raises(TypeError, match=r"needs a closure.*step\(closure\)"):
        opt.step()
    assert torch.equal(x.detach(), before) and not opt.state


def test_registered_under_both_names():
    assert adamkit.create("c-adam", [torch.zeros(1)]).__class__ is adamkit.CompositeAdam
    assert {"compositeadam", "c-adam"} <= set(adamkit.available())
