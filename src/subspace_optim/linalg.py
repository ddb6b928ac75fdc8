"""Linear algebra in fp32 for subspace selection: SVD, QR, random bases, subspace overlap.

``SVD_METHODS`` (the ``svd_method`` group key) names the factorisations of a gradient: ``svd`` (the
reference), ``gram`` (exact, faster), ``randomized`` (``randomized.py``: the leading triplets only),
``auto`` (``auto_svd.py``: per shape, the cheaper of ``gram`` and a randomized plan) and ``lapack``
(galore-torch's arithmetic: the SVD of the gradient as stored, LAPACK's signs).

Every factorisation here runs in float32 (or float64 on a retry) whatever the parameter dtype:
``torch.linalg.svd`` has no bf16 kernel, and a low-precision basis would drift from orthonormality.
"""

from __future__ import annotations

import torch


def lapack(routine, matrix: torch.Tensor):
    """``routine(matrix)`` for one matrix (..., k, l); on CPU one matrix of a batch at a time.

    torch's batched CPU linalg kernels are a loop over the batch anyway, but they hand MKL each
    matrix at its offset in the batch, and MKL's results depend on the memory alignment of its input
    (measured: ``eigh`` of 13x13 matrices differs in the last bits). Called one at a time, every
    matrix gets its own freshly allocated copy, so a batch gives the same bits as each matrix alone.
    On CUDA the batched kernels run as they are.
    """
    if matrix.dim() == 2 or matrix.device.type != "cpu":
        return routine(matrix)
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    parts = [routine(m) for m in flat]
    return tuple(torch.stack([p[i] for p in parts]).reshape(*matrix.shape[:-2], *parts[0][i].shape)
                 for i in range(len(parts[0])))


