"""Figures of ``adamkit results`` (matplotlib, Agg, written atomically by ``report._save``).

A run that diverged, or ended worse than where it started, is never plotted at its value: it is
marked on the top edge of the axes (``report.mark_above``), so one blown-up run cannot flatten
every other curve.
"""
from __future__ import annotations

import math
from pathlib import Path

from .report import _colors, _pyplot, _save, mark_above
from .results_claims import GOOD_RATIO


def _finish(fig, ax_list, path: Path) -> None:
    for ax in ax_list:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    _pyplot().close(fig)


def _union_colors(panels: dict) -> dict:
    """One color per name over all panels, so a name keeps its color from panel to panel."""
    return _colors(list(dict.fromkeys(name for curves in panels.values() for name in curves)))


def _panels(count: int, width: float = 4.6, height: float = 3.8, layout: str | None = None):
    plt = _pyplot()
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False, layout=layout)
    return fig, list(axes.flat)


def loss_vs_lr(panels: dict, caps: dict, path: Path, ylabel: str = "final held-out loss (seed 0)",
               title: str = "{workload}") -> None:
    """``panels[workload][name]`` = [(lr, loss)]; ``caps[workload]`` = the loss at initialisation: a point
    above it (or infinite) is marked at the top edge."""
    fig, axes = _panels(len(panels))
    colors = _union_colors(panels)
    for ax, (workload, curves) in zip(axes, panels.items()):
        cap = caps.get(workload, math.inf)
        for name, points in curves.items():
            points = sorted(points)
            lrs = [lr for lr, _ in points]
            shown = [loss if loss <= cap else math.nan for _, loss in points]
            ax.plot(lrs, shown, marker="o", markersize=3.5, linewidth=1.3, color=colors[name], label=name)
            mark_above(ax, [lr for lr, loss in points if not loss <= cap], colors[name])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(workload=workload), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("▲ on the top edge: diverged or ended above the initial loss", fontsize=9, y=1.02)
    _finish(fig, axes, path)


def target_curves(panels: dict, targets: dict, path: Path) -> None:
    """``panels[workload][name]`` = (metric, {step: mean value over seeds}); ``targets[workload]`` = (metric, value)."""
    fig, axes = _panels(len(panels))
    colors = _union_colors(panels)
    for ax, (workload, curves) in zip(axes, panels.items()):
        metric, value = targets[workload]
        for name, (_, points) in curves.items():
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], color=colors[name], label=name, linewidth=1.3)
        ax.axhline(value, color="black", linestyle=":", linewidth=1, label=f"target {metric} {value:g}")
        if metric in ("loss", "bits_per_char"):
            finite = [v for _, pts in curves.values() for v in pts.values() if math.isfinite(v)]
            if finite:
                start = max(finite[:1] + [value * 1.5])
                ax.set_ylim(min(finite) * 0.95, min(max(finite), start * 2))
        else:
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {metric} (mean over seeds)")
        ax.set_title(f"{workload}: tuned learning rates", fontsize=10)
        ax.legend(fontsize=7)
    _finish(fig, axes, path)


