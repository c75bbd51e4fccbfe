"""`adamkit train --nproc N --strategy ddp|zero|fsdp2`: ranks started by torch.distributed.run (gloo, CPU).

Each distributed run is compared with an independent one-process `adamkit train` of the same global
batch; a run killed mid-way (a rank exits hard after a checkpoint) resumes to the uninterrupted
result; bad launch flags exit 2 before any training. Every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adamkit

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")

SRC = str(Path(adamkit.__file__).resolve().parent.parent)
TIMEOUT = 240
# logistic regression on the digits: the smallest model workload; a large lr so 4 steps move far
RUN = ["--workload", "logreg-digits", "--optimizer", "adamw", "--lr", "0.05", "--steps", "4",
       "--batch-size", "32", "--eval-every", "2", "--quiet"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([SRC] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def adamkit_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamkit.cli", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def train(tmp: Path, name: str, *args, run=RUN, env=None) -> dict:
    out = tmp / f"{name}.json"
    done = adamkit_cli("train", *run, "--json", str(out), *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def assert_same_run(a: dict, b: dict, exact: bool = False) -> None:
    assert a["steps"] == b["steps"]
    assert a["final"].keys() == b["final"].keys() and "loss" in a["final"]
    for key in a["final"]:
        if exact:
            assert a["final"][key] == b["final"][key], key
        else:
            assert a["final"][key] == pytest.approx(b["final"][key], rel=1e-5, abs=1e-6), key
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("one"), "one")


@pytest.mark.parametrize("strategy", ["ddp", "zero", "fsdp2"])
def test_two_ranks_end_where_one_process_ends(tmp_path, one_process, strategy):
    summary = train(tmp_path, strategy, "--nproc", "2", "--strategy", strategy, "--checkpoint", str(tmp_path / "ck"))
    assert (summary["world_size"], summary["strategy"]) == (2, strategy)
    assert (one_process["world_size"], one_process["strategy"]) == (1, None)
    assert one_process["final"]["loss"] < one_process["history"][0]["loss"] - 0.1  # the run did move
    assert_same_run(summary, one_process)
    assert (tmp_path / "ck" / "meta.pt").is_file() and list((tmp_path / "ck").glob("*.distcp"))


WORKLOAD = '''
import os
import torch
from torch import nn

def make(seed):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    calls = [0]

    def loss_fn(out, target):
        if model.training:
            calls[0] += 1
            if calls[0] == int(os.environ.get("CRASH_AT_STEP", 0)) and os.environ.get("RANK") == "1":
                os._exit(9)  # a rank dies without any clean-up, as under kill -9
        return nn.functional.cross_entropy(out, target)

    return {"model": model, "train_loader": train, "val_loader": [(x, y)], "loss_fn": loss_fn, "steps": 6}
'''


def test_resume_after_a_kill_continues_exactly_and_at_another_world_size(tmp_path):
    (tmp_path / "crashy.py").write_text(WORKLOAD)
    run = ["--workload", f"{tmp_path / 'crashy.py'}:make", "--optimizer", "adam", "--lr", "0.05",
           "--steps", "6", "--eval-every", "2", "--checkpoint-every", "2", "--quiet"]
    whole = train(tmp_path, "whole", "--nproc", "2", "--strategy", "fsdp2", "--checkpoint", str(tmp_path / "w"),
                  run=run)
    # rank 1 dies in step 5 (after the checkpoint of step 4)
    ck = tmp_path / "ck"
    killed = adamkit_cli("train", *run, "--nproc", "2", "--strategy", "fsdp2", "--checkpoint", str(ck),
                         env=_env(CRASH_AT_STEP="5"))
    assert killed.returncode != 0
    meta = torch.load(ck / "meta.pt", weights_only=True)
    assert meta["state"]["step"] == 4
    ck_one = tmp_path / "ck_one"
    subprocess.run(["cp", "-r", str(ck), str(ck_one)], check=True, timeout=60)
    resumed = train(tmp_path, "resumed", "--nproc", "2", "--strategy", "fsdp2", "--checkpoint", str(ck), "--resume",
                    run=run)
    assert resumed["resumed"]
    assert_same_run(resumed, whole, exact=True)
    # the same checkpoint continued by one rank under DDP: the same run, up to float rounding
    other = train(tmp_path, "other", "--nproc", "1", "--strategy", "ddp", "--checkpoint", str(ck_one), "--resume",
                  run=run)
    assert other["resumed"] and other["world_size"] == 1
    assert_same_run(other, whole)


def _busy_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "fsdp3"], "invalid choice: 'fsdp3'"),
    (["--nproc", "0"], "--nproc 0: needs at least one process"),
    (["--nproc", "2", "--master-port", "BUSY"], "is in use"),
    (["--nproc", "5"], "not divisible by the 5 ranks"),
])
def test_bad_launch_input_exits_2_before_training(tmp_path, flags, message):
    busy = _busy_port()
    try:
        flags = [str(busy.getsockname()[1]) if f == "BUSY" else f for f in flags]
        done = adamkit_cli("train", *RUN, "--json", str(tmp_path / "x.json"), *flags)
    finally:
        busy.close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_runs_each_training_run_with_n_ranks(tmp_path):
    done = adamkit_cli("bench", "--workloads", "logreg-digits", "--optimizers", "adam", "--seeds", "1",
                       "--lr", "0.05", "--steps", "2", "--batch-size", "32", "--no-report", "--quiet",
                       "--nproc", "2", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert records and all(r["world_size"] == 2 and r["strategy"] == "ddp" for r in records)
