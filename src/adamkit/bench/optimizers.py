"""Optimizer names for the harness and hyperparameter handling.

The names are the library's (``adamkit.available()``) plus a few named variants that are a library
optimizer with preset flags, so that a benchmark can compare them side by side:

  sgdm      sgd with momentum=0.9
  sgdn      sgd with momentum=0.9, nesterov=True
  amsgrad   adam with amsgrad=True
  amsbound  adabound with amsbound=True
  cadamw    adamw with cautious=True (C-AdamW)
  clion     lion with cautious=True (C-Lion)

Only the hyperparameters a user sets are passed to the constructor, so each optimizer's own
defaults apply to the rest. An invalid value surfaces the optimizer's own ValueError message.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import torch

import adamkit

from .errors import UsageError

VARIANTS: dict[str, tuple[str, dict, str]] = {
    "sgdm": ("sgd", {"momentum": 0.9}, "SGD with momentum 0.9"),
    "sgdn": ("sgd", {"momentum": 0.9, "nesterov": True}, "SGD with Nesterov momentum 0.9"),
    "amsgrad": ("adam", {"amsgrad": True}, "Adam with amsgrad=True (Reddi et al. 2018)"),
    "amsbound": ("adabound", {"amsbound": True}, "AdaBound with amsbound=True"),
    "cadamw": ("adamw", {"cautious": True}, "AdamW with cautious=True (C-AdamW, Liang et al. 2024)"),
    "clion": ("lion", {"cautious": True}, "Lion with cautious=True (C-Lion, Liang et al. 2024)"),
}

# Optimizers that need sparse gradients are not run on the dense workloads by default.
SPARSE_ONLY = {"sparseadam"}


@dataclass(frozen=True)
class OptimizerSpec:
    name: str                      # as the user wrote it (lower case)
    base: str                      # the library name
    preset: dict = field(default_factory=dict)

    def describe(self) -> str:
        if not self.preset:
            return self.base
        return self.base + "(" + ", ".join(f"{k}={v}" for k, v in self.preset.items()) + ")"


def names() -> list[str]:
    """Every name ``resolve`` accepts, sorted."""
    library = list(adamkit.available())
    variants = [v for v, (base, _, _) in VARIANTS.items() if base in library and v not in library]
    return sorted(set(library) | set(variants))


def resolve(name: str) -> OptimizerSpec:
    key = name.strip().lower()
    library = adamkit.available()
    if key in library:
        return OptimizerSpec(key, key)
    if key in VARIANTS and VARIANTS[key][0] in library:
        base, preset, _ = VARIANTS[key]
        return OptimizerSpec(key, base, dict(preset))
    raise UsageError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(names())}")


@functools.lru_cache(maxsize=None)
def _constructor_defaults(base: str) -> tuple[tuple[str, object], ...]:
    probe = torch.zeros(1, 1, requires_grad=True)  # 2-D: Muon takes matrices only
    optimizer = adamkit.create(base, [probe])
    parameters = inspect.signature(type(optimizer).__init__).parameters
    return tuple(
        (name, p.default) for name, p in parameters.items()
        if name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def constructor_defaults(spec: OptimizerSpec) -> dict[str, object]:
    """The optimizer's constructor arguments and their defaults (``inspect.Parameter.empty`` if none)."""
    return dict(_constructor_defaults(spec.base))


def default_lr(spec: OptimizerSpec) -> float:
    lr = constructor_defaults(spec).get("lr")
    if not isinstance(lr, (int, float)):
        raise UsageError(f"optimizer {spec.name!r} has no default learning rate")
    return float(lr)


def effective_hyperparameters(spec: OptimizerSpec, user: dict, prescribed: dict | None = None) -> dict:
    """What to pass to the constructor: the variant's preset, the workload's prescribed values for the
    arguments this optimizer has (unless set by the user), then the user's values. Unknown names are
    a UsageError listing the optimizer's hyperparameters."""
    accepted = constructor_defaults(spec)
    for key in user:
        if key not in accepted:
            raise UsageError(
                f"optimizer {spec.name!r} has no hyperparameter {key!r}; its hyperparameters are: "
                + ", ".join(accepted)
            )
    merged = dict(spec.preset)
    for key, value in (prescribed or {}).items():
        if key in accepted and key not in user:
            merged[key] = value
    merged.update(user)
    return merged


