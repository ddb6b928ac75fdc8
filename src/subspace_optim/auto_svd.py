"""``svd_method="auto"``: per weight shape, the cheapest factorisation that reaches the energy target.

For a left-form shape (k, l) and ``count`` wanted triplets, :func:`plan` prices every candidate by
a fixed cost model and takes the cheapest one that qualifies:

- ``gram`` (exact: ``eigh`` of ``A A^T``), which always qualifies; it is also the plan when the
  whole spectrum is needed (``count`` None, e.g. I3S's exact law);
- the randomized method (``randomized.py``) with oversampling 0.5 or 1, a ``direct`` or ``gram``
  sketch, and the fewest power iterations whose *predicted* captured energy on an i.i.d. Gaussian
  matrix of that shape (the flattest spectrum we plan for) reaches ``TARGET`` of the exact
  top-``count`` energy, run with ``certify=TARGET`` so that a steeply decaying gradient stops after
  one sketch.

The plan depends on (k, l, count) only: every rank, every resumed run and every weight of that
shape takes the same method, and its result is bitwise that method's (tested).

Energy model: the singular values ``sigma_j`` of a Gaussian k x l matrix are the quantiles of the
Marchenko-Pastur law; a filter of degree d (``2 q + 1`` direct, ``2 q + 2`` gram) weighs direction
j by ``lambda_j = sigma_j^(2 d)``, and a Gaussian sketch of width b captures the fraction
``c_j = lambda_j / (lambda_j + mu)`` of it, with ``mu`` set by ``sum_j c_j = b`` (the sketch's
dimension). The prediction ``sum_{j<=r} sigma_j^2 c_j / sum_{j<=r} sigma_j^2`` ignores the energy a
Ritz vector picks up from directions past r, so it errs low: on Gaussian matrices its deficit was
1.5-6x the measured one for every shape, rank and iteration count tried (``MODEL_SLACK``).

Cost model: flops, with the slower LAPACK routines weighted by their measured speed relative to a
matmul on one CPU thread (``eigh`` of n x n: 12 n^3; QR of k x b: 9 k b^2; LU: 2.5 k b^2).
"""

from __future__ import annotations

import functools
import math

from .randomized import sketch_width

TARGET = 0.99  # captured energy relative to the exact top-r subspace's
# The model overstates the energy deficit: measured / predicted deficit was 0.17-0.67 on Gaussian
# matrices (k = 384-2048, aspect 1/8-1, rank k/16-k/2, oversampling 0.5 and 1, 0-6 iterations),
# so a plan qualifies when its predicted deficit is at most (1 - TARGET) / MODEL_SLACK.
MODEL_SLACK = 0.7
OVERSAMPLINGS = (0.5, 1.0)
MAX_POWER_ITERS = 8
EIGH, QR, LU = 12.0, 9.0, 2.5  # matmul-equivalent flops per n^3 / k b^2 (one CPU thread, measured)
SYMMETRIC_GRAM = 1.3  # sketch_ops.symmetric_gram: k^2 l flops at ~0.77 of a matmul's speed
CALL = 3e6  # a torch call's fixed cost (~30 us), which decides for small matrices
_GRID = 4000  # points of the Marchenko-Pastur quantile integral


@functools.lru_cache(maxsize=64)
def gaussian_spectrum(k: int, l: int) -> tuple[float, ...]:
    """Singular values (descending, up to scale) of a Gaussian k x l matrix: Marchenko-Pastur
    quantiles at ``(j - 1/2) / min(k, l)``."""
    n, alpha = min(k, l), min(k, l) / max(k, l)
    lo, hi = (1 - math.sqrt(alpha)) ** 2, (1 + math.sqrt(alpha)) ** 2
    # x = lo + (hi - lo)(1 - cos t)/2 removes the square-root edges: density dx ~ sin(t)^2 / x dt
    xs = [lo + (hi - lo) * (1 - math.cos(math.pi * i / _GRID)) / 2 for i in range(_GRID + 1)]
    edge = 4 / (hi - lo) if lo == 0 else 0.0  # the limit at t = 0 (square: x ~ hi t^2 / 4)
    dens = [edge] + [math.sin(math.pi * i / _GRID) ** 2 / xs[i] for i in range(1, _GRID + 1)]
    cdf = [0.0]
    for i in range(1, _GRID + 1):
        cdf.append(cdf[-1] + (dens[i] + dens[i - 1]) / 2)
    values, i = [], 0
    for j in range(n):  # the j-th largest: the (1 - (j + 1/2) / n) quantile
        target = (1 - (j + 0.5) / n) * cdf[-1]
        while i < _GRID - 1 and cdf[i + 1] < target:
            i += 1
        while i > 0 and cdf[i] > target:
            i -= 1
        t = (target - cdf[i]) / (cdf[i + 1] - cdf[i]) if cdf[i + 1] > cdf[i] else 0.0
        values.append(math.sqrt(max(xs[i] + t * (xs[i + 1] - xs[i]), 0.0)))
    return tuple(values)


