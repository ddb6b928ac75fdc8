"""galore-torch compatibility: its arguments, its two-sided projection and its arithmetic.

``galore_torch_step`` below re-implements galore-torch 1.0's ``GaLoreAdamW.step`` (transformers'
AdamW arithmetic around ``GaLoreProjector``) for one weight, so that the comparison runs without
the package. By default its singular-vector signs are canonicalised (ours, the documented deviation);
with ``lapack_signs=True`` it keeps LAPACK's, exactly as galore-torch (``svd_method="lapack"``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import TinyNet, assert_resumes_identically, batches, groups_for
from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer
from subspace_optim.linalg import canonical_signs


class GaLoreTorchReference:
    """One weight trained by galore-torch's GaLoreAdamW (proj_type std/full). Signs canonicalised,
    or with ``lapack_signs`` LAPACK's as galore-torch keeps them: ``torch.linalg.svd`` of G (m, n) as
    stored, ``U[:, :r]`` for m < n, ``Vh[:r, :]`` for m >= n, both for ``full``."""

    def __init__(self, w, rank, gap, scale, proj_type, lr, betas, eps, wd, lapack_signs=False):
        self.w, self.rank, self.gap, self.scale, self.proj_type = w.clone(), rank, gap, scale, proj_type
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, wd
        self.lapack_signs = lapack_signs
        self.step_count, self.ortho, self.m, self.v = 0, None, None, None

    def _svd(self, g):
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        if self.lapack_signs:
            return u, vh
        u = canonical_signs(u)
        vt = canonical_signs(vh.T)
        return u, vt.T

    def project(self, g):
        right = self.proj_type == "std" and g.shape[0] >= g.shape[1]
        if self.ortho is None or self.step_count % self.gap == 0:
            u, vh = self._svd(g)
            if self.proj_type == "full":
                self.ortho = (u[:, :self.rank], vh[:self.rank, :])
            else:
                self.ortho = vh[:self.rank, :] if right else u[:, :self.rank]
        if self.proj_type == "full":
            return self.ortho[0].T @ g @ self.ortho[1].T
        return g @ self.ortho.T if right else self.ortho.T @ g

    def project_back(self, n):
        if self.proj_type == "full":
            full = self.ortho[0] @ n @ self.ortho[1]
        elif n.shape[0] >= n.shape[1]:
            full = n @ self.ortho
        else:
            full = self.ortho @ n
        return full * self.scale

    def step(self, grad):
        g = self.project(grad)
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        b1, b2 = self.betas
        self.step_count += 1
        self.m.mul_(b1).add_(g, alpha=1.0 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = self.v.sqrt().add_(self.eps)
        step_size = self.lr * math.sqrt(1.0 - b2**self.step_count) / (1.0 - b1**self.step_count)
        self.w.add_(self.project_back(self.m / denom), alpha=-step_size)
        if self.wd > 0:
            self.w.add_(self.w, alpha=-self.lr * self.wd)


def _hyperparameters(proj_type):
    # Two-sided: at a refresh step P^T G Q is diagonal up to rounding noise (~1e-8), which Adam
    # normalises to O(noise / eps); a larger eps keeps that noise out of the comparison.
    return dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6 if proj_type == "std" else 1e-3, wd=0.1)


def _ours(w, proj_type, hp, **kwargs):
    return GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type}],
                       lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"], inner="adamw_hf",
                       **kwargs)


def _trajectories(shape, proj_type, lapack_signs, seed=0, **kwargs):
    """Yield (ours, reference) weights after each of 12 steps, refreshes every 4 (rank 3), on the
    same random gradients; ours is ``GaLoreAdamW(..., inner="adamw_hf", **kwargs)``."""
    torch.manual_seed(seed)
    w = nn.Parameter(torch.randn(*shape))
    hp = _hyperparameters(proj_type)
    ref = GaLoreTorchReference(w.detach(), rank=3, gap=4, scale=0.25, proj_type=proj_type,
                               lapack_signs=lapack_signs, **hp)
    opt = _ours(w, proj_type, hp, **kwargs)
    for _ in range(12):
        g = torch.randn(*shape)
        w.grad = g.clone()
        opt.step()
        ref.step(g)
        yield w.detach().clone(), ref.w.clone()


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_adamw_hf_inner_reproduces_galore_torch_up_to_signs(shape, proj_type):
    for ours, ref in _trajectories(shape, proj_type, lapack_signs=False):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_svd_method_lapack_reproduces_galore_torch_exactly(shape, proj_type):
    """``svd_method="lapack"``: galore-torch's SVD of G as stored with LAPACK's signs, also for right
    projections (whose left form is G^T: LAPACK's signs of svd(G^T) are not those of svd(G))."""
    for ours, ref in _trajectories(shape, proj_type, lapack_signs=True, svd_method="lapack"):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_canonical_signs_leave_galore_torchs_trajectory_after_a_refresh(shape, proj_type):
    """The option matters: with our default (canonical) signs the run leaves the LAPACK-sign one
    after a refresh whose sign flips differ from the previous basis' (``keep`` carries moments whose
    vectors flipped), and agrees before the first refresh (one basis' overall signs cancel)."""
    pairs = list(_trajectories(shape, proj_type, lapack_signs=True))
    for ours, ref in pairs[:4]:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    gap = max((ours - ref).abs().max().item() for ours, ref in pairs)
    assert gap > 1e-4, gap


def test_svd_method_lapack_keeps_lapacks_signs_of_the_gradient_as_stored():
    from subspace_optim.linalg import SVD_METHODS, svd_lapack_fp32

    torch.manual_seed(0)
    g = torch.randn(10, 6)  # a right projection: the selector's left form is g^T
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    uu, ss = SVD_METHODS["lapack"](g.T, 3, None, transposed=True)
    assert torch.equal(uu, vh.T) and torch.equal(ss, s)
    uu, ss = svd_lapack_fp32(g)
    assert torch.equal(uu, u) and torch.equal(ss, s)
    w = nn.Parameter(torch.zeros(10, 6))
    w.grad = g.clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 4}], svd_method="lapack")
    opt.step()
    assert torch.equal(opt.state[w]["projector"], vh[:3].T)


