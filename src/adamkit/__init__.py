"""adamkit: the Adam family of optimizers as exact, drop-in torch.optim optimizers."""

from . import schedules
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
from .groups import param_groups
from .optimizer import Optimizer
from .registry import available, create

__version__ = "0.1.0"

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam",
    "AdaBound", "AdaMod", "AdaBelief", "Lion", "Muon", "FAdam", "Adafactor", "ADOPT",
    "Optimizer", "available", "create", "param_groups", "schedules",
    "ScheduleFreeAdamW", "ScheduleFreeSGD", "CompositeAdam",
]
