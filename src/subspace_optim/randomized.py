"""Randomized SVD of a gradient: Halko, Martinsson and Tropp, "Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions" (SIAM Review 2011,
arXiv 0909.4061), Algorithms 4.4 (randomized subspace iteration) and 5.1 (direct SVD).

For ``A`` (k, l) and ``count`` wanted triplets, with ``b = count + ceil(oversampling * count)``
columns (oversampling relative to the rank, so that one setting fits rank 32 and rank 512), and an
operator ``M``: ``A`` itself (``sketch="direct"``) or the Gram matrix ``C = A A^T``
(``sketch="gram"``, for k <= l):

1. ``Y = M Omega`` with a Gaussian test matrix ``Omega`` ((l, b) direct, (k, b) gram) from the
   weight's counter-based generator (so every data-parallel rank and every resumed run draws the
   same one); ``Q = qr(Y)``.
2. ``power_iters`` times: ``Y = A (A^T Q)`` (direct) or ``Y = C Q`` (gram); ``Q`` = a basis of
   ``Y``: LU (``sketch_ops.lu_basis``) between iterations, QR after the last one.
3. Rayleigh-Ritz: ``T = Z^T Z`` with ``Z = A^T Q`` (direct), or ``T = Q^T C Q`` (gram);
   ``eigh(T) = W diag(lambda) W^T`` (b, b) instead of an SVD of ``Q^T A``; ``U = Q W``,
   ``s = sqrt(lambda)``, descending; the first ``count`` are returned, their signs canonicalised
   like the exact methods'.

The filter applied to the spectrum is ``sigma^(2 q + 1)`` (direct, ``2 q + 2`` products with ``A``)
or ``sigma^(2 q + 2)`` (gram: one symmetric product ``A A^T``, about half a full one, then ``q + 2``
products with the (k, k) matrix ``C``: far cheaper than products with ``A`` when l > k).

``certify=t`` (used by ``svd_method="auto"``) stops after step 1 when the sketch provably captures
``t`` of the exact top-``count`` energy (``sketch_ops.certified``: a bound that needs only
``||A||_F``, ``||Q^T A||_F`` and the Ritz values): a steeply decaying spectrum costs one sketch, a
flat one the full iteration. The stop is a function of the gradient, so it is the same on every
rank and after a resume.

Deliberate deviations from the paper's Algorithm 4.4: the sketch is re-orthonormalised on the short
(k) side only; the long-side product ``A^T Q`` is not (a QR of that (l, b) matrix costs almost a
product with ``A`` and protects only directions below ``sqrt(eps_fp32) * s_1``, which carry no energy
to speak of and which the Gram step loses anyway). Everything runs in fp32; ``Z`` (direct) or ``A``
(gram) is scaled to ``max |x_ij| = 1`` before it is squared, so the Gram matrices cannot overflow.

Every function here takes a single matrix (k, l) or a batch (..., k, l): the batched refresh
(``batched_refresh.py``) stacks weights of one shape and gets the bits of one matrix at a time
(tested); a certificate is decided per matrix, and the uncertified ones of a batch continue alone.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .checks import check_int, check_real
from .linalg import canonical_signs, lapack, svd_gram_fp32
from .sketch_ops import certified, lu_basis, orthonormal_basis, symmetric_gram

# Group keys of the randomized method, with their defaults (validated by ``validate_randomized``):
# chosen on gradients saved from lab runs, where they capture >= 0.99 of the exact top-r energy
# (docs/refresh.md); power_iters=0 is the fast setting for steeply decaying spectra.
RANDOMIZED_DEFAULTS = {"rsvd_oversampling": 0.5, "rsvd_power_iters": 1}
SKETCHES = ("direct", "gram")

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


class _Operator:
    """``A`` (direct) or ``C = A A^T`` (gram) of a (batch of) fp32 matrices, with the products the
    iteration needs; ``pick(idx)`` restricts a batch to some of its matrices."""

    def __init__(self, a: torch.Tensor, sketch: str):
        self.sketch = sketch
        if sketch == "direct":
            self.a, self.scale = a, None
        else:  # scaled first, so that squaring cannot overflow (or underflow) in fp32
            scale = a.abs().amax(dim=(-2, -1), keepdim=True)
            self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            self.a = symmetric_gram(a / self.scale)  # C (..., k, k)

    def pick(self, idx: torch.Tensor) -> "_Operator":
        other = object.__new__(_Operator)
        other.sketch, other.a = self.sketch, self.a[idx]
        other.scale = None if self.scale is None else self.scale[idx]
        return other

    def test_rows(self) -> int:
        return self.a.shape[-1]  # l for A, k for C

    def start(self, omega: torch.Tensor) -> torch.Tensor:
        return self.a @ omega  # (..., k, b)

    def half(self, q: torch.Tensor) -> torch.Tensor:
        """``A^T Q`` (..., l, b) direct, ``C Q`` (..., k, b) gram."""
        return self.a.mT @ q if self.sketch == "direct" else self.a @ q

    def power(self, q: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """The next sketch ``A A^T Q`` (direct) or ``C Q`` (gram), from ``half(q)``."""
        return self.a @ half if self.sketch == "direct" else half

    def energies(self, q: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||A||_F^2, ||Q^T A||_F^2)`` per matrix, in the units of :meth:`ritz`'s eigenvalues."""
        if self.sketch == "direct":
            return (torch.linalg.vector_norm(self.a, dim=(-2, -1)) ** 2,
                    torch.linalg.vector_norm(half, dim=(-2, -1)) ** 2)
        return torch.diagonal(self.a, dim1=-2, dim2=-1).sum(-1), (q * half).sum(dim=(-2, -1))

    def ritz(self, q: torch.Tensor, half: torch.Tensor, count: int):
        """``(U (..., k, count), S (..., count), E_r (...))`` from the basis ``q`` and ``half(q)``."""
        if self.sketch == "direct":
            scale = half.abs().amax(dim=(-2, -1), keepdim=True)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            z = half / scale
            small, unit = z.mT @ z, scale  # (..., b, b)
        else:
            small, unit = q.mT @ half, self.scale
        evals, evecs = lapack(torch.linalg.eigh, small)  # (..., b), ascending
        top = evecs.flip(-1)[..., :count].contiguous()  # (..., b, count); contiguous: see sketch_ops
        lam = evals.flip(-1)[..., :count].clamp(min=0)
        energy = lam.sum(-1) * (unit[..., 0, 0] ** 2 if self.sketch == "direct" else 1)
        return canonical_signs(q @ top), lam.sqrt() * unit[..., 0], energy


