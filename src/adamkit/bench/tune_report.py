"""What ``adamkit tune`` reports: the terminal table, ``DIR/report.md``, ``DIR/report.html`` and figures.

Everything is read back from the Optuna studies, so a rerun that adds no trial reports the same.
Figures (matplotlib, Agg backend) in ``DIR/figures/``:
  tune-best-so-far.png    best value so far against trial number, every optimizer on one plot
  tune-lr-slice.png       the objective of each complete trial against its learning rate
  tune-importance.png     Optuna's parameter importances (fANOVA), one panel per optimizer
  tune-contour-<opt>.png  learning rate x weight decay, for the decoupled-decay optimizers
"""
from __future__ import annotations

import html
import math
import time
from pathlib import Path

from . import optimizers as optim_names

FIGURES = "figures"


def _complete(study):
    from optuna.trial import TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]


def summarize(studies, prepared) -> list[dict]:
    """One row per optimizer: best trial, counts, trial time."""
    from .tune import counts
    rows = []
    for study, plan in zip(studies, prepared.plans):
        state = counts(study)
        seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)
                      if t.datetime_complete is not None and t.datetime_start is not None)
        best = None
        if _complete(study):
            trial = study.best_trial
            best = {"number": trial.number, "value": trial.value, "params": dict(trial.params),
                    "hyperparameters": trial.user_attrs.get("hyperparameters", {}),
                    "schedule_args": trial.user_attrs.get("schedule_args", {}),
                    "final": trial.user_attrs.get("final", {})}
        rows.append({"optimizer": plan.spec.name, "study": study.study_name, "best": best, "seconds": seconds,
                     "decoupled": optim_names.decoupled_decay(plan.spec, plan.fixed), **state})
    return rows


def _value(value) -> str:
    return "—" if value is None else f"{value:.5g}"


def best_settings(row: dict) -> str:
    """The best trial's searched values, as constructor (and schedule) arguments."""
    if row["best"] is None:
        return "—"
    hp = row["best"]["hyperparameters"]
    names = {k for k in row["best"]["params"]}
    shown = []
    for key, value in hp.items():
        searched = key in names or f"one_minus_{key}" in names or (key == "betas" and any("beta" in n for n in names)) \
            or f"{key}_on" in names
        if not searched:
            continue
        if isinstance(value, list):
            shown.append(f"{key}=(" + ", ".join(f"{v:.4g}" for v in value) + ")")
        elif isinstance(value, float):
            shown.append(f"{key}={value:.3g}")
        else:
            shown.append(f"{key}={value}")
    for key, value in row["best"]["schedule_args"].items():
        if f"schedule.{key}" in names:
            shown.append(f"schedule.{key}={value:.3g}" if isinstance(value, float) else f"schedule.{key}={value}")
    return ", ".join(shown)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["optimizer", "best", "best hyperparameters", "complete / pruned / failed", "trial time"]
    body = [[row["optimizer"], _value(row["best"]["value"] if row["best"] else None), best_settings(row),
             f"{row['complete']} / {row['pruned']} / {row['failed']}", f"{row['seconds']:.1f} s"] for row in rows]
    return header, body


