"""The user's own workload (`--workload FILE.py:make` / `module:make`) through train, bench and tune."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit.bench.runner import TrainConfig, run_training
from adamkit.cli import main

SRC = str(Path(adamkit.__file__).resolve().parent.parent)

WORKLOAD = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(192, 4, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return {
        "model": model,
        "train_loader": DataLoader(TensorDataset(x[:128], y[:128]), batch_size=16, shuffle=True),
        "val_loader": DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32),
        "loss_fn": nn.functional.cross_entropy,
        "task": "classification",
        "steps": 24,
        "target": {"metric": "accuracy", "value": 0.5, "mode": "max"},
    }
'''


def write_workload(folder: Path, text: str = WORKLOAD, name: str = "my_work.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


REF = ["--hp", "backend=reference"]


def test_train_with_json_tensorboard_and_checkpoint(tmp_path, capsys):
    spec = f"{write_workload(tmp_path / 'w')}:make"
    status, out, err = run(["train", "--workload", spec, "--optimizer", "adamw", "--lr", "1e-2", *REF, "-q",
                            "--json", str(tmp_path / "run.json"), "--logdir", str(tmp_path / "tb"),
                            "--checkpoint", str(tmp_path / "ck.pt")], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["workload"] == spec
    assert summary["steps"] == 24  # make()'s default budget
    assert set(summary["final"]) >= {"loss", "accuracy", "precision", "recall", "f1"}
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    assert summary["time_to_target"]["target"] == "accuracy >= 0.5"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    saved = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert saved["state"]["step"] == 24 and saved["task"] == {"epoch": 2, "position": 8}  # 8 batches an epoch


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run_with_a_shuffling_loader(tmp_path):
    spec = f"{write_workload(tmp_path / 'w')}:make"

    def config(folder, **extra):
        return TrainConfig(workload=spec, optimizer="adam", hyperparameters={"lr": 1e-2, "backend": "reference"},
                           steps=20, seed=3, quiet=True, eval_every=5, checkpoint=str(folder / "run.pt"), **extra)

    reference = run_training(config(tmp_path / "a"))

    def stop_at_13(step, total):
        if step == 13:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(config(tmp_path / "b", checkpoint_every=5), on_step=stop_at_13)
    assert torch.load(tmp_path / "b" / "run.pt", weights_only=False)["task"] == {"epoch": 1, "position": 2}
    resumed = run_training(config(tmp_path / "b", checkpoint_every=5, resume=True))
    assert resumed["resumed"]
    assert resumed["final"] == reference["final"]  # same batches after the resume, so the same numbers
    other_seed = run_training(TrainConfig(workload=spec, optimizer="adam", steps=20, seed=4, quiet=True,
                                          hyperparameters={"lr": 1e-2, "backend": "reference"}))
    assert other_seed["final"]["loss"] != reference["final"]["loss"]


def test_bench_and_report_on_a_user_workload(tmp_path, capsys):
    spec = f"{write_workload(tmp_path / 'w')}:make"
    out = tmp_path / "bench"
    status, stdout, err = run(["bench", "--workloads", spec, "--optimizers", "adam,sgdm", "--seeds", "1",
                               "--sweep-points", "2", "--steps", "12", "--jobs", "1", *REF, "-q",
                               "--out", str(out)], capsys)
    assert status == 0, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    finals = [r for r in records if r["phase"] == "final"]
    assert {r["optimizer"] for r in finals} == {"adam", "sgdm"}
    assert all(r["workload"] == spec and "accuracy" in r["final"] for r in finals)
    assert all((out / r["tb"]).is_dir() and (out / r["tb"]).resolve().is_relative_to(out.resolve()) for r in records)
    assert spec in stdout  # the leaderboard's title
    figures = os.listdir(out / "figures")
    assert any(name.startswith("curves-") for name in figures) and all(":" not in name and "/" not in name
                                                                        for name in figures)
    status, stdout, err = run(["report", str(out), "-q"], capsys)
    assert status == 0 and spec in stdout


def test_tune_on_a_user_workload_given_as_a_module(tmp_path):
    write_workload(tmp_path, name="user_pkg_mod.py")
    out = tmp_path / "tune"
    done = subprocess.run([sys.executable, "-m", "adamkit.cli", "tune", "--workload", "user_pkg_mod:make",
                           "--optimizers", "adam", "--trials", "2", "--steps", "8", "--fix", "backend=reference",
                           "--seed", "0", "--metric", "accuracy", "-q", "--out", str(out)],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    import optuna
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="user_pkg_mod:make:adam", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # accuracy
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 2
    assert "best accuracy" in done.stdout


@pytest.mark.parametrize("text, make_name, message", [
    (None, "make", "does not exist"),
    ("x = 1\n", "make", "has no function 'make'"),
    ("def make(seed):\n    return None\n", "make", "make() returned None"),
    ("def make(seed):\n    return {'model': 1}\n", "make", "has no train_loader, val_loader, loss_fn"),
    ("import torch\ndef make(seed):\n    b = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]\n"
     "    return {'model': 3, 'train_loader': b, 'val_loader': b, 'loss_fn': torch.nn.functional.cross_entropy}\n",
     "make", "model must be a torch.nn.Module"),
    ("import torch\ndef make(seed):\n    b = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]\n"
     "    return {'model': torch.nn.Linear(5, 2), 'train_loader': b, 'val_loader': b,\n"
     "            'loss_fn': torch.nn.functional.cross_entropy}\n", "make", "on the first training batch raised"),
    ("import torch\ndef make(seed):\n    b = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]\n"
     "    return {'model': torch.nn.Linear(3, 2), 'train_loader': iter(b), 'val_loader': b,\n"
     "            'loss_fn': torch.nn.functional.cross_entropy}\n", "make", "must be re-iterable"),
    ("import torch\ndef make(seed):\n    b = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]\n"
     "    return {'model': torch.nn.Linear(3, 2), 'train_loader': b, 'val_loader': b,\n"
     "            'loss_fn': lambda o, t: (o - o).sum(1)}\n", "make", "must return a scalar tensor"),
    ("def make(seed):\n    raise RuntimeError('no data here')\n", "make", "make(0) raised RuntimeError: no data here"),
    (WORKLOAD, "build", "has no function 'build'"),
])
@pytest.mark.parametrize("command", ["train", "bench", "tune"])
def test_unusable_workloads_stop_before_training(tmp_path, capsys, text, make_name, message, command):
    path = tmp_path / "missing.py" if text is None else write_workload(tmp_path, text, name=f"bad_{command}.py")
    spec = f"{path}:{make_name}"
    out = tmp_path / "out"
    argv = {"train": ["train", "--workload", spec, "--json", str(out / "run.json")],
            "bench": ["bench", "--workloads", spec, "--out", str(out), "--jobs", "1"],
            "tune": ["tune", "--workload", spec, "--optimizers", "adam", "--out", str(out)]}[command]
    status, stdout, err = run(argv, capsys)
    assert status == 2
    assert f"adamkit {command}: error:" in err and message in err, err
    assert not (out / "run.json").exists() and not (out / "results.jsonl").exists() and not (out / "study.db").exists()


def test_batch_size_belongs_to_the_users_loader(tmp_path, capsys):
    spec = f"{write_workload(tmp_path)}:make"
    status, _, err = run(["train", "--workload", spec, "--batch-size", "8"], capsys)
    assert status == 2 and "set the batch size there" in err


def test_the_example_file_is_a_valid_workload():
    from adamkit.bench import workloads
    example = Path(__file__).resolve().parent.parent / "examples" / "my_workload.py"
    if not example.is_file():
        pytest.skip("examples/ is not part of an installed package")
    workload = workloads.get(f"{example}:make")
    assert workload.steps == 600 and workload.target.describe() == "accuracy >= 0.9"
    assert workload.report_metrics == ("accuracy", "f1")
