"""The projected update, pinned exactly through the public API (docs/testing.md, "Pinned update"):
which side is projected (P1), what ``scale`` multiplies (P2), and Adam's first step after a ``reset``
(P3). Each check has a closed form: with eps = 0, Adam's first step is ``sign`` of its gradient, so
GaLore's first update is ``-lr * scale * P sign(P^T G)`` with P the top-r singular vectors of G.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import rounding_tolerance
from optim_db import OPTIMIZERS
from subspace_optim import GaLoreAdamW, LDAdamW, SubspaceOptimizer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster


def top_singular_vectors(grad: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r (m, r) and V_r (n, r) of ``grad``, by our own SVD."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[:, :r], vh[:r].T


def first_galore_update(grad: torch.Tensor, r: int, lr: float, scale: float, left: bool) -> torch.Tensor:
    """``-lr * scale * P sign(P^T G)`` in the weight's layout; invariant to the signs of P's columns."""
    u, v = top_singular_vectors(grad, r)
    if left:
        return -lr * scale * u @ torch.sign(u.T @ grad)
    return -lr * scale * (v @ torch.sign(v.T @ grad.T)).T


def one_step_update(opt_cls, grad, **kwargs) -> torch.Tensor:
    w = nn.Parameter(torch.zeros(grad.shape))  # from zero, the update is the new weight, unrounded
    opt = opt_cls([{"params": [w], "subspace": True}], **kwargs)
    w.grad = grad.clone()
    opt.step()
    return w.detach().clone()


def assert_update_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=rounding_tolerance(expected))


# ---------------------------------------------------------------------------------------- P1
@pytest.mark.parametrize("opt_cls,side,left", [
    (GaLoreAdamW, None, False),  # GaLore's rule: a square matrix is projected on the right
    (SubspaceOptimizer, "galore", False),
    (SubspaceOptimizer, "ldadam", True),
    (SubspaceOptimizer, "min_state", True),
    (SubspaceOptimizer, "left", True),
    (SubspaceOptimizer, "right", False),
    (LDAdamW, None, True),  # LDAdam's code: square goes left
])
def test_p1_side_of_a_square_matrix(opt_cls, side, left):
    torch.manual_seed(0)
    grad = torch.randn(7, 7)
    kwargs = dict(rank=2, lr=1e-2, eps=0.0, scale=1.0)
    if side is not None:
        kwargs["side"] = side
    update = one_step_update(opt_cls, grad, **kwargs)
    u, v = top_singular_vectors(grad, 2)
    in_columns = (update - u @ (u.T @ update)).abs().max() <= rounding_tolerance(update)
    in_rows = (update - (update @ v) @ v.T).abs().max() <= rounding_tolerance(update)
    assert (in_columns, in_rows) == (left, not left)
    # LDAdam too: its first basis is the SVD's, its error buffer starts at zero, and Adam's first
    # step is a sign whatever the betas
    assert_update_close(update, first_galore_update(grad, 2, 1e-2, 1.0, left))


@pytest.mark.parametrize("shape,left", [((5, 9), True), ((9, 5), False)])
def test_p1_galore_projects_the_smaller_dimension(shape, left):
    torch.manual_seed(1)
    grad = torch.randn(shape)
    update = one_step_update(GaLoreAdamW, grad, rank=2, lr=1e-2, eps=0.0, scale=1.0)
    assert_update_close(update, first_galore_update(grad, 2, 1e-2, 1.0, left))


# ---------------------------------------------------------------------------------------- P2
def test_p2_first_update_is_scaled():
    torch.manual_seed(2)
    grad = torch.randn(6, 10)
    update = one_step_update(GaLoreAdamW, grad, rank=2, lr=1e-2, eps=0.0, scale=0.25)
    assert_update_close(update, first_galore_update(grad, 2, 1e-2, 0.25, left=True))


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.inner != "lion"], ids=lambda i: i.name)
def test_p2_scale_multiplies_every_projected_update(info):
    """With the gradients given, nothing but the update depends on ``scale`` (not the bases, the
    moments or the error buffer): the weight's path at scale 0.3 is 0.3 times the path at scale 1,
    across refreshes (gap 3). Lion takes a sign after back-projection, so scale has no effect there
    (tests/test_inner_rules.py)."""
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(6, 10, generator=g) for _ in range(7)]
    paths = {}
    for scale in (1.0, 0.3):
        w = nn.Parameter(torch.zeros(6, 10))
        opt = info.make([{"params": [("w", w)], "subspace": True}], scale=scale, weight_decay=0.0)
        path = []
        for grad in grads:
            w.grad = grad.clone()
            opt.step()
            path.append(w.detach().clone())
        paths[scale] = torch.stack(path)
    assert paths[1.0].abs().max() > 0
    torch.testing.assert_close(paths[0.3], 0.3 * paths[1.0], rtol=1e-5, atol=rounding_tolerance(paths[1.0]))


# ---------------------------------------------------------------------------------------- P3
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_p3_adam_restarts_its_bias_correction_after_reset(scale):
    """After a ``reset`` refresh the inner Adam starts afresh: its first step in the new subspace is
    ``-lr * scale * P sign(P^T G)`` (eps = 0), as at a parameter's very first step. A bias correction
    counted from the parameter's first step instead would shrink it to 0.58 of that at step 4."""
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(6, 10, generator=g) for _ in range(4)]
    w = nn.Parameter(torch.zeros(6, 10))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=1e-2, eps=0.0, scale=scale,
                      transition="reset")
    for grad in grads[:3]:
        w.grad = grad.clone()
        opt.step()
    before = w.detach().clone()
    w.grad = grads[3].clone()
    opt.step()  # refreshes (3 steps done, gap 3), then steps
    expected = first_galore_update(grads[3], 2, 1e-2, scale, left=True)
    torch.testing.assert_close(w.detach() - before, expected, rtol=1e-5,
                               atol=rounding_tolerance(before, expected))
