"""The user's own workload: ``--workload path/to/file.py:make`` or ``--workload package.module:make``.

``make(seed)`` returns a mapping, or an object with these attributes:

  model         an ``nn.Module``
  train_loader  re-iterable batches of ``(inputs, targets)`` (a DataLoader, a list of tuples, ...)
  val_loader    the same for the held-out split
  loss_fn       ``loss_fn(outputs, targets)`` -> a scalar tensor (the mean over the batch)
  task          optional: "classification" adds accuracy and macro precision / recall / F1
                (the prediction is ``outputs.argmax(1)``)
  steps         optional: the default budget (default: one pass over ``train_loader``)
  target        optional, for time-to-target: a number (held-out loss <= it), or
                ``{"metric": "accuracy", "value": 0.9, "mode": "max"}``

Inputs and targets may be tensors, or tuples / lists / dicts of tensors; they are moved to
``--device``. The held-out loss is the batch-size-weighted mean of ``loss_fn`` over
``val_loader``. The workload's name is the ``--workload`` text as given; a module path is
imported with the current folder on ``sys.path``, as ``python -m`` would.

Everything is checked when the workload is looked up, before any training: the file or module,
``make``, the returned fields and one forward pass of the model on the first training batch. A
problem raises UsageError naming it and the fix.

Batch order: each epoch's iterator is created under a torch random state seeded from (seed,
epoch), so a shuffling DataLoader without its own generator gives the same batches in a resumed
run; the checkpoint stores the epoch and the position in it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .metrics import classification_metrics
from .tasks import Task, _mix

FIELDS = ("model", "train_loader", "val_loader", "loss_fn")
OPTIONAL = ("task", "steps", "target")
TASKS = ("classification", None)
CONTRACT = ("make(seed) must return a mapping or object with model (nn.Module), train_loader and "
            "val_loader (re-iterable (inputs, targets) batches) and loss_fn(outputs, targets); optionally "
            "task='classification', steps and target (see examples/my_workload.py)")


def is_user_workload(name: str) -> bool:
    """Whether ``name`` names a user workload (``FILE.py[:make]`` or ``module:make``), not a built-in one."""
    return ":" in name or name.strip().endswith(".py")


def file_safe(name: str) -> str:
    """``name`` usable as one file or folder name: ``examples/my_workload.py:make`` -> ``examples_my_workload.py_make``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "workload"


def split(name: str) -> tuple[str, str]:
    """``"path/file.py:make"`` -> ``("path/file.py", "make")``; the function defaults to ``make``."""
    location, sep, function = name.strip().rpartition(":")
    if not sep:
        return name.strip(), "make"
    if not location or not function.isidentifier():
        raise UsageError(f"workload {name!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    return location, function


def _load_module(location: str):
    if location.endswith(".py") or os.sep in location or "/" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise UsageError(f"workload file {location!r} does not exist (looked in {path.resolve().parent}); "
                             "give an existing FILE.py:make or a built-in workload (adamkit train --list)")
        module_name = "adamkit_user_workload_" + str(abs(hash(str(path.resolve()))))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"workload file {location!r} cannot be loaded as Python; give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(module_name, None)
            raise UsageError(f"workload file {location!r} failed to import: {type(error).__name__}: {error}; "
                             "fix the file") from None
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(location)
    except ImportError as error:
        raise UsageError(f"workload module {location!r} cannot be imported ({error}); give FILE.py:make with a "
                         "path, install the package, or run from the folder that holds it") from None
    except Exception as error:
        raise UsageError(f"workload module {location!r} failed to import: {type(error).__name__}: {error}; "
                         "fix the module") from None


def _field(result, key):
    if isinstance(result, Mapping):
        return result.get(key)
    return getattr(result, key, None)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _batch_size(targets) -> int:
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() else 1
    if isinstance(targets, (list, tuple)) and targets:
        return _batch_size(targets[0])
    if isinstance(targets, Mapping) and targets:
        return _batch_size(next(iter(targets.values())))
    return 1


def _unpack(batch, where: str, name: str):
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UsageError(f"workload {name!r}: each batch of {where} must be a pair (inputs, targets), got "
                     f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
                     + "; make the loader yield (inputs, targets)")


def _call_make(make, seed: int, name: str):
    try:
        return make(seed)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"workload {name!r}: make({seed}) raised {type(error).__name__}: {error}; fix make()") from None


