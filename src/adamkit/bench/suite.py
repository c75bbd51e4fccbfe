"""The benchmark protocol: ``adamkit bench``.

For every workload and optimizer:
  1. Learning rate. If the user fixes it (``--lr``) or the workload prescribes one (reddi), that
     value is used. Otherwise a short sweep: ``sweep_points`` learning rates log-spaced over two
     decades centred on the optimizer's default learning rate, each trained with the first seed for
     ``sweep_fraction`` of the budget. If the best value lies on the edge of the grid, the grid is
     extended by half a decade in that direction, at most ``max_extensions`` times. The best value
     has the lowest final held-out loss (a diverged run counts as infinitely bad).
  2. Seeds. The chosen learning rate is trained with every seed for the full budget. Workloads with
     no randomness (the functions) are run once, since every seed gives the same run.
Every finished run appends one JSON record to ``DIR/results.jsonl`` (flushed and fsynced) and logs
to TensorBoard under ``DIR/tb/``. A rerun with the same ``--out`` skips runs whose record exists,
so an interrupted bench continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import optimizers as optim_names
from . import workloads
from .data import DEFAULT_DATA_DIR
from .errors import UsageError

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Suite:
    name: str
    workloads: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: int
    sweep_fraction: float
    description: str


QUICK_OPTIMIZERS = ("sgdm", "adam", "adamw", "amsgrad", "radam", "adabound")

SUITES = {
    "quick": Suite("quick", ("rosenbrock", "quadratic", "reddi", "logreg-digits", "mlp-digits", "mlp-mnist1d"),
                   QUICK_OPTIMIZERS, seeds=2, sweep_fraction=0.25,
                   description="offline workloads that finish in minutes on a laptop CPU"),
    "full": Suite("full", ("rosenbrock", "beale", "rastrigin", "quadratic", "reddi", "logreg-digits", "mlp-digits",
                           "cnn-digits", "mlp-mnist1d", "charlm"),
                  (), seeds=5, sweep_fraction=0.25,
                  description="every offline workload including charlm, every dense optimizer, 5 seeds"),
    "paper": Suite("paper", ("logreg-mnist", "mlp-mnist", "cnn-cifar10", "resnet18-cifar10"),
                   ("sgdn", "adagrad", "rmsprop", "adam", "amsgrad", "adamw", "adabound"), seeds=3, sweep_fraction=0.1,
                   description="Kingma & Ba's experiments and ResNet-18 on MNIST / CIFAR-10 (needs --data-dir)"),
}


def suite_optimizers(suite: Suite) -> list[str]:
    if suite.optimizers:
        return list(suite.optimizers)
    return [n for n in optim_names.names() if optim_names.resolve(n).base not in optim_names.SPARSE_ONLY]


@dataclass
class BenchConfig:
    out: str
    suite: str | None = "quick"
    workloads: list[str] | None = None
    optimizers: list[str] | None = None
    seeds: list[int] | None = None          # None: the suite's count, from 0
    lr: float | None = None                 # fixes the learning rate for every optimizer (no sweep)
    hyperparameters: dict = field(default_factory=dict)  # applied to the optimizers that have them
    schedule: str | None = None             # None: each workload's own (if any)
    schedule_args: dict = field(default_factory=dict)
    steps: int | None = None                # overrides every workload's budget
    batch_size: int | None = None
    sweep_points: int = 5
    sweep_fraction: float | None = None     # None: the suite's
    max_extensions: int = 3
    jobs: int = 1                           # worker processes; 1 runs in this process
    threads: int | None = 1                 # torch threads per run (None: torch's choice)
    data_dir: str = DEFAULT_DATA_DIR
    download: bool = False
    device: str = "cpu"
    quiet: bool = False
    report: bool = True
    nproc: int | None = None                # each model run with N ranks (torchrun); None: in one process
    strategy: str | None = None             # ddp (default), zero or fsdp2


# --------------------------------------------------------------------------------------------
# results.jsonl
# --------------------------------------------------------------------------------------------

def read_results(out: str | os.PathLike) -> tuple[list[dict], int]:
    """Records in ``DIR/results.jsonl`` and the number of unreadable lines (e.g. a write cut short)."""
    path = Path(out).expanduser() / RESULTS
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and "key" in record:
                records.append(record)
            else:
                bad += 1
    return records, bad


class ResultsWriter:
    """Appends one JSON line per record; never rewrites what is already in the file."""

    def __init__(self, out: Path):
        self.path = out / RESULTS

    def append(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a line cut short by an interrupted write stays a bad line
                    handle.write(b"\n")
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

def run_key(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()[:16]


@dataclass
class RunSpec:
    """One run of the bench: what to train and where its logs go."""

    phase: str                  # "sweep" or "final"
    workload: str
    optimizer: str
    hyperparameters: dict       # set by the protocol / user (includes lr)
    seed: int
    steps: int
    batch_size: int | None
    lr_source: str              # "sweep", "fixed" (--lr) or "prescribed" (by the workload)
    data_dir: str
    download: bool
    device: str
    threads: int | None
    protocol: dict = field(default_factory=dict)   # recorded with the run; not part of its identity
    schedule: str | None = None
    schedule_args: dict = field(default_factory=dict)
    nproc: int | None = None                       # ranks (adamkit train --nproc); not part of its identity
    strategy: str | None = None

    def identity(self) -> dict:
        identity = {"phase": self.phase, "workload": self.workload, "optimizer": self.optimizer,
                    "hyperparameters": optim_names.to_json(sorted(self.hyperparameters.items())),
                    "seed": self.seed, "steps": self.steps, "batch_size": self.batch_size}
        if self.schedule is not None:  # only then, so that the keys of earlier runs stay the same
            identity["schedule"] = [self.schedule, optim_names.to_json(sorted(self.schedule_args.items()))]
        return identity

    @property
    def key(self) -> str:
        return run_key(self.identity())

    @property
    def lr(self) -> float:
        return float(self.hyperparameters["lr"])

    def name(self) -> str:
        from .userworkload import file_safe
        return f"{file_safe(self.workload)}/{self.optimizer}/{self.phase}-lr{self.lr:g}-seed{self.seed}-{self.key[:6]}"


def _config(spec: RunSpec, logdir: str | None):
    from .runner import TrainConfig
    return TrainConfig(workload=spec.workload, optimizer=spec.optimizer, hyperparameters=dict(spec.hyperparameters),
                       schedule=spec.schedule, schedule_args=dict(spec.schedule_args), steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed, logdir=logdir, quiet=True,
                       data_dir=spec.data_dir, download=spec.download, device=spec.device, threads=spec.threads)


def execute(spec: RunSpec, out: str) -> dict:
    """Train one run and return its results record (called in this process or in a worker)."""
    from .runner import run_training
    tb = _fresh_tb_dir(Path(out), spec.name())
    if spec.nproc is not None and _is_model(spec.workload):
        from .launch import run_launched
        summary = run_launched(_config(spec, str(tb)), spec.nproc, spec.strategy or "ddp")
    else:  # functions have no data to share among ranks: they run in this process
        summary = run_training(_config(spec, str(tb)))
    summary.pop("versions", None)
    record = {"key": spec.key, "run": spec.name(), "phase": spec.phase, "lr": spec.lr, "lr_source": spec.lr_source,
              "hyperparameters_user": {k: optim_names.to_json(v) for k, v in spec.hyperparameters.items() if k != "lr"},
              "protocol": spec.protocol, "tb": str(tb.relative_to(Path(out))),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record.update(summary)
    return record


def _is_model(workload: str) -> bool:
    from . import workloads
    return workloads.get(workload).kind == "model"


def _fresh_tb_dir(out: Path, name: str) -> Path:
    """DIR/tb/<run>; a run interrupted earlier left logs there, so a retry logs beside them, never over them."""
    base = out / "tb" / name
    candidate, attempt = base, 1
    while candidate.exists():
        attempt += 1
        candidate = base.with_name(f"{base.name}-retry{attempt}")
    return candidate


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _execute_safely(spec: RunSpec, out: str):
    try:
        return spec, execute(spec, out), None
    except KeyboardInterrupt:
        raise
    except Exception as error:  # one failing run must not stop the benchmark
        return spec, None, f"{type(error).__name__}: {error}"


class Executor:
    """Runs a batch of RunSpecs, serially or in worker processes, and records each finished run."""

    def __init__(self, config: BenchConfig, out: Path, existing: dict[str, dict], log):
        self.config, self.out, self.records, self.log = config, out, existing, log
        self.writer = ResultsWriter(out)
        self.failures: list[str] = []
        self.completed = 0
        self.skipped = 0
        self._pool = None

    def run(self, specs: list[RunSpec]) -> None:
        todo = []
        for spec in specs:
            if spec.key in self.records:
                self.skipped += 1
            elif spec.key not in {s.key for s in todo}:
                todo.append(spec)
        if not todo:
            return
        if self.config.jobs <= 1 or self.config.nproc is not None:
            for spec in todo:
                self._finish(*_execute_safely(spec, str(self.out)))
            return
        pool = self._get_pool()
        futures = [pool.submit(_execute_safely, spec, str(self.out)) for spec in todo]
        from concurrent.futures import as_completed
        try:
            for future in as_completed(futures):
                self._finish(*future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            threads = self.config.threads or 1
            self._pool = ProcessPoolExecutor(self.config.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(threads,))
        return self._pool

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=True)
            self._pool = None

    def _finish(self, spec: RunSpec, record: dict | None, error: str | None) -> None:
        if record is None:
            self.failures.append(f"{spec.name()}: {error}")
            self.log(f"  FAILED {spec.name()}: {error}")
            return
        self.writer.append(record)
        self.records[spec.key] = record
        self.completed += 1
        final = record["final"]
        loss = final.get("loss")
        self.log(f"  {spec.phase:5s} {spec.workload:14s} {spec.optimizer:10s} lr={spec.lr:<9.3g} seed={spec.seed} "
                 f"loss={'nan' if loss is None else format(loss, '.4g'):>10s} ({record['wall_time_s']:.1f} s)")


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------

def _score(record: dict | None) -> float:
    if record is None or record.get("diverged"):
        return math.inf
    loss = record["final"].get("loss")
    return math.inf if loss is None or not math.isfinite(loss) else float(loss)


@dataclass
class Combination:
    workload: workloads.Workload
    spec: optim_names.OptimizerSpec
    hyperparameters: dict         # user-set, without lr
    lr: float | None              # fixed or prescribed
    lr_source: str
    grid: list[float] = field(default_factory=list)
    extensions: int = 0
    best_lr: float | None = None


def _validate(config: BenchConfig) -> tuple[list[workloads.Workload], list[str], list[int], float, Suite | None]:
    suite = None
    if config.suite is not None:
        if config.suite not in SUITES:
            raise UsageError(f"unknown suite {config.suite!r}; valid suites: {', '.join(SUITES)}")
        suite = SUITES[config.suite]
    if config.workloads:
        chosen = [workloads.get(name) for name in config.workloads]
    elif suite is not None:
        chosen = [workloads.get(name) for name in suite.workloads]
    else:
        raise UsageError("give --suite or --workloads")
    names = config.optimizers or (suite_optimizers(suite) if suite else list(QUICK_OPTIMIZERS))
    for name in names:
        spec = optim_names.resolve(name)
        if spec.base in optim_names.SPARSE_ONLY:
            raise UsageError(f"optimizer {name!r} needs sparse gradients; no built-in workload produces them")
    seeds = config.seeds if config.seeds is not None else list(range(suite.seeds if suite else 1))
    if not seeds:
        raise UsageError("--seeds must name at least one seed")
    fraction = config.sweep_fraction if config.sweep_fraction is not None else (suite.sweep_fraction if suite else 0.25)
    if not 0 < fraction <= 1:
        raise UsageError(f"--sweep-fraction must be in (0, 1], got {fraction}")
    if config.sweep_points < 1:
        raise UsageError(f"--sweep-points must be at least 1, got {config.sweep_points}")
    if config.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {config.jobs}")
    if config.nproc is not None or config.strategy is not None:
        from .launch import check_launch
        check_launch(config.nproc, config.strategy)
    if config.steps is not None and config.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {config.steps}")
    if config.lr is not None and not config.lr > 0:
        raise UsageError(f"--lr must be positive, got {config.lr}")
    return chosen, [optim_names.resolve(n).name for n in names], list(seeds), fraction, suite


def _check_out(out: Path) -> None:
    """A clear error now, before any training, if results cannot be written to ``out``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        import tempfile
        handle, probe = tempfile.mkstemp(dir=out, prefix=".adamkit-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from None
    results = out / RESULTS
    if results.exists() and not os.access(results, os.W_OK):
        raise UsageError(f"cannot append to {results}: permission denied")


def _preflight(config: BenchConfig, combos: list[Combination]) -> None:
    """Build every optimizer once on a dummy parameter so bad hyperparameters fail before training."""
    import torch
    from .runner import TrainConfig, prepare
    for combo in combos:
        hyperparameters = dict(combo.hyperparameters)
        hyperparameters["lr"] = combo.lr if combo.lr is not None else optim_names.default_lr(combo.spec)
        batch_size = config.batch_size if combo.workload.kind == "model" else None
        run = prepare(TrainConfig(workload=combo.workload.name, optimizer=combo.spec.name,
                                  hyperparameters=hyperparameters, steps=config.steps, batch_size=batch_size,
                                  schedule=config.schedule, schedule_args=dict(config.schedule_args),
                                  data_dir=config.data_dir, download=config.download, device=config.device))
        optim_names.create(combo.spec, [torch.zeros(2, requires_grad=True)], run.hyperparameters)


def run_bench(config: BenchConfig, log=None) -> dict:
    """Run the protocol; returns {"records": [...], "failures": [...], "skipped": n, "completed": n, ...}."""
    log = log or (lambda message: None)
    chosen, optimizer_names, seeds, fraction, suite = _validate(config)
    out = Path(config.out).expanduser()

    combos = []
    for workload in chosen:
        for name in optimizer_names:
            spec = optim_names.resolve(name)
            accepted = optim_names.constructor_defaults(spec)
            user = {k: v for k, v in config.hyperparameters.items() if k in accepted and k != "lr"}
            if config.lr is not None:
                lr, source = config.lr, "fixed"
            elif workload.lr is not None:
                lr, source = workload.lr, "prescribed"
            else:
                lr, source = None, "sweep"
            combos.append(Combination(workload, spec, user, lr, source))
    unknown = [k for k in config.hyperparameters
               if k != "lr" and not any(k in optim_names.constructor_defaults(c.spec) for c in combos)]
    if unknown:
        raise UsageError(f"no chosen optimizer has the hyperparameter(s) {', '.join(unknown)}")
    _preflight(config, combos)
    _check_out(out)
    log(f"adamkit bench: {len(chosen)} workload(s) x {len(optimizer_names)} optimizer(s), seeds "
        f"{', '.join(map(str, seeds))}; results in {out / RESULTS}")

    existing, bad = read_results(out)
    if bad:
        log(f"note: {bad} unreadable line(s) in {out / RESULTS} are ignored (a run cut short?)")
    records = {r["key"]: r for r in existing}
    executor = Executor(config, out, records, log)
    started = time.perf_counter()

    def budget(workload):
        return config.steps or workload.steps

    protocol = protocol_text(config, fraction, seeds)

    def spec_for(combo, phase, lr, seed, steps):
        return RunSpec(phase=phase, workload=combo.workload.name, optimizer=combo.spec.name,
                       hyperparameters={**combo.hyperparameters, "lr": lr}, seed=seed, steps=steps,
                       batch_size=config.batch_size if combo.workload.kind == "model" else None,
                       lr_source=combo.lr_source, data_dir=config.data_dir, download=config.download,
                       device=config.device, threads=config.threads, protocol=protocol,
                       schedule=config.schedule, schedule_args=dict(config.schedule_args),
                       nproc=config.nproc if config.nproc is not None or config.strategy is None else 1,
                       strategy=config.strategy)

    def sweep_spec(combo, lr):
        steps = max(1, int(round(budget(combo.workload) * fraction)))
        return spec_for(combo, "sweep", lr, seeds[0], steps)

    try:
        sweeping = [c for c in combos if c.lr is None]
        for combo in sweeping:
            combo.grid = optim_names.lr_grid(optim_names.default_lr(combo.spec), config.sweep_points, 2.0)
        if sweeping:
            log(f"learning-rate sweep: {config.sweep_points} values per optimizer, {fraction:g} of each budget")
        executor.run([sweep_spec(c, lr) for c in sweeping for lr in c.grid])
        ratio = 10 ** 0.5
        while True:
            extend = []
            for combo in sweeping:
                scores = [_score(records.get(sweep_spec(combo, lr).key)) for lr in combo.grid]
                best, beyond = optim_names.pick_best(combo.grid, scores, optim_names.default_lr(combo.spec))
                combo.best_lr = combo.grid[best]
                if beyond and combo.extensions < config.max_extensions:
                    if best == 0:
                        new = float(f"{combo.grid[0] / ratio:.6g}")
                        combo.grid.insert(0, new)
                    else:
                        new = float(f"{combo.grid[-1] * ratio:.6g}")
                        combo.grid.append(new)
                    combo.extensions += 1
                    extend.append(sweep_spec(combo, new))
            if not extend:
                break
            log(f"extending {len(extend)} sweep(s) whose best learning rate was on the edge of the grid")
            executor.run(extend)

        finals = []
        for combo in combos:
            lr = combo.lr if combo.lr is not None else combo.best_lr
            combo_seeds = seeds[:1] if combo.workload.deterministic else seeds
            finals += [spec_for(combo, "final", lr, seed, budget(combo.workload)) for seed in combo_seeds]
        log(f"final runs: {len(finals)}")
        executor.run(finals)
    except BaseException:  # interrupted or broken: stop the workers, keep every finished record
        executor.close(cancel=True)
        raise
    executor.close()
    return {"out": str(out), "records": list(records.values()), "failures": executor.failures,
            "skipped": executor.skipped, "completed": executor.completed,
            "elapsed_s": time.perf_counter() - started, "protocol": protocol}


def protocol_text(config: BenchConfig, fraction: float, seeds: list[int]) -> dict:
    """The protocol's parameters, stored in every record so that a report can state them."""
    return {"sweep_points": config.sweep_points, "sweep_fraction": fraction, "max_extensions": config.max_extensions,
            "seeds": seeds, "fixed_lr": config.lr, "steps_override": config.steps, "jobs": config.jobs}
