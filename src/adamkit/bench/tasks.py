"""Tasks: a built workload instance (model or point, data, loss, evaluation) for one seed.

A task answers four questions for the training loop: the loss of step ``step`` (the batch of a
step depends only on the seed and the step, so a resumed run sees the same batches), what to do
after the optimizer step (projection), how to evaluate on held-out data, and which extra state must
survive a checkpoint.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functions
from .metrics import classification_metrics


def _mix(seed: int, *values: int) -> int:
    """A deterministic 63-bit generator seed from a run seed and counters (stable across processes)."""
    state = (seed & 0xFFFFFFFF) * 0x9E3779B97F4A7C15
    for value in values:
        state = ((state ^ (value & 0xFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return state & 0x7FFFFFFFFFFFFFFF


class Task:
    """Base class; subclasses set ``model`` and implement ``loss`` and ``evaluate``."""

    model: nn.Module
    steps_per_epoch: int | None = None  # None: no data set (functions), so --epochs does not apply

    def loss(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (Reddi's problem projects onto [-1, 1] here)."""

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def final(self) -> dict:
        """Extra entries for the run summary's ``final`` (e.g. the final point)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EpochSampler:
    """Mini-batch indices: a fresh permutation each epoch, a function of (seed, epoch) only.

    An epoch has ``n // batch_size`` steps (the incomplete last batch is dropped); a batch size of
    at least ``n`` means full-batch training.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n = n
        self.batch_size = min(batch_size, n)
        self.seed = seed
        self.steps_per_epoch = max(1, n // self.batch_size)
        self._epoch = -1
        self._permutation = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
            self._permutation = torch.randperm(self.n, generator=generator)
            self._epoch = epoch
        start = position * self.batch_size
        return self._permutation[start:start + self.batch_size]


class ClassificationTask(Task):
    """Classification on in-memory arrays; cross-entropy loss; held-out classification metrics.

    ``prepare`` turns stored inputs (e.g. uint8 pixels) into float model inputs; ``augment``
    (optional) gets the float batch and a generator seeded from (seed, step).
    """

    def __init__(self, model, split, batch_size, seed, device="cpu", prepare=None, augment=None,
                 eval_batch_size=1000):
        self.model = model.to(device)
        self.device = torch.device(device)
        self.train_x = torch.from_numpy(np.ascontiguousarray(split.train_x)).to(self.device)
        self.train_y = torch.from_numpy(np.ascontiguousarray(split.train_y)).to(self.device)
        self.val_x = torch.from_numpy(np.ascontiguousarray(split.val_x)).to(self.device)
        self.val_y = torch.from_numpy(np.ascontiguousarray(split.val_y)).to(self.device)
        self.num_classes = split.num_classes
        self.prepare = prepare or (lambda x: x)
        self.augment = augment
        self.seed = seed
        self.sampler = EpochSampler(len(self.train_y), batch_size, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.eval_batch_size = eval_batch_size

    def loss(self, step):
        index = self.sampler.indices(step).to(self.device)
        inputs = self.prepare(self.train_x[index])
        if self.augment is not None:
            inputs = self.augment(inputs, torch.Generator().manual_seed(_mix(self.seed, 2, step)))
        return F.cross_entropy(self.model(inputs), self.train_y[index])

    @torch.no_grad()
    def evaluate(self):
        was_training = self.model.training
        self.model.eval()
        total_loss, predictions = 0.0, []
        for start in range(0, len(self.val_y), self.eval_batch_size):
            inputs = self.prepare(self.val_x[start:start + self.eval_batch_size])
            targets = self.val_y[start:start + self.eval_batch_size]
            logits = self.model(inputs)
            total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            predictions.append(logits.argmax(dim=1).cpu())
        self.model.train(was_training)
        metrics = {"loss": total_loss / max(1, len(self.val_y))}
        metrics.update(classification_metrics(torch.cat(predictions).numpy(), self.val_y.cpu().numpy(), self.num_classes))
        return metrics


class CharLMTask(Task):
    """Next-character prediction on a text corpus; held-out loss, bits per character and accuracy.

    The last 10% of the text is held out. Training windows start at offsets drawn from a generator
    seeded by (seed, step); evaluation uses ``eval_windows`` evenly spaced windows of the held-out text.
    An "epoch" is as many windows as fit in the training text end to end.
    """

    def __init__(self, model_factory, text: str, batch_size: int, seed: int, context: int = 64,
                 device="cpu", eval_windows: int = 64):
        vocabulary = sorted(set(text))
        self.vocabulary = "".join(vocabulary)
        lookup = {char: i for i, char in enumerate(vocabulary)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * 0.9)
        self.device = torch.device(device)
        self.train_ids, self.val_ids = ids[:cut].to(self.device), ids[cut:].to(self.device)
        if len(self.val_ids) <= context + 1 or len(self.train_ids) <= context + 1:
            raise ValueError(f"corpus too short for a context of {context} characters")
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.model = model_factory(len(vocabulary), context).to(self.device)
        self.steps_per_epoch = max(1, len(self.train_ids) // (context * batch_size))
        last = len(self.val_ids) - context - 1
        self.eval_offsets = torch.linspace(0, last, min(eval_windows, last + 1)).long()
        self._window = torch.arange(context + 1, device=self.device)

    def _batch(self, ids, offsets):
        windows = ids[offsets.to(self.device).unsqueeze(1) + self._window]
        return windows[:, :-1], windows[:, 1:]

    def loss(self, step):
        generator = torch.Generator().manual_seed(_mix(self.seed, 3, step))
        offsets = torch.randint(0, len(self.train_ids) - self.context - 1, (self.batch_size,), generator=generator)
        inputs, targets = self._batch(self.train_ids, offsets)
        logits = self.model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self):
        was_training = self.model.training
        self.model.eval()
        inputs, targets = self._batch(self.val_ids, self.eval_offsets)
        logits = self.model(inputs)
        loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))
        accuracy = float((logits.argmax(-1) == targets).float().mean())
        self.model.train(was_training)
        return {"loss": loss, "bits_per_char": loss / math.log(2), "accuracy": accuracy}


