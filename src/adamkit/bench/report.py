"""Leaderboards, ``DIR/report.md``, ``DIR/report.html`` and PNG figures from ``DIR/results.jsonl``.

``adamkit report DIR`` calls ``generate(DIR)``; ``adamkit bench`` calls it when it finishes. Every
file is written to a temporary name and renamed, so an interrupted report never leaves a broken one.
Figures (matplotlib, Agg backend), per workload:
  curves-<workload>.png   the held-out curve over steps: mean over seeds and a min-max band
  ttt-<workload>.png      time to target: median steps over seeds (unreached runs marked)
  lr-<workload>.png       learning-rate sensitivity: final held-out loss of each sweep run
A run that diverged, or ended above the workload's initial loss, is marked on the top edge of the
axes (``mark_above``) instead of being plotted at its value, which could stretch the axis to 1e235.
"""
from __future__ import annotations

import html
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from . import workloads as workload_registry
from .errors import UsageError
from .suite import RESULTS, read_results
from .userworkload import file_safe


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

def _loss(record) -> float:
    value = record["final"].get("loss")
    if record.get("diverged") or value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def _hp_label(record) -> str:
    """Hyperparameters the user set for the bench (besides lr); variant presets and workload
    prescriptions are part of the optimizer's and the workload's names."""
    extra = record.get("hyperparameters_user", {})
    return ", ".join(f"{k}={v}" for k, v in sorted(extra.items()))


def group_final(records: list[dict]) -> dict[str, list[dict]]:
    """Per workload, one row per (optimizer, hyperparameters): the final runs over seeds, best first."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record.get("phase") != "final":
            continue
        settings = tuple(sorted((k, str(v)) for k, v in record.get("hyperparameters_user", {}).items()))
        key = (record["workload"], record["optimizer"], record["lr"], settings, record.get("steps_planned"))
        groups[key].append(record)
    table: dict[str, list[dict]] = defaultdict(list)
    for (workload, optimizer, _, _, _), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        losses = [_loss(r) for r in runs]
        finite = [x for x in losses if math.isfinite(x)]
        reached = [r["time_to_target"]["step"] for r in runs if r["time_to_target"]["step"] is not None]
        times = [r["time_to_target"]["time_s"] for r in runs if r["time_to_target"]["time_s"] is not None]
        row = {
            "workload": workload, "optimizer": optimizer, "lr": runs[0]["lr"], "lr_source": runs[0].get("lr_source"),
            "extra": _hp_label(runs[0]), "runs": runs, "seeds": len(runs),
            "diverged": sum(bool(r.get("diverged")) for r in runs),
            "loss_mean": statistics.fmean(losses) if len(finite) == len(losses) else math.inf,
            "loss_std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
            "reached": len(reached),
            "target_step": statistics.median(reached) if len(reached) == len(runs) else None,
            "target_time_s": statistics.median(times) if len(times) == len(runs) else None,
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs),
            "target": runs[0]["time_to_target"]["target"],
            "steps": runs[0].get("steps_planned", runs[0]["steps"]),
        }
        for key in _report_metrics(workload):
            values = [r["final"].get(key) for r in runs]
            values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            row[key] = statistics.fmean(values) if len(values) == len(runs) else None
        table[workload].append(row)
    for rows in table.values():
        rows.sort(key=lambda row: (row["loss_mean"], row["optimizer"]))
    return table


def group_sweeps(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per workload and optimizer, (lr, final held-out loss) of every sweep run, by lr."""
    sweeps: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("phase") == "sweep":
            sweeps[record["workload"]][record["optimizer"]].append((record["lr"], _loss(record)))
    for per_optimizer in sweeps.values():
        for points in per_optimizer.values():
            points.sort()
    return sweeps


def _report_metrics(workload: str) -> tuple[str, ...]:
    spec = workload_registry.WORKLOADS.get(workload)
    return spec.report_metrics if spec else ()


