"""`adamkit results`: every section, figure and verdict at the test scale; the verdict rules on both
outcomes; reruns reuse finished runs; figures mark diverged runs at the axis edge."""
import json
import math
import re

import pytest

from adamkit.bench import report
from adamkit.bench import results_claims as claims
from adamkit.bench.results import RUNS_DIR, SCALES, ResultsConfig, measured_steps, run_results
from adamkit.cli import main

TITLES = ["Speed of convergence", "Learning-rate sensitivity", "Decoupled weight decay",
          "AMSGrad on Reddi et al.'s problem", "AMSGrad in practice", "Warm-up and RAdam",
          "AdaBound: from Adam to SGD", "Sparse gradients", "Memory: bytes of optimizer state",
          "Memory: low-precision state and final loss"]
STATUSES = {claims.CONFIRMED, claims.NOT_CONFIRMED, claims.DEPENDS}


def _records(out):
    """Every readable record (the interruption test leaves a line cut short in the shared folder)."""
    return _records_tolerant(out / RUNS_DIR / "results.jsonl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = run_results(ResultsConfig(out=str(out), scale="test", jobs=1))
    return out, result


def _sections(text):
    return {m.group(1): m.group(2) for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M)}


def test_every_section_has_claim_experiment_figure_table_rule_and_verdict(tiny):
    out, result = tiny
    text = (out / "RESULTS.md").read_text()
    sections = _sections(text)
    for title in TITLES:
        body = sections[title]
        for part in ("**Claim.**", "**Experiment.**", "**Rule.**"):
            assert part in body, (title, part)
        assert "\n| " in body and "|---" in body, title  # a table
        verdicts = re.findall(r"^\*\*Verdict: (confirmed|not confirmed|depends)\*\* — \S", body, re.M)
        assert len(verdicts) == 1, title
        images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", body)
        assert len(images) == 1, title
        png = out / images[0]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", title
    assert set(result["verdicts"]) == set(TITLES)
    assert all(v.status in STATUSES for v in result["verdicts"].values())
    # the verdict table at the top lists every claim with the section's own verdict
    table = sections["Verdicts"]
    for title in TITLES:
        row = next(line for line in table.splitlines() if line.startswith(f"| [{title}]"))
        assert f"**{result['verdicts'][title].status}**" in row
    assert "commit" in text.splitlines()[2] and "Machine:" in text


def test_the_documents_verdicts_follow_the_rules_on_the_recorded_numbers(tiny):
    out, result = tiny
    records = _records(out)
    reddi = {r["optimizer"]: r["final"]["x_mean"] for r in records if r["workload"] == "reddi"}
    assert result["verdicts"]["AMSGrad on Reddi et al.'s problem"] == claims.verdict_reddi(reddi["adam"],
                                                                                          reddi["amsgrad"])
    scale = SCALES["test"]
    maps = {"adam": {}, "adamw": {}}
    for r in records:
        wd = r["hyperparameters_user"].get("weight_decay")
        if r["workload"] == scale.heatmap_workload and wd is not None and r["optimizer"] in maps:
            maps[r["optimizer"]][(r["lr"], wd)] = r["final"]["loss"] if not r["diverged"] else math.inf
    assert len(maps["adam"]) == len(scale.heatmap_lrs) * len(scale.heatmap_wds)
    assert result["verdicts"]["Decoupled weight decay"] == claims.verdict_weight_decay(maps["adam"], maps["adamw"])