class PointModel(nn.Module):
    """The optimised object of a function workload: a single parameter ``x``, the point itself."""

    def __init__(self, start):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(start, dtype=torch.float64).clone())


class FunctionTask(Task):
    """Minimise a deterministic function of a point (float64); the 'held-out' loss is f itself."""

    def __init__(self, fn, start, report_point: bool = True):
        self.fn = fn
        self.model = PointModel(start)
        self.report_point = report_point

    def loss(self, step):
        return self.fn(self.model.x)

    @torch.no_grad()
    def evaluate(self):
        metrics = {"loss": float(self.fn(self.model.x))}
        if self.report_point:
            metrics.update({"x": float(self.model.x[0]), "y": float(self.model.x[1])})
        return metrics

    def final(self):
        if self.report_point:
            return {"point": [float(v) for v in self.model.x.detach()]}
        return {"distance_to_minimum": float(self.model.x.detach().norm())}


class QuadraticTask(FunctionTask):
    """f(x) = x^T A x / 2 with an ill-conditioned A (see ``functions.quadratic_problem``)."""

    def __init__(self, dim=100, condition=1e3):
        matrix, start = functions.quadratic_problem(dim, condition)
        super().__init__(lambda x: 0.5 * x @ (matrix @ x), start, report_point=False)

    @torch.no_grad()
    def evaluate(self):
        return {"loss": float(self.fn(self.model.x)), "distance_to_minimum": float(self.model.x.norm())}


class ReddiTask(Task):
    """Reddi et al.'s online problem; see ``functions.reddi_coefficient``.

    Step t (from 1) uses the loss f_t(x) = c_t x and then projects x onto [-1, 1]. Tracked: the
    regret sum_t f_t(x_t) - f_t(-1), evaluated at the point x_t where f_t's gradient is taken, and
    the mean of x over the last period (101 steps), which does not depend on where in the period the
    run stops. The held-out ``loss`` is the expected per-step regret of the current point,
    F(x) - F(-1) = (10/101)(x + 1): 0 at the optimum x = -1, 0.198 at x = +1.
    """

    def __init__(self, start: float = 0.0):
        self.model = PointModel([start])
        self.regret = 0.0
        self.steps = 0
        self.recent = deque(maxlen=functions.REDDI_PERIOD)

    def loss(self, step):
        t = step + 1
        coefficient = functions.reddi_coefficient(t)
        x = self.model.x
        position = float(x.detach()[0])
        self.regret += coefficient * (position - functions.REDDI_OPTIMUM)
        self.steps = t
        return coefficient * x.sum()

    @torch.no_grad()
    def after_step(self, step):
        self.model.x.clamp_(-1.0, 1.0)
        self.recent.append(float(self.model.x[0]))

    def _x_mean(self):
        return sum(self.recent) / len(self.recent) if self.recent else float(self.model.x.detach()[0])

    def evaluate(self):
        x = float(self.model.x.detach()[0])
        return {
            "loss": functions.reddi_expected_regret(x),
            "x": x,
            "x_mean": self._x_mean(),
            "average_regret": self.regret / self.steps if self.steps else 0.0,
        }

    def final(self):
        metrics = self.evaluate()
        return {"x": metrics["x"], "x_mean": metrics["x_mean"], "average_regret": metrics["average_regret"]}

    def state_dict(self):
        return {"regret": self.regret, "steps": self.steps, "recent": list(self.recent)}

    def load_state_dict(self, state):
        self.regret = float(state["regret"])
        self.steps = int(state["steps"])
        self.recent = deque(state["recent"], maxlen=functions.REDDI_PERIOD)
