"""Bayesian hyperparameter search per optimizer: ``adamkit tune`` (Optuna, the ``[tune]`` extra).

For each optimizer, one Optuna study named ``WORKLOAD:OPTIMIZER`` in one storage (``DIR/study.db``
by default, or ``--storage URL``). A trial trains the workload once with the sampled
hyperparameters through the same runner as ``adamkit train`` and returns the held-out metric at
the end of the budget; every evaluation reports the metric to the pruner. A diverged run, a
non-finite metric or an exception inside the run is a failed trial (its message is kept as the
trial's ``failure`` attribute), never the end of the study.

``--trials N`` counts finished (complete or pruned) trials in the study, whoever ran them: a
worker starts a trial only while finished + running trials are fewer than N, so one process ends
with exactly N and concurrent processes with at most N + (workers - 1). A rerun continues the
studies. Trials left RUNNING by a dead process are marked failed: at once when the process ran
on this machine (each trial records its host, process id and process start time), and through
Optuna's heartbeat (``fail_stale_trials``) after ``GRACE_PERIOD`` seconds for RDB storages
shared by several machines.

Search spaces are declared per optimizer in ``optimizers.SEARCH_SPACES``; ``--space`` and
``--fix`` change them and every bound is checked by building the optimizer with it, before any
training.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import optimizers as optim_names
from . import workloads
from .errors import UsageError

HEARTBEAT_INTERVAL = 10   # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 60         # a RUNNING trial whose heartbeat is older than this is failed
MAXIMIZED = {"accuracy", "precision", "recall", "f1"}   # every other metric is minimized
SAMPLERS = ("tpe", "gp", "random", "qmc")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneConfig:
    """Everything ``adamkit tune`` needs; plain values, so worker processes can receive it."""

    workload: str
    optimizers: list[str]
    trials: int
    out: str
    storage: str | None = None
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "median"
    metric: str = "loss"
    space: list[str] = field(default_factory=list)      # KEY=LOW:HIGH[:log]
    fix: list[str] = field(default_factory=list)        # KEY=VALUE
    schedule: str | None = None
    schedule_args: dict = field(default_factory=dict)
    steps: int | None = None
    train_seed: int = 0
    workers: int = 1
    threads: int | None = 1
    max_failures: int | None = None   # None: as many as --trials
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False
    quiet: bool = False
    rerun_best: int = 0
    report: bool = True


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError("adamkit tune needs Optuna: pip install 'adamkit[tune]' (or pip install optuna)") from None
    import warnings
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats and grouped TPE are marked experimental; the warning says nothing the user can act on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def study_name(workload: str, optimizer: str) -> str:
    return f"{workload}:{optimizer}"


def direction(metric: str) -> str:
    return "maximize" if metric in MAXIMIZED else "minimize"


# --------------------------------------------------------------------------------------------
# Search spaces: the declared one, changed by --space and --fix, every bound checked
# --------------------------------------------------------------------------------------------

def _parse_bounds(item: str) -> tuple[str, float, float, bool, bool]:
    key, sep, text = item.partition("=")
    parts = text.split(":")
    if not sep or not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise UsageError(f"--space expects KEY=LOW:HIGH or KEY=LOW:HIGH:log, got {item!r}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"--space {item!r}: LOW and HIGH must be numbers") from None
    integral = all(p.strip().lstrip("+-").isdigit() for p in parts[:2])
    return key.strip().replace("-", "_"), low, high, len(parts) == 3, integral


@dataclass
class Plan:
    """One optimizer's search: its parameters, fixed values and schedule, ready to sample."""

    spec: optim_names.OptimizerSpec
    params: list[optim_names.SearchParam]
    fixed: dict                    # constructor arguments fixed by --fix (beta1/beta2 merged into betas)
    schedule: str | None
    schedule_args: dict
    schedule_params: list[optim_names.SearchParam]

    def hyperparameters(self, values: dict) -> tuple[dict, dict]:
        """Constructor arguments and schedule arguments for sampled ``values`` (Optuna param names)."""
        hp, betas = {}, {}
        fixed = dict(self.fixed)
        for key in ("beta1", "beta2"):
            if key in fixed:
                betas[key] = fixed.pop(key)
        for param in self.params:
            if param.switch and not values.get(f"{param.name}_on", True):
                value = 0.0
            elif param.name not in values:
                continue
            else:
                value = values[param.name]
                if param.one_minus:
                    value = 1.0 - value
            if param.target in ("beta1", "beta2"):
                betas[param.target] = value
            else:
                hp[param.target] = value
        if betas:
            default = optim_names.constructor_defaults(self.spec)["betas"]
            base = fixed.pop("betas", self.spec.preset.get("betas", default))
            hp["betas"] = (betas.get("beta1", base[0]), betas.get("beta2", base[1]))
        hp.update(fixed)
        schedule_args = dict(self.schedule_args)
        for param in self.schedule_params:
            if param.name in values:  # absent when only the fixed part is asked for (checks)
                schedule_args[param.target] = values[param.name]
        return hp, schedule_args

    def suggest(self, trial) -> tuple[dict, dict]:
        values = {}
        for param in self.params + self.schedule_params:
            if param.switch:
                values[f"{param.name}_on"] = trial.suggest_categorical(f"{param.name}_on", [False, True])
                if not values[f"{param.name}_on"]:
                    continue
            if param.kind == "bool":
                values[param.name] = trial.suggest_categorical(param.name, [False, True])
            elif param.kind == "int":
                values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
            else:
                values[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.log)
        return self.hyperparameters(values)


