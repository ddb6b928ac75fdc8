"""I3S importance-sampled subspaces ("Breaking the Frozen Subspace: Importance Sampling for Low-Rank
Optimization in LLM Pretraining", arXiv 2502.05790, NeurIPS 2025; first titled "I3S").

The sampling law implemented (the papers' own code is not public; this follows every available
description; the README's "I3S sampling law" states it):

1. Thin SVD of the gradient in fp32: ``G = U diag(s) V^T``, ``s_1 >= ... >= s_k``.
2. Weights ``w_i = s_i / sum_j s_j``, proportional to the singular value itself (not its square).
3. Draw ``r`` distinct indices by *successive sampling without replacement*: the first index with
   probability ``w_i``, each next one with probability proportional to ``w_i`` among those not yet
   drawn. This is the law of ``torch.multinomial(w, r, replacement=False)`` (Plackett-Luce), drawn
   here as Gumbel-top-r on ``log w`` with the parameter's counter-based generator. Its marginal
   inclusion probabilities are *not* proportional to ``w_i``; tests check the exact marginals.
4. The drawn indices are sorted ascending, so the basis columns keep the spectrum's order and a
   kept (GaLore-style) Adam state pairs coordinates by rank position.

Edge cases (documented behaviour, tested): singular values under the numerical rank tolerance have
weight zero and are never drawn; if at most ``r`` singular values are non-zero, all of them are taken
and the remaining slots are filled with the next singular vectors in spectrum order, i.e. the result
equals the dominant (GaLore) basis; an all-zero gradient keeps the previous basis (or takes the first
r coordinate axes at the first step); ``r >= min(m, n)`` is clipped by the optimizer, which makes
the selection the whole space.

With ``svd_method="randomized"`` and an ``importance_pool`` set, only a *pool* of the top
``K = min(ceil(importance_pool * r), min(k, l))`` triplets is computed (``randomized.py``) and step 3 runs on the pool: the law is
successive sampling with weights ``s^_i 1{i <= K}``, where ``s^`` are the randomized estimates of
the top singular values, so directions past ``K`` are never drawn. With exact ``s`` its total
variation distance to the full law is exactly the probability that the full law draws at least one
index past ``K`` (derivation and measurements on real gradients: ``docs/refresh.md``). On gradients
saved from lab runs that probability is 0.9-1 for pools up to 3 r: the pooled law is a different
law, so the default ``importance_pool=None`` keeps the exact one (the whole spectrum, by the exact
Gram path); ``svd`` and ``gram`` always take the whole spectrum.
"""

from __future__ import annotations

import torch

from ..checks import check_real
from ..randomized import pool_size
from .base import SelectionContext, SpectralSelector, numerically_nonzero, zero_gradient_basis

DEFAULT_POOL = None  # the whole spectrum: the exact law (see the module docstring)


def sample_without_replacement(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct indices with successive weighted sampling without replacement (sorted).

    Gumbel-top-k: ``argtopk(log w_i + Gumbel_i)`` has the same law as drawing one index at a time
    with probability proportional to the remaining weights. Only positive weights may be drawn, and
    ``count`` must not exceed their number. Gumbels are drawn in float64 on the generator's device.
    """
    positive = weights > 0
    if count > int(positive.sum()):
        raise ValueError(f"count={count} exceeds the {int(positive.sum())} positive weights")
    u = torch.rand(weights.shape, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    keys = torch.log(weights.to(device=u.device, dtype=torch.float64)) - torch.log(-torch.log(u))
    keys[~positive.to(u.device)] = -torch.inf
    picked = torch.topk(keys, count).indices
    return torch.sort(picked).values.to(weights.device)


class ImportanceSelector(SpectralSelector):
    """r singular vectors drawn without replacement with probability proportional to sigma.

    Group key: ``importance_pool`` (None or a float >= 1, default None): with
    ``svd_method="randomized"``, draw from the top ``ceil(importance_pool * r)`` triplets only, a
    different law (see the module docstring); None samples the whole spectrum.
    """

    name = "importance"
    defaults = {"importance_pool": DEFAULT_POOL}

    def validate(self, group: dict) -> None:
        if group["importance_pool"] is not None:
            check_real("importance_pool", group["importance_pool"], 1.0)

    def triplets(self, rank, shape, group) -> int | None:
        if group.get("svd_method", "svd") != "randomized":
            return None  # the exact law samples from the whole spectrum
        return pool_size(rank, group.get("importance_pool", DEFAULT_POOL), shape)

    def choose(self, factors, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        if factors is None:
            return zero_gradient_basis(previous, grad.shape[0], rank, grad.device, ctx.shard)
        u, s = factors
        shape = ctx.shard.whole_shape(grad.shape)
        pool = self.triplets(rank, shape, ctx.group)
        if pool is not None:  # a sketch as large as the matrix returns every triplet: keep the pool's law
            u, s = u[:, :pool], s[:pool]
        nonzero = numerically_nonzero(s, shape)
        if int(nonzero.sum()) <= rank:
            return ctx.shard.rows(u[:, :rank]).contiguous()
        weights = torch.where(nonzero, s, torch.zeros_like(s))
        weights = weights / weights.sum()
        idx = sample_without_replacement(weights, rank, ctx.generator(grad.device))
        return ctx.shard.rows(u[:, idx]).contiguous()  # (k, r), orthonormal columns
