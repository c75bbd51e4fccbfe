"""`adamkit train` as a library call: summaries, checkpoints, resume, TensorBoard logs."""
import json
import os

import pytest
import torch

from adamkit.bench.errors import UsageError
from adamkit.bench.runner import TrainConfig, run_training

SUMMARY_KEYS = {"workload", "optimizer", "hyperparameters", "seed", "steps", "wall_time_s", "final"}


def test_json_summary_is_valid_and_complete(tmp_path):
    path = tmp_path / "out" / "run.json"
    summary = run_training(TrainConfig(workload="logreg-digits", optimizer="adamw", hyperparameters={"lr": 3e-3},
                                       steps=12, batch_size=32, seed=3, quiet=True, json_path=str(path)))
    on_disk = json.loads(path.read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["workload"] == "logreg-digits" and on_disk["optimizer"] == "adamw"
    assert on_disk["seed"] == 3 and on_disk["steps"] == 12 and on_disk["batch_size"] == 32
    assert on_disk["hyperparameters"]["lr"] == 3e-3
    assert on_disk["hyperparameters"]["weight_decay"] == 1e-2  # AdamW's own default filled in
    assert on_disk["hyperparameters_set"] == {"lr": 3e-3}
    assert set(on_disk["final"]) >= {"loss", "accuracy", "precision", "recall", "f1", "train_loss"}
    assert on_disk["final"] == summary["final"]
    assert on_disk["wall_time_s"] > 0
    assert [h["step"] for h in on_disk["history"]][-1] == 12


def test_reddi_and_function_summaries_carry_the_point(tmp_path):
    reddi = run_training(TrainConfig(workload="reddi", optimizer="amsgrad", steps=202, quiet=True))
    assert set(reddi["final"]) >= {"x", "x_mean", "average_regret"}
    assert -1.0 <= reddi["final"]["x"] <= 1.0
    assert reddi["hyperparameters"]["betas"] == [0.9, 0.99] and reddi["hyperparameters"]["lr"] == 0.5
    assert reddi["hyperparameters"]["amsgrad"] is True
    assert reddi["schedule"] == {"name": "inverse_sqrt", "args": {}}  # the paper's step size 0.5 / sqrt(t)
    rosen = run_training(TrainConfig(workload="rosenbrock", optimizer="sgd", steps=5, quiet=True))
    assert len(rosen["final"]["point"]) == 2
    assert rosen["final"]["loss"] < 24.2  # f(-1.2, 1) = 24.2; five small SGD steps go downhill


def test_epochs_budget_and_schedule(tmp_path):
    summary = run_training(TrainConfig(workload="logreg-digits", optimizer="sgd", epochs=2, batch_size=500,
                                       schedule="warmup_cosine", quiet=True))
    assert summary["steps"] == 4  # 1437 training examples: 2 full batches of 500 per epoch
    assert summary["schedule"] == {"name": "warmup_cosine", "args": {"total_steps": 4, "warmup_steps": 1}}


def _config(tmp_path, **extra):
    base = dict(workload="mlp-digits", optimizer="adam", steps=20, batch_size=16, seed=1, quiet=True,
                schedule="warmup_cosine", eval_every=5, checkpoint=str(tmp_path / "ck" / "run.pt"))
    base.update(extra)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run(tmp_path):
    reference = run_training(_config(tmp_path / "a"))
    reference_state = torch.load(tmp_path / "a" / "ck" / "run.pt", weights_only=False)["model"]

    def stop_at_13(step, total):
        if step == 13:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(_config(tmp_path / "b", checkpoint_every=5), on_step=stop_at_13)
    saved = torch.load(tmp_path / "b" / "ck" / "run.pt", weights_only=False)
    assert saved["state"]["step"] == 10  # the last checkpoint before the interruption
    resumed = run_training(_config(tmp_path / "b", checkpoint_every=5, resume=True))
    assert resumed["resumed"] and not reference["resumed"]
    assert resumed["final"] == reference["final"]
    assert resumed["history"] == [dict(h, time_s=r["time_s"]) for h, r in zip(reference["history"], resumed["history"])]
    final_state = torch.load(tmp_path / "b" / "ck" / "run.pt", weights_only=False)["model"]
    for key, value in reference_state.items():
        assert torch.equal(value, final_state[key]), key
    leftovers = [p for p in os.listdir(tmp_path / "b" / "ck") if p != "run.pt"]
    assert leftovers == []  # atomic writes leave no temporary files


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    run_training(_config(tmp_path, steps=5))
    with pytest.raises(UsageError, match="different run"):
        run_training(_config(tmp_path, steps=5, seed=2, resume=True))


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = tmp_path / "tb"
    run_training(TrainConfig(workload="mlp-digits", optimizer="adam", steps=10, batch_size=16, quiet=True,
                             logdir=str(logdir), log_every=2, eval_every=5))
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/grad_norm", "val/loss", "val/accuracy", "val/f1",
                "effective_step_size/median", "effective_step_size/p90"]:
        assert tag in tags, tag
    assert any(tag.startswith("update_ratio/net.0.weight") for tag in tags)
    assert [e.step for e in events.Scalars("val/loss")] == [0, 5, 10]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)


