"""Presets: each paper as a ``SubspaceOptimizer`` with its choices fixed. Defaults only, no logic.

Defaults follow galore-torch (lr 1e-3, eps 1e-6, no weight decay) so that a galore-torch user
switches by changing the class name, and the papers' pretraining settings for the subspace keys
(rank 128, update_proj_gap 200, scale 0.25: GaLore arXiv 2403.03507 App. C.1; I3S arXiv 2502.05790
inherits them).
"""

from __future__ import annotations

from .optimizer import SubspaceOptimizer


def _fixed(preset: str, key: str, value, kwargs: dict):
    """A preset's defining choice: passing another value is an error, not a silent override."""
    given = kwargs.pop(key, value)
    if given != value:
        raise ValueError(
            f"{key}: {preset} fixes {key}={value!r}, got {given!r}; use SubspaceOptimizer(..., {key}=...) "
            "or a per-group override instead"
        )
    return value


class GaLoreAdamW(SubspaceOptimizer):
    """GaLore: the top-r singular subspace of the gradient, refreshed every ``update_proj_gap``
    steps, Adam moments kept across refreshes (``transition="keep"``). All other arguments as in
    :class:`SubspaceOptimizer`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 rank=128, update_proj_gap=200, scale=0.25, transition="keep", **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                         scale=scale, transition=transition,
                         selector=_fixed("GaLoreAdamW", "selector", "dominant", kwargs), **kwargs)


class I3SAdamW(SubspaceOptimizer):
    """I3S: GaLore with the subspace *sampled*: r singular vectors drawn without replacement with
    probability proportional to their singular values (law in ``selectors/importance.py``), from a
    counter-based generator keyed by (seed, parameter name, refresh number). ``transition="reset"``
    (and, with the projection-aware transitions, ``"rotate"``) is a one-word option."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 rank=128, update_proj_gap=200, scale=0.25, transition="keep", seed=0, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                         scale=scale, transition=transition, seed=seed,
                         selector=_fixed("I3SAdamW", "selector", "importance", kwargs), **kwargs)
