"""One training run: ``adamkit train``.

``run_training(config)`` builds the workload's task for the seed, the optimizer and the schedule,
trains for the budget, evaluates on the held-out split at regular intervals, writes TensorBoard
scalars, checkpoints atomically, resumes from a checkpoint, and returns a JSON-ready summary.

Reproducibility: a run is a function of its configuration. The model is initialised from the seed,
each step's batch depends only on (seed, step), and a checkpoint stores model, optimizer, scheduler,
task state, the torch / NumPy / Python random states and the evaluation history, so a resumed run
ends with the same parameters and metrics as one that was never interrupted.
"""
from __future__ import annotations

import inspect
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import adamkit

from . import optimizers as optim_names
from . import workloads
from .data import DEFAULT_DATA_DIR
from .errors import UsageError
from .models import INITS, apply_init

CHECKPOINT_FORMAT = "adamkit-train-checkpoint/1"


@dataclass
class TrainConfig:
    """Everything that defines a run (``adamkit train``'s flags)."""

    workload: str
    optimizer: str
    hyperparameters: dict = field(default_factory=dict)   # only those the user set
    schedule: str | None = None                            # None: the workload's default (if any)
    schedule_args: dict = field(default_factory=dict)
    steps: int | None = None                               # None: --epochs, else the workload's budget
    epochs: float | None = None
    batch_size: int | None = None
    seed: int = 0
    init: str = "default"
    param_groups: bool = False
    logdir: str | None = None
    json_path: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    quiet: bool = False
    data_dir: str = DEFAULT_DATA_DIR
    data_file: str | None = None
    download: bool = False
    device: str = "cpu"
    eval_every: int | None = None
    log_every: int | None = None
    threads: int | None = None


@dataclass
class PreparedRun:
    """A validated configuration: names resolved, hyperparameters merged, nothing trained yet."""

    config: TrainConfig
    workload: workloads.Workload
    spec: optim_names.OptimizerSpec
    hyperparameters: dict          # passed to the constructor
    schedule: str | None
    schedule_args: dict


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def schedule_names() -> list[str]:
    return list(adamkit.schedules.available())


def _schedule_factory(name: str):
    factory = getattr(adamkit.schedules, name, None)
    return factory if callable(factory) else None


