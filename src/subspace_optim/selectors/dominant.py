"""GaLore's dominant subspace (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", arXiv 2403.03507): the top-r left singular vectors of the gradient, by an fp32
thin SVD (or the group's ``svd_method``: ``gram``, exact; ``randomized``, only the top r computed).
Ties in the spectrum are broken by LAPACK's order; signs are canonicalised (``svd_method="lapack"``:
LAPACK's, of the gradient as stored, as galore-torch)."""

from __future__ import annotations

import torch

from .base import SelectionContext, SpectralSelector, zero_gradient_basis


class DominantSelector(SpectralSelector):
    """Top-r singular vectors. With an all-zero gradient the previous basis is kept (or, at the first
    step, the first r coordinate axes): see :func:`zero_gradient_basis`."""

    name = "dominant"

    def choose(self, factors, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        if factors is None:
            return zero_gradient_basis(previous, grad.shape[0], rank, grad.device, ctx.shard)
        return ctx.shard.rows(factors[0][:, :rank]).contiguous()  # (k, r), orthonormal columns