def randomized_svd_fp32(matrix: torch.Tensor, count: int | None, test_matrix: TestMatrix | None,
                        oversampling: float = RANDOMIZED_DEFAULTS["rsvd_oversampling"],
                        power_iters: int = RANDOMIZED_DEFAULTS["rsvd_power_iters"],
                        sketch: str = "direct", certify: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading ``count`` singular triplets of ``matrix`` (..., k, l): ``U`` (..., k, count) with
    orthonormal columns and ``S`` (..., count) descending, by the randomized method above.

    ``test_matrix(rows, b)`` draws ``Omega``. When the sketch would span the whole column space
    (``b >= min(k, l)``) or ``count`` is None, randomization buys nothing and the exact Gram path
    (:func:`linalg.svd_gram_fp32`) returns every triplet instead. An all-zero matrix gives all-zero
    ``S``. ``sketch``: ``direct`` or ``gram`` (k <= l only); ``certify``: None or an energy target
    in (0, 1) for the early stop.
    """
    if oversampling < 0 or power_iters < 0:
        raise ValueError(f"oversampling and power_iters must be >= 0, got {oversampling}, {power_iters}")
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    if certify is not None and not 0 < certify < 1:
        raise ValueError(f"certify must be None or in (0, 1), got {certify!r}")
    a = matrix.detach().to(torch.float32)
    k, l = a.shape[-2:]
    if count is None or sketch_width(count, oversampling, a.shape) >= min(k, l):
        return svd_gram_fp32(a)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if sketch == "gram" and k > l:
        raise ValueError(f"sketch='gram' needs k <= l (the Gram matrix of the short side), got {(k, l)}")
    batch = a.shape[:-2]
    if a.dim() > 3:  # one batch dimension below, so that a batch can be split by certificate
        a = a.reshape(-1, k, l)
    op = _Operator(a, sketch)
    b = sketch_width(count, oversampling, a.shape)
    omega = test_matrix(op.test_rows(), b).reshape(*a.shape[:-2], op.test_rows(), b)
    q = orthonormal_basis(op.start(omega))  # (..., k, b)
    half = op.half(q)
    if certify is None:
        u, s = _iterate(op, q, half, power_iters, count)
    else:
        u, s = _certified_or_iterate(op, q, half, power_iters, count, certify)
    return u.reshape(*batch, k, count), s.reshape(*batch, count)


def _certified_or_iterate(op: _Operator, q, half, power_iters: int, count: int, target: float):
    total, captured = op.energies(q, half)
    if not any(certified(total, captured, None, target)):  # the Ritz step would be wasted
        return _iterate(op, q, half, power_iters, count)
    u, s, energy = op.ritz(q, half, count)
    done = certified(total, captured, energy, target)
    if all(done):
        return u, s
    if q.dim() == 2:
        return _iterate(op, q, half, power_iters, count)
    # the uncertified matrices of a batch go on alone, as each would alone
    rest = torch.tensor([i for i, d in enumerate(done) if not d], device=q.device)
    u_rest, s_rest = _iterate(op.pick(rest), q[rest], half[rest], power_iters, count)
    u, s = u.clone(), s.clone()
    u[rest], s[rest] = u_rest, s_rest
    return u, s


def _iterate(op: _Operator, q: torch.Tensor, half: torch.Tensor, power_iters: int, count: int):
    """Steps 2 and 3 from the first orthonormal basis ``q`` and ``op.half(q)``."""
    for i in range(power_iters):
        y = op.power(q, half)  # (..., k, b)
        q = orthonormal_basis(y) if i == power_iters - 1 else lu_basis(y)
        half = op.half(q)
    u, s, _ = op.ritz(q, half, count)
    return u, s


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


def method_options(group: dict, shape: tuple[int, ...] | None = None, count: int | None = None
                   ) -> tuple[str, dict]:
    """``(svd_method, options)`` of ``group``: the randomized method's checked keyword options, none
    for the exact methods. ``auto`` is resolved here, for a left-form gradient of ``shape`` (its
    whole shape, also when sharded) and ``count`` wanted triplets, to ``gram`` or ``randomized``
    with the plan's options (``auto_svd.py``), so that every caller runs one concrete method."""
    method = group.get("svd_method", "svd")
    if method == "auto":
        from .auto_svd import plan  # it prices the randomized method defined here

        if shape is None:
            raise ValueError("svd_method='auto' is resolved per gradient shape; pass shape")
        return plan(shape, count)
    if method != "randomized":
        return method, {}
    oversampling, power_iters = randomized_options(group)
    return method, {"oversampling": oversampling, "power_iters": power_iters}
