"""Param groups from a model: which weights train in a subspace, which stay dense.

Target modules follow the Hugging Face Trainer's ``optim_target_modules``: a list of substrings
(a module is matched when its name contains one), a single string taken as a regular expression
(``re.fullmatch`` on the module name), or ``"all-linear"`` (every ``nn.Linear`` except the output
layer). Only the 2-D ``weight`` of matched ``nn.Linear`` modules is projected; embeddings, the LM
head, norms and biases go to the dense AdamW group, as in every published setup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out or name.split(".")[-1] in ("lm_head", "output", "classifier"):
            names.add(name)
    return names


def _matcher(target_modules):
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return None
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: invalid regular expression {target_modules!r}: {err}") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(target_modules, Iterable):
        subs = list(target_modules)
        if not subs or not all(isinstance(s, str) for s in subs):
            raise ValueError(f"target_modules: expected 'all-linear', a regex or a non-empty list of strings, got {target_modules!r}")
        return lambda name: any(s in name for s in subs)
    raise ValueError(f"target_modules: expected 'all-linear', a regex or a list of substrings, got {target_modules!r}")


def subspace_param_groups(
    model: nn.Module, target_modules="all-linear", *, dense_options: dict | None = None, **subspace_options
) -> list[dict]:
    """Two param groups for a subspace optimizer: ``[dense, subspace]``, with parameter names.

    ``subspace_options`` (``rank``, ``update_proj_gap``, ``scale``, ``selector``, ...) go into the
    subspace group, ``dense_options`` (e.g. ``weight_decay``) into the dense one. Frozen parameters
    (``requires_grad=False``) are left out; a tied weight appears once. Raises ``ValueError`` when
    nothing matches, so a typo in ``target_modules`` cannot silently train everything densely.
    """
    match = _matcher(target_modules)
    excluded = _output_layer_names(model) if match is None else set()
    projected = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in excluded:
            continue
        if match is None or match(name):
            projected.add(id(module.weight))
    dense, low_rank = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (low_rank if id(p) in projected and p.dim() == 2 else dense).append((name, p))
    if not low_rank:
        raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear weight of the model")
    groups = [{"params": low_rank, "subspace": True, **subspace_options}]
    if dense:
        groups.insert(0, {"params": dense, "subspace": False, **(dense_options or {})})
    return groups
