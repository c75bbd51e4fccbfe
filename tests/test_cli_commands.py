"""The `adamkit` command line: help texts, exit statuses, messages, and the console script."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adamkit.cli import main

SUBCOMMANDS = ["train", "bench", "landscape", "report", "speed"]


def run_cli(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: adamkit {command}")
    expected = {"train": ["--workload", "--optimizer", "--lr", "--betas", "--schedule", "--steps", "--epochs",
                          "--batch-size", "--seed", "--init", "--logdir", "--json", "--checkpoint",
                          "--checkpoint-every", "--resume", "--quiet", "--hp"],
                "bench": ["--suite", "--workloads", "--optimizers", "--seeds", "--out", "--lr", "--jobs"],
                "landscape": ["--function", "--optimizers", "--out"],
                "report": ["DIR"],
                "speed": ["--shapes", "--scale", "--optimizers", "--state-dtype", "--backend",
                          "--steps", "--warmup", "--compare", "--json"]}[command]
    for flag in expected:
        assert flag in out, flag


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: adamkit" in capsys.readouterr().out


def test_train_list(capsys):
    status, out, _ = run_cli(["train", "--list"], capsys)
    assert status == 0
    assert "mlp-mnist1d" in out and "amsgrad" in out and "warmup_cosine" in out


def test_train_json_and_hyperparameter_flags(tmp_path, capsys):
    path = tmp_path / "run.json"
    status, out, _ = run_cli(["train", "--workload", "logreg-digits", "--optimizer", "adam", "--lr", "0.01",
                              "--betas", "0.8,0.95", "--amsgrad", "--hp", "eps=1e-6", "--steps", "6",
                              "--batch-size", "32", "--json", str(path)], capsys)
    assert status == 0 and "logreg-digits / adam" in out
    summary = json.loads(path.read_text())
    assert summary["hyperparameters_set"] == {"lr": 0.01, "betas": [0.8, 0.95], "amsgrad": True, "eps": 1e-6}
    assert summary["steps"] == 6


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--workload", "bogus"], "valid workloads: rosenbrock, beale"),
    (["train", "--workload", "rosenbrock", "--optimizer", "bogus"], "valid optimizers: adabelief"),
    (["train", "--workload", "rosenbrock", "--schedule", "bogus"], "valid schedules: constant"),
    (["train", "--workload", "rosenbrock", "--betas", "1.5,0.999"], "Invalid beta1: 1.5 (must be in [0, 1))"),
    (["train", "--workload", "rosenbrock", "--optimizer", "sgd", "--nesterov"], "Nesterov"),
    (["train", "--workload", "rosenbrock", "--optimizer", "adam", "--momentum", "0.9"],
     "has no hyperparameter 'momentum'"),
    (["train", "--workload", "rosenbrock", "--hp", "oops"], "--hp expects KEY=VALUE"),
    (["bench", "--workloads", "bogus", "--out", "{tmp}/b"], "valid workloads"),
    (["bench", "--optimizers", "adam,bogus", "--out", "{tmp}/b"], "valid optimizers"),
    (["landscape", "--function", "bogus", "--out", "{tmp}/x.png"], "valid functions: rosenbrock, beale, rastrigin"),
    (["landscape", "--optimizers", "bogus", "--out", "{tmp}/x.png"], "valid optimizers"),
    (["report", "{tmp}/nothing"], "no results.jsonl"),
])
def test_bad_input_exits_2_with_message(argv, fragment, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert fragment.lower() in err.lower()
    assert err.startswith(f"adamkit {argv[0]}: error: ")


def test_paper_workload_without_data(tmp_path, capsys):
    status, _, err = run_cli(["train", "--workload", "logreg-mnist", "--data-dir", str(tmp_path)], capsys)
    assert status == 2
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err and "--download" in err
    status, _, err = run_cli(["train", "--workload", "cnn-cifar10", "--data-dir", str(tmp_path)], capsys)
    assert status == 2 and "cifar-10-batches-py" in err


def test_unwritable_out_is_a_clear_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    status, out, err = run_cli(["bench", "--workloads", "rosenbrock", "--optimizers", "adam",
                                "--out", str(blocker / "out")], capsys)
    assert status == 2 and "cannot write to --out" in err
    assert "sweep" not in err and blocker.read_text() == "keep me"
    status, _, err = run_cli(["train", "--workload", "rosenbrock", "--json", str(blocker / "x.json")], capsys)
    assert status == 2 and "cannot write" in err


def test_bench_then_report(tmp_path, capsys):
    out = tmp_path / "bench"
    status, stdout, _ = run_cli(["bench", "--workloads", "reddi", "--optimizers", "adam,amsgrad", "--steps", "505",
                                 "--out", str(out), "--jobs", "1", "--quiet"], capsys)
    assert status == 0
    assert "reddi" in stdout and "amsgrad" in stdout
    assert (out / "report.md").is_file()
    (out / "report.md").unlink()
    status, stdout, _ = run_cli(["report", str(out), "--quiet"], capsys)
    assert status == 0 and (out / "report.md").is_file() and "reddi" in stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["optimizer"]: r["lr_source"] for r in records} == {"adam": "prescribed", "amsgrad": "prescribed"}
    x = {r["optimizer"]: r["final"]["x"] for r in records}
    assert x["amsgrad"] < x["adam"]


def test_landscape_writes_png(tmp_path, capsys):
    png = tmp_path / "rosen.png"
    summary = tmp_path / "rosen.json"
    status, _, _ = run_cli(["landscape", "--function", "rosenbrock", "--optimizers", "adam,sgd", "--steps", "40",
                            "--sweep-points", "2", "--out", str(png), "--json", str(summary), "--quiet"], capsys)
    assert status == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    chosen = json.loads(summary.read_text())["optimizers"]
    assert set(chosen) == {"adam", "sgd"}
    for name, result in chosen.items():
        finite = {lr: v for lr, v in result["sweep"].items() if v is not None}
        assert result["final"] == pytest.approx(min(finite.values()))


def test_console_script_and_module_entry_point(tmp_path):
    script = shutil.which("adamkit", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "adamkit"]
    result = subprocess.run(command + ["train", "--workload", "quadratic", "--steps", "3", "--quiet",
                                       "--json", str(tmp_path / "q.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "q.json").read_text())["steps"] == 3
    result = subprocess.run([sys.executable, "-m", "adamkit", "train", "--workload", "bogus"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "valid workloads" in result.stderr


def test_speed_runs_through_the_adamkit_command(tmp_path, capsys):
    out = tmp_path / "speed.json"
    status, text, _ = run_cli(["speed", "--shapes", "uniform", "--scale", "0.002", "--steps", "1",
                               "--warmup", "0", "--optimizers", "adam", "--json", str(out)], capsys)
    assert status == 0
    assert text.startswith("copy bandwidth:")
    rows = json.loads(out.read_text())["rows"]
    assert {r["optimizer"] for r in rows} >= {"adam"}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_speed_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit) as info:
        main(["speed", "--optimizers", "adamm"])
    assert info.value.code == 2
    assert "adamm" in capsys.readouterr().err
