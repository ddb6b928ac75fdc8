"""GaLore's dominant subspace (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", arXiv 2403.03507): the top-r left singular vectors of the gradient, by an fp32
thin SVD. Ties in the spectrum are broken by LAPACK's order; signs are canonicalised."""

from __future__ import annotations

import torch

from .base import SelectionContext, Selector, dominant_basis


class DominantSelector(Selector):
    """Top-r singular vectors. With an all-zero gradient the previous basis is kept (or, at the first
    step, the first r coordinate axes): see :func:`zero_gradient_basis`."""

    name = "dominant"

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        return dominant_basis(grad, previous, rank, ctx)
