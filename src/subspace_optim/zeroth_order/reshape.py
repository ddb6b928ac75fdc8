"""Most-square reshaping of thin matrices for SubZero's low-rank perturbations.

SubZero (arXiv 2410.08989, the official code's PEFT modes) reshapes a LoRA / prefix / prompt
tensor to the most-square factorisation m' x n' = numel before building U Z V^T, because a thin
m x k matrix with small k leaves no room for a rank r << k. Here the rule is applied to any 2-D
parameter whose smaller side is below a threshold, whatever the fine-tuning mode.
"""

from __future__ import annotations

import math


def most_square(numel: int) -> tuple[int, int]:
    """The factorisation ``(a, b)`` of ``numel`` with ``a <= b`` and ``a`` as large as possible."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    for a in range(math.isqrt(numel), 0, -1):
        if numel % a == 0:
            return a, numel // a
    return 1, numel  # unreachable: a = 1 always divides


def subspace_shape(shape: tuple[int, ...], reshape_min_dim: int) -> tuple[int, int] | None:
    """The matrix shape SubZero perturbs a parameter as, or None for a full Gaussian direction.

    Parameters that are 2-D after squeezing size-1 dimensions get a low-rank direction (the
    official code's rule); 0-D, 1-D and >= 3-D ones get MeZO's full Gaussian. A 2-D matrix whose
    smaller side is below ``reshape_min_dim`` is treated as its most-square factorisation.
    """
    dims = [d for d in shape if d != 1]
    if len(dims) != 2:
        return None
    m, n = dims
    if min(m, n) < reshape_min_dim:
        m, n = most_square(m * n)
    return m, n
