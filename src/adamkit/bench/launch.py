"""Training across processes: ``adamkit train --nproc N --strategy ddp|zero|fsdp2`` and ``bench --nproc N``.

Two halves:

* the launcher (``launch_train``, ``run_launched``): checks the flags, then starts the ranks with
  PyTorch's own launcher, ``python -m torch.distributed.run`` (torchrun), which runs
  ``python -m adamkit.cli train ...`` in every rank with the strategy in ``ADAMKIT_STRATEGY``;
* the rank side (``Session``, made by ``session()`` inside ``run_training``): joins the process
  group (gloo on the CPU, nccl on CUDA), wraps the model (``DistributedDataParallel``, DDP plus
  ``ZeroRedundancyOptimizer``, or FSDP2's ``fully_shard``), gives each rank its slice of every
  global batch, averages the logged loss over the ranks, and reads and writes checkpoints with
  ``torch.distributed.checkpoint`` (DCP).

Data: ``--batch-size B`` stays the global batch. Each step's batch is chosen exactly as in one
process and rank r trains on rows ``[r*B/W, (r+1)*B/W)`` of it, so the averaged gradient is the
gradient of the whole batch, and a run with W ranks ends where the one-process run ends (up to the
float rounding of the gradient all-reduce). Randomness inside the model (dropout) and data
augmentation is drawn per rank and is not the one-process draw.

Checkpoints: ``--checkpoint PATH`` is a DCP directory holding the model and optimizer in
fully-qualified-name form (``get_state_dict``; under ZeRO the consolidated state goes through a
plain optimizer of the same class), plus ``meta.pt`` (history, counters, scheduler, random state)
written by rank 0. A new checkpoint is written beside the old one and renamed over it, so a kill
leaves the previous one. The format does not depend on the world size or the strategy: ``--resume``
continues at any ``--nproc``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

from .errors import UsageError

STRATEGIES = ("ddp", "zero", "fsdp2")
ENV_STRATEGY = "ADAMKIT_STRATEGY"
META = "meta.pt"
LAUNCH_FLAGS = ("--nproc", "--strategy", "--nnodes", "--node-rank", "--master-addr", "--master-port")
DEFAULT_MASTER_PORT = 29500  # torchrun's


# --------------------------------------------------------------------------------------------
# The launcher (the process the user started)
# --------------------------------------------------------------------------------------------

def wanted(args) -> bool:
    """Whether the command asked for a distributed run."""
    return getattr(args, "nproc", None) is not None or getattr(args, "strategy", None) is not None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launch(nproc, strategy, nnodes=1, node_rank=0, master_addr=None, master_port=None) -> dict:
    """Validate the launch flags; returns them completed (a free port when none was given)."""
    nproc = 1 if nproc is None else nproc
    strategy = strategy or "ddp"
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: needs at least one process per node")
    if nnodes < 1:
        raise UsageError(f"--nnodes {nnodes}: needs at least one node")
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank {node_rank}: must be between 0 and --nnodes - 1 = {nnodes - 1}")
    master_addr = master_addr or "127.0.0.1"
    if master_port is None:
        master_port = free_port() if nnodes == 1 else DEFAULT_MASTER_PORT
    elif not 0 < master_port < 65536:
        raise UsageError(f"--master-port {master_port}: not a TCP port")
    elif node_rank == 0 and not _port_free(master_port):
        raise UsageError(f"--master-port {master_port} is in use on this machine; choose a free port "
                         "(or leave --master-port out on a single node to get one)")
    return {"nproc": nproc, "strategy": strategy, "nnodes": nnodes, "node_rank": node_rank,
            "master_addr": master_addr, "master_port": master_port}


def check_config(config, world_size: int) -> None:
    """What a distributed run needs of the training configuration, checked before any rank starts."""
    from . import runner
    prepared = runner.prepare(config)
    if prepared.workload.kind != "model":
        raise UsageError(f"workload {prepared.workload.name!r} is a function (no data to share among ranks); "
                         "--nproc needs a model workload")
    batch = config.batch_size or prepared.workload.batch_size
    if batch is not None and batch % world_size:
        raise UsageError(f"batch size {batch} (the global batch) is not divisible by the {world_size} ranks; "
                         "set --batch-size to a multiple of the world size")


def _environment() -> dict:
    import adamkit
    env = dict(os.environ)
    src = str(Path(adamkit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun_command(launch: dict, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc-per-node={launch['nproc']}", f"--nnodes={launch['nnodes']}",
            f"--node-rank={launch['node_rank']}", f"--master-addr={launch['master_addr']}",
            f"--master-port={launch['master_port']}",
            "-m", "adamkit.cli", "train", *train_args]


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``adamkit train``'s arguments without the launch flags (which the ranks must not see)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in LAUNCH_FLAGS:
            skip = True
            continue
        if item.split("=", 1)[0] in LAUNCH_FLAGS and "=" in item:
            continue
        out.append(item)
    return out


def run_torchrun(launch: dict, train_args: list[str], quiet: bool = False, timeout: float | None = None) -> int:
    env = _environment()
    env[ENV_STRATEGY] = launch["strategy"]
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True} if quiet else {}
    done = subprocess.run(torchrun_command(launch, train_args), env=env, timeout=timeout, **kwargs)
    if done.returncode and quiet and done.stderr:
        sys.stderr.write(done.stderr[-4000:])
    return done.returncode


def launch_train(args, config) -> int:
    """``adamkit train --nproc N``: check everything, then run torchrun; returns the exit status."""
    launch = check_launch(args.nproc, args.strategy, args.nnodes, args.node_rank, args.master_addr,
                          args.master_port)
    check_config(config, launch["nproc"] * launch["nnodes"])
    argv = getattr(args, "argv", None)
    if argv is None:
        raise UsageError("internal: the command line of adamkit train is not known")
    code = run_torchrun(launch, strip_launch_flags(argv))
    return 0 if code == 0 else 1


def train_arguments(config) -> list[str]:
    """The ``adamkit train`` command line of a TrainConfig (the bench runs each run through it)."""

    def text(value):
        if isinstance(value, (tuple, list)):
            return ",".join(text(v) for v in value)
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, float) else str(value)

    args = ["--workload", config.workload, "--optimizer", config.optimizer, "--seed", str(config.seed),
            "--init", config.init, "--device", config.device, "--data-dir", str(config.data_dir)]
    for key, value in config.hyperparameters.items():
        args += ["--hp", f"{key}={text(value)}"]
    if config.schedule:
        args += ["--schedule", config.schedule]
    for key, value in config.schedule_args.items():
        args += ["--schedule-arg", f"{key}={text(value)}"]
    for flag, value in (("--steps", config.steps), ("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--logdir", config.logdir), ("--json", config.json_path),
                        ("--checkpoint", config.checkpoint), ("--checkpoint-every", config.checkpoint_every),
                        ("--eval-every", config.eval_every), ("--threads", config.threads),
                        ("--data", config.data_file)):
        if value is not None:
            args += [flag, str(value)]
    for flag, on in (("--param-groups", config.param_groups), ("--resume", config.resume),
                     ("--quiet", config.quiet), ("--download", config.download)):
        if on:
            args.append(flag)
    return args


def run_launched(config, nproc: int, strategy: str, timeout: float | None = None) -> dict:
    """Train ``config`` with ``nproc`` local ranks and return rank 0's summary (``adamkit bench --nproc``)."""
    import dataclasses
    import json
    import tempfile
    launch = check_launch(nproc, strategy)
    with tempfile.TemporaryDirectory(prefix="adamkit-launch-") as folder:
        summary_path = Path(folder) / "summary.json"
        config = dataclasses.replace(config, json_path=str(summary_path), quiet=True)
        code = run_torchrun(launch, train_arguments(config), quiet=True, timeout=timeout)
        if code != 0 or not summary_path.is_file():
            raise RuntimeError(f"torchrun with {nproc} rank(s) ({strategy}) exited with status {code}")
        return json.loads(summary_path.read_text())


