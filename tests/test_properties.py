"""Properties that hold for all inputs, checked with hypothesis over shapes, ranks and gradients
(docs/testing.md): orthonormal bases (S3), the side rule (P1), ``rotate`` = ``keep`` when the basis
does not change (S11). Examples are few and small; the CI profile is derandomized (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import rounding_tolerance, state_equal
from optim_db import OPTIMIZERS
from subspace_optim import SubspaceOptimizer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster

dims = st.integers(1, 9)


def fed_steps(opt, w, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=g)
        opt.step()


@settings(max_examples=40, deadline=None)
@given(info=st.sampled_from(OPTIMIZERS), m=dims, n=dims, rank=st.integers(1, 10), seed=st.integers(0, 99))
def test_s3_basis_is_orthonormal_for_any_shape_and_rank(info, m, n, rank, seed):
    w = nn.Parameter(torch.zeros(m, n))
    opt = info.make([{"params": [("w", w)], "subspace": True}], rank=rank, update_proj_gap=2)
    for _ in range(4):  # across two refreshes (every step for OSD and LDAdam)
        fed_steps(opt, w, 1, seed)
        seed += 1
        basis = opt.state_dict()["state"][0]["projector"]
        k = basis.shape[0]
        assert k in (m, n) and basis.shape[1] == min(rank, k) and basis.dtype == torch.float32
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
        assert torch.isfinite(w).all()


def documented_side_is_left(side: str, m: int, n: int) -> bool:
    """The side rule as docs/testing.md states it (written out here, not imported)."""
    return {"galore": m < n, "ldadam": m <= n, "min_state": m >= n, "left": True, "right": False}[side]


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), side=st.sampled_from(["galore", "ldadam", "min_state", "left", "right"]),
       data=st.data())
def test_p1_update_lies_on_the_documented_side(m, n, side, data):
    """First step of the dominant selector from zero weights: a left projection's update lies in the
    span of the gradient's top-r left singular vectors, a right one's rows in the top-r right ones."""
    rank = data.draw(st.integers(1, min(m, n) - 1), label="rank")
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 10 + n))
    w = nn.Parameter(torch.zeros(m, n))
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=rank, side=side, lr=1e-2)
    w.grad = grad
    opt.step()
    update = w.detach()
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    u, v = u[:, :rank], vh[:rank].T
    tol = rounding_tolerance(update, ulps=64)
    in_columns = bool((update - u @ (u.T @ update)).abs().max() <= tol)
    in_rows = bool((update - (update @ v) @ v.T).abs().max() <= tol)
    left = documented_side_is_left(side, m, n)
    assert in_columns if left else in_rows


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, rank=st.integers(1, 10), gap=st.integers(1, 3), steps=st.integers(1, 6),
       inner=st.sampled_from(["adam", "lion", "sgd"]), seed=st.integers(0, 99))
def test_s11_rotate_is_keep_when_the_basis_does_not_change(m, n, rank, gap, steps, inner, seed):
    """The coordinate selector returns the same basis at every refresh: then ``rotate`` must leave
    the inner state exactly as ``keep`` does, bitwise, whatever the shapes and the inner rule."""
    runs = []
    for transition in ("keep", "rotate"):
        w = nn.Parameter(torch.zeros(m, n))
        opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=rank, update_proj_gap=gap,
                                selector="coordinate", transition=transition, inner=inner, lr=1e-2)
        fed_steps(opt, w, steps, seed)
        runs.append((w.detach().clone(), opt.state_dict()))
    (w_keep, sd_keep), (w_rotate, sd_rotate) = runs
    assert torch.equal(w_keep, w_rotate)
    for group in (*sd_keep["param_groups"], *sd_rotate["param_groups"]):
        group.pop("transition")
    assert state_equal(sd_keep, sd_rotate)
