"""Split a model's parameters into a weight-decay group and a no-weight-decay group."""

from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["NORM_TYPES", "param_groups"]


def _normalization_types() -> tuple[type[nn.Module], ...]:
    # Every module class torch defines in its normalization files (BatchNorm*, SyncBatchNorm,
    # InstanceNorm*, their Lazy variants, LayerNorm, GroupNorm, LocalResponseNorm, RMSNorm where
    # this torch has it), found by scanning so that a class added by a newer torch is covered.
    from torch.nn.modules import batchnorm, instancenorm, normalization

    found = []
    for module in (batchnorm, instancenorm, normalization):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, nn.Module)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return tuple(found)


NORM_TYPES: tuple[type[nn.Module], ...] = _normalization_types()
"""The module types whose parameters never get weight decay (torch's normalization layers)."""


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str | type[nn.Module]] = (),
    lr: float | torch.Tensor | None = None,
    decay_embeddings: bool = True,
) -> list[dict[str, Any]]:
    """Parameter groups for an optimizer, with no weight decay on biases and normalization layers.

    Returns ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not_decayed, "weight_decay": 0.0}]`` (plus ``"lr": lr`` in both when ``lr`` is
    given, and no other keys), omitting a group that would be empty; ``[]`` when the model has no
    trainable parameters.

    A parameter goes to the no-decay group when any of these holds:

    * its own name is ``bias`` (in any module);
    * it belongs to a normalization layer: any instance of :data:`NORM_TYPES` (BatchNorm*,
      SyncBatchNorm, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm, ...) or of a subclass;
    * it belongs to an ``nn.Embedding`` / ``nn.EmbeddingBag`` and ``decay_embeddings`` is False;
    * its full name (as in ``model.named_parameters()``) matches a pattern of ``no_decay``
      (``fnmatch``, case-sensitive), or its module is an instance of a type in ``no_decay``.

    Every other parameter is decayed. Parameters with ``requires_grad=False`` are left out.
    Each parameter appears once, in the order of ``model.parameters()``; a parameter shared by
    several modules (tied weights) is judged under all its names and owners, and no-decay wins
    (a tied embedding / output weight follows the embedding's rule).

    Args:
        model: the module whose parameters are grouped.
        weight_decay: ``>= 0``, the decay of the decayed group.
        no_decay: extra exclusions: ``fnmatch`` patterns on full parameter names (e.g.
            ``"*.pos_emb"``, ``"head.*"``) and/or ``nn.Module`` subclasses (e.g. a custom RMSNorm);
            default none.
        lr: when given, set as the ``"lr"`` of both groups; default None (the optimizer's lr).
        decay_embeddings: default True, following nanoGPT and Hugging Face's Trainer, which decay
            embedding tables; False follows minGPT, which does not.

    Example::

        groups = param_groups(model, weight_decay=0.1, no_decay=("*.pos_emb",))
        opt = torch.optim.AdamW(groups, lr=3e-4)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
    weight_decay = _check_non_negative("weight_decay", weight_decay)
    if lr is not None and not isinstance(lr, torch.Tensor):
        lr = _check_non_negative("lr", lr)
    patterns, module_types = _split_no_decay(no_decay)
    excluded_types = NORM_TYPES + module_types
    if not decay_embeddings:
        excluded_types += (nn.Embedding, nn.EmbeddingBag)

    # id(parameter) -> [parameter, exempt from decay]. Modules are visited in the order that
    # model.parameters() follows, and dicts keep first-seen order, so the groups list parameters
    # in model.parameters() order.
    seen: dict[int, list[Any]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        module_excluded = isinstance(module, excluded_types)
        for full_name, parameter in module.named_parameters(
            prefix=module_name, recurse=False, remove_duplicate=False
        ):
            if not parameter.requires_grad:
                continue
            exempt = (
                module_excluded
                or full_name.rpartition(".")[2] == "bias"
                or any(fnmatch.fnmatchcase(full_name, pattern) for pattern in patterns)
            )
            entry = seen.setdefault(id(parameter), [parameter, False])
            entry[1] = entry[1] or exempt

    entries = list(seen.values())
    decayed = [parameter for parameter, exempt in entries if not exempt]
    not_decayed = [parameter for parameter, exempt in entries if exempt]

    groups: list[dict[str, Any]] = []
    for parameters, decay in ((decayed, weight_decay), (not_decayed, 0.0)):
        if parameters:
            group: dict[str, Any] = {"params": parameters, "weight_decay": decay}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    return groups


def _check_non_negative(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")
    return float(value)


def _split_no_decay(
    no_decay: Iterable[str | type[nn.Module]],
) -> tuple[tuple[str, ...], tuple[type[nn.Module], ...]]:
    if isinstance(no_decay, (str, type)):
        no_decay = (no_decay,)
    patterns: list[str] = []
    module_types: list[type[nn.Module]] = []
    for entry in no_decay:
        if isinstance(entry, str):
            patterns.append(entry)
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            module_types.append(entry)
        else:
            raise ValueError(
                f"Invalid no_decay entry: {entry!r} "
                "(must be a parameter-name pattern or an nn.Module subclass)"
            )
    return tuple(patterns), tuple(module_types)