def format_table(rows: list[dict], metric: str) -> str:
    header, body = table_rows(rows)
    header[1] = f"best {metric}"
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    import os
    import tempfile
    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="matplotlib")  # overflow of huge losses
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(temporary, dpi=110, bbox_inches="tight")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def plot_best_so_far(studies, rows, metric: str, maximize: bool, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values_all = []
    for study, row in zip(studies, rows):
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        xs, ys, best = [], [], None
        for trial in trials:
            if trial.value is not None and trial.state.name == "COMPLETE":
                best = trial.value if best is None else (max if maximize else min)(best, trial.value)
            if best is not None:
                xs.append(trial.number + 1)
                ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", label=row["optimizer"], linewidth=1.6)
            values_all += ys
    if values_all and min(values_all) > 0 and max(values_all) / min(values_all) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best held-out {metric} so far")
    ax.set_title("How quickly each optimizer becomes good under the same tuning budget")
    ax.grid(True, alpha=0.3)
    if values_all:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_lr_slice(studies, rows, metric: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values_all = []
    for study, row in zip(studies, rows):
        points = [(t.params["lr"], t.value) for t in _complete(study) if "lr" in t.params]
        if points:
            ax.scatter(*zip(*points), label=row["optimizer"], s=22, alpha=0.8)
            values_all += [v for _, v in points]
    ax.set_xscale("log")
    if values_all and min(values_all) > 0 and max(values_all) / min(values_all) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"held-out {metric} at the end")
    ax.set_title("Learning-rate slice: every complete trial")
    ax.grid(True, alpha=0.3)
    if values_all:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def importances(study) -> dict[str, float]:
    """Optuna's fANOVA importances (fixed seed); {} with fewer than two complete trials or one value."""
    import optuna
    complete = _complete(study)
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    # On a log scale when every value is positive: a loss that spans 300 decades would swamp fANOVA's variances.
    positive = all(t.value > 0 for t in complete)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(
            study, evaluator=evaluator, target=(lambda t: math.log10(t.value)) if positive else None)
    except (RuntimeError, ValueError):  # e.g. no parameter common to the complete trials
        return {}
    return {k: v for k, v in values.items() if math.isfinite(v)}


def plot_importances(studies, rows, path: Path) -> dict[str, dict[str, float]]:
    plt = _pyplot()
    found = {row["optimizer"]: importances(study) for study, row in zip(studies, rows)}
    panels = max(1, len(found))
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], found.items()):
        if values:
            keys = list(values)[::-1]
            ax.barh(keys, [values[k] for k in keys], color="tab:blue")
            ax.set_xlim(0, 1)
        else:
            ax.text(0.5, 0.5, "too few complete trials", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("importance (fANOVA)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return found


def plot_contour(study, row, metric: str, path: Path) -> bool:
    """lr x weight decay of the complete trials with weight decay > 0: points coloured by the objective
    and, with enough of them, a filled contour of the interpolated objective in log-log coordinates."""
    import numpy as np
    points = [(t.params["lr"], t.params["weight_decay"], t.value) for t in _complete(study)
              if "lr" in t.params and t.params.get("weight_decay", 0) > 0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    if points:
        lr, wd, value = (np.array(v, dtype=float) for v in zip(*points))
        finite = np.isfinite(value)
        lr, wd, value = lr[finite], wd[finite], value[finite]
        color = np.log10(value) if len(value) and value.min() > 0 else value
        label = f"log10 {metric}" if len(value) and value.min() > 0 else metric
        contoured = False
        if len(value) >= 4:
            try:
                import matplotlib.tri as mtri
                triangulation = mtri.Triangulation(np.log10(lr), np.log10(wd))
                filled = ax.tricontourf(triangulation, color, levels=12, cmap="viridis", alpha=0.6)
                fig.colorbar(filled, ax=ax, label=label)
                contoured = True
            except (RuntimeError, ValueError):  # collinear points: no triangulation, the points alone
                pass
        dots = ax.scatter(np.log10(lr), np.log10(wd), c=color, cmap="viridis", edgecolors="black", s=30)
        if not contoured:
            fig.colorbar(dots, ax=ax, label=label)
    else:
        ax.text(0.5, 0.5, "no complete trial with weight decay > 0", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("log10 weight decay")
    ax.set_title(f"{row['optimizer']}: learning rate x weight decay")
    _save(fig, path)
    plt.close(fig)
    return bool(points)


# --------------------------------------------------------------------------------------------
# report.md and report.html
# --------------------------------------------------------------------------------------------

def write(studies, prepared, rows: list[dict], rerun: dict | None = None) -> dict:
    """Write DIR/report.md, DIR/report.html and DIR/figures/tune-*.png; returns their paths."""
    from .runner import write_text_atomic
    from .tune import direction
    config = prepared.config
    out = Path(config.out).expanduser()
    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    metric = config.metric
    maximize = direction(metric) == "maximize"
    written = []
    path = figures / "tune-best-so-far.png"
    plot_best_so_far(studies, rows, metric, maximize, path)
    written.append((path, "best value so far against trial number"))
    path = figures / "tune-lr-slice.png"
    plot_lr_slice(studies, rows, metric, path)
    written.append((path, "learning-rate slice"))
    path = figures / "tune-importance.png"
    found = plot_importances(studies, rows, path)
    written.append((path, "parameter importances"))
    for study, row in zip(studies, rows):
        if row["decoupled"] and any(p.name == "weight_decay" for p in _plan(prepared, row).params):
            path = figures / f"tune-contour-{row['optimizer']}.png"
            plot_contour(study, row, metric, path)
            written.append((path, f"{row['optimizer']}: learning rate x weight decay"))

    blocks = [("h1", f"adamkit tune: {prepared.workload.name}"),
              ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')}. One Optuna study per optimizer "
                    f"(`{prepared.workload.name}:OPTIMIZER`), {config.trials} finished trials each, "
                    f"{config.sampler} sampler, {config.pruner} pruner, objective: held-out `{metric}` after "
                    f"{prepared.steps} steps ({'higher' if maximize else 'lower'} is better); training seed "
                    f"{config.train_seed}."),
              ("table", table_rows(rows)),
              ("h2", "Search spaces")]
    for plan in prepared.plans:
        space = "; ".join(p.describe() for p in plan.params + plan.schedule_params)
        fixed = ", ".join(f"{k}={v}" for k, v in plan.fixed.items())
        blocks.append(("p", f"{plan.spec.name}: {space}" + (f"; fixed {fixed}" if fixed else "")))
    blocks.append(("h2", "Figures"))
    for path, caption in written:
        blocks.append(("img", (path.relative_to(out).as_posix(), caption)))
    important = [f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()) for name, values in found.items()
                 if values]
    if important:
        blocks.append(("h2", "Parameter importances"))
        blocks += [("p", line) for line in important]
    if rerun is not None:
        blocks.append(("h2", "Best configurations rerun"))
        text = (f"Each optimizer's best configuration trained with {config.rerun_best} seed(s) at the full budget: "
                f"records in `rerun-best/results.jsonl`, report in `rerun-best/report.md`.")
        if rerun.get("report"):
            text += "\n\n```\n" + rerun["report"]["leaderboard"] + "\n```"
        blocks.append(("p", text))

    markdown = []
    for kind, content in blocks:
        if kind == "h1":
            markdown.append(f"# {content}")
        elif kind == "h2":
            markdown.append(f"## {content}")
        elif kind == "p":
            markdown.append(content)
        elif kind == "table":
            header, body = content
            markdown.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                      + ["| " + " | ".join(r) + " |" for r in body]))
        elif kind == "img":
            markdown.append(f"![{content[1]}]({content[0]})")
    write_text_atomic("\n\n".join(markdown) + "\n", out / "report.md")

    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            if content.count("```") >= 2:
                before, code, after = content.split("```", 2)
                body.append(f"<p>{html.escape(before)}</p><pre>{html.escape(code.strip())}</pre>")
            else:
                body.append(f"<p>{html.escape(content).replace('`', '')}</p>")
        elif kind == "table":
            header, rows_ = content
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows_)
                        + "</table>")
        elif kind == "img":
            body.append(f'<img src="{html.escape(content[0])}" alt="{html.escape(content[1])}">')
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")
    write_text_atomic("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>adamkit tune</title>"
                      f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n",
                      out / "report.html")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
            "figures": [str(p) for p, _ in written]}


def _plan(prepared, row):
    return next(plan for plan in prepared.plans if plan.spec.name == row["optimizer"])