def resolved_hyperparameters(spec: OptimizerSpec, passed: dict) -> dict:
    """Every constructor argument with the value in force (defaults filled in), JSON-friendly."""
    values = {}
    for key, default in constructor_defaults(spec).items():
        value = passed.get(key, default)
        if value is inspect.Parameter.empty:
            continue
        values[key] = to_json(value)
    return values


def create(spec: OptimizerSpec, params, hyperparameters: dict):
    """Build the optimizer; the optimizer's own ValueError message becomes a UsageError."""
    try:
        return adamkit.create(spec.base, params, **hyperparameters)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None


def to_json(value):
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def parse_value(text: str):
    """Parse a command-line hyperparameter value: bool, none, int, float, comma list (tuple) or string."""
    text = text.strip()
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_assignments(items, what: str = "--hp") -> dict:
    """``["key=value", ...]`` into a dict (values through ``parse_value``; dashes in keys become underscores)."""
    result = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} expects KEY=VALUE, got {item!r}")
        result[key.strip().replace("-", "_")] = parse_value(value)
    return result


def pick_best(grid: list[float], scores: list[float], center: float) -> tuple[int, bool]:
    """The index of the best (lowest) score, and whether the sweep should be extended past it.

    Ties go to the learning rate closest (in log scale) to ``center``. The sweep is extended only
    when the best value is on the edge of the grid, finite, and strictly better than its neighbour:
    a flat edge says nothing about what lies beyond it.
    """
    best = min(range(len(grid)), key=lambda i: (scores[i], abs(math.log(grid[i] / center))))
    if len(grid) < 2 or not math.isfinite(scores[best]) or best not in (0, len(grid) - 1):
        return best, False
    neighbour = scores[1] if best == 0 else scores[-2]
    margin = 1e-9 * max(abs(scores[best]), 1e-300)
    return best, scores[best] < neighbour - margin


def lr_grid(center: float, points: int = 5, decades: float = 2.0) -> list[float]:
    """``points`` learning rates log-spaced over ``decades`` decades, centred (geometrically) on ``center``."""
    if points == 1:
        return [float(center)]
    step = decades / (points - 1)
    return [float(f"{center * 10 ** (-decades / 2 + i * step):.6g}") for i in range(points)]


