"""Split a model's parameters into a weight-decay group and a no-weight-decay group (and, for
Muon, into Muon and AdamW groups)."""

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
    weight_decay: float | None = None,
    no_decay: Iterable[str | type[nn.Module]] = (),
    lr: float | torch.Tensor | None = None,
    decay_embeddings: bool = True,
    muon: bool = False,
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

    With ``muon=True`` the groups are for :class:`adamkit.Muon`: each of the above is split
    into a Muon group (``"use_muon": True``) and an AdamW group (``"use_muon": False``), in the
    order Muon decayed, Muon not decayed, AdamW decayed, AdamW not decayed (empty ones
    omitted). A parameter is a Muon parameter when it is 2-D and none of these holds (judged,
    like decay, under all its names and owners; AdamW wins):

    * it belongs to an ``nn.Embedding`` / ``nn.EmbeddingBag``;
    * it belongs to the output head: the last ``nn.Linear`` in ``model.named_modules()`` order,
      or a Linear whose weight is tied to an embedding;
    * it is a bias or belongs to a normalization layer (these are never 2-D in torch's layers).

    Other parameters, conv kernels included (they are 3-D to 5-D: Muon is stated for
    matrices), go to the AdamW groups. ``adamkit.Muon(param_groups(model, muon=True),
    lr=0.02)`` then takes any model. Decay is decided as above in both kinds of group;
    ``weight_decay`` may then be None: the decayed groups carry no ``"weight_decay"`` and take
    the optimizer's (Muon's 0.1, and AdamW groups torch.optim.AdamW's 1e-2).

    Args:
        muon: default False (two groups, as above); True for Muon's groups.

    Example::

        groups = param_groups(model, weight_decay=0.1, no_decay=("*.pos_emb",))
        opt = torch.optim.AdamW(groups, lr=3e-4)
        opt = adamkit.Muon(param_groups(model, muon=True), lr=0.02)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module)")
    if not isinstance(muon, bool):
        raise ValueError(f"Invalid muon: {muon!r} (must be True or False)")
    if weight_decay is None and not muon:
        raise ValueError("Invalid weight_decay: None (must be >= 0; None only with muon=True)")
    if weight_decay is not None:
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
    # the output head (muon=True): the last Linear, and Linears tied to an embedding
    linears = [m for _, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear)]
    embedding_ids = {id(p) for m in model.modules()
                     if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters()}
    heads = {id(m) for m in linears[-1:]} | {
        id(m) for m in linears if id(m.weight) in embedding_ids}
    for module_name, module in model.named_modules(remove_duplicate=False):
        module_excluded = isinstance(module, excluded_types)
        adamw_module = isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or id(module) in heads
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
            adamw = (adamw_module or full_name.rpartition(".")[2] == "bias"
                     or isinstance(module, NORM_TYPES) or parameter.dim() != 2)
            entry = seen.setdefault(id(parameter), [parameter, False, False])
            entry[1] = entry[1] or exempt
            entry[2] = entry[2] or adamw

    entries = list(seen.values())
    kinds = [(None, False), (None, True)] if not muon else [
        (True, False), (True, True), (False, False), (False, True)]
    groups: list[dict[str, Any]] = []
    for use_muon, exempt_kind in kinds:
        parameters = [parameter for parameter, exempt, adamw in entries
                      if exempt == exempt_kind and (use_muon is None or adamw != use_muon)]
        if parameters:
            group: dict[str, Any] = {"params": parameters}
            decay = 0.0 if exempt_kind else weight_decay
            if decay is not None:
                group["weight_decay"] = decay
            if lr is not None:
                group["lr"] = lr
            if use_muon is not None:
                group["use_muon"] = use_muon
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