def check_result(result, name: str) -> dict:
    """The fields of ``make(seed)``'s result, checked; UsageError naming the problem otherwise."""
    if result is None:
        raise UsageError(f"workload {name!r}: make() returned None; {CONTRACT}")
    fields = {key: _field(result, key) for key in FIELDS + OPTIONAL}
    missing = [key for key in FIELDS if fields[key] is None]
    if missing:
        raise UsageError(f"workload {name!r}: make() result has no {', '.join(missing)}; {CONTRACT}")
    if not isinstance(fields["model"], nn.Module):
        raise UsageError(f"workload {name!r}: model must be a torch.nn.Module, got {type(fields['model']).__name__}")
    if not any(p.requires_grad for p in fields["model"].parameters()):
        raise UsageError(f"workload {name!r}: the model has no trainable parameters")
    if not callable(fields["loss_fn"]):
        raise UsageError(f"workload {name!r}: loss_fn must be callable as loss_fn(outputs, targets)")
    for key in ("train_loader", "val_loader"):
        loader = fields[key]
        if isinstance(loader, Iterator) or not hasattr(loader, "__iter__"):
            raise UsageError(f"workload {name!r}: {key} must be re-iterable (a DataLoader or a list of batches), "
                             f"not a one-shot iterator or generator; got {type(loader).__name__}")
    task = fields["task"]
    if task not in TASKS:
        raise UsageError(f"workload {name!r}: task must be 'classification' or absent, got {task!r}")
    steps = fields["steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UsageError(f"workload {name!r}: steps must be a positive integer, got {steps!r}")
    fields["target"] = parse_target(fields["target"], name)
    return fields


def parse_target(value, name: str):
    from .workloads import Target
    if value is None:
        return Target("loss", -math.inf)
    if isinstance(value, Target):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Target("loss", float(value))
    if isinstance(value, Mapping) and "value" in value:
        mode = value.get("mode", "min")
        if mode not in ("min", "max"):
            raise UsageError(f"workload {name!r}: target mode must be 'min' or 'max', got {mode!r}")
        return Target(str(value.get("metric", "loss")), float(value["value"]), mode)
    raise UsageError(f"workload {name!r}: target must be a number (held-out loss) or "
                     f"{{'metric': ..., 'value': ..., 'mode': 'min'|'max'}}, got {value!r}")


def _first_batch(loader, where: str, name: str):
    try:
        iterator = iter(loader)
        batch = next(iterator)
    except StopIteration:
        raise UsageError(f"workload {name!r}: {where} yields no batches; give it at least one") from None
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"workload {name!r}: iterating {where} raised {type(error).__name__}: {error}") from None
    return _unpack(batch, where, name)


