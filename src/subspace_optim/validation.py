"""Param-group checks of ``SubspaceOptimizer``: every bad value raises ``ValueError`` naming the
argument and its range. The optimizer checks its own keys here; each component (selector,
transition, inner rule) checks the keys it owns (``components.py``)."""

from __future__ import annotations

from .checks import NONFINITE_POLICIES, check_bool, check_choice, check_int, check_real
from .inner import INNER_RULES
from .linalg import SVD_METHODS
from .randomized import validate_randomized
from .selectors import SELECTORS
from .sides import PROJ_TYPE_TO_SIDE, SIDES, two_sided
from .state_storage import STORAGE
from .transitions import TRANSITIONS


def validate_group(group: dict) -> None:
    """Check the hyperparameters of one param group (dense groups skip the subspace keys)."""
    check_real("lr", group["lr"], 0.0)
    check_real("eps", group["eps"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_real(f"betas[{i}]", beta, 0.0, 1.0)
    check_real("weight_decay", group["weight_decay"], 0.0)
    check_bool("subspace", group["subspace"])
    if group["foreach"] is not None:
        check_bool("foreach", group["foreach"])
    check_choice("inner", group["inner"], sorted(INNER_RULES))
    INNER_RULES.validate(group)
    STORAGE.validate(group)
    if not group["subspace"]:
        return
    check_int("rank", group["rank"], 1)
    check_int("update_proj_gap", group["update_proj_gap"], 1)
    check_real("scale", group["scale"], 0.0, low_open=True)
    check_choice("side", group["side"], SIDES)
    check_choice("selector", group["selector"], sorted(SELECTORS))
    check_choice("transition", group["transition"], sorted(TRANSITIONS))
    check_choice("svd_method", group["svd_method"], sorted(SVD_METHODS))
    check_int("seed", group["seed"], 0)
    check_bool("error_feedback", group["error_feedback"])
    check_bool("stagger_refresh", group["stagger_refresh"])
    check_bool("batch_refresh", group.get("batch_refresh", False))
    if group["svd_method"] == "lapack" and group.get("batch_refresh", False):
        # a stacked batch mixes weights stored as G and as G^T under one left-form shape
        raise ValueError("batch_refresh must be False with svd_method='lapack' (galore-torch's arithmetic "
                         "factorises each gradient as stored, one weight at a time)")
    validate_randomized(group)
    SELECTORS.validate(group)
    TRANSITIONS.validate(group)
    if two_sided(group["side"]):
        _check_two_sided(group)


def _check_two_sided(group: dict) -> None:
    """galore-torch's two-sided projection is defined for refresh-window selectors whose basis is
    chosen afresh, with moments kept or reset; the every-step selectors, rotate and error feedback
    assume one basis."""
    windowed = sorted(name for name, s in SELECTORS.items() if not s.every_step)
    if SELECTORS.lookup(group["selector"]).every_step:
        raise ValueError(f"selector must be one of {windowed} with side='full' (two-sided), got "
                         f"{group['selector']!r}")
    check_choice("transition", group["transition"], ("keep", "reset"))
    if group["error_feedback"]:
        raise ValueError("error_feedback must be False with side='full' (two-sided)")


def side_from_proj_type(proj_type) -> str:
    check_choice("proj_type", proj_type, PROJ_TYPE_TO_SIDE)
    return PROJ_TYPE_TO_SIDE[proj_type]


def validate_nonfinite(policy) -> None:
    check_choice("nonfinite", policy, NONFINITE_POLICIES)
