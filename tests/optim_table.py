"""The one table of optimizers under test (in the spirit of PyTorch's OptimizerInfo).

Each entry states what the optimizer is compared against and which flag combinations matter;
tests expand it over configurations. Capabilities (torch counterpart, complex and sparse
support) live here, not in scattered skips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import adamkit


@dataclass
class OptimInfo:
    name: str  # registry name
    cls: type
    torch_cls: type | None  # torch.optim counterpart, the external oracle where it exists
    configs: list[dict[str, Any]]  # flag combinations compared against the oracle
    second_group: dict[str, Any]  # overrides for a second param group
    complex_ok: bool = False
    sparse_grads: bool = False  # takes (only, for SparseAdam) sparse gradients
    # convergence: per function (quadratic, beale, rosenbrock) -> (hyperparameters, schedule)
    converge: dict[str, tuple[dict[str, Any], Callable | None]] = field(default_factory=dict)
    # where the generic front-end drivers cannot step it (2-D parameters only, a closure, a
    # train/eval switch): why, and the test file that covers it instead
    elsewhere: str | None = None

    def ids(self):
        return [f"{self.name}-{_cfg_id(c)}" for c in self.configs]


def _cfg_id(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def _cos(steps):
    return adamkit.schedules.cosine(steps)


def _warm(steps):
    return adamkit.schedules.warmup_cosine(300, steps)


def _const(steps):
    return adamkit.schedules.constant()


T = torch.optim

OPTIMIZERS: list[OptimInfo] = [
    OptimInfo(
        "sgd", adamkit.SGD, T.SGD,
        configs=[dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, nesterov=True),
                 dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.1),
                 dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True)],
        second_group=dict(lr=0.03, weight_decay=0.2), complex_ok=True, sparse_grads=True,
        converge={"quadratic": (dict(lr=5e-3, momentum=0.9), _cos),
                  "beale": (dict(lr=2e-3, momentum=0.9), _cos),
                  "rosenbrock": (dict(lr=2e-3, momentum=0.9), _cos)},
    ),
    OptimInfo(
        "adagrad", adamkit.Adagrad, T.Adagrad,
        configs=[dict(), dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
                 dict(maximize=True, eps=1e-6)],
        second_group=dict(lr=0.05, weight_decay=0.3), complex_ok=True, sparse_grads=True,
        converge={"quadratic": (dict(lr=0.5), _cos), "beale": (dict(lr=0.5), _cos),
                  "rosenbrock": (dict(lr=0.3), _const)},
    ),
    OptimInfo(
        "rmsprop", adamkit.RMSprop, T.RMSprop,
        configs=[dict(), dict(centered=True), dict(momentum=0.9, weight_decay=0.1),
                 dict(centered=True, momentum=0.5, maximize=True, alpha=0.9)],
        second_group=dict(lr=0.003, weight_decay=0.2), complex_ok=True,
        converge={"quadratic": (dict(lr=1e-2), _cos), "beale": (dict(lr=1e-2), _cos),
                  "rosenbrock": (dict(lr=3e-3), _cos)},
    ),
    OptimInfo(
        "adam", adamkit.Adam, T.Adam,
        configs=[dict(), dict(amsgrad=True), dict(weight_decay=0.1),
                 dict(weight_decay=0.1, decoupled_weight_decay=True),
                 dict(amsgrad=True, weight_decay=0.1, maximize=True, betas=(0.8, 0.99))],
        second_group=dict(lr=3e-4, weight_decay=0.2, eps=1e-6), complex_ok=True,
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=0.3), _cos)},
    ),
    OptimInfo(
        "adamw", adamkit.AdamW, T.AdamW,
        configs=[dict(), dict(amsgrad=True, weight_decay=0.1), dict(maximize=True)],
        second_group=dict(lr=3e-4, weight_decay=0.0), complex_ok=True,
        converge={"quadratic": (dict(lr=5e-2, weight_decay=0), _cos),
                  "beale": (dict(lr=5e-2, weight_decay=0), _cos),
                  "rosenbrock": (dict(lr=0.3, weight_decay=0), _cos)},
    ),
    OptimInfo(
        "nadam", adamkit.NAdam, T.NAdam,
        configs=[dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                 dict(momentum_decay=0.01, maximize=True)],
        second_group=dict(lr=1e-3, weight_decay=0.2), complex_ok=True,
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=3e-2), _cos)},
    ),
    OptimInfo(
        "radam", adamkit.RAdam, T.RAdam,
        configs=[dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                 dict(maximize=True, betas=(0.9, 0.99))],
        second_group=dict(lr=3e-4, weight_decay=0.2), complex_ok=True,
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=0.1), _warm)},
    ),
    OptimInfo(
        "adamax", adamkit.Adamax, T.Adamax,
        configs=[dict(), dict(weight_decay=0.1), dict(maximize=True, eps=1e-3)],
        second_group=dict(lr=1e-3, weight_decay=0.2), complex_ok=True,
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=0.3), _cos)},
    ),
    OptimInfo(
        "sparseadam", adamkit.SparseAdam, T.SparseAdam,
        configs=[dict(), dict(maximize=True, betas=(0.8, 0.99))],
        second_group=dict(lr=3e-4, eps=1e-6), sparse_grads=True,
    ),
    OptimInfo(
        "adafactor", adamkit.Adafactor, T.Adafactor,
        configs=[dict(), dict(weight_decay=0.1), dict(maximize=True, d=2.0, beta2_decay=-0.5),
                 dict(eps=(1e-30, 1e-2))],
        second_group=dict(lr=3e-3, weight_decay=0.2),
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=3e-2), _cos)},
    ),
    # Not in torch.optim: compared against float64 NumPy statements of ALGORITHMS.md in
    # test_numpy_oracles.py; here they take part in the behavioural tests.
    OptimInfo(
        "adabound", adamkit.AdaBound, None, configs=[dict(), dict(amsbound=True)],
        second_group=dict(lr=3e-4, final_lr=0.05),
        converge={"quadratic": (dict(lr=5e-2, final_lr=0.01), _cos),
                  "beale": (dict(lr=5e-2, final_lr=0.01), _cos),
                  "rosenbrock": (dict(lr=5e-2, final_lr=0.01), _cos)},
    ),
    OptimInfo(
        "adamod", adamkit.AdaMod, None, configs=[dict()], second_group=dict(lr=3e-4),
        converge={"quadratic": (dict(lr=5e-2, beta3=0.99), _cos),
                  "beale": (dict(lr=5e-2, beta3=0.99), _cos),
                  "rosenbrock": (dict(lr=0.3), _cos)},
    ),
    OptimInfo(
        "adabelief", adamkit.AdaBelief, None, configs=[dict(), dict(rectify=False, amsgrad=True)],
        second_group=dict(lr=3e-4, weight_decay=0.1),
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=0.1), _warm)},
    ),
    OptimInfo(
        "lion", adamkit.Lion, None, configs=[dict()], second_group=dict(lr=3e-5, weight_decay=0.1),
        converge={"quadratic": (dict(lr=3e-3), _cos), "beale": (dict(lr=3e-3), _cos),
                  "rosenbrock": (dict(lr=3e-3), _cos)},
    ),
    OptimInfo(
        "fadam", adamkit.FAdam, None, configs=[dict()], second_group=dict(lr=3e-4, weight_decay=0.0),
        converge={"quadratic": (dict(lr=5e-2, weight_decay=0), _cos),
                  "beale": (dict(lr=5e-2, weight_decay=0), _cos),
                  "rosenbrock": (dict(lr=0.1, weight_decay=0), _cos)},
    ),
    # ADOPT and the Cautious modifier: float64 NumPy oracles in test_new_optimizers.py
    OptimInfo(
        "adopt", adamkit.ADOPT, None,
        configs=[dict(), dict(weight_decay=0.1, decouple=True), dict(cautious=True)],
        second_group=dict(lr=3e-4, weight_decay=0.1),
        # the clip (t^0.25) bounds each step by about lr * t^0.25: the valley needs a large lr
        converge={"quadratic": (dict(lr=5e-2), _cos), "beale": (dict(lr=5e-2), _cos),
                  "rosenbrock": (dict(lr=0.3, betas=(0.9, 0.999)), _cos)},
    ),
    OptimInfo("muon", adamkit.Muon, T.Muon, configs=[], second_group={},
              elsewhere="2-D parameters only (AdamW groups for the rest): tests/test_muon.py"),
    OptimInfo("schedulefreeadamw", adamkit.ScheduleFreeAdamW, None, configs=[], second_group={},
              elsewhere="starts in eval mode (opt.train() first): tests/test_schedule_free.py"),
    OptimInfo("schedulefreesgd", adamkit.ScheduleFreeSGD, None, configs=[], second_group={},
              elsewhere="starts in eval mode (opt.train() first): tests/test_schedule_free.py"),
    OptimInfo("compositeadam", adamkit.CompositeAdam, None, configs=[], second_group={},
              elsewhere="needs a closure (a second gradient): tests/test_composite_adam.py"),
    OptimInfo("c-adam", adamkit.CompositeAdam, None, configs=[], second_group={},
              elsewhere="the registry's other name of compositeadam"),
]

BY_NAME = {info.name: info for info in OPTIMIZERS}
DENSE = [info for info in OPTIMIZERS if info.name != "sparseadam" and info.elsewhere is None]


def torch_cases():
    """(info, config) pairs compared against torch.optim."""
    cases, ids = [], []
    for info in OPTIMIZERS:
        if info.torch_cls is None or info.name == "sparseadam":
            continue
        for cfg in info.configs:
            cases.append((info, cfg))
            ids.append(f"{info.name}-{_cfg_id(cfg)}")
    return cases, ids


def assert_tensor_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str):
    """max|a - e| <= rtol * max|e| (relative to the tensor's scale, so elements that pass near
    zero do not turn one-ulp differences in operation order into large relative errors)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.detach(), expected.detach()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    a, e = a.double(), e.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    scale = e.nan_to_num().abs().max().item()
    err = (a - e).nan_to_num().abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x scale {scale:.3e}"
