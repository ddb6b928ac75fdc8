"""Batched subspace refresh: the due weights of one shape factorised by one batched linalg call.

A refresh of GaLore or I3S factorises each weight's gradient on its own. Weights of equal shape
(a transformer's q/k/v/o projections, its gate/up projections, across all layers) can share one
call on the stacked (B, k, l) gradients: ``torch.linalg.svd``/``eigh``/``qr`` and batched matmuls
take a leading batch dimension on CPU and CUDA, which on a GPU turns B small launches into one.

Only the factorisation is shared. Each weight keeps its own law: the randomized method's test
matrix is drawn from the weight's own counter-based stream and stacked, and the selector's choice
(I3S's sampling included) runs per weight with its own generator. The per-weight path
(``selector.select``) is the reference. Stacked, :func:`refresh_batch` returns the same bases to
rounding: bitwise for the shapes tested, but not for every shape on CPU, where torch's batched
matmul rounds differently from the 2-D one for small or unaligned matrices; so on CPU it factorises
one weight at a time by default (``stacked=None``), which gives the per-weight bits exactly.

The optimizer uses it with the param-group option ``batch_refresh=True`` (``refresh_stage.py``): at
an ordinary ``step()``, the due weights are bucketed by :func:`batch_key` and each bucket of two or
more is factorised by one call, before any weight is updated; a selector's ``choose`` therefore must
not depend on another weight's step, nor write the state it is given (dominant and importance do
neither).
"""

from __future__ import annotations

import torch

from .linalg import SVD_METHODS
from .randomized import method_options, stacked_test_matrix
from .selectors.base import SelectionContext, SpectralSelector, nonzero_factors


def batch_key(selector, grad: torch.Tensor, rank: int, group: dict) -> tuple | None:
    """Refreshes with equal keys can share one :func:`refresh_batch` call; None for a selector that
    does not factorise the gradient (random, coordinate, and the every-step selectors, whose later
    steps are no refresh)."""
    if not isinstance(selector, SpectralSelector) or selector.every_step:
        return None
    count = selector.triplets(rank, tuple(grad.shape), group)
    method, options = method_options(group, tuple(grad.shape), count)  # ``auto`` resolved per shape
    return (selector.name, tuple(grad.shape), grad.dtype, grad.device, count, method,
            tuple(sorted(options.items())))


def refresh_batch(selector: SpectralSelector, grads: list[torch.Tensor],
                  previous: list[torch.Tensor | None], ranks: list[int],
                  contexts: list[SelectionContext], *, stacked: bool | None = None) -> list[torch.Tensor]:
    """The new bases of several weights, as ``[selector.select(g, p, r, c) for ...]`` would give.

    Args:
        selector: the weights' selector (one :class:`SpectralSelector` for the whole batch).
        grads: the gradients in left form, (k, l) each, all of one shape, dtype and device.
        previous: each weight's current basis (k, r), or None at its first step.
        ranks: each weight's rank.
        contexts: each weight's :class:`SelectionContext` (its group, key and refresh index).
        stacked: factorise the stacked (B, k, l) gradients in one call (True), or one weight at a
            time through ``selector.select`` (False). None (default): stacked on accelerators, one
            at a time on CPU. On CPU torch's batched kernels loop over the matrices anyway, and its
            batched matmul does not round like the 2-D one for small or unaligned matrices
            (measured, torch 2.13: ``bmm`` of (4, 5, 7) differs from ``mm`` in the last bits, and so
            do ``gram``/``randomized`` bases at rank 3), so the CPU default keeps the per-weight
            bits exactly, giving up stacking's small CPU gain (measured: ``docs/refresh.md``).

    All weights must have the same :func:`batch_key` (the optimizer buckets due weights by it);
    ``ValueError`` otherwise. Memory: the stacked gradients are one extra copy of the batch.
    """
    if not (len(grads) == len(previous) == len(ranks) == len(contexts)):
        raise ValueError("grads, previous, ranks and contexts must have the same length")
    if not grads:
        return []
    keys = {batch_key(selector, g, r, c.group) for g, r, c in zip(grads, ranks, contexts)}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"refresh_batch: the weights need one batch key (selector, shape, dtype, device, "
                         f"triplets, svd_method and its options); got {len(keys)} distinct: {sorted(map(str, keys))}")
    if stacked is None:
        stacked = grads[0].device.type != "cpu"
    if len(grads) == 1 or not stacked:
        return [selector.select(g, p, r, c) for g, p, r, c in zip(grads, previous, ranks, contexts)]
    group = contexts[0].group
    count = selector.triplets(ranks[0], tuple(grads[0].shape), group)
    method, options = method_options(group, tuple(grads[0].shape), count)
    device = grads[0].device
    test_matrix = stacked_test_matrix([c.sketch_generator(device) for c in contexts]) if options else None
    stacked = torch.stack([g.detach().to(torch.float32) for g in grads])  # (B, k, l)
    u, s = SVD_METHODS[method](stacked, count, test_matrix, **options)  # (B, k, c), (B, c)
    return [selector.choose(nonzero_factors(u[i], s[i]), grads[i], previous[i], ranks[i], contexts[i])
            for i in range(len(grads))]
