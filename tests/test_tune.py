"""`adamkit tune`: studies in SQLite / PostgreSQL, trial counts, resume after SIGKILL, workers, report, bad input.

Trial counts are read back from the Optuna storage itself; figures are checked as PNG files.
"""
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import adamkit
from adamkit.cli import main

optuna = pytest.importorskip("optuna", reason="adamkit tune needs the [tune] extra (optuna)")
from optuna.trial import TrialState  # noqa: E402

SRC = str(Path(adamkit.__file__).resolve().parent.parent)
FAST = ["--fix", "backend=reference", "--threads", "1", "-q"]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tune_command(*args) -> list[str]:
    return [sys.executable, "-m", "adamkit.cli", "tune", *args]


def run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def states(storage: str, name: str) -> dict:
    study = optuna.load_study(study_name=name, storage=storage)
    result = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        result[trial.state] += 1
    return result


def finished(counts: dict) -> int:
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 50 and height > 50 and data.rstrip(b"\x00")[-8:-4] == b"IEND"


def test_tiny_tune_writes_studies_report_and_figures(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["tune", "--workload", "quadratic", "--optimizers", "sgdm,adamw", "--trials", "3", "--steps", "30",
            "--seed", "5", "--out", str(out), *FAST]
    status, stdout, err = run(argv, capsys)
    assert status == 0, err
    storage = f"sqlite:///{out / 'study.db'}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["quadratic:adamw", "quadratic:sgdm"]
    for name in names:
        counts = states(storage, name)
        assert finished(counts) == 3 and counts[TrialState.RUNNING] == 0
    header = stdout.splitlines()[0]
    for column in ("optimizer", "best loss", "best hyperparameters", "complete / pruned / failed", "trial time"):
        assert column in header
    assert "sgdm" in stdout and "adamw" in stdout and "lr=" in stdout
    report = (out / "report.md").read_text()
    assert "quadratic:OPTIMIZER" in report and "| sgdm |" in report
    html = (out / "report.html").read_text()
    figures = ["tune-best-so-far.png", "tune-lr-slice.png", "tune-importance.png", "tune-contour-adamw.png"]
    for name in figures:
        assert is_png(out / "figures" / name), name
        assert f"figures/{name}" in report and f'src="figures/{name}"' in html
    assert not (out / "figures" / "tune-contour-sgdm.png").exists()  # SGD's decay is not decoupled

    # The same seed gives the same trials; the rerun of a finished study adds none.
    other = tmp_path / "u"
    status, _, err = run([*argv[:-len(FAST) - 2], "--out", str(other), *FAST], capsys)
    assert status == 0, err
    for name in names:
        first = optuna.load_study(study_name=name, storage=storage).trials
        second = optuna.load_study(study_name=name, storage=f"sqlite:///{other / 'study.db'}").trials
        assert [t.params for t in first] == [t.params for t in second]
    status, _, _ = run(argv, capsys)
    assert status == 0 and sum(states(storage, "quadratic:sgdm").values()) == 3
    status, _, _ = run([a if a != "3" else "4" for a in argv], capsys)  # --trials 4 continues the study
    assert status == 0 and finished(states(storage, "quadratic:sgdm")) == 4


def test_diverged_and_crashing_trials_fail_without_stopping_the_study(tmp_path, capsys):
    # lr far above 2 / lambda_max = 2e-3: every SGD run on the quadratic diverges
    out = tmp_path / "d"
    status, stdout, err = run(["tune", "--workload", "quadratic", "--optimizers", "sgd", "--trials", "2",
                               "--space", "lr=1e3:1e4:log", "--steps", "40", "--max-failures", "3",
                               "--out", str(out), *FAST[:-1]], capsys)
    assert status == 0, err
    counts = states(f"sqlite:///{out / 'study.db'}", "quadratic:sgd")
    assert counts[TrialState.FAIL] == 3 and finished(counts) == 0
    assert "0 / 0 / 3" in stdout and "FAILED (diverged at step" in err
    study = optuna.load_study(study_name="quadratic:sgd", storage=f"sqlite:///{out / 'study.db'}")
    assert all(t.user_attrs["failure"].startswith("diverged") for t in study.trials)

    # A workload whose loss raises in its fourth step: that trial fails, the next ones still run.
    workload = tmp_path / "flaky.py"
    workload.write_text(
        "import torch\nCALLS = [0]\n"
        "def loss_fn(outputs, targets):\n"
        "    CALLS[0] += 1\n"
        "    if CALLS[0] == 5:\n"   # the dry run is call 1
        "        raise RuntimeError('boom in step four')\n"
        "    return torch.nn.functional.mse_loss(outputs, targets)\n"
        "def make(seed):\n"
        "    torch.manual_seed(seed)\n"
        "    b = [(torch.randn(8, 3), torch.randn(8, 1))]\n"
        "    return {'model': torch.nn.Linear(3, 1), 'train_loader': b, 'val_loader': b, 'loss_fn': loss_fn,\n"
        "            'steps': 6}\n")
    out = tmp_path / "c"
    status, stdout, err = run(["tune", "--workload", f"{workload}:make", "--optimizers", "adam", "--trials", "2",
                               "--pruner", "none", "--out", str(out), *FAST[:-1]], capsys)
    assert status == 0, err
    study = optuna.load_study(study_name=f"{workload}:make:adam", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["failure"] == "RuntimeError: boom in step four"
    assert "boom in step four" in err and "2 / 0 / 1" in stdout


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _count_or_zero(storage, name):
    try:
        return states(storage, name)
    except Exception:  # the study (or the database) does not exist yet
        return {state: 0 for state in TrialState}


def test_resume_after_sigkill_finishes_exactly_n_and_leaves_none_running(tmp_path):
    out = tmp_path / "k"
    storage = f"sqlite:///{out / 'study.db'}"
    command = tune_command("--workload", "quadratic", "--optimizers", "adam", "--trials", "3", "--steps", "700",
                           "--pruner", "none", "--seed", "1", "--out", str(out), *FAST)
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (lambda c: c[TrialState.COMPLETE] >= 1 and c[TrialState.RUNNING] == 1)(
            _count_or_zero(storage, "quadratic:adam")), 180, "a complete trial and a running one")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    killed = states(storage, "quadratic:adam")
    assert killed[TrialState.RUNNING] == 1  # what SIGKILL leaves behind
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = states(storage, "quadratic:adam")
    assert finished(counts) == 3 and counts[TrialState.RUNNING] == 0 and counts[TrialState.FAIL] == 1
    study = optuna.load_study(study_name="quadratic:adam", storage=storage)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed[0].user_attrs["failure"] == "its process died (killed or crashed)"


def test_two_workers_share_one_study(tmp_path):
    out = tmp_path / "w"
    done = subprocess.run(tune_command("--workload", "quadratic", "--optimizers", "adam", "--trials", "4",
                                       "--steps", "30", "--workers", "2", "--seed", "0", "--out", str(out), *FAST),
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    storage = f"sqlite:///{out / 'study.db'}"
    counts = states(storage, "quadratic:adam")
    assert 4 <= finished(counts) <= 5 and counts[TrialState.RUNNING] == 0
    study = optuna.load_study(study_name="quadratic:adam", storage=storage)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2


# --------------------------------------------------------------------------------------------
# A real PostgreSQL server
# --------------------------------------------------------------------------------------------

def _postgres_binaries():
    bindir = None
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    candidates = [Path(bindir)] if bindir else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder / "initdb", folder / "pg_ctl"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url():
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'psycopg[binary]'")
    initdb, pg_ctl = binaries
    prefix = []
    folder = Path(tempfile.mkdtemp(prefix="adamkit-pg-", dir="/tmp"))
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        import pwd
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*prefix, str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60",
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_on_one_postgresql_study(tmp_path, postgres_url):
    n = 4
    commands = [tune_command("--workload", "quadratic", "--optimizers", "adam", "--trials", str(n), "--steps", "40",
                             "--storage", postgres_url, "--seed", str(seed), "--out", str(tmp_path / f"m{seed}"), *FAST)
                for seed in (0, 1)]
    processes = [subprocess.Popen(c, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    try:
        results = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for process, (_, err) in zip(processes, results):
        assert process.returncode == 0, err
    counts = states(postgres_url, "quadratic:adam")
    assert n <= finished(counts) <= n + 1 and counts[TrialState.RUNNING] == 0
    study = optuna.load_study(study_name="quadratic:adam", storage=postgres_url)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both machines' stand-ins worked
    assert not (tmp_path / "m0" / "study.db").exists()


# --------------------------------------------------------------------------------------------
# Bad input: exit status 2, a message naming the problem and the fix, nothing trained
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--optimizers", "adamz"], "unknown optimizer 'adamz'; valid optimizers:"),
    (["--optimizers", "adam", "--workload", "quadratix"], "unknown workload 'quadratix'; valid workloads:"),
    (["--optimizers", "adam", "--space", "lr=1e-2:1e-4:log"], "LOW must be below HIGH (the bounds are inverted)"),
    (["--optimizers", "adam", "--space", "eps=-1:1"], "the bound -1 is not valid for optimizer 'adam'"),
    (["--optimizers", "adam", "--space", "beta2=0.9:1.5"], "bounds must satisfy 0 <= LOW < HIGH < 1"),
    (["--optimizers", "adam", "--space", "lr=0:1e-2:log"], "a log scale needs LOW > 0"),
    (["--optimizers", "adam", "--space", "momentum=0.1:0.9"], "optimizer 'adam' has no hyperparameter 'momentum'"),
    (["--optimizers", "sgdm", "--fix", "beta3=0.9"], "optimizer 'sgdm' has no hyperparameter 'beta3'"),
    (["--optimizers", "adam", "--fix", "eps=-1"], "is not valid for optimizer 'adam'"),
    (["--optimizers", "adam", "--space", "lr=1e-4"], "--space expects KEY=LOW:HIGH or KEY=LOW:HIGH:log"),
    (["--optimizers", "adam", "--space", "schedule.warmup_steps=1:9"], "needs --schedule NAME"),
    (["--optimizers", "adam", "--metric", "accuracy"], "--metric 'accuracy': workload 'quadratic' reports"),
    (["--optimizers", "adam", "--trials", "0"], "--trials must be at least 1"),
    (["--optimizers", "adam", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot reach the storage"),
    (["--optimizers", "adam", "--storage", "study.db"], "is neither an RDB URL"),
])
def test_bad_input_exits_2_before_any_training(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    argv = ["tune", "--workload", "quadratic", "--out", str(out), "--trials", "2", "--steps", "5", *extra]
    status, stdout, err = run(argv, capsys)
    assert status == 2, err
    assert err.startswith("adamkit tune: error:") and message in err, err
    assert not (out / "study.db").exists()


def test_space_and_fix_shape_the_search(tmp_path, capsys):
    out = tmp_path / "s"
    status, _, err = run(["tune", "--workload", "quadratic", "--optimizers", "adam,sgdm", "--trials", "3",
                          "--steps", "10", "--space", "lr=1e-3:2e-3:log", "--space", "beta2=0.99:0.999",
                          "--fix", "weight_decay=0", "--fix", "nesterov=true", "--schedule", "warmup_cosine",
                          "--space", "schedule.warmup_steps=1:4", "--out", str(out), *FAST], capsys)
    assert status == 0, err
    storage = f"sqlite:///{out / 'study.db'}"
    for trial in optuna.load_study(study_name="quadratic:adam", storage=storage).trials:
        assert 1e-3 <= trial.params["lr"] <= 2e-3
        assert 1e-3 <= trial.params["one_minus_beta2"] <= 1e-2  # beta2 in [0.99, 0.999]
        assert "weight_decay" not in trial.params and "weight_decay_on" not in trial.params
        assert trial.user_attrs["hyperparameters"]["weight_decay"] == 0
        assert trial.user_attrs["hyperparameters"]["betas"][1] == pytest.approx(1 - trial.params["one_minus_beta2"])
        assert trial.params["schedule.warmup_steps"] in (1, 2, 3, 4)
        assert trial.user_attrs["schedule_args"]["warmup_steps"] == trial.params["schedule.warmup_steps"]
    for trial in optuna.load_study(study_name="quadratic:sgdm", storage=storage).trials:
        assert "nesterov" not in trial.params and trial.user_attrs["hyperparameters"]["nesterov"] is True
        assert trial.user_attrs["hyperparameters"]["momentum"] == pytest.approx(1 - trial.params["one_minus_momentum"])


def test_rerun_best_lands_in_a_results_file_that_report_reads(tmp_path, capsys):
    out = tmp_path / "r"
    status, _, err = run(["tune", "--workload", "rosenbrock", "--optimizers", "adam", "--trials", "2",
                          "--steps", "20", "--rerun-best", "1", "--out", str(out), *FAST], capsys)
    assert status == 0, err
    import json
    records = [json.loads(line) for line in (out / "rerun-best" / "results.jsonl").read_text().splitlines()]
    study = optuna.load_study(study_name="rosenbrock:adam", storage=f"sqlite:///{out / 'study.db'}")
    assert len(records) == 1 and records[0]["phase"] == "final"
    assert records[0]["lr"] == pytest.approx(study.best_params["lr"])
    assert records[0]["final"]["loss"] == pytest.approx(study.best_value)  # same config, same seed 0, same run
    status, stdout, err = run(["report", str(out / "rerun-best"), "-q"], capsys)
    assert status == 0 and "rosenbrock" in stdout
    assert "Best configurations rerun" in (out / "report.md").read_text()


@pytest.mark.parametrize("sampler, pruner", [("gp", "hyperband"), ("qmc", "none"), ("random", "median")])
def test_every_sampler_and_pruner_runs(tmp_path, capsys, sampler, pruner):
    out = tmp_path / sampler
    status, _, err = run(["tune", "--workload", "rosenbrock", "--optimizers", "adam", "--trials", "2", "--steps", "15",
                          "--sampler", sampler, "--pruner", pruner, "--seed", "0", "--no-report", "--out", str(out),
                          *FAST], capsys)
    assert status == 0, err
    counts = states(f"sqlite:///{out / 'study.db'}", "rosenbrock:adam")
    assert finished(counts) == 2 and counts[TrialState.FAIL] == 0
    assert not (out / "report.md").exists()