def build_schedule(name: str, arguments: dict, total_steps: int):
    """The ``step -> multiplier`` function of ``adamkit.schedules``; fills ``total_steps`` (the run's
    budget) and ``warmup_steps`` (5% of it) when the schedule requires them and they are not given."""
    arguments = dict(arguments)
    factory = _schedule_factory(name)
    if factory is not None:
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            parameters = {}
        if "total_steps" in parameters and "total_steps" not in arguments:
            arguments["total_steps"] = total_steps
        warmup = parameters.get("warmup_steps")
        if warmup is not None and warmup.default is inspect.Parameter.empty and "warmup_steps" not in arguments:
            arguments["warmup_steps"] = max(1, total_steps // 20)
    try:
        return adamkit.schedules.get(name, **arguments), arguments
    except (TypeError, ValueError) as error:
        raise UsageError(f"schedule {name!r}: {error}") from None


def prepare(config: TrainConfig) -> PreparedRun:
    """Check names and values without training; raises UsageError with a message for the user."""
    workload = workloads.get(config.workload)
    spec = optim_names.resolve(config.optimizer)
    if spec.base in optim_names.SPARSE_ONLY:
        raise UsageError(f"optimizer {spec.name!r} needs sparse gradients; no built-in workload produces them")
    user = dict(config.hyperparameters)
    if workload.lr is not None and "lr" not in user:
        user_lr = {"lr": workload.lr}
    else:
        user_lr = {}
    hyperparameters = optim_names.effective_hyperparameters(spec, {**user_lr, **user}, workload.hyperparameters)
    if config.init not in INITS:
        raise UsageError(f"unknown init {config.init!r}; valid: {', '.join(INITS)}")
    if config.init != "default" and workload.kind == "function":
        raise UsageError(f"workload {workload.name!r} optimises a point, not network weights: --init does not apply")
    if config.steps is not None and config.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if config.steps is not None and config.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {config.steps}")
    if config.epochs is not None:
        if workload.kind == "function":
            raise UsageError(f"workload {workload.name!r} has no data set, so --epochs does not apply; use --steps")
        if config.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {config.epochs}")
    if config.batch_size is not None:
        if workload.builder_is_user():
            raise UsageError(f"workload {workload.name!r} brings its own train_loader: set the batch size there")
        if workload.kind == "function":
            raise UsageError(f"workload {workload.name!r} has no data set, so --batch-size does not apply")
        if config.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    for flag in ("checkpoint_every", "eval_every", "log_every", "threads"):
        value = getattr(config, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if config.checkpoint_every and not config.checkpoint:
        raise UsageError("--checkpoint-every needs --checkpoint FILE")
    if config.resume and not config.checkpoint:
        raise UsageError("--resume needs --checkpoint FILE")
    if config.data_file and not workload.takes_data_file:
        raise UsageError(f"--data applies to charlm only, not to {workload.name!r}")
    if config.param_groups and "weight_decay" not in optim_names.constructor_defaults(spec):
        raise UsageError(f"--param-groups sets per-group weight decay, which {spec.name!r} does not have")
    schedule = config.schedule
    schedule_args = dict(config.schedule_args)
    if schedule is None and workload.schedule is not None:
        schedule, default_args = workload.schedule
        schedule_args = {**default_args, **schedule_args}
    if schedule is None and schedule_args:
        raise UsageError("--schedule-arg needs --schedule NAME")
    if schedule is not None:
        valid = schedule_names()
        if schedule not in valid:
            raise UsageError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(valid)}")
    if config.device != "cpu":
        try:
            torch.empty(0, device=config.device)
        except (RuntimeError, AssertionError) as error:
            raise UsageError(f"device {config.device!r} is not usable: {error}") from None
    workload.check_data(config.data_dir, config.download)
    for path in (config.json_path, config.checkpoint):
        if path:
            check_writable_parent(path)
    return PreparedRun(config, workload, spec, hyperparameters, schedule, schedule_args)


def check_writable_parent(path: str | os.PathLike) -> None:
    """UsageError unless a file can be created at ``path`` (the folder is created if needed)."""
    folder = Path(path).expanduser().resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".adamkit-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"cannot write to {folder}: {error.strerror or error}") from None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's files are private (0600)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(obj, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _identity(run: PreparedRun, steps: int) -> dict:
    c = run.config
    return {
        "workload": run.workload.name, "optimizer": run.spec.name,
        "hyperparameters": optim_names.to_json(sorted(run.hyperparameters.items())),
        "schedule": run.schedule, "schedule_args": optim_names.to_json(sorted(run.schedule_args.items())),
        "seed": c.seed, "steps": steps, "batch_size": c.batch_size, "init": c.init,
        "param_groups": c.param_groups, "data_file": c.data_file,
    }


# --------------------------------------------------------------------------------------------
# Logging helpers
# --------------------------------------------------------------------------------------------

def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(metrics: dict) -> dict:
    return {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in metrics.items()}


_QUANTILE_SAMPLE = 16384


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    """Mean over all elements; 10/50/90th percentiles over an evenly strided sample of at most 16384."""
    mean = float(values.mean())
    if values.numel() > _QUANTILE_SAMPLE:
        values = values[:: -(-values.numel() // _QUANTILE_SAMPLE)]
    ordered = values.sort().values
    last = ordered.numel() - 1

    def at(q):
        return float(ordered[int(round(q * last))])

    return {"p10": at(0.1), "median": at(0.5), "p90": at(0.9), "mean": mean}


class _StepStatistics:
    """Per-layer update-to-weight ratios and the effective per-element step size |delta theta| / |g|.

    The effective step size is what the optimizer actually multiplied each gradient element by; it
    equals the learning rate for plain SGD and shows the per-element adaptation of adaptive methods.
    Read-only: it uses no random numbers, so logging does not change the run.
    """

    def __init__(self, named_parameters):
        self.named = [(name, p) for name, p in named_parameters if p.requires_grad]

    def before(self):
        self.snapshot = [p.detach().clone() for _, p in self.named]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for _, p in self.named]

    def after(self) -> dict[str, float]:
        scalars, ratios = {}, []
        squared_norm = 0.0
        for (name, p), old, grad in zip(self.named, self.snapshot, self.grads):
            if grad is None:
                continue
            grad = grad.to_dense() if grad.is_sparse else grad
            squared_norm += float(grad.double().pow(2).sum())
            delta = (p.detach() - old).double()
            weight_norm = float(old.double().norm())
            if weight_norm > 0:
                scalars[f"update_ratio/{name}"] = float(delta.norm()) / weight_norm
            mask = grad != 0
            if bool(mask.any()):
                ratios.append((delta.abs()[mask] / grad.double().abs()[mask]).flatten())
        scalars["train/grad_norm"] = math.sqrt(squared_norm)
        if ratios:
            for key, value in _quantiles(torch.cat(ratios)).items():
                scalars[f"effective_step_size/{key}"] = value
        del self.snapshot, self.grads
        return scalars


def _progress_bar(total: int, initial: int, enabled: bool, description: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=description, file=sys.stderr, dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run_training(config: TrainConfig, *, on_step=None, on_evaluate=None, prepared: PreparedRun | None = None) -> dict:
    """Train once and return the summary (also written to ``config.json_path`` if given).

    ``on_step(step, total)`` is called after every completed step (the progress bar uses the same
    information); ``on_evaluate(step, metrics)`` after every held-out evaluation, step 0 included
    (``adamkit tune`` reports to its pruner there; an exception it raises ends the run). Raises
    UsageError on bad input before any training.
    """
    run = prepared or prepare(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    from .launch import session
    dist = session(config)  # a rank of `adamkit train --nproc N`, else None
    try:
        return _train(run, dist.config if dist else config, on_step, on_evaluate, dist)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was
        if dist is not None:
            dist.close()


def _train(run: PreparedRun, config: TrainConfig, on_step, on_evaluate=None, dist=None) -> dict:
    c = config
    wall_start = time.perf_counter()

    context = workloads.BuildContext(seed=c.seed, batch_size=c.batch_size, device=c.device, data_dir=c.data_dir,
                                     data_file=c.data_file, download=c.download)
    torch.manual_seed(c.seed)
    np.random.seed(c.seed % (2 ** 32))
    random.seed(c.seed)
    task = run.workload.build(context)
    model = task.model
    apply_init(model, c.init, torch.Generator().manual_seed(c.seed))
    model.train()
    if dist is not None:
        model = dist.wrap(task)  # DDP or FSDP2; this rank's slice of every batch

    if c.steps is not None:
        total = int(c.steps)
    elif c.epochs is not None:
        if task.steps_per_epoch is None:
            raise UsageError(f"workload {run.workload.name!r}: train_loader has no length, so --epochs does not "
                             "apply; use --steps")
        total = max(1, int(math.ceil(c.epochs * task.steps_per_epoch)))
    else:
        total = run.workload.steps
    eval_every = c.eval_every or run.workload.eval_every(total)
    log_every = c.log_every or max(1, total // 50)

    if run.spec.base == "muon":  # Muon takes matrices: the rest goes to its AdamW groups
        params = adamkit.param_groups(
            model, muon=True,
            weight_decay=run.hyperparameters.get("weight_decay") if c.param_groups else None)
        if not c.param_groups:  # no-decay groups only with --param-groups, as for the others
            for group in params:
                group.pop("weight_decay", None)
    elif c.param_groups:
        decay = run.hyperparameters.get("weight_decay", optim_names.constructor_defaults(run.spec)["weight_decay"])
        params = adamkit.param_groups(model, weight_decay=decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (dist.create_optimizer if dist else optim_names.create)(run.spec, params, run.hyperparameters)
    scheduler, schedule_args = None, dict(run.schedule_args)
    if run.schedule is not None:
        function, schedule_args = build_schedule(run.schedule, run.schedule_args, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, function)
    run.schedule_args = schedule_args
    identity = _identity(run, total)

    target = run.workload.target
    history: list[dict] = []
    state = {"step": 0, "train_time_s": 0.0, "wall_time_s": 0.0, "loss_sum": 0.0, "loss_count": 0,
             "log_sum": 0.0, "log_count": 0, "target_step": None, "target_time_s": None, "diverged": False}

    checkpoint_path = Path(c.checkpoint).expanduser() if c.checkpoint else None
    resumed = False
    if c.resume and checkpoint_path is not None:
        if dist.exists(checkpoint_path) if dist else checkpoint_path.is_file():
            try:
                saved = dist.load_meta(checkpoint_path) if dist else \
                    torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            except UsageError:
                raise
            except Exception as error:  # not a torch file, truncated, or holding foreign objects
                raise UsageError(f"cannot read checkpoint {checkpoint_path}: {error}") from None
            if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
                raise UsageError(f"{checkpoint_path} is not an adamkit train checkpoint")
            if saved["identity"] != identity:
                different = sorted(k for k in identity if saved["identity"].get(k) != identity[k])
                raise UsageError(f"checkpoint {checkpoint_path} belongs to a different run (differs in: "
                                 f"{', '.join(different)})")
            if dist is not None:  # a DCP checkpoint, at any world size
                dist.load_state(checkpoint_path, model, optimizer)
            else:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            task.load_state_dict(saved["task"])
            history = saved["history"]
            state.update(saved["state"])
            _set_rng_state(saved["rng"])
            resumed = True
        elif not c.quiet:
            print(f"adamkit train: no checkpoint at {checkpoint_path}; starting from step 0", file=sys.stderr)

    # Schedule-Free optimizers (.train()/.eval()) start in eval mode, as the reference's: train
    # mode for the steps; checkpoints are saved in eval mode (the model holds the averaged point),
    # as the reference recommends, so a resumed run switches back to train mode after loading
    switch = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if switch:
        optimizer.train()

    def save_checkpoint():
        state["wall_time_s"] = previous_wall + time.perf_counter() - wall_start
        saved = {"format": CHECKPOINT_FORMAT, "identity": identity,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "task": task.state_dict(), "history": history, "state": dict(state), "rng": _rng_state()}
        if switch:  # Schedule-Free: checkpoints hold the averaged point x (eval mode)
            optimizer.eval()
        try:
            if dist is not None:
                dist.save(checkpoint_path, model, optimizer, saved, save_atomic)
            else:
                save_atomic(dict(saved, model=model.state_dict(), optimizer=optimizer.state_dict()),
                            checkpoint_path)
        finally:
            if switch:
                optimizer.train()

    writer = None
    if c.logdir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(c.logdir).expanduser()))
    statistics = (_StepStatistics(model.named_parameters())
                  if writer is not None and (dist is None or dist.show_statistics()) else None)

    def evaluate(step):
        # Schedule-Free optimizers evaluate at their averaged point: .eval() swaps it in and
        # .train() swaps the gradient point back (torch.optim optimizers have neither)
        if switch:
            optimizer.eval()
        try:
            metrics = task.evaluate()
        finally:
            if switch:
                optimizer.train()
        entry = {"step": step, "time_s": state["train_time_s"],
                 "train_loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else None}
        entry.update(metrics)
        history.append(_clean(entry))
        state["loss_sum"], state["loss_count"] = 0.0, 0
        if state["target_step"] is None and target.reached(metrics):
            state["target_step"], state["target_time_s"] = step, state["train_time_s"]
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"val/{key}", value, step)
        if on_evaluate is not None:
            on_evaluate(step, metrics)
        return metrics

    previous_wall = state["wall_time_s"]
    if not history:
        evaluate(0)
    start = state["step"]
    bar = _progress_bar(total, start, not c.quiet and sys.stderr.isatty(), f"{run.workload.name}/{run.spec.name}")
    try:
        for step in range(start, total):
            begin = time.perf_counter()
            logging = statistics is not None and ((step + 1) % log_every == 0 or step == 0)
            if writer is not None and logging:
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(step)
            loss.backward()
            if logging:
                pause = time.perf_counter()
                statistics.before()
                begin += time.perf_counter() - pause  # training time excludes logging
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            task.after_step(step)
            loss_value = dist.mean(loss) if dist else float(loss.detach())
            state["train_time_s"] += time.perf_counter() - begin
            state["step"] = step + 1
            if not math.isfinite(loss_value):
                state["diverged"] = True
                break
            state["loss_sum"] += loss_value
            state["loss_count"] += 1
            if writer is not None:
                state["log_sum"] += loss_value
                state["log_count"] += 1
                if logging:
                    writer.add_scalar("train/loss", state["log_sum"] / state["log_count"], step + 1)
                    state["log_sum"], state["log_count"] = 0.0, 0
                    for key, value in statistics.after().items():
                        if math.isfinite(value):
                            writer.add_scalar(key, value, step + 1)
            done = step + 1
            if done % eval_every == 0 or done == total:
                metrics = evaluate(done)
                if not math.isfinite(metrics.get("loss", 0.0)):
                    state["diverged"] = True
                    break
            if checkpoint_path is not None and c.checkpoint_every and done % c.checkpoint_every == 0 and done < total:
                save_checkpoint()
            if bar is not None:
                bar.update(1)
                if done % 10 == 0 or done == total:
                    bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
            if on_step is not None:
                on_step(done, total)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
            writer = None  # `evaluate` below must not reopen it

    if history[-1]["step"] != state["step"]:
        evaluate(state["step"])  # a diverged run: record where it stopped
    if checkpoint_path is not None:
        save_checkpoint()
    wall_time = previous_wall + time.perf_counter() - wall_start

    final = dict(history[-1])
    final.pop("step", None)
    final.pop("time_s", None)
    final.update(task.final())
    summary = {
        "workload": run.workload.name,
        "optimizer": run.spec.name,
        "optimizer_base": run.spec.base,
        "hyperparameters": optim_names.resolved_hyperparameters(run.spec, run.hyperparameters),
        "hyperparameters_set": {k: optim_names.to_json(v) for k, v in run.hyperparameters.items()},
        "schedule": None if run.schedule is None else {"name": run.schedule,
                                                       "args": {k: optim_names.to_json(v) for k, v in schedule_args.items()}},
        "seed": c.seed,
        "steps": state["step"],
        "steps_planned": total,
        "batch_size": (c.batch_size or run.workload.batch_size) if run.workload.kind == "model" else None,
        "init": c.init,
        "wall_time_s": wall_time,
        "train_time_s": state["train_time_s"],
        "diverged": state["diverged"],
        "resumed": resumed,
        "world_size": dist.world_size if dist else 1,
        "strategy": dist.strategy if dist else None,
        "final": _clean(final),
        "time_to_target": {"target": target.describe(), "step": state["target_step"],
                           "time_s": state["target_time_s"]},
        "history": history,
        "versions": {"adamkit": _version(), "torch": torch.__version__},
    }
    if c.json_path:
        import json
        write_text_atomic(json.dumps(summary, indent=2, allow_nan=False) + "\n", c.json_path)
    return summary


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("adamkit")
    except Exception:
        return "unknown"


def format_summary(summary: dict) -> str:
    """A short human-readable account of a run for the terminal."""
    final = summary["final"]
    parts = []
    for key, value in final.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.6g}")
        elif isinstance(value, list):
            parts.append(f"{key}=(" + ", ".join(f"{v:.6g}" for v in value) + ")")
        elif value is None:
            parts.append(f"{key}=nan")
    lr = summary["hyperparameters"].get("lr")
    lines = [
        f"{summary['workload']} / {summary['optimizer']} (lr={lr}) seed {summary['seed']}: "
        f"{summary['steps']} steps in {summary['wall_time_s']:.1f} s"
        + ("  [DIVERGED]" if summary["diverged"] else ""),
        "  final: " + "  ".join(parts),
    ]
    ttt = summary["time_to_target"]
    if ttt["step"] is not None:
        lines.append(f"  target {ttt['target']} reached at step {ttt['step']} ({ttt['time_s']:.2f} s)")
    else:
        lines.append(f"  target {ttt['target']} not reached")
    return "\n".join(lines)
