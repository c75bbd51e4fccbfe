"""`adamkit bench` and `adamkit report` on a tiny suite: records, TensorBoard files, report, resume."""
import json
import os

import pytest

from adamkit.bench import report, suite
from adamkit.bench.errors import UsageError
from adamkit.bench.suite import BenchConfig, run_bench

TINY = dict(suite=None, workloads=["rosenbrock", "logreg-digits"], optimizers=["sgd", "adam"], seeds=[0, 1],
            steps=8, batch_size=64, sweep_points=2, sweep_fraction=0.5, max_extensions=1, jobs=1)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(BenchConfig(out=str(out), **TINY))
    paths = report.generate(out)
    return out, result, paths


def _lines(out):
    return (out / "results.jsonl").read_text().splitlines()


def test_bench_writes_one_record_per_run(tiny_bench):
    out, result, _ = tiny_bench
    records = [json.loads(line) for line in _lines(out)]
    assert len(records) == result["completed"] == len({r["key"] for r in records})
    finals = [r for r in records if r["phase"] == "final"]
    sweeps = [r for r in records if r["phase"] == "sweep"]
    # rosenbrock is deterministic: one final run per optimizer; logreg-digits: one per seed
    assert sorted((r["workload"], r["optimizer"], r["seed"]) for r in finals) == [
        ("logreg-digits", "adam", 0), ("logreg-digits", "adam", 1), ("logreg-digits", "sgd", 0),
        ("logreg-digits", "sgd", 1), ("rosenbrock", "adam", 0), ("rosenbrock", "sgd", 0)]
    assert all(r["steps"] == 4 for r in sweeps) and all(r["steps_planned"] == 8 for r in finals)
    assert len(sweeps) >= 8  # 2 learning rates x 2 optimizers x 2 workloads, plus edge extensions
    for workload in ("rosenbrock", "logreg-digits"):
        for optimizer in ("sgd", "adam"):
            swept = [r for r in sweeps if r["workload"] == workload and r["optimizer"] == optimizer]
            best = min(swept, key=lambda r: (r["final"]["loss"] if not r["diverged"] else float("inf")))
            chosen = {r["lr"] for r in finals if r["workload"] == workload and r["optimizer"] == optimizer}
            assert chosen == {best["lr"]}  # the final runs use the sweep's best learning rate
    assert all(r["protocol"]["sweep_points"] == 2 for r in records)


def test_bench_writes_tensorboard_event_files(tiny_bench):
    out, _, _ = tiny_bench
    for line in _lines(out):
        record = json.loads(line)
        folder = out / record["tb"]
        assert folder.is_dir()
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(folder))


def test_report_files_and_figures(tiny_bench):
    out, _, paths = tiny_bench
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "## Protocol" in markdown and "log-spaced" in markdown and "## rosenbrock" in markdown
    assert "<table>" in html and "<img" in html
    for kind in ("curves", "ttt", "lr"):
        for workload in ("rosenbrock", "logreg-digits"):
            png = out / "figures" / f"{kind}-{workload}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
            assert f"figures/{kind}-{workload}.png" in markdown and f"figures/{kind}-{workload}.png" in html
    assert "rosenbrock" in paths["leaderboard"] and "logreg-digits" in paths["leaderboard"]


def test_rerun_skips_finished_runs_and_keeps_results(tiny_bench):
    out, first, _ = tiny_bench
    before = (out / "results.jsonl").read_bytes()
    again = run_bench(BenchConfig(out=str(out), **TINY))
    assert again["completed"] == 0 and again["skipped"] == first["completed"]
    assert (out / "results.jsonl").read_bytes() == before


def test_interrupted_bench_continues_and_never_corrupts(tmp_path, monkeypatch):
    config = dict(TINY, workloads=["rosenbrock"], optimizers=["adam"], seeds=[0])
    calls = []
    original = suite.execute

    def interrupt_on_third(spec, out):
        calls.append(spec.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(spec, out)

    monkeypatch.setattr(suite, "execute", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(tmp_path), **config))
    kept = _lines(tmp_path)
    assert len(kept) == 2
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"key": "cut sh')  # a write cut short by a crash
    monkeypatch.setattr(suite, "execute", original)
    result = run_bench(BenchConfig(out=str(tmp_path), **config))
    assert result["skipped"] == 2
    lines = _lines(tmp_path)
    assert lines[:2] == kept and lines[2] == '{"key": "cut sh'
    records, bad = suite.read_results(tmp_path)
    assert bad == 1 and len(records) == 2 + result["completed"]
    assert any(r["phase"] == "final" for r in records)


def test_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write to --out"):
        run_bench(BenchConfig(out=str(blocker / "sub"), **TINY))
    with pytest.raises(UsageError, match="not a directory"):
        run_bench(BenchConfig(out=str(blocker), **TINY))
    assert blocker.read_text() == "not a folder"


def test_bad_bench_input(tmp_path):
    with pytest.raises(UsageError, match="valid optimizers"):
        run_bench(BenchConfig(out=str(tmp_path), **dict(TINY, optimizers=["adam", "bogus"])))
    with pytest.raises(UsageError, match="valid workloads"):
        run_bench(BenchConfig(out=str(tmp_path), **dict(TINY, workloads=["bogus"])))
    with pytest.raises(UsageError, match=r"Invalid weight_decay: -1.0 \(must be >= 0\)"):
        run_bench(BenchConfig(out=str(tmp_path), hyperparameters={"weight_decay": -1.0}, **TINY))
    with pytest.raises(UsageError, match="no chosen optimizer has the hyperparameter"):
        run_bench(BenchConfig(out=str(tmp_path), hyperparameters={"beta3": 0.9}, **TINY))
    assert not (tmp_path / "results.jsonl").exists()


def test_paper_suite_without_data_names_the_files(tmp_path):
    with pytest.raises(UsageError) as info:
        run_bench(BenchConfig(out=str(tmp_path / "out"), suite="paper", data_dir=str(tmp_path / "data"), steps=1))
    assert "train-images-idx3-ubyte" in str(info.value) and "--download" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_worker_processes_give_the_same_results_as_one_process(tmp_path):
    config = dict(TINY, workloads=["quadratic", "logreg-digits"], optimizers=["adam", "sgdm"], seeds=[0])
    serial = run_bench(BenchConfig(out=str(tmp_path / "serial"), **config))
    parallel = run_bench(BenchConfig(out=str(tmp_path / "parallel"), **dict(config, jobs=2)))
    assert parallel["failures"] == [] and parallel["completed"] == serial["completed"]
    by_key = {r["key"]: r["final"] for r in serial["records"]}
    assert {r["key"]: r["final"] for r in parallel["records"]} == by_key
