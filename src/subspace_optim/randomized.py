"""Randomized SVD of a gradient: Halko, Martinsson and Tropp, "Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions" (SIAM Review 2011,
arXiv 0909.4061), Algorithms 4.4 (randomized subspace iteration) and 5.1 (direct SVD).

For ``A`` (k, l) and ``count`` wanted triplets, with ``b = count + ceil(oversampling * count)``
columns (oversampling relative to the rank, so that one setting fits rank 32 and rank 512):

1. ``Y = A Omega`` with a Gaussian test matrix ``Omega`` (l, b) from the weight's counter-based
   generator (so every data-parallel rank and every resumed run draws the same one).
2. ``power_iters`` times: ``Q = qr(Y)``, ``Y = A (A^T Q)``.
3. ``Q = qr(Y)`` (k, b); ``B = Q^T A`` (b, l).
4. ``eigh(B B^T) = W diag(lambda) W^T`` (b, b); ``U = Q W``, ``s = sqrt(lambda)``, in descending
   order; the first ``count`` are returned, their signs canonicalised like the exact methods'.

Cost: ``2 * power_iters + 2`` products with ``A`` (each about ``2 k l b`` flops, the bulk of the
work), one small QR of the sketch per power iteration, and an eigendecomposition of a (b, b) matrix
instead of an SVD of ``B`` (about 10x cheaper on a CPU thread). Deliberate deviations from the
paper's Algorithm 4.4: the sketch is re-orthonormalised once per power iteration, on the short
(k) side only; the long-side product ``A^T Q`` is not. A QR of that (l, b) matrix costs almost as
much as a product with ``A`` on a CPU thread and only protects directions whose singular values are
below ``sqrt(eps_fp32) * s_1`` (about ``2.4e-4 * s_1``): they carry no energy to speak of, and the
Gram step (``B B^T``) loses them anyway. Everything runs in fp32; ``B`` is scaled to ``max |b_ij| = 1``
before it is squared, so the Gram matrix cannot overflow.

Every function here takes a single matrix (k, l) or a batch (..., k, l): the batched refresh
(``batched_refresh.py``) stacks weights of one shape, and torch's batched kernels give it the same
bits as one matrix at a time (tested).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .checks import check_int, check_real
from .linalg import canonical_signs, lapack, svd_gram_fp32

# Group keys of the randomized method, with their defaults (validated by ``validate_randomized``):
# chosen on gradients saved from lab runs, where they capture >= 0.99 of the exact top-r energy
# (docs/refresh.md); power_iters=0 is the fast setting for steeply decaying spectra.
RANDOMIZED_DEFAULTS = {"rsvd_oversampling": 0.5, "rsvd_power_iters": 1}

TestMatrix = Callable[[int, int], torch.Tensor]  # (rows, cols) -> Gaussian (..., rows, cols) fp32


def validate_randomized(group: dict) -> None:
    """``ValueError`` naming the key for a bad randomized-SVD option in ``group`` (missing keys take
    their defaults)."""
    check_real("rsvd_oversampling", group.get("rsvd_oversampling", RANDOMIZED_DEFAULTS["rsvd_oversampling"]), 0.0)
    check_int("rsvd_power_iters", group.get("rsvd_power_iters", RANDOMIZED_DEFAULTS["rsvd_power_iters"]), 0)


def randomized_options(group: dict) -> tuple[int, int]:
    """``(oversampling, power_iters)`` of ``group``, checked (so a bad value never runs silently)."""
    validate_randomized(group)
    return (group.get("rsvd_oversampling", RANDOMIZED_DEFAULTS["rsvd_oversampling"]),
            group.get("rsvd_power_iters", RANDOMIZED_DEFAULTS["rsvd_power_iters"]))


def sketch_width(count: int, oversampling: float, shape: tuple[int, ...]) -> int:
    """Columns ``b`` of the sketch: ``count + ceil(oversampling * count)``, at most ``min(k, l)``."""
    return min(count + math.ceil(oversampling * count), shape[-2], shape[-1])


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return lapack(lambda m: torch.linalg.qr(m, mode="reduced"), matrix)[0].contiguous()  # layout: see below


def randomized_svd_fp32(matrix: torch.Tensor, count: int | None, test_matrix: TestMatrix | None,
                        oversampling: float = RANDOMIZED_DEFAULTS["rsvd_oversampling"],
                        power_iters: int = RANDOMIZED_DEFAULTS["rsvd_power_iters"]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading ``count`` singular triplets of ``matrix`` (..., k, l): ``U`` (..., k, count) with
    orthonormal columns and ``S`` (..., count) descending, by the randomized method above.

    ``test_matrix(l, b)`` draws ``Omega``. When the sketch would span the whole column space
    (``b >= min(k, l)``) or ``count`` is None, randomization buys nothing and the
    exact Gram path (:func:`linalg.svd_gram_fp32`) returns every triplet instead. An all-zero matrix
    gives all-zero ``S``.
    """
    if oversampling < 0 or power_iters < 0:
        raise ValueError(f"oversampling and power_iters must be >= 0, got {oversampling}, {power_iters}")
    a = matrix.detach().to(torch.float32)
    k, l = a.shape[-2:]
    if count is None or sketch_width(count, oversampling, a.shape) >= min(k, l):
        return svd_gram_fp32(a)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    b = sketch_width(count, oversampling, a.shape)
    y = a @ test_matrix(l, b)  # (..., k, b)
    for _ in range(power_iters):
        q = _orthonormal(y)
        y = a @ (a.mT @ q)  # (..., k, b)
    q = _orthonormal(y)  # (..., k, b)
    small = q.mT @ a  # B (..., b, l)
    scale = small.abs().amax(dim=(-2, -1), keepdim=True)
    small = small / torch.where(scale > 0, scale, torch.ones_like(scale))
    evals, evecs = lapack(torch.linalg.eigh, small @ small.mT)  # (..., b), ascending
    # contiguous: LAPACK returns column-major factors and a stacked batch is row-major, and a
    # matmul's rounding depends on its operands' layout
    top = evecs.flip(-1)[..., :count].contiguous()  # (..., b, count)
    s = evals.flip(-1)[..., :count].clamp(min=0).sqrt() * scale[..., 0]
    return canonical_signs(q @ top), s


def gaussian_test_matrix(generator: torch.Generator) -> TestMatrix:
    """``Omega`` for one weight: standard normal fp32 on the generator's device."""
    return lambda rows, cols: torch.randn(rows, cols, generator=generator, dtype=torch.float32,
                                          device=generator.device)


def stacked_test_matrix(generators: list[torch.Generator]) -> TestMatrix:
    """``Omega`` for a batch: each weight's own :func:`gaussian_test_matrix`, stacked, so that a
    weight draws the same numbers batched or alone."""
    return lambda rows, cols: torch.stack([gaussian_test_matrix(g)(rows, cols) for g in generators])


def pool_size(rank: int, pool: float | None, shape: tuple[int, ...]) -> int | None:
    """Triplets in I3S's randomized pool: ``ceil(pool * rank)``, at most ``min(k, l)``; None (the
    whole spectrum) for ``pool=None``."""
    if pool is None:
        return None
    return min(math.ceil(pool * rank), shape[-2], shape[-1])


def method_options(group: dict) -> tuple[str, dict]:
    """``(svd_method, options)`` of ``group``: the randomized method's checked keyword options, none
    for the exact methods."""
    method = group.get("svd_method", "svd")
    if method != "randomized":
        return method, {}
    oversampling, power_iters = randomized_options(group)
    return method, {"oversampling": oversampling, "power_iters": power_iters}
