"""Name -> optimizer class. A new optimizer is one file in algorithms/ plus one line here."""

from __future__ import annotations

from .algorithms.adabelief import AdaBelief
from .algorithms.adabound import AdaBound
from .algorithms.adafactor import Adafactor
from .algorithms.adagrad import Adagrad
from .algorithms.adam import Adam, AdamW
from .algorithms.adamax import Adamax
from .algorithms.adamod import AdaMod
from .algorithms.adopt import ADOPT
from .algorithms.composite_adam import CompositeAdam
from .algorithms.fadam import FAdam
from .algorithms.lion import Lion
from .algorithms.muon import Muon
from .algorithms.nadam import NAdam
from .algorithms.radam import RAdam
from .algorithms.rmsprop import RMSprop
from .algorithms.schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from .algorithms.sgd import SGD
from .algorithms.sparse_adam import SparseAdam
from .optimizer import Optimizer

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adabelief": AdaBelief,
    "adabound": AdaBound,
    "adafactor": Adafactor,
    "adagrad": Adagrad,
    "adam": Adam,
    "adamax": Adamax,
    "adamod": AdaMod,
    "adamw": AdamW,
    "adopt": ADOPT,
    "fadam": FAdam,
    "lion": Lion,
    "muon": Muon,
    "nadam": NAdam,
    "radam": RAdam,
    "rmsprop": RMSprop,
    "sgd": SGD,
    "sparseadam": SparseAdam,
    "schedulefreeadamw": ScheduleFreeAdamW,
    "schedulefreesgd": ScheduleFreeSGD,
    "compositeadam": CompositeAdam,
    "c-adam": CompositeAdam,
}


def available() -> list[str]:
    """Sorted names of the registered optimizers, for :func:`create`."""
    return sorted(OPTIMIZERS)


def get(name: str) -> type[Optimizer]:
    """The optimizer class registered as ``name`` (case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(available())}")
    return OPTIMIZERS[key]


def create(name: str, params, **hyperparameters) -> Optimizer:
    """Build the optimizer registered as ``name`` (case-insensitive) over ``params``.

    ``hyperparameters`` are the class's constructor arguments; an unknown one is a
    ``TypeError`` naming it, an invalid value the optimizer's own ``ValueError``.
    """
    cls = get(name)
    try:
        return cls(params, **hyperparameters)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            import inspect

            valid = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
            raise TypeError(f"{error}; {cls.__name__} takes: {', '.join(valid)}") from None
        raise
