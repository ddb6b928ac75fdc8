"""MeZO: memory-efficient zeroth-order SGD with full Gaussian directions.

Paper: "Fine-Tuning Language Models with Just Forward Passes", Malladi et al., NeurIPS 2023,
arXiv 2305.17333 (Algorithm 1, ZO-SGD with the two-sided SPSA estimator, n = 1). Deviations from the
official code are listed in :mod:`subspace_optim.zeroth_order.base` (counter-based seeds instead of
numpy's global RNG, decoupled weight decay by a dimension rule, a non-finite-loss policy); momentum
(heavy ball on the regenerated direction, the SubZero code's ``SGD(momentum=...)``) is an option
that costs one parameter-sized buffer and is off by default.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..rng import generator_for
from .base import ZerothOrderOptimizer


class MeZO(ZerothOrderOptimizer):
    """Zeroth-order SGD with seeded full Gaussian perturbations (MeZO).

    Per ``step(closure)``, with t the step counter and ``key`` each parameter's name or position:

    1. For every trainable parameter, in param-group then registration order, regenerate
       ``z ~ N(0, I)`` (shape and dtype of the parameter) from ``generator_for(seed, key, t)`` and
       add ``eps * z`` in place. ``z`` is never stored: it is regenerated for every pass.
    2. ``l+ = closure()`` (forward only, under ``torch.no_grad``).
    3. Subtract ``2 eps z``; ``l- = closure()``.
    4. Add ``eps z`` back (restore; exact to rounding, or bitwise with ``exact_restore=True``);
       this pass and step 7 share one regeneration of ``z``.
    5. ``g = (l+ - l-) / (2 eps)``, one scalar for the whole model (one-sided: evaluate at theta and
       theta + eps z, ``g = (l+ - l0) / eps``). With ``all_reduce=True`` the two losses are averaged
       over the data-parallel ranks first, so every rank applies the same update.
    6. If ``g`` is not finite: raise (``nonfinite='error'``) or return (``'skip'``, counted in
       ``skipped_steps``); the weights are restored, the counter and all state are unchanged.
    7. Update each parameter: ``p <- (1 - lr wd) p`` for parameters with 2 or more dimensions
       (biases and norm weights get no decay, as in MeZO's code), then ``p <- p - lr g z``
       (with momentum: ``buf <- momentum buf + g z``; ``p <- p - lr buf``). ``t <- t + 1``.

    Memory: the weights plus one transient parameter-sized ``z`` (the largest matrix); no gradients,
    no state unless ``momentum > 0`` (one buffer per parameter) or ``exact_restore`` (a full copy of
    the trainable weights during each step).

    Args:
        params: parameters or ``model.named_parameters()`` (names become the seeding keys), or
            param-group dicts.
        lr: learning rate, >= 0. Default 1e-6 (MeZO's full-parameter OPT grid: 1e-6, 1e-7).
        eps: perturbation scale, > 0, the same in every group. Default 1e-3 (MeZO).
        weight_decay: decoupled weight decay, >= 0, applied to parameters with >= 2 dims. Default 0.
        momentum: heavy-ball momentum in [0, 1). Default 0 (pure ZO-SGD, stateless).
        seed: integer in [0, 2**63); with the step counter and the key it fixes every direction.
            Default 0.
        estimator: ``'two-sided'`` (default) or ``'one-sided'``.
        nonfinite: ``'error'`` (default, ``RuntimeError``) or ``'skip'`` for a non-finite loss.
        exact_restore: keep a copy of the trainable weights during the step and copy it back after
            the evaluations, so the perturb/restore round trip is bitwise exact. Costs one extra
            copy of the trainable weights. Default False.
        all_reduce: average the two losses over the default ``torch.distributed`` process group
            (data parallelism). Default False.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.0, seed: int = 0, *,
                 estimator: str = "two-sided", nonfinite: str = "error",
                 exact_restore: bool = False, all_reduce: bool = False):
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum, seed=seed)
        super().__init__(params, defaults, estimator=estimator, nonfinite=nonfinite,
                         exact_restore=exact_restore, all_reduce=all_reduce)

    def _direction(self, group: dict, p: torch.Tensor, key: str) -> torch.Tensor:
        gen = generator_for(group["seed"], key, group["step"], p.device)
        return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