# --------------------------------------------------------------------------------------------
# The rank side (inside run_training)
# --------------------------------------------------------------------------------------------

def is_main_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def session(config):
    """A Session when this process is a rank started by the launcher, else None."""
    strategy = os.environ.get(ENV_STRATEGY)
    if not strategy or "RANK" not in os.environ:
        return None
    return Session(config, strategy)


class Session:
    """One rank's part of a distributed run (see the module docstring)."""

    def __init__(self, config, strategy: str):
        import dataclasses
        import torch.distributed as dist
        self.dist = dist
        self.strategy = strategy
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(config.device)
        self.owns_group = not dist.is_initialized()
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if self.owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=None)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.is_main = self.rank == 0
        changes = {"device": str(device)}
        if not self.is_main:  # progress, TensorBoard and JSON from rank 0 only
            changes.update(quiet=True, logdir=None, json_path=None)
        self.config = dataclasses.replace(config, **changes)
        self.wrapped = None
        self.plain_optimizer = None

    # -- model and data ---------------------------------------------------------------------
    def wrap(self, task) -> torch.nn.Module:
        """Shard ``task``'s data per rank and wrap its model for the strategy; returns the model to train."""
        _shard_data(task, self.rank, self.world_size)
        model = task.model
        if self.strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for module in list(model.modules())[1:]:
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) \
                        and any(p.requires_grad for p in module.parameters(recurse=False)):
                    fully_shard(module)
            fully_shard(model)
            wrapped = model
        else:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        task.model = wrapped
        self.wrapped = wrapped
        return wrapped

    def create_optimizer(self, spec, params, hyperparameters):
        from . import optimizers as optim_names
        if self.strategy != "zero":
            return optim_names.create(spec, params, hyperparameters)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from adamkit import registry
        params = list(params)
        self._zero_args = (spec, params, hyperparameters)
        optim_names.create(spec, [torch.nn.Parameter(torch.zeros(1))], hyperparameters)  # the values' check
        return ZeroRedundancyOptimizer(params, optimizer_class=registry.get(spec.base),
                                       parameters_as_bucket_view=False, **hyperparameters)

    def show_statistics(self) -> bool:
        """Per-layer step statistics are taken on rank 0 alone: not under FSDP2 (they would need collectives)."""
        return self.strategy != "fsdp2"

    def mean(self, loss: torch.Tensor) -> float:
        """The loss of the whole global batch: the mean of the ranks' equal-sized slices."""
        value = loss.detach().float().reshape(1).clone()
        self.dist.all_reduce(value)
        return float(value) / self.world_size

    def summary(self) -> dict:
        return {"world_size": self.world_size, "strategy": self.strategy}

    # -- checkpoints --------------------------------------------------------------------------
    def _plain(self, optimizer):
        """ZeRO: a plain optimizer of the same class over all parameters holding the consolidated state."""
        from . import optimizers as optim_names
        spec, params, hyperparameters = self._zero_args
        return optim_names.create(spec, params, hyperparameters)

    def exists(self, path: Path) -> bool:
        return (path / META).is_file()

    def load_meta(self, path: Path) -> dict:
        if path.is_file():
            raise UsageError(f"{path} is a one-process checkpoint file; --nproc reads and writes DCP "
                             "checkpoint folders (run without --nproc to continue it)")
        try:
            return torch.load(path / META, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(f"cannot read checkpoint {path / META}: {error}") from None

    def load_state(self, path: Path, model, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        target = self._plain(optimizer) if self.strategy == "zero" else optimizer
        model_state, optim_state = get_state_dict(model, target)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, target, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.strategy == "zero":
            optimizer.load_state_dict(target.state_dict())

    def save(self, path: Path, model, optimizer, meta: dict, save_atomic) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        if self.strategy == "zero":
            optimizer.consolidate_state_dict(to=0)
            box = [optimizer.state_dict() if self.is_main else None]
            self.dist.broadcast_object_list(box, src=0)
            target = self._plain(optimizer)
            target.load_state_dict(box[0])
        else:
            target = optimizer
        model_state, optim_state = get_state_dict(model, target)
        fresh = path.with_name(path.name + ".new")
        if self.is_main and fresh.exists():
            shutil.rmtree(fresh)
        self.dist.barrier()
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(fresh))
        if self.is_main:
            save_atomic(meta, fresh / META)
            old = path.with_name(path.name + ".old")
            if path.exists():
                if old.exists():
                    shutil.rmtree(old)
                path.rename(old)
            fresh.rename(path)
            if old.exists():
                shutil.rmtree(old)
        self.dist.barrier()

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _slice(batch, rank: int, world: int):
    """Rank ``rank``'s equal share of a batch (tensors along dim 0; tuples, lists and dicts recursively)."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % world:
            raise UsageError(f"a batch of {n} rows cannot be split evenly among {world} ranks; "
                             "use a batch size divisible by the world size")
        share = n // world
        return batch[rank * share:(rank + 1) * share]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(b, rank, world) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice(v, rank, world) for k, v in batch.items()}
    return batch


def _shard_data(task, rank: int, world: int) -> None:
    """Make ``task.loss(step)`` see rank ``rank``'s slice of the step's global batch."""
    from .tasks import CharLMTask, ClassificationTask
    from .userworkload import UserTask
    if isinstance(task, ClassificationTask):
        sampler, whole = task.sampler, task.sampler.indices
        sampler.indices = lambda step: _slice(whole(step), rank, world)
    elif isinstance(task, UserTask):
        whole = task._next_batch
        task._next_batch = lambda: _slice(whole(), rank, world)
    elif isinstance(task, CharLMTask):
        import torch.nn.functional as F
        from .tasks import _mix

        def loss(step, task=task):
            generator = torch.Generator().manual_seed(_mix(task.seed, 3, step))
            offsets = torch.randint(0, len(task.train_ids) - task.context - 1, (task.batch_size,), generator=generator)
            inputs, targets = task._batch(task.train_ids, _slice(offsets, rank, world))
            logits = task.model(inputs)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        task.loss = loss
    else:
        raise UsageError(f"{type(task).__name__}: this workload has no batches to share among ranks")
