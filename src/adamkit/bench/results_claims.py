"""The rules that turn measured numbers into the verdicts of ``adamkit results``.

Every function here is pure: it takes plain numbers (losses per seed, widths, step counts), never
records, and returns a ``Verdict`` whose status is "confirmed", "not confirmed" or "depends" and
whose detail names the numbers that decided it. ``RULES`` holds the sentence each section prints,
so the document states exactly the rule the code applies.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIRMED, NOT_CONFIRMED, DEPENDS = "confirmed", "not confirmed", "depends"

GOOD_RATIO = 1.1          # "within 10 % of the best" final loss
WIDTH_MARGIN = 0.1        # decades: a width must exceed another by this much to count as wider
SAME_LOSS = 0.02          # relative: low-precision state "matches" float32 within 2 % (or the seeds' spread)
TIE_FLOOR = 0.01          # relative: differences under 1 % of the reference loss are ties


@dataclass(frozen=True)
class Verdict:
    status: str
    detail: str

    def line(self) -> str:
        return f"**Verdict: {self.status}** — {self.detail}"


RULES = {
    "speed": "Per workload, the median over seeds of the steps each optimizer needed to reach the workload's "
             "target (a seed that never reached it counts as infinitely many). Confirmed if Adam needed fewer "
             "steps than SGD with momentum on every workload where the two differ (and they differ on at least "
             "one); not confirmed if Adam needed fewer on none; depends otherwise.",
    "lr": "Per workload and optimizer, the width in decades of the learning-rate range whose final held-out "
          "loss (seed 0) is within 10 % of that optimizer's best, the edges interpolated linearly in log lr "
          "between grid points. Confirmed if Adam's range is wider than SGD with momentum's by more than "
          f"{WIDTH_MARGIN} decade on every workload; not confirmed if on none; depends otherwise.",
    "wd": "A cell is good if its final held-out loss is within 10 % of the best cell of both heatmaps. "
          "Confirmed if AdamW has more good cells than Adam with L2; not confirmed otherwise.",
    "reddi": "x is the mean of the iterate over the last period (101 steps) of Reddi's problem, whose optimum "
             "is x = -1. Confirmed if Adam ends with x > 0 and AMSGrad with x < 0; not confirmed otherwise.",
    "amsgrad": "Per workload, AMSGrad is better if its mean final held-out loss over seeds is lower than "
               "Adam's by more than the larger standard deviation over seeds of the two (and by more than 1 % "
               "of Adam's mean). Confirmed (the gains are inconsistent) if AMSGrad is better on fewer than all "
               "workloads; not confirmed if it is better on every one.",
    "warmup": "Per variant, the width in decades of the learning-rate range whose final held-out loss is "
              "within 10 % of the best of all three variants. Depends (no warm-up was needed) if warm-up did "
              f"not widen Adam's range by more than {WIDTH_MARGIN} decade; otherwise confirmed if RAdam's range "
              f"is at least as wide as warmed-up Adam's (within {WIDTH_MARGIN} decade), not confirmed if "
              "narrower.",
    "adabound": "Effective step size: the factor each step applied to an element's first moment, "
                "|delta theta| / |m| (|delta theta| / |g| for SGD). AdaBound starts like Adam if the median "
                "over elements of its effective step size at the first step is within a factor 2 of Adam's; "
                "it ends like SGD if at the last step 80 % of its elements (the 10th to the 90th percentile) "
                "are within a factor 2 of final_lr. Confirmed if both; depends (on the length of training) if "
                "it starts like Adam but does not yet end like SGD; not confirmed if it does not start like Adam.",
    "sparse": "Mean final held-out loss over seeds, each optimizer at its tuned learning rate. Confirmed if "
              "Adam (dense gradients) is worse than the better of SparseAdam and Adagrad by more than the "
              "larger standard deviation over seeds (and more than 1 % of that loss); not confirmed otherwise.",
    "bytes": "Measured state bytes per parameter. Confirmed if Adam's float32 state is 8 +- 0.1 bytes per "
             "parameter, 2 +- 0.1 times SGD with momentum's, and bfloat16 and int8 state are 0.5 +- 0.05 "
             "and 0.25 +- 0.05 of float32's for Adam; not confirmed otherwise.",
    "precision": "Adam at its tuned learning rate with state_dtype bfloat16 and int8 against float32: a "
                 "combination matches if its mean final held-out loss over seeds differs from float32's by at "
                 "most 2 % of float32's mean or by at most the larger standard deviation over seeds of the two "
                 "(a difference the seeds alone produce). Confirmed if every combination matches; not confirmed "
                 "if none does; depends otherwise.",
}


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation; the mean is infinite if any value is (a diverged seed)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    if not all(math.isfinite(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def median_steps(steps) -> float:
    """Median steps-to-target over seeds; a seed that did not reach the target (None) counts as infinite."""
    values = sorted(math.inf if s is None else float(s) for s in steps)
    if not values:
        return math.inf
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    low, high = values[middle - 1], values[middle]
    return math.inf if math.isinf(high) else (low + high) / 2


def good_width(points, threshold: float) -> tuple[float, bool]:
    """Width in decades of the contiguous learning-rate range around the best point whose loss is
    <= ``threshold``; edges interpolated linearly in log10(lr) between a point inside and the next
    outside (an infinite loss puts the edge at the point inside). Returns (width, reaches a grid edge)."""
    points = sorted((float(lr), float(loss)) for lr, loss in points)
    if not points:
        return 0.0, False
    logs = [math.log10(lr) for lr, _ in points]
    losses = [loss for _, loss in points]
    best = min(range(len(points)), key=lambda i: losses[i])
    if not losses[best] <= threshold:
        return 0.0, False
    low = high = best
    while low > 0 and losses[low - 1] <= threshold:
        low -= 1
    while high < len(points) - 1 and losses[high + 1] <= threshold:
        high += 1

    def crossing(inside: int, outside: int) -> float:
        a, b = losses[inside], losses[outside]
        if not math.isfinite(b) or b == a:
            return logs[inside]
        fraction = (threshold - a) / (b - a)
        return logs[inside] + fraction * (logs[outside] - logs[inside])

    left = logs[0] if low == 0 else crossing(low, low - 1)
    right = logs[-1] if high == len(points) - 1 else crossing(high, high + 1)
    return right - left, low == 0 or high == len(points) - 1


def _names(items) -> str:
    return ", ".join(items) if items else "none"


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------

def verdict_speed(steps: dict, fast: str = "adam", slow: str = "sgdm") -> Verdict:
    """``steps[workload][optimizer]`` = steps-to-target per seed (None: not reached)."""
    faster, slower, same = [], [], []
    for workload, per_optimizer in steps.items():
        a, b = median_steps(per_optimizer[fast]), median_steps(per_optimizer[slow])
        (faster if a < b else slower if a > b else same).append(f"{workload} ({_steps(a)} vs {_steps(b)})")
    detail = (f"{fast} reached the target in fewer steps than {slow} on {len(faster)} of {len(steps)} "
              f"workloads: {_names(faster)}; not on: {_names(slower + same)}")
    if faster and not slower:
        return Verdict(CONFIRMED, detail)
    if not faster:
        return Verdict(NOT_CONFIRMED, detail)
    return Verdict(DEPENDS, detail)


def _steps(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:g}"


def verdict_lr_width(widths: dict, robust: str = "adam", sensitive: str = "sgdm") -> Verdict:
    """``widths[workload][optimizer]`` = width in decades of the range within 10 % of the best."""
    wider, other = [], []
    for workload, per_optimizer in widths.items():
        a, b = per_optimizer[robust], per_optimizer[sensitive]
        (wider if a > b + WIDTH_MARGIN else other).append(f"{workload} ({a:.2f} vs {b:.2f} decades)")
    detail = f"{robust}'s good range is wider than {sensitive}'s on {_names(wider)}; not on {_names(other)}"
    if wider and not other:
        return Verdict(CONFIRMED, detail)
    if not wider:
        return Verdict(NOT_CONFIRMED, detail)
    return Verdict(DEPENDS, detail)


def good_cells(adam: dict, adamw: dict) -> tuple[int, int, float]:
    """Good cells of each heatmap (mean loss within 10 % of the best of both) and that best."""
    best = min(list(adam.values()) + list(adamw.values()))
    threshold = GOOD_RATIO * best
    return sum(v <= threshold for v in adam.values()), sum(v <= threshold for v in adamw.values()), best


def verdict_weight_decay(adam: dict, adamw: dict) -> Verdict:
    """``adam[(lr, wd)]``, ``adamw[(lr, wd)]`` = mean final held-out loss."""
    n_adam, n_adamw, best = good_cells(adam, adamw)
    detail = (f"cells within 10 % of the best loss ({best:.4g}): AdamW {n_adamw} of {len(adamw)}, "
              f"Adam with L2 {n_adam} of {len(adam)}")
    return Verdict(CONFIRMED if n_adamw > n_adam else NOT_CONFIRMED, detail)


def verdict_reddi(x_adam: float, x_amsgrad: float) -> Verdict:
    detail = f"final x (mean over the last period): Adam {x_adam:+.3f}, AMSGrad {x_amsgrad:+.3f}"
    return Verdict(CONFIRMED if x_adam > 0 and x_amsgrad < 0 else NOT_CONFIRMED, detail)


def compare_losses(reference, candidate) -> str:
    """'better', 'worse' or 'tie' for ``candidate`` against ``reference`` (final losses per seed)."""
    mean_r, std_r = mean_std(reference)
    mean_c, std_c = mean_std(candidate)
    if math.isinf(mean_c) or math.isinf(mean_r):
        return "tie" if math.isinf(mean_c) and math.isinf(mean_r) else ("worse" if math.isinf(mean_c) else "better")
    tolerance = max(std_r, std_c, TIE_FLOOR * abs(mean_r))
    if mean_c < mean_r - tolerance:
        return "better"
    if mean_c > mean_r + tolerance:
        return "worse"
    return "tie"


def verdict_amsgrad_models(losses: dict) -> Verdict:
    """``losses[workload] = {"adam": [...], "amsgrad": [...]}`` (final held-out loss per seed)."""
    outcome = {w: compare_losses(v["adam"], v["amsgrad"]) for w, v in losses.items()}
    better = [w for w, o in outcome.items() if o == "better"]
    detail = (f"AMSGrad better than Adam on {len(better)} of {len(outcome)} workloads ("
              + ", ".join(f"{w}: {o}" for w, o in outcome.items()) + ")")
    return Verdict(NOT_CONFIRMED if outcome and len(better) == len(outcome) else CONFIRMED, detail)


def verdict_warmup(curves: dict, plain: str = "adam", warmed: str = "adam + linear warm-up",
                   rectified: str = "radam") -> Verdict:
    """``curves[variant]`` = [(lr, final held-out loss)] over the same learning rates."""
    best = min(loss for points in curves.values() for _, loss in points)
    widths = {name: good_width(points, GOOD_RATIO * best)[0] for name, points in curves.items()}
    detail = ", ".join(f"{name} {widths[name]:.2f}" for name in (plain, warmed, rectified)) + \
        " decades within 10 % of the best loss"
    if widths[warmed] <= widths[plain] + WIDTH_MARGIN:
        return Verdict(DEPENDS, "only where warm-up is needed, and here it was not: " + detail)
    if widths[rectified] >= widths[warmed] - WIDTH_MARGIN:
        return Verdict(CONFIRMED, detail)
    return Verdict(NOT_CONFIRMED, detail)


def verdict_adabound(adabound: list, adam: list, final_lr: float) -> Verdict:
    """``adabound`` and ``adam``: [{"step", "p10", "median", "p90"}] of effective step sizes, by step."""
    ratio = adabound[0]["median"] / adam[0]["median"] if adam[0]["median"] > 0 else math.inf
    starts = 0.5 <= ratio <= 2.0
    last = adabound[-1]
    ends = last["p10"] >= final_lr / 2 and last["p90"] <= 2 * final_lr
    detail = (f"at step {adabound[0]['step']} AdaBound's median step size is {ratio:.3g}x Adam's; at step "
              f"{last['step']} its 10th-90th percentiles are [{last['p10']:.3g}, {last['p90']:.3g}] "
              f"against final_lr {final_lr:g}")
    if starts and ends:
        return Verdict(CONFIRMED, detail)
    if starts:
        return Verdict(DEPENDS, "on the length of training: " + detail)
    return Verdict(NOT_CONFIRMED, detail)


def verdict_sparse(losses: dict, dense: str = "adam", sparse=("sparseadam", "adagrad")) -> Verdict:
    """``losses[optimizer]`` = final held-out loss per seed."""
    means = {name: mean_std(values)[0] for name, values in losses.items()}
    best = min(sparse, key=lambda name: means[name])
    outcome = compare_losses(losses[best], losses[dense])
    detail = (f"mean final held-out loss: {dense} {means[dense]:.4g}, "
              + ", ".join(f"{name} {means[name]:.4g}" for name in sparse) + f" ({dense} vs {best}: {outcome})")
    return Verdict(CONFIRMED if outcome == "worse" else NOT_CONFIRMED, detail)


def verdict_state_bytes(table: dict) -> Verdict:
    """``table[(optimizer, state_dtype)]`` = measured bytes of state per parameter."""
    adam = table[("adam", "float32")]
    checks = {
        "Adam float32 = 8 B": abs(adam - 8) <= 0.1,
        "Adam = 2x SGD with momentum": abs(adam / table[("sgdm", "float32")] - 2) <= 0.1,
        "bfloat16 = 0.5x float32": abs(table[("adam", "bfloat16")] / adam - 0.5) <= 0.05,
        "int8 = 0.25x float32": abs(table[("adam", "int8")] / adam - 0.25) <= 0.05,
    }
    failed = [name for name, ok in checks.items() if not ok]
    detail = (f"Adam keeps {adam:.3g} B per parameter in float32, {table[('adam', 'bfloat16')]:.3g} B in "
              f"bfloat16, {table[('adam', 'int8')]:.3g} B in int8; SGD with momentum "
              f"{table[('sgdm', 'float32')]:.3g} B" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return Verdict(NOT_CONFIRMED if failed else CONFIRMED, detail)


def verdict_low_precision(losses: dict) -> Verdict:
    """``losses[workload][state_dtype]`` = final held-out loss per seed, with "float32" the reference."""
    matched, missed = [], []
    for workload, per_dtype in losses.items():
        reference, reference_std = mean_std(per_dtype["float32"])
        for dtype, values in per_dtype.items():
            if dtype == "float32":
                continue
            mean, std = mean_std(values)
            if not (math.isfinite(mean) and math.isfinite(reference)):
                (matched if mean == reference else missed).append(f"{dtype} on {workload} (diverged)")
                continue
            tolerance = max(SAME_LOSS * abs(reference), reference_std, std)
            label = f"{dtype} on {workload} ({(mean - reference) / reference:+.1%}, tolerance {tolerance:.2g})"
            (matched if abs(mean - reference) <= tolerance else missed).append(label)
    detail = f"as float32's loss within 2 % or the spread over seeds: {_names(matched)}; not: {_names(missed)}"
    if matched and not missed:
        return Verdict(CONFIRMED, detail)
    if not matched:
        return Verdict(NOT_CONFIRMED, detail)
    return Verdict(DEPENDS, detail)