def predicted_energy(spectrum: tuple[float, ...], count: int, width: int, degree: int) -> float:
    """The model's captured energy (relative to the exact top-``count``) of a width-``width``
    sketch filtered by ``sigma^degree`` (module docstring)."""
    top = spectrum[0]
    lam = [(s / top) ** (2 * degree) for s in spectrum]
    lo, hi = 1e-300, 1e300
    for _ in range(200):  # bisection on log(mu): sum_j c_j = width
        mu = math.sqrt(lo * hi)
        if sum(x / (x + mu) for x in lam) > width:
            lo = mu
        else:
            hi = mu
    kept = sum(s * s * x / (x + mu) for s, x in zip(spectrum[:count], lam[:count]))
    return kept / sum(s * s for s in spectrum[:count])


def gram_cost(k: int, l: int) -> float:
    """``svd_gram_fp32``: one k x k x l matmul and ``eigh(k)``; for k > l it is the SVD's
    (bidiagonalisation ~ 4 k l^2, then the small problem)."""
    if k > l:
        return 4.0 * k * l * l + 2 * EIGH * l ** 3 + 4 * CALL
    return 2.0 * k * k * l + EIGH * k ** 3 + 6 * CALL


def randomized_cost(k: int, l: int, count: int, width: int, power_iters: int, sketch: str) -> float:
    """The randomized method's flops, uncertified (every power iteration run)."""
    b, q = width, power_iters
    cost = QR * k * b * b + max(q - 1, 0) * LU * k * b * b + (QR * k * b * b if q else 0)
    cost += EIGH * b ** 3 + 2.0 * k * b * count + (14 + 4 * q) * CALL  # Ritz eigh, U = Q W, calls
    if sketch == "direct":
        return cost + (2 * q + 2) * 2.0 * k * l * b + 2.0 * b * b * l
    return cost + SYMMETRIC_GRAM * k * k * l + (q + 2) * 2.0 * k * k * b + 2.0 * k * b * b


@functools.lru_cache(maxsize=256)
def _plan(k: int, l: int, count: int | None) -> tuple[str, tuple]:
    if count is None:
        return "gram", ()
    best = (gram_cost(k, l), "gram", ())
    spectrum = gaussian_spectrum(k, l)
    for oversampling in OVERSAMPLINGS:
        width = sketch_width(count, oversampling, (k, l))
        if width >= min(k, l):  # the randomized method would run the exact gram path
            continue
        for sketch in ("direct", "gram") if k <= l else ("direct",):
            for q in range(MAX_POWER_ITERS + 1):
                degree = 2 * q + (1 if sketch == "direct" else 2)
                if 1 - predicted_energy(spectrum, count, width, degree) <= (1 - TARGET) / MODEL_SLACK:
                    cost = randomized_cost(k, l, count, width, q, sketch)
                    if cost < best[0]:
                        best = (cost, "randomized", (("oversampling", oversampling), ("power_iters", q),
                                                     ("sketch", sketch), ("certify", TARGET)))
                    break
    return best[1], best[2]


def plan(shape: tuple[int, ...], count: int | None) -> tuple[str, dict]:
    """``(method, options)`` for a left-form gradient of ``shape`` (..., k, l): ``("gram", {})`` or
    ``("randomized", {oversampling, power_iters, sketch, certify})``."""
    method, options = _plan(int(shape[-2]), int(shape[-1]), None if count is None else int(count))
    return method, dict(options)


def auto_svd_fp32(matrix, count=None, test_matrix=None):
    """``svd_method="auto"`` as a function of the :data:`linalg.SVD_METHODS` signature."""
    from .linalg import SVD_METHODS

    method, options = plan(tuple(matrix.shape), count)
    return SVD_METHODS[method](matrix, count, test_matrix, **options)
