"""The building blocks of the randomized SVD (``randomized.py``) that are not plain matmuls: a cheap
basis of a sketch (LU), the symmetric Gram product, and the a-posteriori energy certificate.

Every function takes one matrix (k, l) or a batch (..., k, l) and gives a batch the bits of each
matrix alone on CPU (LAPACK through ``linalg.lapack``, one matrix at a time).
"""

from __future__ import annotations

import torch

from .linalg import lapack

# rows per block of the symmetric Gram product: below this the blocks' matmuls lose more speed than
# the skipped upper triangle saves
_GRAM_BLOCK_ROWS = 256
_GRAM_MAX_BLOCKS = 8


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` (..., k, b): Householder QR, fp32."""
    # contiguous: LAPACK returns column-major factors, and a matmul's rounding depends on its
    # operands' layout (a stacked batch is row-major)
    return lapack(lambda m: torch.linalg.qr(m, mode="reduced"), y)[0].contiguous()


def _lu_one(y: torch.Tensor) -> tuple[torch.Tensor]:
    lu, pivots, _ = torch.linalg.lu_factor_ex(y)  # y = P L U; a zero pivot leaves a unit column
    k, b = y.shape[-2:]
    lower = lu.tril_(-1)  # (k, b), |l_ij| <= 1, unit diagonal
    lower.diagonal().fill_(1)
    perm = list(range(k))
    for i, p in enumerate(pivots.tolist()):  # LAPACK's row swaps, applied in order
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    basis = torch.empty_like(lower)
    basis[torch.tensor(perm, device=y.device)] = lower  # P L: the rows back in y's order
    return (basis,)


def lu_basis(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis ``P L`` of the columns of ``y`` (..., k, b), not orthonormal: the
    unit lower-trapezoidal factor of a partially pivoted LU (entries at most 1 in magnitude).

    Between power iterations only the span matters (``A A^T Y`` spans the same space whatever basis
    of ``span(Y)`` it is applied to); LU costs a third of a QR on one CPU thread (the choice of
    Li, Linderman, Szlam, Stanton, Kluger and Tygert, "Algorithm 971: an implementation of a
    randomized algorithm for principal component analysis", ACM TOMS 2017).
    """
    if y.dim() == 2:
        return _lu_one(y)[0]
    return torch.stack([_lu_one(m)[0] for m in y.reshape(-1, *y.shape[-2:])]).reshape(y.shape)


def symmetric_gram(a: torch.Tensor) -> torch.Tensor:
    """``a a^T`` (..., k, k) of ``a`` (..., k, l) with about half the flops of one matmul: the row
    blocks of the lower triangle (diagonal blocks whole), the upper blocks copied from them."""
    k = a.shape[-2]
    blocks = max(1, min(_GRAM_MAX_BLOCKS, k // _GRAM_BLOCK_ROWS))
    edges = [k * i // blocks for i in range(blocks + 1)]
    gram = a.new_empty(*a.shape[:-2], k, k)
    for lo, hi in zip(edges, edges[1:]):
        gram[..., lo:hi, :hi] = a[..., lo:hi, :] @ a[..., :hi, :].mT
        gram[..., :lo, lo:hi] = gram[..., lo:hi, :lo].mT
    return gram


def certified(total: torch.Tensor, captured: torch.Tensor, top: torch.Tensor | None, target: float
              ) -> list[bool]:
    """Per matrix: does the basis certainly capture ``target`` of the exact top-r energy?

    ``total`` = ``||A||_F^2``, ``captured`` = ``||Q^T A||_F^2`` of the orthonormal sketch ``Q`` (b
    columns) and ``top`` = the energy ``E_r`` of the r Ritz vectors chosen in it (None: not yet
    computed; then the answer is whether it can pass at all, since ``E_r <= captured``). In the
    basis ``[Q, Q_perp]``, ``A A^T`` is a positive block matrix with diagonal blocks ``B B^T`` and
    ``R R^T`` (``R`` the residual ``(I - Q Q^T) A``); the top-r eigenvalue sum of a positive block
    matrix is at most the sum of its diagonal blocks' (Bourin and Lee 2012, any unitarily invariant
    norm), so the exact ``E*_r <= E_r + trace(R R^T) = E_r + total - captured``. Hence
    ``E_r / E*_r >= E_r / (E_r + total - captured)``. Non-finite energies never certify.
    """
    residual = (total - captured).clamp(min=0).double().reshape(-1).tolist()
    mine = (captured if top is None else top).double().reshape(-1).tolist()
    return [bool(e > 0 and e == e and res == res and e != float("inf") and res != float("inf")
                 and e >= target * (e + res)) for e, res in zip(mine, residual)]
