"""Presets: each paper as a ``SubspaceOptimizer`` with its choices fixed. Defaults only, no logic.

Defaults follow galore-torch (lr 1e-3, eps 1e-6, no weight decay) so that a galore-torch user
switches by changing the class name, and the papers' pretraining settings for the subspace keys
(rank 128, update_proj_gap 200, scale 0.25: GaLore arXiv 2403.03507 App. C.1; I3S arXiv 2502.05790
inherits them). ``OnlineSubspaceAdamW`` (arXiv 2408.12857) and ``LDAdamW`` (arXiv 2410.16103) take
their papers' / official code's defaults.

The random-subspace baseline (GoLore-style, OSD's ``random`` projector) has no class of its own:
``SubspaceOptimizer(params, selector="random", update_proj_gap=T, transition="keep"|"reset", seed=s)``.
Every preset accepts the composable options of :class:`SubspaceOptimizer`, e.g. ``transition="rotate"``
(projection-aware state transfer), ``inner="lion"`` or ``inner="sgd"``.
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
    steps, Adam moments kept across refreshes (``transition="keep"``; ``"rotate"`` re-expresses them
    in the new basis, ``"reset"`` zeroes them). All other arguments as in :class:`SubspaceOptimizer`."""

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


class OnlineSubspaceAdamW(SubspaceOptimizer):
    """Online Subspace Descent (arXiv 2408.12857): the basis takes one optimizer step per training
    step on the online-PCA loss of the normalised gradient (``selectors/online_pca.py``), after one
    initial SVD; moments are kept as P drifts (``transition="keep"``, the paper's "continuous" case).

    1. First step of each matrix: P = top-r singular vectors of G (fp32).
    2. Each step t: project G_t on P_t, run Adam (``inner="lion"`` or ``"sgd"`` as options), update
       ``W <- (1 - lr wd) W - lr * scale * P_t N``.
    3. P_{t+1} = one Adam (``osd_p_optimizer="sgd"``: SGD) step on the online-PCA loss at (P_t, G_t),
       then a QR re-orthonormalisation (``osd_orthonormalize``).

    Args (beyond :class:`SubspaceOptimizer`'s): ``osd_variant`` (``"paper"``: orthogonality penalty 0.1,
    P lr = ``osd_alpha`` (5.0) * lr; ``"code"``: no penalty, P lr = lr / initial_lr / update_proj_gap,
    weight decay 0.01 on P). Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-6 (GaLore's AdamW), wd 0,
    rank 128, update_proj_gap 200 (the code variant's P lr 1/200 = 5 x 1e-3, the paper's alpha),
    scale 0.25 (the code's README), side "galore".
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 rank=128, update_proj_gap=200, scale=0.25, transition="keep", osd_variant="paper", **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                         scale=scale, transition=transition, osd_variant=osd_variant,
                         selector=_fixed("OnlineSubspaceAdamW", "selector", "online_pca", kwargs), **kwargs)


class LDAdamW(SubspaceOptimizer):
    """LDAdam (arXiv 2410.16103, official code IST-DASLab/LDAdam): a subspace that moves every step,
    projection-aware moments and generalised error feedback.

    1. ``a = G + xi`` (xi: the fp32 error buffer in the optimizer state, zero at first).
    2. P = one warm-started block power iteration on ``rho * P_prev m^ + (1 - rho) * a``
       (``selector="power"``; exact SVD at the first step).
    3. ``rotate``: ``m~ = C m`` with ``C = P^T P_prev``; the variance rotated by ``C o C`` (never
       negative).
    4. ``xi = (a - P P^T a) + beta1 / (1 - beta1) * (P_prev m - P m~)``.
    5. Adam on ``P^T a``; ``W <- (1 - lr wd) W - lr * P N`` (no scale).

    Defaults (the code's): lr 1e-3, betas (0.908, 0.99), eps 1e-8, weight_decay 0, rank 16,
    rho 0.908, side "ldadam" (square matrices projected on the left), scale 1.0, error_feedback True.
    """

    def __init__(self, params, lr=1e-3, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0, *,
                 rank=16, rho=0.908, side="ldadam", scale=1.0, transition="rotate", error_feedback=True,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, rho=rho, side=side, scale=scale,
                         transition=transition, error_feedback=error_feedback,
                         selector=_fixed("LDAdamW", "selector", "power", kwargs), **kwargs)
