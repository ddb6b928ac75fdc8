"""Random subspaces (the GoLore-style baseline; also SubZero's U and V): a Gaussian (k, r) matrix
orthonormalised by QR in fp32, drawn from the parameter's counter-based generator, so the basis does
not depend on the gradient at all."""

from __future__ import annotations

import torch

from ..linalg import random_orthonormal
from .base import SelectionContext, Selector


class RandomSelector(Selector):
    """A Haar-random orthonormal basis at every refresh."""

    name = "random"

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        k = ctx.shard.whole_shape(grad.shape)[0]
        return ctx.shard.rows(random_orthonormal(k, rank, ctx.generator(grad.device), grad.device))


class CoordinateSelector(Selector):
    """The first r coordinate axes, a reference baseline: with r = k the subspace optimizer is
    exactly AdamW (up to rounding), which is how the composition is tested against torch."""

    name = "coordinate"

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        k = ctx.shard.whole_shape(grad.shape)[0]
        return ctx.shard.rows(torch.eye(k, rank, dtype=torch.float32, device=grad.device))
