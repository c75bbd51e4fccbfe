"""``adamkit results``: the claims made about Adam and its family, measured, in ``DIR/RESULTS.md``.

Each claim is an experiment on the built-in offline workloads; this module plans and runs them,
``results_claims`` turns the records into tables and verdicts by stated rules, ``results_figures``
draws the figures and ``results_doc`` writes the document.

Runs go through the bench runner's machinery (``suite.Executor``, ``suite.ResultsWriter``,
``suite.read_results``): every finished run appends one record, keyed by what defines it, to
``DIR/results-runs/results.jsonl``, and a rerun (or an interrupted run started again) skips every
run whose record exists. Runs that two experiments share (Adam's learning-rate grid on charlm is
both the learning-rate-sensitivity and the warm-up experiment's "no warm-up" arm) are run once.

Training runs use ``adamkit.bench.runner.run_training``. Two experiments need what the runner does
not offer and run a small loop of their own (``probe_training``): the sparse-gradient one
(SparseAdam takes only sparse gradients, which the runner's workloads do not produce) and
AdaBound's effective step sizes, which are read from the optimizer after every measured step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import optimizers as optim_names
from . import workloads
from .errors import UsageError
from .suite import Executor, RunSpec, read_results

RUNS_DIR = "results-runs"
FIGURES_DIR = "results-figures"


# --------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """The budgets of one ``--scale``. Every experiment reads its sizes from here."""

    name: str
    workloads: tuple[str, ...]            # model workloads of the speed / lr / AMSGrad claims
    steps: dict                           # budget per workload
    optimizers: tuple[str, ...]           # compared on those workloads
    grid_points: int                      # learning rates over three decades
    max_extensions: int                   # half-decade extensions when the best lr is on the grid's edge
    seeds: int                            # seeds at the tuned learning rate
    heatmap_workload: str
    heatmap_lrs: tuple[float, ...]
    heatmap_wds: tuple[float, ...]
    heatmap_seeds: int
    warmup_workload: str
    reddi_steps: int
    bounds_workload: str
    bounds_steps: int
    bounds_points: int                    # measured steps, log-spaced
    sparse_steps: int
    sparse_points: int                    # learning rates over two decades
    memory_workloads: tuple[str, ...]     # where int8 / bfloat16 state is trained against float32
    memory_shape: tuple[int, int]         # the weight matrix whose state is measured
    backend: str = "reference"
    workload_optimizers: dict = field(default_factory=dict)   # per-workload subsets of ``optimizers``
    workload_points: dict = field(default_factory=dict)       # per-workload grid sizes
    targets: dict = field(default_factory=dict)               # per-workload steps-to-target overrides

    def optimizers_on(self, workload: str) -> tuple[str, ...]:
        return self.workload_optimizers.get(workload, self.optimizers)

    def points_on(self, workload: str) -> int:
        return self.workload_points.get(workload, self.grid_points)

    def target(self, workload: str):
        return self.targets.get(workload) or workloads.get(workload).target


SPEED_OPTIMIZERS = ("sgdm", "adam", "adamw", "nadam", "radam", "amsgrad", "adabound")

SCALES = {
    "test": Scale("test", ("logreg-digits", "mlp-digits"), {"logreg-digits": 12, "mlp-digits": 12, "bow-zipf": 12},
                  ("sgdm", "adam", "adamw", "amsgrad", "radam", "adabound"), grid_points=3, max_extensions=1,
                  seeds=2, heatmap_workload="logreg-digits", heatmap_lrs=(1e-3, 1e-2), heatmap_wds=(1e-3, 1e-1),
                  heatmap_seeds=1, warmup_workload="mlp-digits", reddi_steps=202, bounds_workload="logreg-digits",
                  bounds_steps=20, bounds_points=6, sparse_steps=12, sparse_points=2,
                  memory_workloads=("logreg-digits",), memory_shape=(128, 64),
                  workload_optimizers={"mlp-digits": ("sgdm", "adam", "amsgrad", "radam")},
                  targets={"logreg-digits": workloads.Target("accuracy", 0.5, "max")}),
    "default": Scale("default", ("mlp-digits", "mlp-mnist1d", "charlm"),
                     {"mlp-digits": 300, "mlp-mnist1d": 400, "charlm": 200, "bow-zipf": 600},
                     SPEED_OPTIMIZERS, grid_points=7, max_extensions=2, seeds=3, heatmap_workload="mlp-digits",
                     heatmap_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), heatmap_wds=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                     heatmap_seeds=1, warmup_workload="charlm", reddi_steps=10100, bounds_workload="mlp-digits",
                     bounds_steps=2000, bounds_points=40, sparse_steps=600, sparse_points=5,
                     memory_workloads=("mlp-digits", "mlp-mnist1d"), memory_shape=(1024, 1024),
                     workload_optimizers={"charlm": ("sgdm", "adam", "adamw", "amsgrad", "radam")},
                     workload_points={"charlm": 5},
                     targets={"charlm": workloads.Target("bits_per_char", 3.3)}),
    "full": Scale("full", ("logreg-digits", "mlp-digits", "mlp-mnist1d", "charlm"),
                  {"logreg-digits": 300, "mlp-digits": 300, "mlp-mnist1d": 800, "charlm": 600, "bow-zipf": 1200},
                  SPEED_OPTIMIZERS + ("lion", "adabelief"), grid_points=7, max_extensions=3, seeds=5,
                  heatmap_workload="mlp-digits", heatmap_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                  heatmap_wds=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), heatmap_seeds=3, warmup_workload="charlm",
                  reddi_steps=101000, bounds_workload="mlp-digits", bounds_steps=5000, bounds_points=50,
                  sparse_steps=1200, sparse_points=5, memory_workloads=("mlp-mnist1d", "charlm"),
                  memory_shape=(2048, 2048)),
}

# The centre of each optimizer's learning-rate grid: its good region on these workloads, not
# necessarily its default (SGD's default of 1e-3 is far too small for SGD with momentum).
LR_CENTER = {"sgdm": 10 ** -1.5, "sgd": 10 ** -1.5, "lion": 10 ** -3.5, "adagrad": 10 ** -1.5}
ADAPTIVE_CENTER = 10 ** -2.5
SPARSE_OPTIMIZERS = ("adam", "sparseadam", "adagrad")
SPARSE_CENTER = {"adam": 1e-2, "sparseadam": 1e-2, "adagrad": 1e-1}
WARMUP_FRACTION = 0.1
LOW_PRECISION = ("bfloat16", "int8")


def lr_center(optimizer: str) -> float:
    return LR_CENTER.get(optimizer, ADAPTIVE_CENTER)


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise UsageError(f"unknown scale {name!r}; valid scales: {', '.join(SCALES)}")
    return SCALES[name]


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

@dataclass
class ResultSpec(RunSpec):
    """A bench ``RunSpec`` plus what the results' experiments add: a schedule, or a probe.

    ``probe`` is None for a training run (``run_training``), "sparse" or "bounds" for the loops
    of ``probe_training``. Its identity (the record's key) covers all of them; the experiment that
    asked for a run is not part of it, so experiments share identical runs.
    """

    schedule: str | None = None
    schedule_args: dict = field(default_factory=dict)
    probe: str | None = None
    sparse: bool = False

    def identity(self) -> dict:
        identity = super().identity()
        identity.update(schedule=self.schedule, schedule_args=optim_names.to_json(sorted(self.schedule_args.items())),
                        probe=self.probe, sparse=self.sparse)
        return identity

    def name(self) -> str:
        extra = f"-{self.schedule}" if self.schedule else ""
        extra += f"-{self.probe}" if self.probe else ""
        return f"{self.workload}/{self.optimizer}/lr{self.lr:g}{extra}-seed{self.seed}-{self.key[:6]}"


def execute(spec: ResultSpec) -> dict:
    """Train one run and return its record (in this process or in a worker)."""
    if spec.probe is not None:
        summary = probe_training(spec)
    else:
        from .runner import TrainConfig, run_training
        summary = run_training(TrainConfig(
            workload=spec.workload, optimizer=spec.optimizer, hyperparameters=dict(spec.hyperparameters),
            schedule=spec.schedule, schedule_args=dict(spec.schedule_args), steps=spec.steps,
            batch_size=spec.batch_size, seed=spec.seed, quiet=True, data_dir=spec.data_dir,
            device=spec.device, threads=spec.threads))
        summary.pop("versions", None)
    record = {"key": spec.key, "run": spec.name(), "phase": spec.phase, "lr": spec.lr, "lr_source": spec.lr_source,
              "hyperparameters_user": {k: optim_names.to_json(v) for k, v in spec.hyperparameters.items()
                                       if k not in ("lr", "backend")},
              "protocol": spec.protocol, "probe": spec.probe, "sparse": spec.sparse,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record.update(summary)
    return record


def _execute_safely(spec: ResultSpec, out: str):
    try:
        return spec, execute(spec), None
    except KeyboardInterrupt:
        raise
    except Exception as error:  # one failing run must not stop the others
        return spec, None, f"{type(error).__name__}: {error}"


class ResultsExecutor(Executor):
    """The bench's executor (records, worker pool, logging) running ``execute`` above."""

    def run(self, specs: list[ResultSpec]) -> None:
        todo, seen = [], set()
        for spec in specs:
            if spec.key in self.records:
                self.skipped += 1
            elif spec.key not in seen:
                seen.add(spec.key)
                todo.append(spec)
        if not todo:
            return
        if self.config.jobs <= 1:
            for spec in todo:
                self._finish(*_execute_safely(spec, str(self.out)))
            return
        from concurrent.futures import as_completed
        pool = self._get_pool()
        futures = [pool.submit(_execute_safely, spec, str(self.out)) for spec in todo]
        try:
            for future in as_completed(futures):
                self._finish(*future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# --------------------------------------------------------------------------------------------
# The loop for what the runner does not offer
# --------------------------------------------------------------------------------------------

def measured_steps(total: int, points: int) -> list[int]:
    """``points`` steps log-spaced in [1, total] (distinct integers, 1 and ``total`` included)."""
    if total <= 1 or points <= 1:
        return [max(1, total)]
    values = {int(round(10 ** (math.log10(total) * i / (points - 1)))) for i in range(points)}
    return sorted(v for v in values if 1 <= v <= total)


def _quantiles(values) -> dict:
    ordered = values.flatten().double().sort().values
    last = ordered.numel() - 1
    return {name: float(ordered[int(round(q * last))]) for name, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}


def probe_training(spec: ResultSpec) -> dict:
    """Train ``spec`` with a plain loop; the summary has the runner's keys used by the results.

    "sparse": the workload's embedding tables give sparse gradients when ``spec.sparse``.
    "bounds": at ``measured_steps`` the effective step size of every element is recorded: the
    factor the step applied to the optimizer's first moment, |delta theta| / |exp_avg| (Adam,
    AdaBound), or to the gradient, |delta theta| / |g| (plain SGD, whose factor is its lr).
    """
    import torch
    workload = workloads.get(spec.workload)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    task = workload.build(workloads.BuildContext(seed=spec.seed, batch_size=spec.batch_size, device=spec.device,
                                                 data_dir=spec.data_dir))
    model = task.model
    if spec.sparse:
        for module in model.modules():
            if hasattr(module, "set_sparse"):
                module.set_sparse(True)
    optimizer_spec = optim_names.resolve(spec.optimizer)
    passed = optim_names.effective_hyperparameters(optimizer_spec, dict(spec.hyperparameters))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = optim_names.create(optimizer_spec, [p for _, p in named], passed)
    measure = set(measured_steps(spec.steps, int(spec.protocol.get("bounds_points", 20)))) \
        if spec.probe == "bounds" else set()
    every = max(1, spec.steps // 20)
    history, bounds = [], []
    train_time, diverged, loss_sum, loss_count = 0.0, False, 0.0, 0

    def evaluate(step):
        nonlocal loss_sum, loss_count
        entry = {"step": step, "time_s": train_time,
                 "train_loss": loss_sum / loss_count if loss_count else None}
        entry.update({k: (v if math.isfinite(v) else None) for k, v in task.evaluate().items()})
        history.append(entry)
        loss_sum, loss_count = 0.0, 0

    evaluate(0)
    wall_start = time.perf_counter()
    step = 0
    for step in range(1, spec.steps + 1):
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(step - 1)
        loss.backward()
        watched = step in measure
        if watched:
            pause = time.perf_counter()
            before = [p.detach().clone() for _, p in named]
            grads = [p.grad.detach().clone() for _, p in named]
            begin += time.perf_counter() - pause
        optimizer.step()
        train_time += time.perf_counter() - begin
        value = float(loss.detach())
        if watched:
            ratios = []
            for (_, p), old, grad in zip(named, before, grads):
                state = optimizer.state.get(p, {})
                moment = state.get("exp_avg", state.get("momentum_buffer"))
                moment = grad if moment is None else moment.float()
                mask = moment != 0
                ratios.append(((p.detach() - old).abs()[mask] / moment.abs()[mask]).flatten())
            bounds.append({"step": step, **_quantiles(torch.cat(ratios))})
        if not math.isfinite(value):
            diverged = True
            break
        loss_sum += value
        loss_count += 1
        if step % every == 0 or step == spec.steps:
            evaluate(step)
            if history[-1].get("loss") is None:
                diverged = True
                break
    if history[-1]["step"] != step:
        evaluate(step)
    final = {k: v for k, v in history[-1].items() if k not in ("step", "time_s")}
    summary = {"workload": spec.workload, "optimizer": spec.optimizer, "optimizer_base": optimizer_spec.base,
               "hyperparameters": optim_names.resolved_hyperparameters(optimizer_spec, passed),
               "seed": spec.seed, "steps": step, "steps_planned": spec.steps,
               "batch_size": spec.batch_size or workload.batch_size, "wall_time_s": time.perf_counter() - wall_start,
               "train_time_s": train_time, "diverged": diverged, "final": final, "history": history}
    if spec.probe == "bounds":
        summary["effective_step_size"] = bounds
    return summary


# --------------------------------------------------------------------------------------------
# State memory: measured, not trained
# --------------------------------------------------------------------------------------------

def memory_names() -> list[str]:
    """Every optimizer the library registers, plus the harness's momentum / AMSGrad variants."""
    import adamkit
    # C-Adam needs a closure (a second gradient) for its one measured step: left out here
    return sorted(set(adamkit.available()) - {"compositeadam", "c-adam"} | {"sgdm", "amsgrad"})


def measure_state_bytes(shape: tuple[int, int], backend: str = "reference") -> dict:
    """Bytes of optimizer state per parameter after one step, for every optimizer and state_dtype.

    The parameters are one ``shape`` float32 matrix and its bias; the count is
    ``adamkit.bench.speed.state_bytes`` (every state tensor but ``step``, int8 codes and scales
    included). A combination the optimizer rejects is None.
    """
    import torch
    from .speed import state_bytes
    rows, columns = shape
    table = {}
    for name in memory_names():
        spec = optim_names.resolve(name)
        for state_dtype in ("float32",) + LOW_PRECISION:
            generator = torch.Generator().manual_seed(0)
            weight = torch.nn.Parameter(torch.randn(rows, columns, generator=generator))
            bias = torch.nn.Parameter(torch.randn(rows, generator=generator))
            passed = optim_names.effective_hyperparameters(spec, {"backend": backend, "state_dtype": state_dtype})
            try:
                # Muon takes the matrix; its AdamW group the bias
                params = ([{"params": [weight]}, {"params": [bias], "use_muon": False}]
                          if spec.base == "muon" else [weight, bias])
                optimizer = optim_names.create(spec, params, passed)
                if hasattr(optimizer, "train"):  # Schedule-Free steps in train mode
                    optimizer.train()
                for p in (weight, bias):
                    grad = torch.randn(p.shape, generator=generator)
                    p.grad = grad.to_sparse() if spec.base in optim_names.SPARSE_ONLY else grad
                optimizer.step()
                table[(name, state_dtype)] = state_bytes(optimizer) / (weight.numel() + bias.numel())
            except UsageError:
                table[(name, state_dtype)] = None
    return table


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@dataclass
class Context:
    scale: Scale
    out: Path
    executor: ResultsExecutor
    records: dict
    threads: int | None
    data_dir: str

    def spec(self, workload: str, optimizer: str, lr: float, seed: int = 0, steps: int | None = None,
             hyperparameters: dict | None = None, schedule: str | None = None, schedule_args: dict | None = None,
             probe: str | None = None, sparse: bool = False, protocol: dict | None = None) -> ResultSpec:
        w = workloads.get(workload)
        hp = {"backend": self.scale.backend, **(hyperparameters or {}), "lr": float(lr)}
        return ResultSpec(phase="results", workload=workload, optimizer=optimizer, hyperparameters=hp, seed=seed,
                          steps=steps or self.scale.steps.get(workload, w.steps), batch_size=None,
                          lr_source="results", data_dir=self.data_dir, download=False, device="cpu",
                          threads=self.threads, protocol=protocol or {"scale": self.scale.name},
                          schedule=schedule, schedule_args=schedule_args or {}, probe=probe, sparse=sparse)

    def record(self, spec: ResultSpec) -> dict | None:
        return self.records.get(spec.key)


def final_loss(record: dict | None) -> float:
    """The final held-out loss; infinite for a missing, failed or diverged run."""
    if record is None or record.get("diverged"):
        return math.inf
    value = record["final"].get("loss")
    return math.inf if value is None or not math.isfinite(value) else float(value)


def lr_grid(center: float, points: int, decades: float = 3.0) -> list[float]:
    return optim_names.lr_grid(center, points, decades)


class Grid:
    """A learning-rate grid over ``decades`` for one (workload, optimizer, settings), extended by half a
    decade past an edge whose value is the best (as the bench's sweep), at most ``max_extensions`` times."""

    def __init__(self, context: Context, workload: str, optimizer: str, center: float, points: int,
                 decades: float = 3.0, **settings):
        self.context, self.workload, self.optimizer, self.settings = context, workload, optimizer, settings
        self.lrs = lr_grid(center, points, decades)
        self.center = center
        self.extensions = 0

    def specs(self, lrs=None) -> list[ResultSpec]:
        return [self.context.spec(self.workload, self.optimizer, lr, **self.settings) for lr in (lrs or self.lrs)]

    def losses(self) -> list[float]:
        return [final_loss(self.context.record(s)) for s in self.specs()]

    def extend(self) -> ResultSpec | None:
        if self.extensions >= self.context.scale.max_extensions or len(self.lrs) < 2:
            return None
        best, beyond = optim_names.pick_best(self.lrs, self.losses(), self.center)
        if not beyond:
            return None
        ratio = 10 ** 0.5
        if best == 0:
            self.lrs.insert(0, float(f"{self.lrs[0] / ratio:.6g}"))
            new = self.lrs[0]
        else:
            self.lrs.append(float(f"{self.lrs[-1] * ratio:.6g}"))
            new = self.lrs[-1]
        self.extensions += 1
        return self.specs([new])[0]

    def best_lr(self) -> float:
        best, _ = optim_names.pick_best(self.lrs, self.losses(), self.center)
        return self.lrs[best]

    def points(self) -> list[tuple[float, dict | None]]:
        return [(lr, self.context.record(s)) for lr, s in zip(self.lrs, self.specs())]


def _settle(context: Context, grids: list[Grid]) -> None:
    """Run every grid, then extend the grids whose best value is on an edge until none is."""
    context.executor.run([s for g in grids for s in g.specs()])
    while True:
        extra = [spec for spec in (g.extend() for g in grids) if spec is not None]
        if not extra:
            return
        context.executor.run(extra)


@dataclass
class Experiments:
    """Everything the document needs: the grids and runs of each claim (records looked up by key)."""

    scale: Scale
    context: Context
    grids: dict = field(default_factory=dict)        # (workload, optimizer) -> Grid
    tuned: dict = field(default_factory=dict)        # (workload, optimizer) -> [record per seed]
    heatmap: dict = field(default_factory=dict)      # (optimizer, lr, wd) -> [record per seed]
    warmup: dict = field(default_factory=dict)       # variant -> [(lr, record)]
    reddi: dict = field(default_factory=dict)        # optimizer -> record
    bounds: dict = field(default_factory=dict)       # optimizer -> [record per seed]
    sparse_grids: dict = field(default_factory=dict)  # optimizer -> Grid
    sparse: dict = field(default_factory=dict)       # optimizer -> [record per seed]
    low_precision: dict = field(default_factory=dict)  # (workload, state_dtype) -> [record per seed]
    state_bytes: dict = field(default_factory=dict)  # (optimizer, state_dtype) -> bytes per parameter


def run_experiments(context: Context, log) -> Experiments:
    scale = context.scale
    result = Experiments(scale, context)
    seeds = list(range(scale.seeds))

    # 1. Learning-rate grids (seed 0, full budget) of every optimizer on every model workload; the
    #    warm-up grid (Adam with linear warm-up) and the lr x wd heatmaps run in the same batch.
    log(f"learning-rate grids: {len(scale.workloads)} workloads x up to {len(scale.optimizers)} optimizers x "
        f"up to {scale.grid_points} learning rates")
    for workload in scale.workloads:
        for optimizer in scale.optimizers_on(workload):
            result.grids[(workload, optimizer)] = Grid(context, workload, optimizer, lr_center(optimizer),
                                                       scale.points_on(workload))
    warm = scale.warmup_workload
    warm_steps = scale.steps.get(warm, workloads.get(warm).steps)
    warmup_steps = max(1, int(round(warm_steps * WARMUP_FRACTION)))
    warm_lrs = lr_grid(lr_center("adam"), scale.points_on(warm))
    warmup_variants = {
        "adam": dict(optimizer="adam"),
        "adam + linear warm-up": dict(optimizer="adam", schedule="linear_warmup",
                                      schedule_args={"warmup_steps": warmup_steps}),
        "radam": dict(optimizer="radam"),
    }
    warm_specs = {name: [context.spec(warm, lr=lr, **v) for lr in warm_lrs] for name, v in warmup_variants.items()}
    heat_specs = {}
    for optimizer in ("adam", "adamw"):
        for lr in scale.heatmap_lrs:
            for wd in scale.heatmap_wds:
                heat_specs[(optimizer, lr, wd)] = [
                    context.spec(scale.heatmap_workload, optimizer, lr, seed=seed, hyperparameters={"weight_decay": wd})
                    for seed in range(scale.heatmap_seeds)]
    reddi_specs = {name: context.spec("reddi", name, workloads.get("reddi").lr, steps=scale.reddi_steps)
                   for name in ("adam", "amsgrad")}
    context.executor.run([s for g in result.grids.values() for s in g.specs()]
                         + [s for specs in warm_specs.values() for s in specs]
                         + [s for specs in heat_specs.values() for s in specs] + list(reddi_specs.values()))

    # 2. Sparse-gradient grids and AdaBound's step sizes (the probes).
    log("sparse gradients and AdaBound's step sizes")
    for optimizer in SPARSE_OPTIMIZERS:
        result.sparse_grids[optimizer] = Grid(context, "bow-zipf", optimizer, SPARSE_CENTER[optimizer],
                                              scale.sparse_points, 2.0, steps=scale.sparse_steps, probe="sparse",
                                              sparse=optimizer != "adam")
    bounds_protocol = {"scale": scale.name, "bounds_points": scale.bounds_points}
    bounds_settings = {"adam": (1e-3, {}), "adabound": (1e-3, {}), "sgd": (0.1, {})}
    bounds_specs = {name: [context.spec(scale.bounds_workload, name, lr, seed=seed, steps=scale.bounds_steps,
                                        hyperparameters=hp, probe="bounds", protocol=bounds_protocol)
                           for seed in seeds[:1]]
                    for name, (lr, hp) in bounds_settings.items()}
    context.executor.run([s for specs in bounds_specs.values() for s in specs])
    _settle(context, list(result.grids.values()) + list(result.sparse_grids.values()))

    # 3. Every seed at the tuned learning rate; int8 and bfloat16 state at Adam's tuned lr.
    log("seeds at the tuned learning rates")
    finals, low = {}, {}
    for (workload, optimizer), grid in result.grids.items():
        finals[(workload, optimizer)] = [context.spec(workload, optimizer, grid.best_lr(), seed=s) for s in seeds]
    sparse_finals = {}
    for optimizer, grid in result.sparse_grids.items():
        sparse_finals[optimizer] = [context.spec("bow-zipf", optimizer, grid.best_lr(), seed=s,
                                                 steps=scale.sparse_steps, probe="sparse",
                                                 sparse=optimizer != "adam") for s in seeds]
    for workload in scale.memory_workloads:
        grid = result.grids.get((workload, "adam")) or Grid(context, workload, "adam", lr_center("adam"),
                                                            scale.points_on(workload))
        if (workload, "adam") not in result.grids:
            _settle(context, [grid])
            result.grids[(workload, "adam")] = grid
            finals[(workload, "adam")] = [context.spec(workload, "adam", grid.best_lr(), seed=s) for s in seeds]
        for state_dtype in LOW_PRECISION:
            low[(workload, state_dtype)] = [context.spec(workload, "adam", grid.best_lr(), seed=s,
                                                         hyperparameters={"state_dtype": state_dtype})
                                            for s in seeds]
    context.executor.run([s for specs in finals.values() for s in specs]
                         + [s for specs in sparse_finals.values() for s in specs]
                         + [s for specs in low.values() for s in specs])

    rec = context.record
    result.tuned = {key: [rec(s) for s in specs] for key, specs in finals.items()}
    result.sparse = {key: [rec(s) for s in specs] for key, specs in sparse_finals.items()}
    result.low_precision = {key: [rec(s) for s in specs] for key, specs in low.items()}
    result.heatmap = {key: [rec(s) for s in specs] for key, specs in heat_specs.items()}
    result.warmup = {name: [(lr, rec(s)) for lr, s in zip(warm_lrs, specs)] for name, specs in warm_specs.items()}
    result.reddi = {name: rec(s) for name, s in reddi_specs.items()}
    result.bounds = {name: [rec(s) for s in specs] for name, specs in bounds_specs.items()}
    log("state memory: every optimizer and state_dtype")
    result.state_bytes = measure_state_bytes(scale.memory_shape, scale.backend)
    return result


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

@dataclass
class ResultsConfig:
    out: str = "docs"
    scale: str = "default"
    jobs: int = 1
    threads: int | None = 1
    data_dir: str | None = None
    command: str = "adamkit results"
    quiet: bool = False


def run_results(config: ResultsConfig, log=None) -> dict:
    """Run (or continue) every experiment of ``config.scale`` and write ``OUT/RESULTS.md`` and its figures.

    Returns {"markdown", "figures", "verdicts", "completed", "skipped", "failures", "elapsed_s"}.
    """
    from . import results_doc
    from .data import DEFAULT_DATA_DIR
    from .suite import BenchConfig, _check_out
    log = log or (lambda message: None)
    scale = get_scale(config.scale)
    if config.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {config.jobs}")
    out = Path(config.out).expanduser()
    runs = out / RUNS_DIR
    _check_out(out)
    _check_out(runs)
    existing, bad = read_results(runs)
    if bad:
        log(f"note: {bad} unreadable line(s) in {runs / 'results.jsonl'} are ignored (a run cut short?)")
    records = {r["key"]: r for r in existing}
    bench_config = BenchConfig(out=str(runs), suite=None, jobs=config.jobs, threads=config.threads)
    executor = ResultsExecutor(bench_config, runs, records, log)
    context = Context(scale, out, executor, records, config.threads, config.data_dir or DEFAULT_DATA_DIR)
    started = time.perf_counter()
    log(f"adamkit results --scale {scale.name}: records in {runs / 'results.jsonl'} ({len(records)} already there)")
    try:
        experiments = run_experiments(context, log)
    except BaseException:
        executor.close(cancel=True)
        raise
    executor.close()
    elapsed = time.perf_counter() - started
    document = results_doc.write(experiments, out, config, elapsed_s=elapsed, completed=executor.completed)
    return {**document, "completed": executor.completed, "skipped": executor.skipped,
            "failures": executor.failures, "elapsed_s": elapsed}