def _check_value(spec, hyperparameters: dict, what: str) -> None:
    """Build the optimizer on a dummy parameter: its own ValueError says what is out of range."""
    import torch
    try:
        optim_names.create(spec, [torch.zeros(2, requires_grad=True)],
                           optim_names.effective_hyperparameters(spec, hyperparameters))
    except UsageError as error:
        raise UsageError(f"{what} is not valid for optimizer {spec.name!r}: {error}") from None


def takes(spec: optim_names.OptimizerSpec, key: str) -> bool:
    """Whether ``key`` (a --fix / --space key) means something for ``spec``."""
    if key.startswith("schedule."):
        return True
    accepted = optim_names.constructor_defaults(spec)
    if key in ("beta1", "beta2"):
        return "betas" in accepted
    params = optim_names.search_space(spec)
    return key in accepted or any(key in (p.name, p.target) for p in params)


def _key(item: str) -> str:
    return item.partition("=")[0].strip().replace("-", "_")


def make_plan(spec: optim_names.OptimizerSpec, config: TuneConfig, total_steps: int) -> Plan:
    """The declared search space of ``spec`` with --fix and --space applied; UsageError on any bad key or bound.

    With several optimizers, a key applies to those that take it (as ``adamkit bench``'s values do);
    ``prepare`` has checked that at least one does. With one, a key it does not take is an error."""
    from .runner import build_schedule
    if len(config.optimizers) > 1:
        config = replace(config, fix=[i for i in config.fix if takes(spec, _key(i))],
                         space=[i for i in config.space if takes(spec, _key(i))])
    accepted = optim_names.constructor_defaults(spec)
    params = {p.name: p for p in optim_names.search_space(spec)}
    by_target = {p.target: p.name for p in params.values()}
    fixed = {}
    for key, value in optim_names.parse_assignments(config.fix, "--fix").items():
        if key not in accepted and key not in ("beta1", "beta2") and key not in by_target and key not in params:
            raise UsageError(f"--fix {key}: optimizer {spec.name!r} has no hyperparameter {key!r}; its "
                             f"hyperparameters are: {', '.join(accepted)}")
        if key in ("beta1", "beta2") and "betas" not in accepted:
            raise UsageError(f"--fix {key}: optimizer {spec.name!r} has no betas")
        name = params[key].name if key in params else by_target.get(key)
        if key == "betas":
            for beta in ("beta1", "beta2"):
                params.pop(by_target.get(beta, ""), None)
        if name is not None:
            param = params.pop(name)
            target = param.target
            if param.one_minus and key == param.name:   # --fix one_minus_beta2=1e-3
                value = 1.0 - float(value)
        else:
            target = key
        fixed[target] = value
    schedule_params = []
    for item in config.space:
        key, low, high, log, integral = _parse_bounds(item)
        where = f"--space {item}"
        if key.startswith("schedule."):
            if config.schedule is None:
                raise UsageError(f"{where}: searching a schedule argument needs --schedule NAME")
            argument = key.split(".", 1)[1]
            if low >= high:
                raise UsageError(f"{where}: LOW must be below HIGH (the bounds are inverted)")
            if log and low <= 0:
                raise UsageError(f"{where}: a log scale needs LOW > 0")
            for bound in (low, high):
                value = int(bound) if integral else bound
                build_schedule(config.schedule, {**config.schedule_args, argument: value}, total_steps)
            schedule_params.append(optim_names.SearchParam(key, low, high, log=log, kind="int" if integral else "float",
                                                           argument=argument))
            continue
        name = key if key in params else by_target.get(key)
        one_minus = name is not None and params[name].one_minus
        if one_minus and key != name:   # bounds given on beta2 itself: search 1 - beta2 between them
            if not (0 <= low < high < 1):
                raise UsageError(f"{where}: {key} bounds must satisfy 0 <= LOW < HIGH < 1")
            low, high = 1.0 - high, 1.0 - low
        if key not in params and key not in by_target and key not in accepted:
            raise UsageError(f"{where}: optimizer {spec.name!r} has no hyperparameter {key!r}; searchable: "
                             + ", ".join([*params, *(k for k in accepted if k not in by_target)]))
        if low >= high:
            raise UsageError(f"{where}: LOW must be below HIGH (the bounds are inverted)")
        if log and low <= 0:
            raise UsageError(f"{where}: a log scale needs LOW > 0")
        if name is not None:
            old = params[name]
            param = replace(old, low=low, high=high, log=log or (old.log and low > 0),
                            kind="int" if old.kind == "int" else "float")
        else:
            default = accepted[key]
            kind = "int" if integral and isinstance(default, int) and not isinstance(default, bool) else "float"
            param = optim_names.SearchParam(key, low, high, log=log, kind=kind)
        if param.kind == "bool":
            raise UsageError(f"{where}: {key} is a switch (true/false); use --fix {key}=true or false")
        params[param.name] = param
        fixed.pop(param.target, None)
        for bound in (param.low, param.high):
            value = 1.0 - bound if param.one_minus else bound
            plan = Plan(spec, [], dict(fixed), None, {}, [])
            if param.target in ("beta1", "beta2"):
                plan.fixed[param.target] = value
                hp, _ = plan.hyperparameters({})
            else:
                hp = {**fixed, param.target: int(value) if param.kind == "int" else value}
                hp.pop("beta1", None), hp.pop("beta2", None)
            _check_value(spec, hp, f"{where}: the bound {bound:g}")
    plan = Plan(spec, list(params.values()), fixed, config.schedule, dict(config.schedule_args), schedule_params)
    hp, _ = plan.hyperparameters({})
    _check_value(spec, hp, "--fix " + " ".join(config.fix) if config.fix else "the declared space")
    return plan


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------