def test_effective_step_size_of_plain_sgd_is_the_learning_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_training(TrainConfig(workload="logreg-digits", optimizer="sgd", hyperparameters={"lr": 0.05}, steps=3,
                             quiet=True, logdir=str(tmp_path), log_every=1))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for tag in ("effective_step_size/median", "effective_step_size/p10", "effective_step_size/p90"):
        assert all(e.value == pytest.approx(0.05, rel=1e-4) for e in events.Scalars(tag))


def test_divergence_is_recorded_not_crashed(tmp_path):
    summary = run_training(TrainConfig(workload="rosenbrock", optimizer="sgd", hyperparameters={"lr": 1.0},
                                       steps=50, quiet=True, json_path=str(tmp_path / "d.json")))
    assert summary["diverged"] and summary["steps"] < 50
    on_disk = json.loads((tmp_path / "d.json").read_text())  # strict JSON: no NaN / Infinity
    assert on_disk["diverged"] is True


@pytest.mark.parametrize("config, message", [
    (dict(workload="mlp-digits", optimizer="adam", hyperparameters={"betas": (1.5, 0.999)}), "Invalid beta1: 1.5"),
    (dict(workload="mlp-digits", optimizer="adam", hyperparameters={"momentum": 0.9}), "has no hyperparameter 'momentum'"),
    (dict(workload="mlp-digits", optimizer="nope"), "valid optimizers: adabelief"),
    (dict(workload="nope", optimizer="adam"), "valid workloads: rosenbrock"),
    (dict(workload="mlp-digits", optimizer="adam", schedule="nope"), "valid schedules: "),
    (dict(workload="rosenbrock", optimizer="adam", epochs=1), "--epochs does not apply"),
    (dict(workload="rosenbrock", optimizer="adam", init="xavier"), "--init does not apply"),
])
def test_bad_input_is_a_usage_error_before_training(config, message):
    with pytest.raises(UsageError) as info:
        run_training(TrainConfig(quiet=True, **{"steps": None if "epochs" in config else 1, **config}))
    assert message in str(info.value)


def test_init_schemes_reinitialise_weights():
    from adamkit.bench.models import MLP, apply_init
    for scheme in ("xavier", "kaiming", "orthogonal"):
        model = MLP(64, (32,), 10)
        assert apply_init(model, scheme, torch.Generator().manual_seed(0)) == 2
        assert torch.count_nonzero(model.net[0].bias) == 0
    model = MLP(64, (32,), 10)
    apply_init(model, "orthogonal", torch.Generator().manual_seed(0))
    w = model.net[0].weight  # 32 x 64: orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "ck" / "run.pt"
    bogus.parent.mkdir()
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        run_training(_config(tmp_path, steps=2, resume=True))
    assert bogus.read_bytes() == b"not a checkpoint"  # a failed run leaves it alone


class _FakeTerminal:
    def __init__(self, tty):
        self.tty, self.text = tty, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bar_only_on_a_terminal_and_not_quiet(tty, quiet, shown, monkeypatch):
    import sys
    terminal = _FakeTerminal(tty)
    monkeypatch.setattr(sys, "stderr", terminal)
    run_training(TrainConfig(workload="rosenbrock", optimizer="sgd", steps=30, quiet=quiet))
    assert ("/30 [" in "".join(terminal.text)) is shown