def _fmt(value, digits=4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "diverged"
        return f"{value:.{digits}g}"
    return str(value)


def _order(workload_names) -> list[str]:
    known = list(workload_registry.WORKLOADS)
    return sorted(workload_names, key=lambda w: (known.index(w) if w in known else len(known), w))


def leaderboard_rows(row_list: list[dict], workload: str) -> tuple[list[str], list[list[str]]]:
    metrics = _report_metrics(workload)
    header = ["#", "optimizer", "lr", "seeds", "held-out loss", *metrics, "steps to target", "train s"]
    rows = []
    for rank, row in enumerate(row_list, 1):
        name = row["optimizer"] + (f" ({row['extra']})" if row["extra"] else "")
        loss = _fmt(row["loss_mean"])
        if row["seeds"] > 1 and math.isfinite(row["loss_mean"]):
            loss += f" ± {row['loss_std']:.2g}"
        if row["target_step"] is not None:
            target = f"{row['target_step']:g}"
        elif row["reached"]:
            target = f"{row['reached']}/{row['seeds']} seeds"
        else:
            target = "not reached"
        rows.append([str(rank), name, f"{row['lr']:.3g}" + ("*" if row["lr_source"] != "sweep" else ""),
                     str(row["seeds"]), loss, *[_fmt(row.get(m)) for m in metrics], target,
                     f"{row['train_time_s']:.1f}"])
    return header, rows


def format_leaderboard(records: list[dict]) -> str:
    """Plain-text leaderboards, one per workload, best held-out loss first."""
    table = group_final(records)
    if not table:
        return "no finished final runs yet"
    blocks = []
    for workload in _order(table):
        header, rows = leaderboard_rows(table[workload], workload)
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
        spec = workload_registry.WORKLOADS.get(workload)
        title = f"{workload} — target {table[workload][0]['target']}, {table[workload][0]['steps']} steps"
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        if spec is not None and spec.name == "reddi":
            lines.append(reddi_sentence(table[workload]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n(* learning rate fixed by --lr or prescribed by the workload, not swept)"


def reddi_sentence(rows: list[dict]) -> str:
    parts = [f"{row['optimizer']} x={_fmt(row.get('x'), 3)} (mean over last period {_fmt(row.get('x_mean'), 3)})"
             for row in rows]
    return "Final point (optimum x = -1; Adam is predicted to drift to +1, AMSGrad to move toward -1): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.stem + ".", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(temporary, dpi=110, bbox_inches="tight", format="png")
        from .runner import FILE_MODE
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def mark_above(ax, xs, color, label=None) -> None:
    """Mark runs that left the plotted range (diverged, or worse than at the start) as triangles on
    the top edge of ``ax`` at data x positions ``xs``."""
    if not len(xs):
        return
    ax.scatter(list(xs), [1.0] * len(xs), marker="^", s=55, color=color, edgecolors="black", linewidths=0.6,
               transform=ax.get_xaxis_transform(), clip_on=False, zorder=5, label=label)
    ax.update_datalim([(float(x), 0.0) for x in xs], updatey=False)  # keep the marks inside the x range
    ax.autoscale_view(scaley=False)


def start_loss(records: list[dict], workload: str) -> float | None:
    """The largest held-out loss at step 0 among ``workload``'s runs (the loss before training)."""
    values = [r["history"][0].get("loss") for r in records
              if r.get("workload") == workload and r.get("history") and r["history"][0].get("step") == 0]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(values) if values else None


def _colors(names):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(sorted(names))}


def plot_curves(rows: list[dict], workload: str, path: Path) -> tuple[float, float]:
    plt = _pyplot()
    spec = workload_registry.WORKLOADS.get(workload)
    metric = spec.curve_metric if spec else "loss"
    colors = _colors([r["optimizer"] + r["extra"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    positive = True
    # Losses: a curve that climbs above 1.5x the highest starting value has blown up; it is cut there
    # and marked on the top edge, so the axis keeps the scale of the runs that trained.
    ceiling = math.inf
    if metric in ("loss", "bits_per_char"):
        starts = [run["history"][0].get(metric) for row in rows for run in row["runs"]
                  if run["history"] and run["history"][0].get("step") == 0]
        starts = [v for v in starts if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
        if starts:
            ceiling = 1.5 * max(starts)
    for row in rows:
        curves = []
        for run in row["runs"]:
            points = {h["step"]: h.get(metric) for h in run["history"] if h.get(metric) is not None}
            curves.append(points)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        color = colors[row["optimizer"] + row["extra"]]
        label = f"{row['optimizer']} (lr {row['lr']:.2g})" + (" — diverged" if row["diverged"] else "")
        if not steps:
            if row["diverged"]:
                mark_above(ax, [0], color, label=label)
            continue
        values = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(v) for v in values]
        low, high = [min(v) for v in values], [max(v) for v in values]
        escaped = next((i for i, v in enumerate(high) if v > ceiling), None)
        if escaped is not None:
            mark_above(ax, [steps[escaped]], color)
            steps, mean, low, high = steps[:escaped], mean[:escaped], low[:escaped], high[:escaped]
        elif row["diverged"]:
            mark_above(ax, [steps[-1]], color)
        if not steps:
            ax.plot([], [], color=color, label=label)
            continue
        positive &= min(low) > 0
        ax.plot(steps, mean, color=color, label=label, linewidth=1.6)
        if row["seeds"] > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    if positive and metric in ("loss", "bits_per_char"):
        ax.set_yscale("log")
    if spec is not None and spec.name == "reddi":
        ax.axhline(-1.0, color="black", linestyle=":", linewidth=1)
        ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    labels = {"x_mean": "x, mean over the last 101 steps", "loss": "loss"}
    ax.set_ylabel(f"held-out {metric}" if spec is None or spec.kind == "model" else labels.get(metric, metric))
    seeds = max((r["seeds"] for r in rows), default=1)
    ax.set_title(f"{workload}: mean over {seeds} seed(s), band = min-max" if seeds > 1 else workload)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    limits = ax.get_ylim()
    _save(fig, path)
    plt.close(fig)
    return limits


def plot_time_to_target(rows: list[dict], workload: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    names = [r["optimizer"] + (f" ({r['extra']})" if r["extra"] else "") for r in rows]
    budget = max(r["steps"] for r in rows)
    for i, row in enumerate(rows):
        if row["target_step"] is not None:
            ax.barh(i, row["target_step"], color="tab:blue")
            ax.text(row["target_step"], i, f" {row['target_step']:g}", va="center", fontsize=8)
        else:
            ax.barh(i, budget, color="lightgray", hatch="//", edgecolor="gray")
            label = f" {row['reached']}/{row['seeds']} seeds reached" if row["reached"] else " not reached"
            ax.text(0, i, label, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("steps to target (median over seeds)")
    ax.set_title(f"{workload}: time to {rows[0]['target']}")
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_lr_sensitivity(sweeps: dict[str, list[tuple[float, float]]], chosen: dict[str, float], workload: str,
                        path: Path, ceiling: float | None = None):
    """Final loss against lr; a run that diverged or ended above ``ceiling`` (the loss before training,
    when known) is a triangle on the top edge. Returns the y limits."""
    plt = _pyplot()
    colors = _colors(list(sweeps))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    limit = math.inf if ceiling is None else ceiling

    def kept(loss):
        return math.isfinite(loss) and loss <= limit

    finite = [loss for points in sweeps.values() for _, loss in points if kept(loss)]
    positive = bool(finite) and min(finite) > 0
    for name, points in sorted(sweeps.items()):
        lrs = [lr for lr, _ in points]
        losses = [loss if kept(loss) else math.nan for _, loss in points]
        ax.plot(lrs, losses, marker="o", color=colors[name], label=name, linewidth=1.4, markersize=4)
        mark_above(ax, [lr for lr, loss in points if not kept(loss)], colors[name])
        if name in chosen:
            best = [loss for lr, loss in points if lr == chosen[name]]
            if best and kept(best[0]):
                ax.scatter([chosen[name]], best, s=110, facecolors="none", edgecolors=colors[name], linewidths=1.5)
    ax.set_xscale("log")
    if positive:
        ax.set_yscale("log")
    if finite:
        low, high = min(finite), max(finite)
        if positive:
            ax.set_ylim(low / 1.3, high * 1.3)
        else:
            ax.set_ylim(low - 0.1 * abs(low), high + 0.1 * abs(high) + 1e-12)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final held-out loss of the sweep run")
    ax.set_title(f"{workload}: learning-rate sensitivity\n(circle = chosen; ▲ on the top edge = diverged or "
                 "ended above the initial loss)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    limits = ax.get_ylim()
    _save(fig, path)
    plt.close(fig)
    return limits


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

def _protocol_paragraphs(records: list[dict]) -> list[str]:
    protocols = [r.get("protocol") or {} for r in records]
    protocol = next((p for p in protocols if p), {})
    points = protocol.get("sweep_points", 5)
    fraction = protocol.get("sweep_fraction", 0.25)
    extensions = protocol.get("max_extensions", 3)
    seeds = protocol.get("seeds", sorted({r["seed"] for r in records if r.get("phase") == "final"}))
    text = [
        f"**Learning rate.** Unless fixed by `--lr` or prescribed by the workload (marked *), every optimizer "
        f"gets its own sweep on every workload: {points} learning rates log-spaced over two decades centred on "
        f"the optimizer's default learning rate, each trained with the first seed for {fraction:g} of the "
        f"workload's budget. When the best value is on the edge of the grid, the grid is extended by half a "
        f"decade in that direction (at most {extensions} times). The best value has the lowest final held-out "
        f"loss; a run that diverges counts as infinitely bad.",
        f"**Seeds.** The chosen learning rate is then trained for the full budget with each seed ({', '.join(map(str, seeds))}). "
        "Workloads without randomness (the test functions, the quadratic and Reddi's problem) are run once: "
        "every seed would give the same run. All other hyperparameters are each optimizer's defaults, except "
        "those the user set and those a workload prescribes" + _prescriptions(records) + ".",
        "**Metrics.** Held-out loss and metrics are measured on a split no training step sees (functions: "
        "the function value). Tables rank by the mean final held-out loss over seeds. Time to target is the "
        "first evaluation at which the workload's target is met (median over seeds, in steps); "
        "training time excludes evaluation and logging. Runs that share the machine (`--jobs`) slow each "
        "other, so compare steps rather than seconds.",
    ]
    return text


def _prescriptions(records: list[dict]) -> str:
    """'' or ' (reddi: lr 0.5, betas (0.9, 0.99), schedule inverse_sqrt; ...)' for the workloads in ``records``."""
    parts = []
    for name in _order({r["workload"] for r in records}):
        spec = workload_registry.WORKLOADS.get(name)
        if spec is None:
            continue
        items = [f"lr {spec.lr:g}"] if spec.lr is not None else []
        items += [f"{k} {tuple(v) if isinstance(v, (list, tuple)) else v}" for k, v in spec.hyperparameters.items()]
        if spec.schedule is not None:
            items.append(f"schedule {spec.schedule[0]}")
        if items:
            parts.append(f"{name}: " + ", ".join(items))
    return f" ({'; '.join(parts)})" if parts else ""


def _table_md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _table_html(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_inline_to_html(text: str) -> str:
    import re
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def generate(out: str | os.PathLike, log=None) -> dict:
    """Write report.md, report.html and figures/*.png in ``out`` from its results.jsonl."""
    log = log or (lambda message: None)
    out = Path(out).expanduser()
    if not (out / RESULTS).is_file():
        raise UsageError(f"no {RESULTS} in {out}; run `adamkit bench --out {out}` first")
    records, bad = read_results(out)
    if bad:
        log(f"note: {bad} unreadable line(s) in {out / RESULTS} ignored")
    if not records:
        raise UsageError(f"{out / RESULTS} has no finished runs")
    figures = out / "figures"
    try:
        figures.mkdir(exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot write to {figures}: {error.strerror or error}") from None
    table = group_final(records)
    sweeps = group_sweeps(records)
    workload_names = _order(set(table) | set(sweeps))
    finals = sum(r.get("phase") == "final" for r in records)

    blocks: list[tuple[str, object]] = [
        ("h1", "adamkit benchmark report"),
        ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from `{RESULTS}`: {len(records)} runs "
              f"({finals} final, {len(records) - finals} sweep)."),
        ("h2", "Protocol"),
    ]
    blocks += [("p", text) for text in _protocol_paragraphs(records)]
    written = []
    for workload in workload_names:
        spec = workload_registry.WORKLOADS.get(workload)
        blocks.append(("h2", workload))
        if spec is not None:
            blocks.append(("p", spec.summary + (f" ({spec.reference})" if spec.reference else "") + "."))
        rows = table.get(workload, [])
        if rows:
            blocks.append(("p", f"Target: {rows[0]['target']}; budget {rows[0]['steps']} steps."))
            blocks.append(("table", leaderboard_rows(rows, workload)))
            if workload == "reddi":
                blocks.append(("p", reddi_sentence(rows)))
            for kind, plot in (("curves", plot_curves), ("ttt", plot_time_to_target)):
                path = figures / f"{kind}-{file_safe(workload)}.png"
                plot(rows, workload, path)
                written.append(path)
                blocks.append(("img", (path.relative_to(out).as_posix(), f"{kind} {workload}")))
        else:
            blocks.append(("p", "No final runs yet."))
        if sweeps.get(workload):
            chosen = {row["optimizer"]: row["lr"] for row in rows}
            path = figures / f"lr-{file_safe(workload)}.png"
            plot_lr_sensitivity(sweeps[workload], chosen, workload, path,
                                ceiling=start_loss(records, workload))
            written.append(path)
            blocks.append(("img", (path.relative_to(out).as_posix(), f"learning-rate sensitivity {workload}")))

    from .runner import write_text_atomic
    markdown = []
    for kind, content in blocks:
        if kind == "h1":
            markdown.append(f"# {content}")
        elif kind == "h2":
            markdown.append(f"## {content}")
        elif kind == "p":
            markdown.append(content)
        elif kind == "table":
            markdown.append(_table_md(*content))
        elif kind == "img":
            markdown.append(f"![{content[1]}]({content[0]})")
    write_text_atomic("\n\n".join(markdown) + "\n", out / "report.md")

    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_md_inline_to_html(content)}</p>")
        elif kind == "table":
            body.append(_table_html(*content))
        elif kind == "img":
            body.append(f'<img src="{html.escape(content[0])}" alt="{html.escape(content[1])}">')
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}")
    document = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>adamkit benchmark report</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")
    write_text_atomic(document, out / "report.html")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
            "figures": [str(p) for p in written], "leaderboard": format_leaderboard(records)}