def storage_url(config: TuneConfig) -> str:
    if config.storage:
        return config.storage
    return "sqlite:///" + str((Path(config.out).expanduser() / "study.db").resolve())


def open_storage(url: str):
    """An Optuna storage for ``url``: an RDB URL (sqlite:///, postgresql://, mysql://) or journal:FILE."""
    optuna = _optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = Path(url[len("journal:"):]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as error:
            raise UsageError(f"--storage {url}: cannot open the journal file: {error}") from None
    if "://" not in url:
        raise UsageError(f"--storage {url!r} is neither an RDB URL (sqlite:///FILE.db, "
                         "postgresql://USER:PASSWORD@HOST:PORT/DB, mysql://...) nor journal:FILE")
    if url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 120}}
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UsageError(f"--storage {url}: cannot create the folder: {error}") from None
    else:
        engine = {"pool_pre_ping": True}
    try:
        return _rdb_storage(optuna, url, engine)
    except ImportError as error:  # Optuna wraps the driver's ModuleNotFoundError
        cause = error.__cause__ if isinstance(error.__cause__, ModuleNotFoundError) else error
        missing = getattr(cause, "name", None) or "its driver"
        raise UsageError(f"--storage {url}: the database driver is not installed ({missing}); install it, "
                         "e.g. pip install 'psycopg[binary]' for postgresql:// (or psycopg2-binary with "
                         "postgresql+psycopg2://), pymysql for mysql+pymysql://") from None
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--storage {url}: cannot reach the storage ({message}); check that the server runs, "
                         "and the host, port, user, password and database name in the URL") from None


