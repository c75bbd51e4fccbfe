"""``OUT/RESULTS.md`` and ``OUT/results-figures/*.png`` from the experiments of ``adamkit results``.

One section per claim: the claim, the experiment, a figure, a table (means and spread over seeds),
the rule and the verdict the rule gives (``results_claims``). Nothing in a verdict is written here.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from . import results_claims as claims
from . import results_figures as figures
from . import workloads
from .results import FIGURES_DIR, LOW_PRECISION, RUNS_DIR, WARMUP_FRACTION, Experiments, final_loss

SPEED_SLOW, SPEED_FAST = "sgdm", "adam"


def steps_to_target(record: dict | None, target) -> tuple[int | None, float | None]:
    """The first evaluation that meets ``target``: (step, training seconds), or (None, None)."""
    if record is None or record.get("diverged"):
        return None, None
    for entry in record["history"]:
        if target.reached(entry):
            return entry["step"], entry.get("time_s")
    return None, None


def _fmt(mean: float, std: float | None = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if math.isinf(mean):
        return "diverged"
    text = f"{mean:.{digits}g}"
    if std is not None and math.isfinite(std) and std > 0:
        text += f" ± {std:.2g}"
    return text


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _losses(records) -> list[float]:
    return [final_loss(r) for r in records]


def _start(records) -> float:
    values = [r["history"][0].get("loss") for r in records if r and r.get("history")]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(values) if values else math.inf


class Section:
    def __init__(self, key: str, title: str, claim: str, experiment: str):
        self.key, self.title, self.claim, self.experiment = key, title, claim, experiment
        self.figure: str | None = None
        self.tables: list[str] = []
        self.notes: list[str] = []
        self.verdict: claims.Verdict | None = None

    def markdown(self) -> str:
        parts = [f"## {self.title}", f"**Claim.** {self.claim}", f"**Experiment.** {self.experiment}"]
        if self.figure:
            parts.append(f"![{self.title}]({self.figure})")
        parts += self.tables + self.notes
        parts.append(f"**Rule.** {claims.RULES[self.key]}")
        parts.append(self.verdict.line())
        return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def _tuning(scale) -> str:
    sizes = ", ".join(f"{scale.points_on(w)} on {w}" for w in scale.workloads)
    return (f"each optimizer's learning rate tuned on a grid of values log-spaced over three decades ({sizes}; "
            f"seed 0, full budget), extended by half a decade past an edge that was best (at most "
            f"{scale.max_extensions} times); the lowest final held-out loss wins")


def _optimizer_sets(scale) -> str:
    text = ", ".join(scale.optimizers)
    others = [f"{w}: {', '.join(scale.optimizers_on(w))}" for w in scale.workloads
              if scale.optimizers_on(w) != scale.optimizers]
    return text + (f" (on fewer where a run costs more — {'; '.join(others)})" if others else "")


def _budgets(scale, names) -> str:
    return ", ".join(f"{w} {scale.steps.get(w, workloads.get(w).steps)} steps" for w in names)


def section_speed(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("speed", "Speed of convergence",
                "Adam reaches a given loss in fewer steps than SGD with momentum.",
                f"Workloads {_budgets(scale, scale.workloads)}; optimizers {_optimizer_sets(scale)} with "
                f"their default settings (sgdm: SGD with momentum 0.9), {_tuning(scale)}; then {scale.seeds} seeds "
                "at the tuned learning rate. Targets: "
                + "; ".join(f"{w}: {scale.target(w).describe()}" for w in scale.workloads)
                + " (the workload's own target unless its budget here is too short to reach it).")
    steps, panels, targets = {}, {}, {}
    header = ["workload", "optimizer", "tuned lr", "steps to target (median)", "reached", "train s to target",
              "final held-out loss"]
    rows = []
    for workload in scale.workloads:
        target = scale.target(workload)
        targets[workload] = (target.metric, target.value)
        steps[workload], panels[workload] = {}, {}
        for optimizer in scale.optimizers_on(workload):
            runs = ex.tuned[(workload, optimizer)]
            reached = [steps_to_target(r, target) for r in runs]
            steps[workload][optimizer] = [st for st, _ in reached]
            times = [t for st, t in reached if st is not None and t is not None]
            median = claims.median_steps(steps[workload][optimizer])
            mean, std = claims.mean_std(_losses(runs))
            rows.append([workload, optimizer, f"{runs[0]['lr']:.3g}" if runs[0] else "—",
                         "not reached" if math.isinf(median) else f"{median:g}",
                         f"{sum(st is not None for st, _ in reached)}/{len(runs)}",
                         _fmt(sum(times) / len(times), None, 3) if len(times) == len(runs) else "—",
                         _fmt(mean, std)])
            curve = {}
            for run in runs:
                if run is None:
                    continue
                for entry in run["history"]:
                    value = entry.get(target.metric)
                    if value is not None:
                        curve.setdefault(entry["step"], []).append(value)
            panels[workload][optimizer] = (target.metric, {k: sum(v) / len(v) for k, v in curve.items()
                                                           if len(v) == len(runs)})
    path = fig_dir / "speed.png"
    figures.target_curves(panels, targets, path)
    s.figure = f"{rel}/{path.name}"
    s.tables.append(_table(header, rows))
    s.notes.append("Training seconds are measured on a shared, busy machine and are noisy; the rule uses steps.")
    s.verdict = claims.verdict_speed(steps, SPEED_FAST, SPEED_SLOW)
    return s


def _grid_points(ex: Experiments, workload: str, optimizer: str) -> list[tuple[float, float]]:
    return [(lr, final_loss(r)) for lr, r in ex.grids[(workload, optimizer)].points()]


def section_lr(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("lr", "Learning-rate sensitivity",
                "Adam is less sensitive to the learning rate than SGD with momentum: a wider range of learning "
                "rates trains to near the best loss.",
                f"The learning-rate grids of the speed experiment ({_tuning(scale)}) on "
                f"{_budgets(scale, scale.workloads)}; the best loss of the seeds at the tuned lr is shown with "
                "its spread.")
    panels, caps, widths = {}, {}, {}
    header = ["workload", "optimizer", "grid (lr)", "best lr", "width within 10 % (decades)",
              "final loss at tuned lr (mean ± std over seeds)"]
    rows = []
    for workload in scale.workloads:
        panels[workload], widths[workload] = {}, {}
        caps[workload] = _start([r for o in scale.optimizers_on(workload) for _, r in ex.grids[(workload, o)].points()])
        for optimizer in scale.optimizers_on(workload):
            points = _grid_points(ex, workload, optimizer)
            panels[workload][optimizer] = points
            best = min(loss for _, loss in points)
            width, edge = claims.good_width(points, claims.GOOD_RATIO * best)
            widths[workload][optimizer] = width
            grid = ex.grids[(workload, optimizer)]
            mean, std = claims.mean_std(_losses(ex.tuned[(workload, optimizer)]))
            rows.append([workload, optimizer, f"{grid.lrs[0]:.2g} … {grid.lrs[-1]:.2g}", f"{grid.best_lr():.3g}",
                         ("≥ " if edge else "") + f"{width:.2f}", _fmt(mean, std)])
    path = fig_dir / "lr-sensitivity.png"
    figures.loss_vs_lr(panels, caps, path)
    s.figure = f"{rel}/{path.name}"
    s.tables.append(_table(header, rows))
    s.notes.append("“≥” marks a range that reaches the edge of the grid: the true width may be larger.")
    s.verdict = claims.verdict_lr_width(widths)
    return s


def section_weight_decay(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("wd", "Decoupled weight decay",
                "AdamW (decoupled weight decay) has a wider region of good (learning rate, weight decay) "
                "settings than Adam with L2 regularisation (Loshchilov & Hutter).",
                f"{scale.heatmap_workload}, {scale.steps.get(scale.heatmap_workload)} steps; learning rates "
                f"{', '.join(f'{v:g}' for v in scale.heatmap_lrs)} x weight decays "
                f"{', '.join(f'{v:g}' for v in scale.heatmap_wds)}; Adam's weight_decay is added to the "
                "gradient (L2), AdamW's decays the weights by lr x wd per step (as torch); "
                f"{scale.heatmap_seeds} seed(s) per cell.")
    maps, spread = {}, {}
    for optimizer in ("adam", "adamw"):
        maps[optimizer], spread[optimizer] = {}, {}
        for lr in scale.heatmap_lrs:
            for wd in scale.heatmap_wds:
                mean, std = claims.mean_std(_losses(ex.heatmap[(optimizer, lr, wd)]))
                maps[optimizer][(lr, wd)], spread[optimizer][(lr, wd)] = mean, std
    names = {"adam": "Adam + L2", "adamw": "AdamW"}
    path = fig_dir / "weight-decay.png"
    figures.heatmaps({names[k]: v for k, v in maps.items()}, scale.heatmap_lrs, scale.heatmap_wds, path)
    s.figure = f"{rel}/{path.name}"
    n_adam, n_adamw, best = claims.good_cells(maps["adam"], maps["adamw"])
    header = ["optimizer", "best cell (lr, wd)", "best final loss", "good cells", "median loss over the grid"]
    rows = []
    for optimizer in ("adam", "adamw"):
        cell = min(maps[optimizer], key=maps[optimizer].get)
        values = sorted(maps[optimizer].values())
        rows.append([names[optimizer], f"{cell[0]:g}, {cell[1]:g}",
                     _fmt(maps[optimizer][cell], spread[optimizer][cell]),
                     f"{n_adam if optimizer == 'adam' else n_adamw} of {len(values)}",
                     _fmt(values[len(values) // 2])])
    s.tables.append(_table(header, rows))
    s.verdict = claims.verdict_weight_decay(maps["adam"], maps["adamw"])
    return s


def section_reddi(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("reddi", "AMSGrad on Reddi et al.'s problem",
                "On Reddi et al.'s online problem Adam converges to the worst point x = +1 and AMSGrad to the "
                "optimum x = -1.",
                f"f_t(x) = 1010x if t mod 101 = 1 else -10x on [-1, 1] from x = 0, {scale.reddi_steps} steps, betas "
                "(0.9, 0.99), step size 0.5/sqrt(t), as in the paper; deterministic, one run each.")
    curves, rows, final = {}, [], {}
    for name in ("adam", "amsgrad"):
        record = ex.reddi[name]
        curves[name] = [(e["step"], e["x_mean"]) for e in record["history"] if e.get("x_mean") is not None]
        final[name] = record["final"]["x_mean"]
        rows.append([name, f"{record['final']['x']:+.3f}", f"{final[name]:+.3f}",
                     f"{record['final']['average_regret']:.4g}"])
    path = fig_dir / "reddi.png"
    figures.reddi_curves(curves, path)
    s.figure = f"{rel}/{path.name}"
    s.tables.append(_table(["optimizer", "final x", "x over the last period", "average regret"], rows))
    s.verdict = claims.verdict_reddi(final["adam"], final["amsgrad"])
    return s


def section_amsgrad(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("amsgrad", "AMSGrad in practice",
                "AMSGrad's gains over Adam on real models are inconsistent.",
                f"The tuned runs of the speed experiment: Adam and AMSGrad (Adam with amsgrad=True), each at its "
                f"own tuned learning rate, {scale.seeds} seeds, on {_budgets(scale, scale.workloads)}.")
    losses, groups, rows = {}, {}, []
    for workload in scale.workloads:
        losses[workload] = {n: _losses(ex.tuned[(workload, n)]) for n in ("adam", "amsgrad")}
        groups[workload] = {n: claims.mean_std(v) for n, v in losses[workload].items()}
        rows.append([workload, _fmt(*groups[workload]["adam"]), _fmt(*groups[workload]["amsgrad"]),
                     claims.compare_losses(losses[workload]["adam"], losses[workload]["amsgrad"])])
    path = fig_dir / "amsgrad.png"
    figures.bars(groups, path, "final held-out loss (mean ± std over seeds)", "Adam against AMSGrad at tuned lr")
    s.figure = f"{rel}/{path.name}"
    s.tables.append(_table(["workload", "Adam", "AMSGrad", "AMSGrad is"], rows))
    s.verdict = claims.verdict_amsgrad_models(losses)
    return s


def section_warmup(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    workload = scale.warmup_workload
    steps = scale.steps.get(workload, workloads.get(workload).steps)
    s = Section("warmup", "Warm-up and RAdam",
                "RAdam removes the need for learning-rate warm-up: without warm-up it trains over as wide a range "
                "of learning rates as Adam with warm-up.",
                f"{workload}, {steps} steps, seed 0; Adam without warm-up, Adam with linear warm-up over the first "
                f"{WARMUP_FRACTION:.0%} of the steps ({max(1, round(steps * WARMUP_FRACTION))}), RAdam without "
                f"warm-up; {scale.points_on(workload)} learning rates over three decades.")
    curves = {name: [(lr, final_loss(r)) for lr, r in points] for name, points in ex.warmup.items()}
    cap = _start([r for points in ex.warmup.values() for _, r in points])
    path = fig_dir / "warmup.png"
    figures.loss_vs_lr({workload: curves}, {workload: cap}, path, title="{workload}: warm-up")
    s.figure = f"{rel}/{path.name}"
    best = min(loss for points in curves.values() for _, loss in points)
    lrs = [lr for lr, _ in next(iter(curves.values()))]
    header = ["variant"] + [f"lr {lr:.2g}" for lr in lrs] + ["width within 10 % of the best (decades)"]
    rows = [[name] + [_fmt(loss) for _, loss in points]
            + [f"{claims.good_width(points, claims.GOOD_RATIO * best)[0]:.2f}"] for name, points in curves.items()]
    s.tables.append(_table(header, rows))
    s.notes.append("Final held-out loss, seed 0 (one run per cell).")
    s.verdict = claims.verdict_warmup(curves)
    return s


def adabound_bounds(final_lr: float, gamma: float, steps) -> list[tuple[int, float, float]]:
    return [(t, final_lr * (1 - 1 / (gamma * t + 1)), final_lr * (1 + 1 / (gamma * t))) for t in steps]


def section_adabound(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("adabound", "AdaBound: from Adam to SGD",
                "AdaBound starts like Adam and ends like SGD: its per-element step sizes are clipped into bounds "
                "that close on final_lr.",
                f"{scale.bounds_workload}, {scale.bounds_steps} steps, seed 0: Adam (lr 1e-3), AdaBound (lr 1e-3, "
                "final_lr 0.1, gamma 1e-3) and plain SGD at lr 0.1 (AdaBound's final_lr); the effective step "
                f"size of every element measured at {scale.bounds_points} log-spaced steps.")
    traces = {name: ex.bounds[name][0]["effective_step_size"] for name in ("adam", "adabound", "sgd")}
    record = ex.bounds["adabound"][0]
    final_lr, gamma = record["hyperparameters"]["final_lr"], record["hyperparameters"]["gamma"]
    steps = [e["step"] for e in traces["adabound"]]
    path = fig_dir / "adabound.png"
    figures.step_sizes(traces, adabound_bounds(final_lr, gamma, steps), path)
    s.figure = f"{rel}/{path.name}"
    header = ["step"] + [f"{n} median [p10, p90]" for n in traces] + ["AdaBound's bounds"]
    rows = []
    picks = sorted({steps[0], steps[len(steps) // 3], steps[2 * len(steps) // 3], steps[-1]})
    for step in picks:
        row = [str(step)]
        for trace in traces.values():
            entry = next(e for e in trace if e["step"] == step)
            row.append(f"{entry['median']:.3g} [{entry['p10']:.3g}, {entry['p90']:.3g}]")
        _, low, high = adabound_bounds(final_lr, gamma, [step])[0]
        row.append(f"[{low:.3g}, {high:.3g}]")
        rows.append(row)
    s.tables.append(_table(header, rows))
    final = [(name, ex.bounds[name][0]) for name in traces]
    s.notes.append("Final held-out loss: " + ", ".join(f"{n} {_fmt(final_loss(r))}" for n, r in final) +
                   ". Quantiles are over the elements of one run (seed 0).")
    s.verdict = claims.verdict_adabound(traces["adabound"], traces["adam"], final_lr)
    return s


def section_sparse(ex: Experiments, fig_dir: Path, rel: str) -> Section:
    scale = ex.scale
    s = Section("sparse", "Sparse gradients",
                "Adam handles sparse gradients poorly: on an embedding model, Adam with dense gradients ends "
                "worse than SparseAdam and Adagrad on sparse gradients.",
                f"bow-zipf ({workloads.get('bow-zipf').summary}), {scale.sparse_steps} steps, batch 64. Adam gets "
                "the table's dense gradient (zero rows included, so its moments decay and every row moves every "
                "step); SparseAdam and Adagrad get sparse gradients (only the batch's rows). Learning rate tuned "
                f"per optimizer on {scale.sparse_points} values over two decades (seed 0, extended past a best "
                f"edge), then {scale.seeds} seeds.")
    losses, groups, rows = {}, {}, []
    for name, runs in ex.sparse.items():
        losses[name] = _losses(runs)
        groups[name] = claims.mean_std(losses[name])
        accuracy = [r["final"].get("accuracy") for r in runs if r]
        step_ms = [1e3 * r["train_time_s"] / max(1, r["steps"]) for r in runs if r]
        rows.append([name, f"{runs[0]['lr']:.3g}", _fmt(*groups[name]),
                     _fmt(*claims.mean_std(accuracy)) if len(accuracy) == len(runs) else "—",
                     f"{sum(step_ms) / len(step_ms):.2f}" if step_ms else "—"])
    path = fig_dir / "sparse.png"
    figures.bars({"bow-zipf": groups}, path, "final held-out loss (mean ± std over seeds)",
                 "bag-of-words embedding: dense Adam vs sparse optimizers")
    s.figure = f"{rel}/{path.name}"
    s.tables.append(_table(["optimizer", "tuned lr", "final held-out loss", "accuracy", "ms per step (noisy)"],
                           rows))
    s.verdict = claims.verdict_sparse(losses)
    return s


def section_memory(ex: Experiments, fig_dir: Path, rel: str) -> tuple[Section, Section]:
    scale = ex.scale
    table = ex.state_bytes
    bytes_section = Section(
        "bytes", "Memory: bytes of optimizer state",
        "Adam's two moments cost 8 bytes per parameter in float32, twice SGD with momentum; bfloat16 state "
        "halves that and int8 state quarters it.",
        f"Every optimizer after one step on a {scale.memory_shape[0]}x{scale.memory_shape[1]} float32 matrix and "
        "its bias, state_dtype float32, bfloat16 and int8; bytes of every state tensor but `step` (int8: codes "
        "plus one float32 scale per 256-element block; tensors under 4,096 elements stay float32) per parameter.")
    names = sorted({n for n, _ in table})
    dtypes = ("float32",) + LOW_PRECISION
    rows = [[name] + [("n/a" if table[(name, d)] is None else f"{table[(name, d)]:.3f}") for d in dtypes]
            for name in names]
    path = fig_dir / "memory.png"
    figures.bars({name: {d: (table[(name, d)], 0.0) for d in dtypes if table[(name, d)] is not None}
                  for name in names}, path, "state bytes per parameter", "optimizer state per parameter")
    bytes_section.figure = f"{rel}/{path.name}"
    bytes_section.tables.append(_table(["optimizer"] + [f"{d} (B/param)" for d in dtypes], rows))
    bytes_section.verdict = claims.verdict_state_bytes(table)

    precision = Section(
        "precision", "Memory: low-precision state and final loss",
        "Keeping Adam's state in bfloat16 or int8 does not hurt the final loss.",
        f"Adam at its tuned learning rate (the speed experiment's) on "
        f"{_budgets(scale, scale.memory_workloads)}, {scale.seeds} seeds, with state_dtype None (float32, "
        "the tuned runs themselves), bfloat16 and int8.")
    losses, groups, rows = {}, {}, []
    for workload in scale.memory_workloads:
        losses[workload] = {"float32": _losses(ex.tuned[(workload, "adam")])}
        for dtype in LOW_PRECISION:
            losses[workload][dtype] = _losses(ex.low_precision[(workload, dtype)])
        groups[workload] = {d: claims.mean_std(v) for d, v in losses[workload].items()}
        rows.append([workload] + [_fmt(*groups[workload][d]) for d in dtypes])
    path = fig_dir / "state-precision.png"
    figures.bars(groups, path, "final held-out loss (mean ± std over seeds)", "Adam: state_dtype and final loss")
    precision.figure = f"{rel}/{path.name}"
    precision.tables.append(_table(["workload"] + list(dtypes), rows))
    precision.verdict = claims.verdict_low_precision(losses)
    return bytes_section, precision


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------

def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available; {platform.system()} {platform.release()}; Python " \
           f"{platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + (" (with uncommitted changes)" if dirty else "")) if sha else "unknown"


SECTIONS = (section_speed, section_lr, section_weight_decay, section_reddi, section_amsgrad, section_warmup,
            section_adabound, section_sparse, section_memory)


def build_sections(ex: Experiments, fig_dir: Path, rel: str = FIGURES_DIR) -> list[Section]:
    sections = []
    for build in SECTIONS:
        made = build(ex, fig_dir, rel)
        sections.extend(made if isinstance(made, tuple) else [made])
    return sections


def _anchor(title: str) -> str:
    import re
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def verdict_table(sections: list[Section]) -> str:
    return _table(["claim", "verdict", "why"],
                  [[f"[{s.title}](#{_anchor(s.title)})", f"**{s.verdict.status}**", s.verdict.detail]
                   for s in sections])


def _run_summary(records: list[dict]) -> str:
    """How many runs the page rests on, when they finished and their summed wall time."""
    from datetime import datetime
    stamps = []
    for record in records:
        try:
            stamps.append(datetime.strptime(record.get("finished_at", ""), "%Y-%m-%dT%H:%M:%S%z"))
        except ValueError:
            pass
    text = f"{len(records)} runs in `{RUNS_DIR}/results.jsonl`"
    if stamps:
        text += f", finished between {min(stamps):%Y-%m-%d %H:%M} and {max(stamps):%H:%M %Z}"
    busy = sum(r.get("wall_time_s", 0.0) for r in records) / 60
    return text + f" (summed wall time of the runs: {busy:.0f} min)."


def write(ex: Experiments, out: Path, config, elapsed_s: float, completed: int) -> dict:
    from .runner import write_text_atomic
    scale = ex.scale
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    sections = build_sections(ex, fig_dir)
    records = list(ex.context.records.values())
    header = [
        "# The claims about Adam and its family, measured",
        f"Generated by `{config.command}` (scale `{scale.name}`) at commit {commit()} on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}.  \nMachine: {machine()}.  \n"
        f"{_run_summary(records)} This invocation trained {completed} of them in {elapsed_s / 60:.1f} min with "
        f"{config.jobs} worker process(es) of {config.threads or 'torch default'} thread(s). Rerunning the "
        "command reuses every finished run and rewrites this page.",
        "## Verdicts",
        "Each verdict is computed from the numbers below by the rule stated in its section; none is written "
        "by hand.",
        verdict_table(sections),
        "## Protocol",
        f"All runs use adamkit's `{scale.backend}` engine (the oracle the fused engines are tested against, so "
        "the numbers are the algorithms', not an engine's), float32 parameters, one torch thread per run. "
        "Hyperparameters other than the learning rate are each optimizer's defaults unless a section says "
        "otherwise. Final held-out loss is measured on a split no training step sees; a run that diverges "
        "counts as infinitely bad. Seeds change initialisation, batch order and dropout. "
        "Steps to target are read from evaluations every 1/20 of the budget. The machine is shared with other "
        "work and busy: wall-clock times (training seconds, ms per step) are noisy, so the rules use steps "
        "and losses, never seconds.",
    ]
    text = "\n\n".join(header + [s.markdown() for s in sections]) + "\n"
    path = out / "RESULTS.md"
    write_text_atomic(text, path)
    return {"markdown": str(path), "figures": sorted(str(p) for p in fig_dir.glob("*.png")),
            "verdicts": {s.title: s.verdict for s in sections}, "verdict_table": verdict_table(sections)}