def heatmaps(maps: dict, lrs, wds, path: Path) -> None:
    """``maps[name][(lr, wd)]`` = mean final held-out loss; good cells (within 10 % of the best of all) outlined."""
    import numpy as np
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    fig, axes = _panels(len(maps), 5.2, 4.4, layout="constrained")
    finite = [v for m in maps.values() for v in m.values() if math.isfinite(v)]
    best = min(finite) if finite else 1.0
    top = sorted(finite)[int(0.75 * (len(finite) - 1))] * 2 if finite else 10.0
    norm = LogNorm(vmin=best, vmax=max(top, best * 1.01))
    image = None
    for ax, (name, values) in zip(axes, maps.items()):
        grid = np.array([[min(values[(lr, wd)], top) for lr in lrs] for wd in wds])
        image = ax.imshow(grid, origin="lower", cmap="viridis_r", norm=norm, aspect="auto")
        for i, wd in enumerate(wds):
            for j, lr in enumerate(lrs):
                value = values[(lr, wd)]
                good = value <= GOOD_RATIO * best
                text = "div" if not math.isfinite(value) else f"{value:.3g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if good else "white", fontweight="bold" if good else "normal")
                if good:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
        ax.set_yticks(range(len(wds)), [f"{wd:g}" for wd in wds], fontsize=8)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("weight decay")
        ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.85, label="final held-out loss (clipped)")
    fig.suptitle("red outline: within 10 % of the best loss of both maps", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def reddi_curves(curves: dict, path: Path) -> None:
    """``curves[name]`` = [(step, x over the last period)]."""
    fig, axes = _panels(1, 7, 3.8)
    ax = axes[0]
    colors = _colors(list(curves))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [x for _, x in points], color=colors[name], label=name, linewidth=1.5)
    ax.axhline(-1.0, color="black", linestyle=":", linewidth=1, label="optimum x = -1")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("x, mean over the last 101 steps")
    ax.set_title("Reddi et al.'s online problem", fontsize=10)
    ax.legend(fontsize=8)
    _finish(fig, axes, path)


def step_sizes(traces: dict, bounds: list, path: Path) -> None:
    """``traces[name]`` = [{"step", "p10", "median", "p90"}]; ``bounds`` = [(step, lower, upper)] of AdaBound."""
    fig, axes = _panels(1, 7.5, 4.2)
    ax = axes[0]
    colors = _colors(list(traces))
    styles = ["-", "--", "-.", ":"]
    for i, (name, trace) in enumerate(traces.items()):
        steps = [e["step"] for e in trace]
        ax.plot(steps, [e["median"] for e in trace], color=colors[name], linestyle=styles[i % len(styles)],
                linewidth=1.8, label=f"{name} (median, band p10-p90)")
        ax.fill_between(steps, [e["p10"] for e in trace], [e["p90"] for e in trace], color=colors[name], alpha=0.2)
    ax.plot([b[0] for b in bounds], [b[1] for b in bounds], "k--", linewidth=1, label="AdaBound's lower / upper bound")
    ax.plot([b[0] for b in bounds], [b[2] for b in bounds], "k--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    values = [v for t in traces.values() for e in t for v in (e["p10"], e["p90"]) if v > 0]
    if values:
        ax.set_ylim(min(values) / 2, max(values) * 2)
    ax.set_xlabel("step")
    ax.set_ylabel("effective step size |Δθ| / |m|")
    ax.set_title("effective per-element step size over training", fontsize=10)
    ax.legend(fontsize=8)
    _finish(fig, axes, path)


def bars(groups: dict, path: Path, ylabel: str, title: str, log: bool = False) -> None:
    """``groups[group][name]`` = (mean, std); infinite means are marked at the top edge."""
    import numpy as np
    fig, axes = _panels(1, min(14.0, max(6.0, 0.3 * sum(len(v) for v in groups.values()))), 4.0)
    ax = axes[0]
    names = sorted({n for g in groups.values() for n in g}, key=lambda n: list(
        dict.fromkeys(n2 for g in groups.values() for n2 in g)).index(n))
    colors = _colors(names)
    width = 0.8 / max(1, len(names))
    finite = [m for g in groups.values() for m, _ in g.values() if math.isfinite(m)]
    for i, name in enumerate(names):
        xs, means, stds, failed = [], [], [], []
        for j, group in enumerate(groups):
            if name not in groups[group]:
                continue
            mean, std = groups[group][name]
            x = j - 0.4 + width * (i + 0.5)
            if math.isfinite(mean):
                xs.append(x)
                means.append(mean)
                stds.append(0.0 if not math.isfinite(std) else std)
            else:
                failed.append(x)
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=colors[name], label=name)
        mark_above(ax, failed, colors[name])
    ax.set_xticks(np.arange(len(groups)), list(groups), fontsize=8, rotation=30 if len(groups) > 6 else 0)
    if log and finite and min(finite) > 0:
        ax.set_yscale("log")
    elif finite:
        ax.set_ylim(min(0.0, min(finite)), max(finite) * 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    _finish(fig, axes, path)