# --------------------------------------------------------------------------------------------
# Search spaces for `adamkit tune`, one per optimizer name, beside the names above
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter of ``adamkit tune``.

    ``name`` is the Optuna parameter (and the ``--space`` / ``--fix`` key); ``argument`` the
    constructor argument it sets (``beta1`` / ``beta2`` / ``beta3`` are the entries of ``betas``
    or AdaMod's ``beta3``). With ``one_minus`` the sampled value v sets the argument to 1 - v, so
    that a log scale over v resolves 0.9, 0.99 and 0.999 alike. With ``switch`` a boolean
    ``<name>_on`` decides between 0 and the sampled value (weight decay). ``kind`` is "float",
    "int" or "bool" (``low`` and ``high`` unused).
    """

    name: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    kind: str = "float"
    argument: str | None = None
    one_minus: bool = False
    switch: bool = False

    @property
    def target(self) -> str:
        return self.argument or self.name

    def describe(self) -> str:
        if self.kind == "bool":
            return f"{self.name} in {{False, True}}"
        text = f"{self.name} in [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")
        if self.one_minus:
            text += f" (= 1 - {self.target})"
        if self.switch:
            text += f" or 0 ({self.name}_on)"
        return text


def _one_minus(argument: str, low: float, high: float) -> SearchParam:
    return SearchParam(f"one_minus_{argument}", low, high, log=True, argument=argument, one_minus=True)


_BETA1 = _one_minus("beta1", 1e-2, 0.5)       # beta1 in [0.5, 0.99]
_BETA2 = _one_minus("beta2", 1e-4, 1e-1)      # beta2 in [0.9, 0.9999]
_WD_COUPLED = SearchParam("weight_decay", 1e-6, 1e-2, log=True, switch=True)    # L2 added to the gradient
_WD_DECOUPLED = SearchParam("weight_decay", 1e-5, 1.0, log=True, switch=True)   # p <- p (1 - lr wd)
_MOMENTUM = _one_minus("momentum", 1e-2, 0.5)  # momentum in [0.5, 0.99]
_ADAM = (_BETA1, _BETA2, "eps", _WD_COUPLED)

# Per optimizer name: what is searched besides the learning rate (log-uniform over
# [default / 100, default * 100]); "eps" is log-uniform over [default / 100, default * 1e4].
SEARCH_SPACES: dict[str, tuple] = {
    "sgd": (_WD_COUPLED,),
    "sgdm": (_MOMENTUM, SearchParam("nesterov", kind="bool"), _WD_COUPLED),
    "sgdn": (_MOMENTUM, _WD_COUPLED),
    "adagrad": ("eps", _WD_COUPLED),
    "rmsprop": (_one_minus("alpha", 1e-3, 1e-1), "eps", SearchParam("momentum", 0.0, 0.9),
                SearchParam("centered", kind="bool"), _WD_COUPLED),
    "adam": _ADAM,
    "amsgrad": _ADAM,
    "radam": _ADAM,
    "adamax": _ADAM,
    "nadam": _ADAM + (SearchParam("momentum_decay", 1e-4, 1e-2, log=True),),
    "adamw": (_BETA1, _BETA2, "eps", _WD_DECOUPLED),
    "adabound": _ADAM + (SearchParam("final_lr", 1e-3, 1.0, log=True), SearchParam("gamma", 1e-4, 1e-1, log=True)),
    "amsbound": _ADAM + (SearchParam("final_lr", 1e-3, 1.0, log=True), SearchParam("gamma", 1e-4, 1e-1, log=True)),
    "adamod": _ADAM + (_one_minus("beta3", 1e-4, 1e-1),),
    "adabelief": (_BETA1, _BETA2, "eps", _WD_DECOUPLED),
    "lion": (_one_minus("beta1", 1e-2, 0.5), _one_minus("beta2", 1e-3, 1e-1), _WD_DECOUPLED),
    "fadam": (_BETA1, _BETA2, "eps", _WD_DECOUPLED),
    "adafactor": (SearchParam("beta2_decay", -1.0, -0.5), _WD_DECOUPLED),
    # an "lr" entry replaces the default lr range; Muon's lr is not AdamW-like (1e-3 default)
    "muon": (SearchParam("lr", 3e-3, 0.1, log=True), SearchParam("momentum", 0.9, 0.98), _WD_DECOUPLED),
    # an "lr" entry replaces the default range (the default lr / 100 to * 100)
    "schedulefreeadamw": (SearchParam("lr", 1e-4, 1e-1, log=True), SearchParam("warmup_steps", 0, 1000, kind="int"),
                          SearchParam("beta1", 0.9, 0.98), SearchParam("weight_decay", 1e-5, 1.0, log=True, switch=True)),
    "schedulefreesgd": (SearchParam("lr", 1e-3, 10.0, log=True), SearchParam("momentum", 0.5, 0.99)),
    "compositeadam": _ADAM,
    "c-adam": _ADAM,
}

# Optimizers whose weight decay is decoupled (p <- p (1 - lr wd)); tune draws lr x wd contours for them.
DECOUPLED_DECAY = {"adamw", "adabelief", "lion", "fadam", "adafactor", "muon"}


def search_space(spec: OptimizerSpec) -> list[SearchParam]:
    """The default search space of ``spec``: the learning rate first, then its own knobs."""
    if spec.name not in SEARCH_SPACES:
        raise UsageError(f"optimizer {spec.name!r} has no search space for `adamkit tune`; tunable: "
                         + ", ".join(sorted(SEARCH_SPACES)))
    defaults = constructor_defaults(spec)
    lr = default_lr(spec)
    space = [SearchParam("lr", lr / 100, lr * 100, log=True)]
    if any(isinstance(e, SearchParam) and e.name == "lr" for e in SEARCH_SPACES[spec.name]):
        space = []  # the entry states its own lr range
    for entry in SEARCH_SPACES[spec.name]:
        if entry == "eps":
            eps = float(defaults["eps"])
            entry = SearchParam("eps", eps / 100, eps * 1e4, log=True)
        space.append(entry)
    return space


def decoupled_decay(spec: OptimizerSpec, hyperparameters: dict) -> bool:
    """Whether weight decay is decoupled for ``spec`` with these constructor arguments."""
    if spec.name in DECOUPLED_DECAY:
        return bool(hyperparameters.get("decoupled_weight_decay", True))
    return bool(hyperparameters.get("decoupled_weight_decay", spec.preset.get("decoupled_weight_decay", False)))
