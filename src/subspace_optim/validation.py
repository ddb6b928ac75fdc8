"""Hyperparameter checks: every bad value raises ``ValueError`` naming the argument and its range."""

from __future__ import annotations

import math
from numbers import Real

from .inner import INNER_RULES
from .linalg import SVD_METHODS
from .selectors import OSD_VARIANTS, P_OPTIMIZERS, SELECTORS
from .sides import PROJ_TYPE_TO_SIDE, SIDES
from .transitions import TRANSITIONS

NONFINITE_POLICIES = ("error", "skip")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    return float(value)


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {sorted(allowed)}")


def validate_group(group: dict) -> None:
    """Check the hyperparameters of one param group (dense groups skip the subspace keys)."""
    if _real("lr", group["lr"]) < 0:
        raise ValueError(f"lr: expected lr >= 0, got {group['lr']!r}")
    if _real("eps", group["eps"]) < 0:
        raise ValueError(f"eps: expected eps >= 0, got {group['eps']!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}]: expected 0 <= beta < 1, got {beta!r}")
    if _real("weight_decay", group["weight_decay"]) < 0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {group['weight_decay']!r}")
    if not isinstance(group["subspace"], bool):
        raise ValueError(f"subspace: expected True or False, got {group['subspace']!r}")
    _choice("inner", group["inner"], INNER_RULES)
    if not 0.0 <= _real("momentum", group["momentum"]) < 1.0:
        raise ValueError(f"momentum: expected 0 <= momentum < 1, got {group['momentum']!r}")
    if not group["subspace"]:
        return
    _integer("rank", group["rank"], 1)
    _integer("update_proj_gap", group["update_proj_gap"], 1)
    if _real("scale", group["scale"]) <= 0:
        raise ValueError(f"scale: expected scale > 0, got {group['scale']!r}")
    _choice("side", group["side"], SIDES)
    _choice("selector", group["selector"], SELECTORS)
    _choice("transition", group["transition"], TRANSITIONS)
    _choice("svd_method", group["svd_method"], SVD_METHODS)
    _integer("seed", group["seed"], 0)
    _boolean("error_feedback", group["error_feedback"])
    if not 0.0 <= _real("rho", group["rho"]) <= 1.0:
        raise ValueError(f"rho: expected 0 <= rho <= 1, got {group['rho']!r}")
    _choice("osd_variant", group["osd_variant"], OSD_VARIANTS)
    if _real("osd_alpha", group["osd_alpha"]) <= 0:
        raise ValueError(f"osd_alpha: expected osd_alpha > 0, got {group['osd_alpha']!r}")
    _choice("osd_p_optimizer", group["osd_p_optimizer"], P_OPTIMIZERS)
    _boolean("osd_orthonormalize", group["osd_orthonormalize"])


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def side_from_proj_type(proj_type) -> str:
    _choice("proj_type", proj_type, PROJ_TYPE_TO_SIDE)
    return PROJ_TYPE_TO_SIDE[proj_type]


def validate_nonfinite(policy) -> None:
    _choice("nonfinite", policy, NONFINITE_POLICIES)
