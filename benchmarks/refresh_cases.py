"""Weights, spectra and refresh methods for ``bench_refresh.py``.

Shapes are GaLore's LLaMA configs (``subspace_lab.models.MODEL_SHAPES``); per layer: q, k, v, o
(hidden x hidden), gate and up (intermediate x hidden), down (hidden x intermediate). Gradients are
taken in the optimizer's left form (k, l) under GaLore's side rule (the smaller side projected).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from subspace_lab.models import MODEL_SHAPES
from subspace_optim.selectors import SelectionContext, get_selector

VOCAB = 32000  # GaLore's (T5 tokenizer)
GALORE_BATCH_TOKENS = 512 * 256  # GaLore's pretraining batch (App. C.1)


@dataclass(frozen=True)
class WeightShape:
    m: int
    n: int
    per_layer: int

    @property
    def left(self) -> tuple[int, int]:
        return (min(self.m, self.n), max(self.m, self.n))


def model_weights(name: str) -> tuple[list[WeightShape], int, int]:
    """Distinct projected weight shapes in left form (with their count per layer), layers, params."""
    s = MODEL_SHAPES[name]
    # gate and up (intermediate x hidden) and down (hidden x intermediate) share one left form
    # (hidden x intermediate): timed once, on the gate/up orientation, and counted three times
    weights = [WeightShape(s.hidden, s.hidden, 4), WeightShape(s.intermediate, s.hidden, 3)]
    params = s.layers * (4 * s.hidden ** 2 + 3 * s.hidden * s.intermediate) + 2 * VOCAB * s.hidden
    return weights, s.layers, params


def planted(m: int, n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """An (m, n) fp32 matrix with singular values ``spectrum`` and Haar-random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, p, generator=g))[0]
    return (u * spectrum.to(torch.float32)) @ v.T


def stretched(profile: torch.Tensor, size: int) -> torch.Tensor:
    """A measured spectrum ``profile`` (descending) resampled to ``size`` values by relative index."""
    x = (torch.arange(size, dtype=torch.float64) + 0.5) / size * profile.numel() - 0.5
    lo = x.floor().clamp(0, profile.numel() - 1).long()
    hi = (lo + 1).clamp(max=profile.numel() - 1)
    t = (x - lo).clamp(0, 1)
    p = profile.to(torch.float64)
    return ((1 - t) * p[lo] + t * p[hi]).to(torch.float32)


def spectrum_matrix(kind: str, w: WeightShape, seed: int, real_profile: torch.Tensor | None) -> torch.Tensor:
    """A gradient-like (m, n) matrix: ``gaussian`` (i.i.d. normal), ``decay`` (sigma_i ~ 1/i) or
    ``real-profile`` (the normalised spectrum of saved lab gradients, stretched to this size)."""
    p = min(w.m, w.n)
    if kind == "gaussian":
        return torch.randn(w.m, w.n, generator=torch.Generator().manual_seed(seed))
    if kind == "decay":
        return planted(w.m, w.n, 1.0 / torch.arange(1, p + 1, dtype=torch.float32), seed)
    if kind == "real-profile" and real_profile is not None:
        return planted(w.m, w.n, stretched(real_profile, p), seed)
    raise ValueError(f"unknown spectrum {kind!r} (real-profile needs saved gradients)")


def left_form(matrix: torch.Tensor) -> torch.Tensor:
    """GaLore's side rule ("std"): the smaller side projected, ties to the right: G or G^T (a view)."""
    return matrix if matrix.shape[0] < matrix.shape[1] else matrix.T


def ours(selector: str, method: str, **options):
    """A refresh by one of our selectors on the left-form gradient, as the optimizer calls it."""
    sel = get_selector(selector)
    group = {"seed": 0, "svd_method": method, **options}

    def refresh(matrix: torch.Tensor, rank: int) -> torch.Tensor:
        return sel.select(left_form(matrix), None, rank, SelectionContext({}, group, "bench.weight", 0))
    return refresh


def galore_torch():
    """galore-torch's refresh (``GaLoreProjector.get_orthogonal_matrix``, proj_type ``std``), as a
    left-form basis; None when galore-torch is not installed."""
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except Exception:  # not installed (or its bitsandbytes import fails)
        return None

    def refresh(matrix: torch.Tensor, rank: int) -> torch.Tensor:
        projector = GaLoreProjector(rank, proj_type="std")
        if matrix.shape[0] >= matrix.shape[1]:
            return projector.get_orthogonal_matrix(matrix, rank, type="right").T
        return projector.get_orthogonal_matrix(matrix, rank, type="left")
    return refresh


def captured_energy(basis: torch.Tensor, matrix: torch.Tensor) -> float:
    """``||P^T G||_F^2`` of a left-form basis P."""
    return float(((basis.T @ left_form(matrix)) ** 2).sum())


def gemm_rate(seconds: float = 0.5) -> float:
    """Single-thread fp32 matmul throughput (flop/s) of this machine now, for the step-time estimate."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * 1024 ** 3 * count / (time.perf_counter() - t0)


def step_seconds(params: int, rate: float, tokens: int = GALORE_BATCH_TOKENS) -> float:
    """A training step's compute time estimated as ``6 * params * tokens`` flops at ``rate``."""
    return 6 * params * tokens / rate


def fmt_ratio(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1f}x"
