"""``adamkit landscape``: optimizer trajectories drawn over a 2-D function's contour plot.

Each optimizer gets its own learning rate: a log-spaced sweep (as in the bench: centred on the
optimizer's default, two decades, extended when the best value is on the edge) keeps the value with
the lowest final function value, and the panel shows the trajectory at that value.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import functions
from . import optimizers as optim_names
from .errors import UsageError


def trajectory(function: str, optimizer: str, lr: float, steps: int, hyperparameters: dict | None = None):
    """The points visited (start included) and the final function value, in float64."""
    spec = optim_names.resolve(optimizer)
    problem = functions.FUNCTIONS_2D[function]
    point = torch.nn.Parameter(torch.tensor(problem.start, dtype=torch.float64))
    passed = optim_names.effective_hyperparameters(spec, {**(hyperparameters or {}), "lr": lr})
    opt = optim_names.create(spec, [point], passed)
    path = [point.detach().clone()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = problem.fn(point)
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        path.append(point.detach().clone())
    final = float(problem.fn(point.detach()))
    return torch.stack(path).numpy(), (final if math.isfinite(final) else math.inf)


def best_lr(function: str, optimizer: str, steps: int, points: int = 5, max_extensions: int = 3,
            hyperparameters: dict | None = None) -> tuple[float, dict[float, float]]:
    """Sweep the learning rate; returns the best value and every (lr -> final value) tried."""
    spec = optim_names.resolve(optimizer)
    grid = optim_names.lr_grid(optim_names.default_lr(spec), points, 2.0)
    center = optim_names.default_lr(spec)
    scores = {lr: trajectory(function, optimizer, lr, steps, hyperparameters)[1] for lr in grid}
    extensions = 0
    while True:
        ordered = sorted(scores)
        index, beyond = optim_names.pick_best(ordered, [scores[lr] for lr in ordered], center)
        best = ordered[index]
        if not beyond or extensions >= max_extensions:
            return best, scores
        new = float(f"{(best / 10 ** 0.5 if index == 0 else best * 10 ** 0.5):.6g}")
        scores[new] = trajectory(function, optimizer, new, steps, hyperparameters)[1]
        extensions += 1


def run_landscape(function: str, optimizer_list: list[str], out: str, steps: int | None = None,
                  lr: float | None = None, sweep_points: int = 5, log=None) -> dict:
    """Draw one PNG with a panel per optimizer; returns {optimizer: {"lr", "final", "sweep"}}."""
    log = log or (lambda message: None)
    if function not in functions.FUNCTIONS_2D:
        raise UsageError(f"unknown function {function!r}; valid functions: {', '.join(functions.FUNCTIONS_2D)}")
    specs = [optim_names.resolve(name) for name in optimizer_list]
    if not specs:
        raise UsageError("--optimizers must name at least one optimizer")
    for spec in specs:
        if spec.base in optim_names.SPARSE_ONLY:
            raise UsageError(f"optimizer {spec.name!r} needs sparse gradients")
        optim_names.create(spec, [torch.zeros(2, requires_grad=True)],
                           optim_names.effective_hyperparameters(spec, {} if lr is None else {"lr": lr}))
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    from .workloads import WORKLOADS
    steps = steps or WORKLOADS[function].steps
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {out}")
    from .runner import check_writable_parent
    check_writable_parent(path)

    results = {}
    for spec in specs:
        if lr is None:
            chosen, sweep = best_lr(function, spec.name, steps, sweep_points)
        else:
            chosen, sweep = lr, {}
        points, final = trajectory(function, spec.name, chosen, steps)
        results[spec.name] = {"lr": chosen, "final": final, "sweep": sweep, "points": points}
        log(f"  {spec.name:10s} lr={chosen:<9.3g} final f={final:.4g}")
    _plot(function, results, steps, path)
    return results


def _plot(function: str, results: dict, steps: int, path: Path) -> None:
    from .report import _pyplot, _save
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    problem = functions.FUNCTIONS_2D[function]
    xs = np.linspace(*problem.xlim, 240)
    ys = np.linspace(*problem.ylim, 240)
    grid_x, grid_y = np.meshgrid(xs, ys)
    values = problem.fn(torch.from_numpy(np.stack([grid_x, grid_y]))).numpy()
    count = len(results)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.2 * rows), squeeze=False)
    shifted = values - values.min() + 1e-3
    levels = np.logspace(np.log10(shifted.min()), np.log10(shifted.max()), 30)
    for ax, (name, result) in zip(axes.flat, results.items()):
        ax.contourf(grid_x, grid_y, shifted, levels=levels, norm=LogNorm(), cmap="viridis", alpha=0.85)
        ax.contour(grid_x, grid_y, shifted, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.5)
        points = result["points"]
        ax.plot(points[:, 0], points[:, 1], color="orangered", linewidth=1.2)
        ax.plot(points[0, 0], points[0, 1], "o", color="white", markeredgecolor="black", markersize=6)
        ax.plot(points[-1, 0], points[-1, 1], "X", color="orangered", markeredgecolor="black", markersize=8)
        ax.plot(*problem.minimum, "*", color="gold", markeredgecolor="black", markersize=13)
        ax.set_xlim(problem.xlim)
        ax.set_ylim(problem.ylim)
        final = result["final"]
        ax.set_title(f"{name}  lr={result['lr']:.3g}\nf after {len(points) - 1} steps = "
                     + ("diverged" if not math.isfinite(final) else f"{final:.3g}"), fontsize=10)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(f"{function} from {problem.start}: best learning rate per optimizer, {steps} steps", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