def _rdb_storage(optuna, url: str, engine: dict, attempts: int = 4):
    """RDBStorage, tried again when the first use of an empty database races with another process
    creating the same tables (PostgreSQL reports a unique violation on the loser's CREATE TABLE)."""
    import sqlalchemy.exc
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=dict(engine), heartbeat_interval=HEARTBEAT_INTERVAL,
                                              grace_period=GRACE_PERIOD)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


# --------------------------------------------------------------------------------------------
# Trials left RUNNING by a dead process
# --------------------------------------------------------------------------------------------

def _start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid())}


def _alive(identity: dict) -> bool:
    pid = identity.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = identity.get("start")
    return start is None or _start_ticks(pid) in (None, start)


def fail_dead_trials(study) -> int:
    """Mark failed the RUNNING trials of processes that died (this machine), then the stale ones
    (Optuna's heartbeat, any machine). Returns how many this machine's check failed."""
    optuna = _optuna()
    from optuna.trial import TrialState
    host, failed = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        identity = trial.user_attrs.get("worker") or {}
        if identity.get("host") != host or _alive(identity):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "failure", "its process died (killed or crashed)")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    optuna.storages.fail_stale_trials(study)  # a no-op for storages without heartbeats
    return failed


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    config: TuneConfig
    workload: workloads.Workload
    plans: list[Plan]
    steps: int


def prepare(config: TuneConfig) -> Prepared:
    """Check everything before any training; UsageError names the problem and the fix."""
    from .runner import TrainConfig, prepare as prepare_run
    _optuna()
    if config.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {config.trials}")
    if config.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {config.workers}")
    if config.rerun_best < 0:
        raise UsageError(f"--rerun-best must be 0 or more seeds, got {config.rerun_best}")
    if config.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler {config.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if config.pruner not in PRUNERS:
        raise UsageError(f"unknown --pruner {config.pruner!r}; valid: {', '.join(PRUNERS)}")
    if config.max_failures is not None and config.max_failures < 1:
        raise UsageError(f"--max-failures must be at least 1, got {config.max_failures}")
    workload = workloads.get(config.workload)
    if not config.optimizers:
        raise UsageError("--optimizers needs at least one name")
    specs = [optim_names.resolve(name) for name in config.optimizers]
    if len({s.name for s in specs}) != len(specs):
        raise UsageError("--optimizers names an optimizer twice")
    steps = config.steps or workload.steps
    if len(specs) > 1:
        for flag, items in (("--fix", config.fix), ("--space", config.space)):
            for item in items:
                if not any(takes(spec, _key(item)) for spec in specs):
                    raise UsageError(f"{flag} {item}: no chosen optimizer ({', '.join(s.name for s in specs)}) has "
                                     f"the hyperparameter {_key(item)!r}")
    plans = []
    for spec in specs:
        plan = make_plan(spec, config, steps)
        hp, schedule_args = plan.hyperparameters({})
        run = TrainConfig(workload=workload.name, optimizer=spec.name, hyperparameters=hp, schedule=config.schedule,
                          schedule_args=schedule_args, steps=config.steps, seed=config.train_seed, quiet=True,
                          **_run_options(config))
        prepare_run(run)
        plans.append(plan)
    _check_metric(workload, config)
    from .suite import _check_out
    _check_out(Path(config.out).expanduser())
    return Prepared(config, workload, plans, steps)


def _run_options(config: TuneConfig) -> dict:
    options = {"device": config.device, "threads": config.threads, "download": config.download}
    if config.data_dir:
        options["data_dir"] = config.data_dir
    return options


def _check_metric(workload, config: TuneConfig) -> None:
    """Build the workload once and evaluate it: the metric must be one it reports."""
    import torch
    from .workloads import BuildContext
    options = _run_options(config)
    options.pop("threads")
    context = BuildContext(seed=config.train_seed, **options)
    with torch.random.fork_rng(devices=[]):
        metrics = workload.build(context).evaluate()
    if config.metric not in metrics:
        raise UsageError(f"--metric {config.metric!r}: workload {workload.name!r} reports "
                         f"{', '.join(sorted(metrics))}; choose one of them")


def make_sampler(name: str, seed: int | None):
    optuna = _optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str, steps: int):
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, steps // 10))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, steps // 20), max_resource=steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(prepared: Prepared, plan: Plan, storage, seed: int | None):
    optuna = _optuna()
    return optuna.create_study(
        study_name=study_name(prepared.workload.name, plan.spec.name), storage=storage,
        sampler=make_sampler(prepared.config.sampler, seed), pruner=make_pruner(prepared.config.pruner, prepared.steps),
        direction=direction(prepared.config.metric), load_if_exists=True)


