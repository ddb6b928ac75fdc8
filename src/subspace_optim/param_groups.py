"""The param groups of a ``SubspaceOptimizer`` and the parameters in them: galore-torch's group keys,
validation when a group is added, the full-rank warning, each parameter's layout (projected or
dense, side, clipped rank) and the checks a parameter with a gradient must pass before a step
modifies anything. Mixed into the optimizer (``optimizer.py``).
"""

from __future__ import annotations

import warnings

import torch

from .sharding import is_dtensor
from .sides import projects_left, two_sided
from .validation import side_from_proj_type, validate_group

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
# galore-torch's AdamW arguments that mean nothing here (its deprecation notice), accepted so that a
# galore-torch call works unchanged
IGNORED_GALORE_ARGS = ("no_deprecation_warning",)


class ParamGroupsMixin:
    """Mix into a ``torch.optim.Optimizer`` (before it in the bases)."""

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "proj_type" in group:
            group.setdefault("side", side_from_proj_type(group.pop("proj_type")))
        if "subspace" not in group:
            explicit = any(key in group for key in GALORE_KEYS)
            group["subspace"] = explicit or bool(getattr(self, "_default_subspace", None))
        for key in IGNORED_GALORE_ARGS:
            group.pop(key, None)
        super().add_param_group(group)
        added = self.param_groups[-1]
        try:
            validate_group(added)
            if (added["state_bits"] < 32 or added["projector_bits"] < 32) and any(map(is_dtensor, added["params"])):
                raise ValueError("state_bits/projector_bits: compressed state is not supported for DTensor "
                                 "(FSDP2-sharded) parameters yet; use 32")
            if added["subspace"]:
                names = added.get("param_names")
                for i, p in enumerate(added["params"]):
                    if p.dim() > 2:
                        name = names[i] if names else f"#{i}"
                        raise ValueError(
                            f"params: subspace groups take 1-D and 2-D tensors; parameter {name} has "
                            f"shape {tuple(p.shape)}; put it in a dense group (subspace=False)"
                        )
        except ValueError:
            self.param_groups.pop()
            raise
        if getattr(self, "_constructed", False):  # during construction __init__ warns, pointing at its caller
            self._warn_full_rank(added)

    def _warn_full_rank(self, group: dict) -> None:
        """Once per optimizer: a rank at or above a weight's projected dimension makes its subspace
        the whole space, i.e. plain AdamW at ``scale`` times the learning rate, which is rarely meant."""
        if not group["subspace"] or self._warned_full_rank:
            return
        full = [tuple(p.shape) for p in group["params"] if p.dim() == 2 and p.numel() > 0
                and group["rank"] >= self._layout(group, p)[2]]
        if full:
            self._warned_full_rank = True
            warnings.warn(
                f"{type(self).__name__}: rank {group['rank']} is at or above the projected dimension of "
                f"{len(full)} weight(s) (e.g. shape {full[0]}), which therefore train full-rank (the "
                "subspace is the whole space); lower the rank to compress them",
                stacklevel=3,  # the caller of __init__ / add_param_group
            )

    @staticmethod
    def _layout(group: dict, p: torch.Tensor) -> tuple[bool, int, int]:
        """``(left, rank, k)``: the projected side by the side rule, the rank clipped to the projected
        dimension ``k``."""
        m, n = p.shape
        left = projects_left(group["side"], m, n)
        k = m if left else n
        if two_sided(group["side"]):
            return left, min(group["rank"], m, n), min(m, n)
        return left, min(group["rank"], k), k

    @staticmethod
    def _is_projected(group: dict, p: torch.Tensor) -> bool:
        return group["subspace"] and p.dim() == 2 and p.numel() > 0

    def _collect_work(self) -> list[tuple[dict, str, torch.Tensor]]:
        """``(group, key, param)`` for every parameter with a gradient, after the checks that must
        pass before anything is modified (so a failing step changes nothing)."""
        work = []
        for group, key, p in self._keyed_params():
            if p.grad is None:
                continue
            self._check_gradient(group, key, p)
            work.append((group, key, p))
        return work

    def _keyed_params(self):
        """``(group, key, param)`` for every parameter: its name, or ``"group.index"``."""
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                yield group, (names[pi] if names else f"{gi}.{pi}"), p

    def _check_gradient(self, group: dict, key: str, p: torch.Tensor) -> None:
        """The checks that must pass before a parameter with a gradient is modified."""
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({key})")
        if torch.is_complex(p) or torch.is_complex(p.grad):
            raise RuntimeError(f"{type(self).__name__} does not support complex parameters ({key})")
        state = self.state.get(p)
        if state and self._is_projected(group, p):
            left, rank, _ = self._layout(group, p)
            if state["project_left"] != left or state["projector"].shape[1] != rank:
                raise ValueError(
                    f"rank/side: parameter {key} was set up with a rank-{state['projector'].shape[1]} "
                    f"{'left' if state['project_left'] else 'right'} projection; these cannot "
                    "change mid-run")