def test_a_rerun_trains_nothing_and_an_interrupted_run_continues(tiny, capsys):
    out, _ = tiny
    before = _records(out)
    again = run_results(ResultsConfig(out=str(out), scale="test", jobs=1))
    assert again["completed"] == 0 and again["failures"] == []
    assert len(_records(out)) == len(before)
    # cut the record file as an interruption would (the last line half written) and run the command
    path = out / RUNS_DIR / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-5]) + lines[-5][: len(lines[-5]) // 2])
    assert main(["results", "--out", str(out), "--scale", "test", "--jobs", "1", "--quiet"]) == 0
    assert "| claim | verdict | why |" in capsys.readouterr().out
    after = _records(out)
    assert len(after) == len(before)
    assert {r["key"] for r in after} == {r["key"] for r in before}


def _records_tolerant(path):
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def test_probe_records_carry_effective_step_sizes_and_sparse_runs(tiny):
    out, _ = tiny
    records = _records(out)
    bounds = [r for r in records if r.get("probe") == "bounds"]
    assert {r["optimizer"] for r in bounds} == {"adam", "adabound", "sgd"}
    sgd = next(r for r in bounds if r["optimizer"] == "sgd")
    # plain SGD's effective step size is its learning rate for every element
    for entry in sgd["effective_step_size"]:
        assert entry["p10"] == pytest.approx(0.1, rel=1e-4) and entry["p90"] == pytest.approx(0.1, rel=1e-4)
    adabound = next(r for r in bounds if r["optimizer"] == "adabound")
    for entry in adabound["effective_step_size"]:  # inside AdaBound's bounds at every measured step
        t = entry["step"]
        assert 0.1 * (1 - 1 / (1e-3 * t + 1)) * (1 - 1e-4) <= entry["p10"]
        assert entry["p90"] <= 0.1 * (1 + 1 / (1e-3 * t)) * (1 + 1e-4)
    sparse = {r["optimizer"]: r["sparse"] for r in records if r.get("probe") == "sparse"}
    assert sparse == {"adam": False, "sparseadam": True, "adagrad": True}


# --------------------------------------------------------------------------------------------
# The rules, each fed numbers where the claim holds and where it does not
# --------------------------------------------------------------------------------------------

def test_speed_rule():
    holds = {"a": {"adam": [10, 20, 30], "sgdm": [40, 50, None]}, "b": {"adam": [5, 5], "sgdm": [None, None]}}
    assert claims.verdict_speed(holds).status == claims.CONFIRMED
    fails = {"a": {"adam": [40, 50, 60], "sgdm": [10, 20, 30]}}
    assert claims.verdict_speed(fails).status == claims.NOT_CONFIRMED
    mixed = {**holds, "c": {"adam": [None], "sgdm": [100]}}
    assert claims.verdict_speed(mixed).status == claims.DEPENDS
    neither = {"a": {"adam": [None, None], "sgdm": [None, None]}}
    assert claims.verdict_speed(neither).status == claims.NOT_CONFIRMED
    assert claims.median_steps([10, None, None]) == math.inf and claims.median_steps([10, 30, None]) == 30


def test_good_width_interpolates_in_log_lr_and_flags_the_grid_edge():
    points = [(1e-3, 2.0), (1e-2, 1.0), (1e-1, 1.0), (1.0, 3.0)]
    width, edge = claims.good_width(points, 1.1)
    # left edge 1/10 of the way from 1e-2 to 1e-3 (loss 1.0 -> 2.0), right edge 1/20 of the way to 1.0
    assert width == pytest.approx(0.1 + 1 + 0.05) and not edge
    assert claims.good_width([(1e-3, 1.0), (1e-2, math.inf)], 1.1) == (0.0, True)
    assert claims.good_width([(1e-3, 1.0), (1e-2, 1.05)], 1.1) == (pytest.approx(1.0), True)


def test_lr_sensitivity_rule():
    holds = {"a": {"adam": 2.0, "sgdm": 1.0}, "b": {"adam": 1.5, "sgdm": 0.5}}
    assert claims.verdict_lr_width(holds).status == claims.CONFIRMED
    assert claims.verdict_lr_width({"a": {"adam": 1.0, "sgdm": 1.05}}).status == claims.NOT_CONFIRMED
    assert claims.verdict_lr_width({**holds, "c": {"adam": 0.5, "sgdm": 1.0}}).status == claims.DEPENDS


def test_weight_decay_rule():
    adamw = {(1, 1): 1.0, (1, 2): 1.05, (2, 1): 1.08, (2, 2): 2.0}
    adam = {(1, 1): 1.02, (1, 2): 3.0, (2, 1): 3.0, (2, 2): 3.0}
    assert claims.verdict_weight_decay(adam, adamw).status == claims.CONFIRMED
    assert claims.verdict_weight_decay(adamw, adam).status == claims.NOT_CONFIRMED
    assert claims.verdict_weight_decay(adam, adam).status == claims.NOT_CONFIRMED  # equal is not wider


def test_reddi_rule():
    assert claims.verdict_reddi(0.9, -0.95).status == claims.CONFIRMED
    assert claims.verdict_reddi(-0.9, -0.95).status == claims.NOT_CONFIRMED
    assert claims.verdict_reddi(0.9, 0.5).status == claims.NOT_CONFIRMED


def test_amsgrad_rule():
    mixed = {"a": {"adam": [1.0, 1.02], "amsgrad": [0.8, 0.82]}, "b": {"adam": [1.0, 1.0], "amsgrad": [1.0, 1.0]}}
    assert claims.verdict_amsgrad_models(mixed).status == claims.CONFIRMED
    always = {"a": {"adam": [1.0, 1.02], "amsgrad": [0.8, 0.82]}, "b": {"adam": [2.0], "amsgrad": [1.0]}}
    assert claims.verdict_amsgrad_models(always).status == claims.NOT_CONFIRMED
    # a difference inside the spread over seeds is a tie, not a gain
    assert claims.compare_losses([1.0, 1.2], [1.05, 1.0]) == "tie"
    assert claims.compare_losses([1.0, 1.0], [math.inf, 1.0]) == "worse"


def test_warmup_rule():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    plain = list(zip(lrs, [2.0, 1.0, 5.0, math.inf]))
    warmed = list(zip(lrs, [2.0, 1.0, 1.0, 5.0]))
    holds = {"adam": plain, "adam + linear warm-up": warmed, "radam": list(zip(lrs, [2.0, 1.0, 1.02, 5.0]))}
    assert claims.verdict_warmup(holds).status == claims.CONFIRMED
    fails = {**holds, "radam": plain}
    assert claims.verdict_warmup(fails).status == claims.NOT_CONFIRMED
    unneeded = {**holds, "adam + linear warm-up": plain}
    assert claims.verdict_warmup(unneeded).status == claims.DEPENDS


def _trace(*entries):
    return [{"step": s, "p10": lo, "median": mid, "p90": hi} for s, lo, mid, hi in entries]


def test_adabound_rule():
    adam = _trace((1, 0.01, 0.1, 1.0), (1000, 0.01, 0.5, 10.0))
    holds = _trace((1, 0.01, 0.12, 1.0), (1000, 0.07, 0.1, 0.15))
    assert claims.verdict_adabound(holds, adam, 0.1).status == claims.CONFIRMED
    too_short = _trace((1, 0.01, 0.12, 1.0), (20, 0.02, 0.1, 5.0))
    assert claims.verdict_adabound(too_short, adam, 0.1).status == claims.DEPENDS
    unlike_adam = _trace((1, 0.05, 0.9, 1.0), (1000, 0.07, 0.1, 0.15))
    assert claims.verdict_adabound(unlike_adam, adam, 0.1).status == claims.NOT_CONFIRMED


def test_sparse_rule():
    holds = {"adam": [1.5, 1.52], "sparseadam": [1.2, 1.22], "adagrad": [1.3, 1.31]}
    assert claims.verdict_sparse(holds).status == claims.CONFIRMED
    fails = {"adam": [1.2, 1.22], "sparseadam": [1.21, 1.2], "adagrad": [1.3, 1.31]}
    assert claims.verdict_sparse(fails).status == claims.NOT_CONFIRMED


def test_memory_rules():
    table = {("adam", "float32"): 8.0, ("adam", "bfloat16"): 4.0, ("adam", "int8"): 2.1, ("sgdm", "float32"): 4.0}
    assert claims.verdict_state_bytes(table).status == claims.CONFIRMED
    assert claims.verdict_state_bytes({**table, ("adam", "int8"): 8.0}).status == claims.NOT_CONFIRMED
    assert claims.verdict_state_bytes({**table, ("adam", "float32"): 12.0}).status == claims.NOT_CONFIRMED
    same = {"w": {"float32": [1.0, 1.02], "bfloat16": [1.01, 1.01], "int8": [1.0, 1.03]}}
    assert claims.verdict_low_precision(same).status == claims.CONFIRMED
    worse = {"w": {"float32": [1.0, 1.02], "bfloat16": [1.2, 1.2], "int8": [1.3, math.inf]}}
    assert claims.verdict_low_precision(worse).status == claims.NOT_CONFIRMED
    mixed = {"w": {"float32": [1.0], "bfloat16": [1.01], "int8": [1.1]}}
    assert claims.verdict_low_precision(mixed).status == claims.DEPENDS
    # 8 % worse, but the seeds of float32 alone spread by more than that: a match
    noisy = {"w": {"float32": [0.10, 0.14], "bfloat16": [0.13, 0.13], "int8": [0.12, 0.12]}}
    assert claims.verdict_low_precision(noisy).status == claims.CONFIRMED
    assert claims.verdict_low_precision({"w": {"float32": [0.10, 0.14], "bfloat16": [0.2, 0.2],
                                               "int8": [0.12, 0.12]}}).status == claims.DEPENDS


def test_measured_steps_are_log_spaced_and_end_at_the_budget():
    steps = measured_steps(2000, 40)
    assert steps[0] == 1 and steps[-1] == 2000 and steps == sorted(set(steps))
    assert measured_steps(1, 5) == [1]


# --------------------------------------------------------------------------------------------
# Figures: a diverged run is marked at the axis edge, never plotted at its value
# --------------------------------------------------------------------------------------------

def test_lr_sensitivity_figure_marks_a_blown_up_run_on_the_edge(tmp_path):
    sweeps = {"adam": [(1e-3, 0.5), (1e-2, 0.3), (1e-1, 0.4)],
              "sgd": [(1e-3, 0.9), (1e-2, 0.6), (1e-1, 1e235), (1.0, math.inf)]}
    path = tmp_path / "lr.png"
    low, high = report.plot_lr_sensitivity(sweeps, {"adam": 1e-2}, "quadratic", path, ceiling=2.3)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert 0.9 < high < 2.0 and low > 0.1  # the axis fits the runs that trained, not 1e235
    # without a known starting loss, only non-finite values are taken off the axis
    _, high = report.plot_lr_sensitivity(sweeps, {}, "quadratic", tmp_path / "lr2.png")
    assert high > 1e200


def test_curves_figure_cuts_a_run_that_blows_up(tmp_path):
    def run(seed, values):
        return {"seed": seed, "history": [{"step": 10 * i, "loss": v} for i, v in enumerate(values)]}
    rows = [{"optimizer": "adam", "extra": "", "lr": 1e-3, "diverged": 0, "seeds": 1,
             "runs": [run(0, [2.3, 1.0, 0.5, 0.3])]},
            {"optimizer": "sgd", "extra": "", "lr": 1.0, "diverged": 0, "seeds": 1,
             "runs": [run(0, [2.3, 50.0, 1e120, 1e235])]}]
    low, high = report.plot_curves(rows, "mlp-digits", tmp_path / "curves.png")
    assert high < 10  # 1.5x the starting loss at most, log axis padding aside


def test_bench_report_uses_the_starting_loss_as_the_lr_figure_ceiling():
    records = [{"workload": "quadratic", "history": [{"step": 0, "loss": 5.0}]},
               {"workload": "quadratic", "history": [{"step": 0, "loss": 7.0}, {"step": 9, "loss": 1.0}]},
               {"workload": "reddi", "history": [{"step": 0, "loss": 0.1}]}]
    assert report.start_loss(records, "quadratic") == 7.0
    assert report.start_loss(records, "beale") is None
