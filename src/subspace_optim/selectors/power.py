"""LDAdam's subspace: one warm-started block power iteration per step ("LDAdam: Adaptive Optimization
from Low-Dimensional Gradient Statistics", Robert et al., arXiv 2410.16103, ICLR 2025; behaviour from
the official code IST-DASLab/LDAdam, ``proj_method="power_iteration"``).

Deliberate deviations: the QR's R diagonal is made non-negative (:func:`linalg.orthonormalize`), so the
new basis is the continuation of the previous one rather than depending on LAPACK's sign convention;
when the iterated matrix is all zero (zero gradient and zero momentum) the previous basis is kept
instead of letting QR return arbitrary axes. The momentum term reads the inner rule's own momentum
estimate, so the selector also works with Lion and SGD-momentum (Adam: ``m / (1 - beta1^k)``, LDAdam's).
"""

from __future__ import annotations

import torch

from ..checks import check_real
from ..linalg import orthonormalize
from .base import SelectionContext, Selector, dominant_basis


class PowerSelector(Selector):
    """Warm-started block power iteration on the momentum-interpolated gradient.

    1. First step of a parameter: the top-r left singular vectors of the gradient (fp32 SVD, or the
       Gram-matrix path with ``svd_method="gram"``).
    2. Afterwards, with ``k`` completed inner steps, ``m`` (r, l) the inner rule's bias-corrected
       momentum and ``a`` (k, l) the (error-corrected) gradient:
       ``b = rho * P_prev m + (1 - rho) * a`` (just ``a`` when ``k = 0``).
    3. ``P = QR(b (b^T P_prev))`` in fp32: one block power iteration on ``b b^T`` warm-started from
       ``P_prev``.

    Group key: ``rho`` (float, 0.908, in [0, 1]): weight of the back-projected momentum.
    """

    name = "power"
    every_step = True
    defaults = {"rho": 0.908}

    def validate(self, group: dict) -> None:
        check_real("rho", group["rho"], 0.0, 1.0, high_open=False)

    def select(self, grad, previous, rank, ctx: SelectionContext) -> torch.Tensor:
        if previous is None:
            return dominant_basis(grad, previous, rank, ctx)
        group = ctx.group
        momentum = ctx.inner.momentum_estimate(ctx.state, group, ctx.state["inner_step"])
        b = grad
        if momentum is not None:
            rho = group["rho"]
            b = rho * (previous @ momentum) + (1 - rho) * grad  # (k, l)
        shard = ctx.shard  # sums over the sharded side of each contraction (identity when whole)
        iterated = shard.sum_l(b @ shard.sum_k(b.T @ previous))  # (k, r)
        if not shard.any(iterated):
            return previous
        return shard.rows(orthonormalize(shard.gather_rows(iterated)))  # (k, r), orthonormal columns