def test_svd_method_lapack_refuses_batch_refresh():
    w = nn.Parameter(torch.zeros(6, 10))
    with pytest.raises(ValueError, match="svd_method='lapack'"):
        GaLoreAdamW([{"params": [w], "rank": 3}], svd_method="lapack", batch_refresh=True)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_svd_method_lapack_matches_the_real_galore_torch(shape, proj_type):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(*shape))
    theirs_w = nn.Parameter(w.detach().clone())
    hp = _hyperparameters(proj_type)
    opt = _ours(w, proj_type, hp, svd_method="lapack")
    theirs = galore_torch.GaLoreAdamW(
        [{"params": [theirs_w], "rank": 3, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type}],
        lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"])
    for _ in range(12):
        g = torch.randn(*shape)
        w.grad, theirs_w.grad = g.clone(), g.clone()
        opt.step()
        theirs.step()
        torch.testing.assert_close(w.detach(), theirs_w.detach(), rtol=1e-5, atol=1e-6)


def test_two_sided_state_is_r_by_r_and_the_update_is_P_N_Q():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = SubspaceOptimizer([{"params": [w], "rank": 2, "proj_type": "full"}], lr=0.1, scale=1.0, inner="sgd",
                            momentum=0.0)
    g = torch.randn(6, 10)
    before = w.detach().clone()
    w.grad = g
    opt.step()
    state = opt.state[w]
    P, Q = state["projector"], state["projector_right"]
    assert P.shape == (6, 2) and Q.shape == (10, 2) and state["momentum_buffer"].shape == (2, 2)
    torch.testing.assert_close(w.detach() - before, -0.1 * P @ (P.T @ g @ Q) @ Q.T, rtol=1e-5, atol=1e-7)
    # Q spans the top right singular vectors of g
    _, _, vh = torch.linalg.svd(g)
    torch.testing.assert_close((Q.T @ vh[:2].T).abs().det().abs(), torch.tensor(1.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [3, 4])
def test_two_sided_i3s_resumes_bitwise(k):
    assert_resumes_identically(
        lambda m: I3SAdamW(groups_for(m, rank=2, update_proj_gap=3, proj_type="full"), lr=1e-2),
        batches(7), k, via_file=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(selector="online_pca"), "selector"), (dict(selector="power"), "selector"),
    (dict(transition="rotate"), "transition"), (dict(error_feedback=True), "error_feedback")])
def test_two_sided_rejects_what_it_does_not_support(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceOptimizer(groups_for(TinyNet(), rank=2, proj_type="full"), **kwargs)


@pytest.mark.filterwarnings("ignore:.*no parameter group is projected")
def test_adamw_hf_dense_is_transformers_adamw():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(7))
    ref = w.detach().clone()
    m, v = torch.zeros(7), torch.zeros(7)
    opt = SubspaceOptimizer([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, inner="adamw_hf")
    for t in range(1, 5):
        g = torch.randn(7)
        w.grad = g.clone()
        opt.step()
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.99).addcmul_(g, g, value=0.01)
        ref.addcdiv_(m, v.sqrt().add_(1e-6), value=-1e-2 * math.sqrt(1 - 0.99**t) / (1 - 0.9**t))
        ref.add_(ref, alpha=-1e-2 * 0.1)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-6, atol=1e-7)