def dry_run(fields: dict, name: str) -> None:
    """One forward pass and loss on the first training batch, and a look at the first held-out one."""
    model, loss_fn = fields["model"], fields["loss_fn"]
    inputs, targets = _first_batch(fields["train_loader"], "train_loader", name)
    _first_batch(fields["val_loader"], "val_loader", name)
    try:
        with torch.no_grad():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
    except Exception as error:
        raise UsageError(f"workload {name!r}: loss_fn(model(inputs), targets) on the first training batch raised "
                         f"{type(error).__name__}: {error}; fix the model, the loader or loss_fn") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(f"workload {name!r}: loss_fn must return a scalar tensor, got "
                         + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                            else type(loss).__name__))
    if fields["task"] == "classification":
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            raise UsageError(f"workload {name!r}: task='classification' needs model outputs of shape "
                             "(batch, classes)" + (f", got {tuple(outputs.shape)}" if isinstance(outputs, torch.Tensor) else ""))
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise UsageError(f"workload {name!r}: task='classification' needs integer class targets of shape (batch,)")


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The ``Workload`` for ``name``, checked by calling ``make(0)`` once (under a forked RNG)."""
    from .workloads import Workload
    location, function = split(name)
    module = _load_module(location)
    make = getattr(module, function, None)
    if not callable(make):
        raise UsageError(f"workload {name!r}: {location} has no function {function!r}; define "
                         f"def {function}(seed): ... returning model, train_loader, val_loader and loss_fn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fields = check_result(_call_make(make, 0, name), name)
        dry_run(fields, name)
    steps = fields["steps"]
    if steps is None:
        try:
            steps = len(fields["train_loader"])
        except TypeError:
            raise UsageError(f"workload {name!r}: train_loader has no length, so give steps in make()'s result") from None
    metrics = ("accuracy", "f1") if fields["task"] == "classification" else ()
    return Workload(name=name, kind="model", summary=f"user workload {location}:{function}",
                    builder=functools.partial(_build, make), steps=int(steps), target=fields["target"],
                    report_metrics=metrics, reference=str(location))


def _build(make, workload, context) -> "UserTask":
    fields = check_result(_call_make(make, context.seed, workload.name), workload.name)
    return UserTask(fields, context.seed, context.device)


class UserTask(Task):
    """Training and evaluation of a user workload: batches from its loaders, its loss function."""

    def __init__(self, fields: dict, seed: int, device="cpu"):
        self.device = torch.device(device)
        self.model = fields["model"].to(self.device)
        self.train_loader, self.val_loader = fields["train_loader"], fields["val_loader"]
        self.loss_fn = fields["loss_fn"]
        self.classification = fields["task"] == "classification"
        self.seed = seed
        try:
            self.steps_per_epoch = max(1, len(self.train_loader))
        except TypeError:
            self.steps_per_epoch = None
        self.epoch, self.position, self._iterator = 0, 0, None

    def _open_epoch(self, skip: int = 0) -> None:
        # The iterator draws its shuffling seed from the global torch RNG at creation and first
        # batch: both happen under a state that depends on (seed, epoch) only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, 4, self.epoch))
            self._iterator = iter(self.train_loader)
            self._pending = next(self._iterator, None)
        for _ in range(skip):
            self._next_raw()

    def _next_raw(self):
        batch, self._pending = self._pending, next(self._iterator, None)
        return batch

    def _next_batch(self):
        if self._iterator is None:
            self._open_epoch(self.position)
        batch = self._next_raw()
        if batch is None:  # end of an epoch
            self.epoch, self.position = self.epoch + 1, 0
            self._open_epoch()
            batch = self._next_raw()
            if batch is None:
                raise RuntimeError("train_loader yielded no batches in a new epoch")
        self.position += 1
        return batch

    def loss(self, step):
        inputs, targets = _unpack(self._next_batch(), "train_loader", "user")
        inputs, targets = _to_device(inputs, self.device), _to_device(targets, self.device)
        return self.loss_fn(self.model(inputs), targets)

    @torch.no_grad()
    def evaluate(self):
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        predictions, labels, classes = [], [], 0
        for batch in self.val_loader:
            inputs, targets = _unpack(batch, "val_loader", "user")
            inputs, targets = _to_device(inputs, self.device), _to_device(targets, self.device)
            outputs = self.model(inputs)
            n = _batch_size(targets)
            total += float(self.loss_fn(outputs, targets)) * n
            count += n
            if self.classification:
                predictions.append(outputs.argmax(dim=1).cpu())
                labels.append(targets.cpu())
                classes = max(classes, int(outputs.shape[1]))
        self.model.train(was_training)
        metrics = {"loss": total / max(1, count)}
        if self.classification and predictions:
            metrics.update(classification_metrics(torch.cat(predictions).numpy(), torch.cat(labels).numpy(), classes))
        return metrics

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None  # reopened at that epoch and position by the next batch

