"""The registry of named workloads.

A workload declares what is optimised (a network or a point), its data and held-out split, its loss
and metrics, a default budget (steps, batch size), a target for time-to-target, and any setting the
problem prescribes (Reddi's betas and learning rate). ``build`` turns it into a ``Task`` for one seed.

Built in and offline:
  rosenbrock, beale, rastrigin  2-D test functions from their standard starts
  quadratic                     100-D quadratic, condition number 1e3
  reddi                         Reddi et al. (2018)'s online counterexample to Adam
  logreg-digits, mlp-digits, cnn-digits   scikit-learn's 8x8 digits
  mlp-mnist1d                   MNIST-1D-style signals generated locally
  charlm                        character-level transformer on the Python standard library's source
  bow-zipf                      linear bag-of-words classifier over 10,000 Zipf-distributed tokens
                                (an embedding table: the sparse-gradient workload of `adamkit results`)
The user's own: FILE.py:make or package.module:make (see ``userworkload``).
With data the user provides (--data-dir, or --download when online):
  logreg-mnist, mlp-mnist       Kingma & Ba (2015) §6.1 and §6.2 on MNIST
  cnn-cifar10                   Kingma & Ba (2015) §6.3 c64-c64-c128-1000 on CIFAR-10
  resnet18-cifar10              ResNet-18 on CIFAR-10 (random crop and flip)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from . import data as datasets
from . import functions, models
from .errors import UsageError
from .tasks import CharLMTask, ClassificationTask, FunctionTask, QuadraticTask, ReddiTask, Task


@dataclass(frozen=True)
class Target:
    """Time-to-target: the first evaluation at which ``metric`` is <= ``value`` (mode "min") or >= it ("max")."""

    metric: str
    value: float
    mode: str = "min"

    def reached(self, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        return value <= self.value if self.mode == "min" else value >= self.value

    def describe(self) -> str:
        if not math.isfinite(self.value):
            return "none set"
        return f"{self.metric} {'<=' if self.mode == 'min' else '>='} {self.value:g}"


@dataclass(frozen=True)
class BuildContext:
    """What ``Workload.build`` needs besides the workload itself."""

    seed: int = 0
    batch_size: int | None = None
    device: str = "cpu"
    data_dir: str = datasets.DEFAULT_DATA_DIR
    data_file: str | None = None
    download: bool = False


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str                       # "function" (the parameters are the point) or "model"
    summary: str
    builder: Callable[["Workload", BuildContext], Task]
    steps: int                      # default budget
    target: Target
    batch_size: int | None = None   # None for functions
    deterministic: bool = False     # no randomness at all: every seed gives the same run
    data: str | None = None         # "mnist" / "cifar10": user-provided data set
    hyperparameters: Mapping[str, object] = field(default_factory=dict)  # prescribed by the problem
    lr: float | None = None         # prescribed learning rate: the bench does not sweep it
    schedule: tuple[str, Mapping[str, object]] | None = None  # default schedule (name, arguments)
    eval_unit: int = 1              # evaluations happen at multiples of this many steps
    evaluations: int = 20           # about this many evaluations per run
    curve_metric: str = "loss"      # what the report's curves show
    report_metrics: tuple[str, ...] = ()  # shown beside the held-out loss in leaderboards
    takes_data_file: bool = False
    reference: str = ""

    def builder_is_user(self) -> bool:
        """Whether this is the user's own ``FILE.py:make`` workload (it brings its own loaders)."""
        from .userworkload import is_user_workload
        return is_user_workload(self.name)

    def build(self, context: BuildContext) -> Task:
        return self.builder(self, context)

    def eval_every(self, steps: int) -> int:
        every = max(1, steps // self.evaluations)
        every = max(self.eval_unit, every // self.eval_unit * self.eval_unit)
        return min(every, max(1, steps))

    def check_data(self, data_dir: str, download: bool = False) -> None:
        """Raise DataNotFoundError now, before any training, when the user's data set is missing."""
        if download:
            return
        if self.data == "mnist" and datasets.find_mnist(data_dir) is None:
            raise datasets.DataNotFoundError(datasets.mnist_missing_message(data_dir, self.name))
        if self.data == "cifar10" and datasets.find_cifar10(data_dir) is None:
            raise datasets.DataNotFoundError(datasets.cifar10_missing_message(data_dir, self.name))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def _function(workload, context):
    spec = functions.FUNCTIONS_2D[workload.name]
    return FunctionTask(spec.fn, spec.start)


def _quadratic(workload, context):
    return QuadraticTask(dim=100, condition=1e3)


def _reddi(workload, context):
    return ReddiTask(start=0.0)


def _batch(workload, context):
    return context.batch_size or workload.batch_size


def _digits(model_factory):
    def build(workload, context):
        return ClassificationTask(model_factory(), datasets.load_digits_split(), _batch(workload, context),
                                  context.seed, context.device)
    return build


def _mnist1d(workload, context):
    model = models.MLP(40, (256, 256), 10)
    return ClassificationTask(model, datasets.make_mnist1d(), _batch(workload, context), context.seed, context.device)


def _charlm(workload, context):
    if context.data_file:
        text = datasets.read_text_corpus(context.data_file, max_chars=5_000_000)
    else:
        text = datasets.stdlib_corpus(max_chars=1_000_000)
    return CharLMTask(lambda vocab, ctx: models.CharTransformer(vocab, context=ctx, width=64, layers=2, heads=4),
                      text, _batch(workload, context), context.seed, context=64, device=context.device)


def _bag_of_words(workload, context):
    split = datasets.make_bag_of_words()
    model = models.BagOfWords(10000, split.num_classes)
    return ClassificationTask(model, split, _batch(workload, context), context.seed, context.device)


def _mnist_pixels(x):
    return x.float().div_(255.0)


def _mnist(model_factory):
    def build(workload, context):
        split = datasets.load_mnist(context.data_dir, workload.name, context.download)
        return ClassificationTask(model_factory(), split, _batch(workload, context), context.seed, context.device,
                                  prepare=_mnist_pixels)
    return build


_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _cifar_pixels(x):
    x = x.float().div_(255.0)
    return (x - _CIFAR_MEAN.to(x.device)) / _CIFAR_STD.to(x.device)


def _crop_flip(x, generator):
    """Random 32x32 crop of the zero-padded (4 pixels) image and random horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        image = padded[i, :, top:top + 32, left:left + 32]
        out[i] = image.flip(-1) if flips[i] else image
    return out


def _cifar(model_factory, augment=None):
    def build(workload, context):
        split = datasets.load_cifar10(context.data_dir, workload.name, context.download)
        return ClassificationTask(model_factory(), split, _batch(workload, context), context.seed, context.device,
                                  prepare=_cifar_pixels, augment=augment, eval_batch_size=500)
    return build


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_KB = "Kingma & Ba 2015, Adam: A Method for Stochastic Optimization"

WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("rosenbrock", "function", "Rosenbrock's banana valley from (-1.2, 1); minimum 0 at (1, 1)",
             _function, steps=1000, target=Target("loss", 1e-3), deterministic=True,
             reference=functions.FUNCTIONS_2D["rosenbrock"].reference),
    Workload("beale", "function", "Beale's function from (1, 1); minimum 0 at (3, 0.5)",
             _function, steps=1000, target=Target("loss", 1e-3), deterministic=True,
             reference=functions.FUNCTIONS_2D["beale"].reference),
    Workload("rastrigin", "function", "2-D Rastrigin from (-2.3, 2.7): many local minima, global 0 at the origin",
             _function, steps=1000, target=Target("loss", 0.5), deterministic=True,
             reference=functions.FUNCTIONS_2D["rastrigin"].reference),
    Workload("quadratic", "function", "100-D quadratic x^T A x / 2, eigenvalues log-spaced in [1, 1e3]",
             _quadratic, steps=500, target=Target("loss", 1.0), deterministic=True),
    Workload("reddi", "function",
             "Reddi et al.'s online problem: f_t(x) = 1010x if t mod 101 = 1 else -10x, x in [-1, 1], optimum -1, "
             "from x = 0; prescribed as in the paper: betas (0.9, 0.99), step size 0.5/sqrt(t)",
             _reddi, steps=10100, target=Target("x_mean", -0.8), deterministic=True,
             hyperparameters={"betas": (0.9, 0.99)}, lr=0.5, schedule=("inverse_sqrt", {}),
             eval_unit=functions.REDDI_PERIOD,
             curve_metric="x_mean", report_metrics=("x", "x_mean", "average_regret"), reference="Reddi, Kale & Kumar 2018, On the Convergence of Adam and Beyond, §5"),
    Workload("logreg-digits", "model", "logistic regression on scikit-learn's 8x8 digits",
             _digits(lambda: models.LogisticRegression(64, 10)), steps=300, batch_size=128,
             target=Target("accuracy", 0.95, "max"), report_metrics=("accuracy", "f1")),
    Workload("mlp-digits", "model", "MLP 64-128-128-10 (ReLU, dropout 0.2) on scikit-learn's 8x8 digits",
             _digits(lambda: models.MLP(64, (128, 128), 10, dropout=0.2)), steps=300, batch_size=128,
             target=Target("accuracy", 0.97, "max"), report_metrics=("accuracy", "f1")),
    Workload("cnn-digits", "model", "CNN conv16-conv32-pool-linear on scikit-learn's 8x8 digits",
             _digits(lambda: models.DigitsCNN(10)), steps=300, batch_size=64,
             target=Target("accuracy", 0.97, "max"), report_metrics=("accuracy", "f1")),
    Workload("mlp-mnist1d", "model", "MLP 40-256-256-10 on MNIST-1D-style signals generated locally (4000/1000)",
             _mnist1d, steps=800, batch_size=128, target=Target("accuracy", 0.8, "max"), report_metrics=("accuracy", "f1"),
             reference="idea of Greydanus 2020, MNIST-1D; generator written for adamkit"),
    Workload("charlm", "model",
             "character-level transformer (2 layers, width 64, context 64) on the Python standard library's "
             "source, or --data FILE",
             _charlm, steps=600, batch_size=32, target=Target("bits_per_char", 2.8), takes_data_file=True,
             report_metrics=("bits_per_char", "accuracy")),
    Workload("bow-zipf", "model",
             "linear bag-of-words classifier (one 10000x4 embedding table, summed rows) on 20-token bags of "
             "Zipf-distributed synthetic tokens (6000/2000)",
             _bag_of_words, steps=600, batch_size=64, target=Target("accuracy", 0.6, "max"),
             report_metrics=("accuracy", "f1")),
    Workload("logreg-mnist", "model", "logistic regression on MNIST, minibatch 128, 1/sqrt(t) step decay (K&B §6.1)",
             _mnist(lambda: models.LogisticRegression(784, 10)), steps=4680, batch_size=128,
             target=Target("accuracy", 0.92, "max"), data="mnist", report_metrics=("accuracy", "f1"),
             schedule=("inverse_sqrt", {}), reference=_KB + ", §6.1"),
    Workload("mlp-mnist", "model", "MLP 784-1000-1000-10 (ReLU, dropout 0.5) on MNIST, minibatch 128 (K&B §6.2)",
             _mnist(lambda: models.MLP(784, (1000, 1000), 10, dropout=0.5)), steps=4680, batch_size=128,
             target=Target("accuracy", 0.98, "max"), data="mnist", report_metrics=("accuracy", "f1"), reference=_KB + ", §6.2"),
    Workload("cnn-cifar10", "model", "CNN c64-c64-c128-1000 (5x5 conv, 3x3/2 max pool) on CIFAR-10 (K&B §6.3)",
             _cifar(lambda: models.KingmaBaCNN(10)), steps=3900, batch_size=128,
             target=Target("accuracy", 0.7, "max"), data="cifar10", report_metrics=("accuracy", "f1"), reference=_KB + ", §6.3"),
    Workload("resnet18-cifar10", "model", "ResNet-18 on CIFAR-10 with random crop and flip",
             _cifar(lambda: models.ResNet18(10), augment=_crop_flip), steps=3900, batch_size=128,
             target=Target("accuracy", 0.85, "max"), data="cifar10", report_metrics=("accuracy", "f1"),
             reference="He et al. 2016, Deep Residual Learning for Image Recognition (CIFAR variant)"),
]}

OFFLINE = [name for name, w in WORKLOADS.items() if w.data is None]


def names() -> list[str]:
    return list(WORKLOADS)


def get(name: str) -> Workload:
    """The workload called ``name``, or the user's own for ``FILE.py:make`` / ``module:make``
    (``userworkload.load``); UsageError listing the valid names otherwise."""
    from . import userworkload
    if userworkload.is_user_workload(name):
        return userworkload.load(name.strip())
    key = name.strip().lower()
    if key not in WORKLOADS:
        raise UsageError(f"unknown workload {name!r}; valid workloads: {', '.join(WORKLOADS)}, "
                         "or your own as FILE.py:make or package.module:make")
    return WORKLOADS[key]