def objective_for(prepared: Prepared, plan: Plan, log):
    """The Optuna objective: one training run; NaN (a failed trial) when it diverges or raises."""
    optuna = _optuna()
    from .runner import TrainConfig, run_training
    config = prepared.config

    def objective(trial):
        trial.set_user_attr("worker", worker_identity())
        hp, schedule_args = plan.suggest(trial)
        trial.set_user_attr("hyperparameters", {k: optim_names.to_json(v) for k, v in hp.items()})
        trial.set_user_attr("schedule_args", {k: optim_names.to_json(v) for k, v in schedule_args.items()})
        run = TrainConfig(workload=prepared.workload.name, optimizer=plan.spec.name, hyperparameters=hp,
                          schedule=config.schedule, schedule_args=schedule_args, steps=config.steps,
                          seed=config.train_seed, quiet=True, **_run_options(config))

        def on_evaluate(step, metrics):
            value = metrics.get(config.metric)
            if step == 0 or value is None or not math.isfinite(value):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        label = f"{study_name(prepared.workload.name, plan.spec.name)} trial {trial.number}"
        try:
            summary = run_training(run, on_evaluate=on_evaluate)
        except optuna.TrialPruned:
            log(f"  {label}: pruned")
            raise
        except KeyboardInterrupt:
            raise
        except Exception as error:  # one broken trial must not stop the study
            return _failed(trial, f"{type(error).__name__}: {error}", label, log)
        value = summary["final"].get(config.metric)
        trial.set_user_attr("final", {k: v for k, v in summary["final"].items() if isinstance(v, (int, float))})
        if summary["diverged"]:
            return _failed(trial, f"diverged at step {summary['steps']}", label, log)
        if value is None or not math.isfinite(value):
            return _failed(trial, f"{config.metric} is not finite", label, log)
        log(f"  {label}: {config.metric}={value:.6g}  " + _format_params(trial.params))
        return float(value)

    return objective


def _failed(trial, message: str, label: str, log) -> float:
    trial.set_user_attr("failure", message)
    log(f"  {label}: FAILED ({message})")
    return float("nan")  # Optuna records a NaN objective as a failed trial


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState
    result = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    for trial in study.get_trials(deepcopy=False):
        result[names[trial.state]] += 1
    return result