def svd_fp32(matrix: torch.Tensor, count: int | None = None, test_matrix=None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD of ``matrix`` (..., k, l) in fp32: ``U`` (..., k, min(k, l)) and ``S`` (..., min(k, l)).

    Singular vectors get a canonical sign (the largest-magnitude entry of each column positive), so
    the same gradient gives the same basis whatever LAPACK's sign convention. If the fp32 SVD fails to
    converge (ill-conditioned input), it is retried once in float64 before the error propagates.
    ``count`` and ``test_matrix`` are the randomized method's (:data:`SVD_METHODS` share one
    signature); an exact method returns every triplet.
    """
    a = matrix.detach().to(torch.float32)
    try:
        u, s, _ = lapack(lambda m: torch.linalg.svd(m, full_matrices=False), a)
    except torch.linalg.LinAlgError:
        if a.dim() > 2:  # one at a time, so that only the failing matrix is retried, as alone
            return lapack(svd_fp32, a)
        u, s, _ = torch.linalg.svd(a.double(), full_matrices=False)
        u, s = u.float(), s.float()
    return canonical_signs(u), s


def svd_lapack_fp32(matrix: torch.Tensor, count: int | None = None, test_matrix=None, *,
                    transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """galore-torch's factorisation (``svd_method="lapack"``): ``U`` (..., k, min(k, l)) and ``S`` of
    the left-form ``matrix`` (..., k, l) from ``torch.linalg.svd`` of the gradient *as stored*, with
    LAPACK's singular-vector signs kept (no :func:`canonical_signs`).

    galore-torch's ``GaLoreProjector`` factorises the fp32 gradient G (m, n) as the weight stores it
    and takes ``U[:, :r]`` for a left projection, ``Vh[:r, :]`` for a right one (and both, from the
    one SVD, for ``proj_type="full"``). A right projection's left form is ``A = G^T``, and LAPACK's
    signs of ``svd(G^T)`` are not those of ``svd(G)`` (measured, torch 2.13 CPU: they differ for most
    random matrices), so with ``transposed=True`` (``matrix`` is the transpose of the gradient as
    stored; the selector passes it) this factorises ``matrix^T`` and returns ``Vh^T``. Under the
    ``keep`` transition a flipped vector flips the meaning of its moments, so only these signs
    reproduce a galore-torch trajectory (with ``inner="adamw_hf"``).

    Not reproducible across BLAS/LAPACK libraries or devices (the signs are whatever the library
    returns; so are galore-torch's); no float64 retry, as galore-torch has none: a convergence failure
    raises ``torch.linalg.LinAlgError``. ``count`` and ``test_matrix`` are unused (an exact method
    returns every triplet). Whole gradients only: sharded (DTensor) weights are refused at the
    refresh (``SelectionContext.factorize``).
    """
    a = matrix.detach().to(torch.float32)
    if transposed:
        _, s, vh = lapack(lambda m: torch.linalg.svd(m, full_matrices=False), a.mT.contiguous())
        return vh.mT.contiguous(), s
    u, s, _ = lapack(lambda m: torch.linalg.svd(m, full_matrices=False), a)
    return u, s


def svd_gram_fp32(matrix: torch.Tensor, count: int | None = None, test_matrix=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path of :func:`svd_fp32`: ``U`` and ``S`` from ``eigh`` of the (k, k) Gram matrix.

    2-5x faster than the SVD on CPU (``eigh`` of a small symmetric matrix instead of a bidiagonal
    SVD of the whole (k, l) matrix). Forming ``A A^T`` in fp32 squares the condition number, so
    singular values under about ``3e-4 * s_1`` (and their vectors) lose accuracy: harmless for the
    top-r subspace and for sampling with weights proportional to ``s``, where such directions have
    negligible weight. Tested against :func:`svd_fp32`. Takes a batch (..., k, l) too.
    """
    a = matrix.detach().to(torch.float32)
    if a.shape[-2] > a.shape[-1]:  # the thin SVD has min(k, l) columns: keep the reference's shapes
        return svd_fp32(a)
    # scaled to max |a_ij| = 1 first, so that squaring cannot overflow (or underflow) in fp32
    scale = a.abs().amax(dim=(-2, -1), keepdim=True)
    if not bool(torch.isfinite(scale).all()):
        return svd_fp32(a)
    a = a / torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero matrix stays zero
    return gram_factors(a @ a.mT, scale[..., 0])


def gram_factors(gram: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U``, ``S`` (descending) of ``A`` from the Gram matrix ``(A / scale) (A / scale)^T``
    (..., k, k); also the sharded refresh's, whose Gram matrix is a sum over processes."""
    evals, evecs = lapack(torch.linalg.eigh, gram)  # ascending
    s = evals.flip(-1).clamp_(min=0).sqrt_().mul_(scale)
    return canonical_signs(evecs.flip(-1)), s


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``basis`` (..., k, r) so that its largest-magnitude entry is positive."""
    if basis.numel() == 0:
        return basis
    idx = basis.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.sign(torch.gather(basis, -2, idx))
    signs[signs == 0] = 1
    return basis * signs


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (k, r) of the columns of ``matrix`` (k, r) by reduced QR in fp32.

    The sign of each column is fixed by making R's diagonal non-negative, so QR is unique.
    """
    q, r = torch.linalg.qr(matrix.to(torch.float32), mode="reduced")
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d


def random_orthonormal(
    rows: int, rank: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A random (rows, rank) fp32 basis with orthonormal columns: Gaussian, then QR.

    The distribution is uniform (Haar) on the Stiefel manifold because R's diagonal is made
    positive. ``generator`` must live on ``device``.
    """
    gauss = torch.randn(rows, rank, generator=generator, device=device, dtype=torch.float32)
    return orthonormalize(gauss)


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """Overlap of two subspaces given by orthonormal bases (k, r1) and (k, r2), in [0, 1].

    ``||old^T new||_F^2 / min(r1, r2)``: the mean squared cosine of the principal angles. 1 means the
    subspaces coincide (GaLore's frozen subspace), about r/k means unrelated random subspaces.
    """
    r = min(old.shape[1], new.shape[1])
    if r == 0:
        return 1.0
    c = old.to(torch.float32).T @ new.to(torch.float32)  # (r1, r2)
    return float((c * c).sum() / r)


def _svd_methods() -> dict:
    from .auto_svd import auto_svd_fp32  # both build on the exact methods above
    from .randomized import randomized_svd_fp32

    return {"svd": svd_fp32, "gram": svd_gram_fp32, "randomized": randomized_svd_fp32, "auto": auto_svd_fp32,
            "lapack": svd_lapack_fp32}


# name -> f(matrix (..., k, l), count, test_matrix, **options) -> (U (..., k, c), S (..., c))
SVD_METHODS = _svd_methods()