def work(prepared: Prepared, storage, worker: int = 0, log=None) -> None:
    """Run trials of every study until each has ``trials`` finished ones (or too many failures)."""
    log = log or (lambda message: None)
    config = prepared.config
    seed = None if config.seed is None else config.seed + worker
    limit = config.max_failures if config.max_failures is not None else config.trials
    for plan in prepared.plans:
        study = open_study(prepared, plan, storage, seed)
        objective = objective_for(prepared, plan, log)
        while True:
            fail_dead_trials(study)
            state = counts(study)
            finished = state["complete"] + state["pruned"]
            if finished >= config.trials:
                break
            if state["failed"] >= limit:
                log(f"  {study.study_name}: stopping after {state['failed']} failed trials (--max-failures {limit})")
                break
            if finished + state["running"] >= config.trials:
                time.sleep(0.5)  # the trials others are running decide; if one dies it becomes FAIL above
                continue
            study.optimize(objective, n_trials=1, catch=())


def _worker_main(config: TuneConfig, worker: int) -> None:
    """Entry point of a ``--workers`` process: prepare again (cheap, checked already) and work."""
    import torch
    if config.threads:
        torch.set_num_threads(config.threads)
    prepared = prepare(config)
    storage = open_storage(storage_url(config))
    work(prepared, storage, worker, _log(config.quiet, f"[worker {worker}] "))


def _log(quiet: bool, prefix: str = ""):
    if quiet:
        return lambda message: None
    return lambda message: print(prefix + message, file=sys.stderr, flush=True)


def run_tune(config: TuneConfig) -> dict:
    """Check the input, run the workers, write the report; returns the summary rows."""
    log = _log(config.quiet)
    prepared = prepare(config)
    url = storage_url(config)
    storage = open_storage(url)
    for plan in prepared.plans:   # create the studies once, before workers race to it
        open_study(prepared, plan, storage, config.seed)
    log(f"adamkit tune: {prepared.workload.name}, {len(prepared.plans)} optimizer(s), {config.trials} finished "
        f"trial(s) each, {config.sampler} sampler, {config.pruner} pruner, storage {url}")
    started = time.perf_counter()
    if config.workers == 1:
        work(prepared, storage, 0, log)
    else:
        _run_workers(config)
    from . import tune_report
    studies = [open_study(prepared, plan, storage, config.seed) for plan in prepared.plans]
    for study in studies:
        fail_dead_trials(study)
    rows = tune_report.summarize(studies, prepared)
    result = {"rows": rows, "elapsed_s": time.perf_counter() - started, "storage": url,
              "table": tune_report.format_table(rows, config.metric)}
    if config.rerun_best:
        result["rerun"] = rerun_best(prepared, rows, log)
    if config.report:
        result["report"] = tune_report.write(studies, prepared, rows, result.get("rerun"))
    return result


def _run_workers(config: TuneConfig) -> None:
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(config, index), daemon=False)
                 for index in range(config.workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        raise
    bad = [p.exitcode for p in processes if p.exitcode]
    if bad:
        print(f"adamkit tune: {len(bad)} worker process(es) ended with exit status {', '.join(map(str, bad))}",
              file=sys.stderr)


def rerun_best(prepared: Prepared, rows: list[dict], log) -> dict:
    """Train each optimizer's best configuration with ``rerun_best`` seeds at the full budget through
    the bench runner: records in ``DIR/rerun-best/results.jsonl``, which ``adamkit report`` reads."""
    from .report import generate
    from .suite import BenchConfig, run_bench
    config = prepared.config
    out = Path(config.out).expanduser() / "rerun-best"
    failures = []
    for row in rows:
        if row["best"] is None:
            log(f"  {row['optimizer']}: no complete trial, nothing to rerun")
            continue
        hp = dict(row["best"]["hyperparameters"])
        hp = {k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()}
        lr = hp.pop("lr", None)
        bench = BenchConfig(out=str(out), suite=None, workloads=[prepared.workload.name], optimizers=[row["optimizer"]],
                            seeds=list(range(config.rerun_best)), lr=lr, hyperparameters=hp, steps=config.steps,
                            jobs=1, quiet=config.quiet, report=False, schedule=config.schedule,
                            schedule_args=dict(row["best"]["schedule_args"]), **_run_options(config))
        result = run_bench(bench, log=log)
        failures += result["failures"]
    paths = generate(out, log=log) if (out / "results.jsonl").is_file() else None
    return {"out": str(out), "failures": failures, "report": paths}
