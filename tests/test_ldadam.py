"""LDAdamW: power selector, rotate transition and generalised error feedback (S13), against a plain
re-implementation of the official code's step (arXiv 2410.16103, IST-DASLab/LDAdam)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, assert_resumes_identically, batches, groups_for, state_equal, train
from subspace_optim import LDAdamW, SubspaceOptimizer
from subspace_optim.linalg import orthonormalize, svd_fp32


def ldadam_reference(w0, grads, lr=1e-2, betas=(0.908, 0.99), eps=1e-8, rank=2, rho=0.908):
    """LDAdam for a left-projected (m <= n) matrix, one official-code step per gradient, in fp32:
    error-corrected gradient, power-iteration basis, rotated moments, error buffer, Adam update."""
    b1, b2 = betas
    w, xi, P, m, v, k = w0.clone(), torch.zeros_like(w0), None, None, None, 0
    for g in grads:
        a = g + xi
        if P is None:
            P_new = svd_fp32(a)[0][:, :rank]
        else:
            b = rho * (P @ (m / (1 - b1**k))) + (1 - rho) * a
            P_new = orthonormalize(b @ (b.T @ P))
        low = P_new.T @ a
        xi = a - P_new @ low
        if P is None:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        else:
            c1, c2 = 1 - b1**k, 1 - b2**k
            C = P_new.T @ P
            m_rot = C @ m
            xi = xi + b1 / (1 - b1) * (P @ m - P_new @ m_rot)
            v = c2 * ((C * C) @ (v / c2 - m**2 / c1**2) + m_rot**2 / c1**2).abs()
            m = m_rot
        k += 1
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low**2
        step = (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        w = w - lr * P_new @ step
        P = P_new
    return w, xi, P


@pytest.mark.parametrize("shape", [(6, 10), (7, 7)])  # wide, and square (LDAdam's side rule: left)
def test_matches_reference_implementation(shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    grads = [torch.randn(shape) + 2 * torch.outer(torch.randn(shape[0]), torch.randn(shape[1]))
             for _ in range(12)]
    opt = LDAdamW([{"params": [w], "subspace": True}], lr=1e-2, rank=2)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    w_ref, xi_ref, P_ref = ldadam_reference(w0, grads)
    st = opt.state[w]
    assert st["project_left"]
    torch.testing.assert_close(st["projector"], P_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st["error_buffer"], xi_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.detach(), w_ref, rtol=1e-5, atol=1e-6)


def test_defaults_are_the_official_codes():
    opt = LDAdamW(groups_for(TinyNet()))
    g = opt.param_groups[-1]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["rank"], g["rho"]) == (
        1e-3, (0.908, 0.99), 1e-8, 0.0, 16, 0.908)
    assert (g["side"], g["scale"], g["selector"], g["transition"], g["error_feedback"]) == (
        "ldadam", 1.0, "power", "rotate", True)
    with pytest.raises(ValueError, match="selector"):
        LDAdamW(groups_for(TinyNet()), selector="dominant")


@pytest.mark.parametrize("selector", ["power", "dominant", "online_pca"])
def test_error_feedback_conservation(selector):
    """S13 with SGD (momentum 0, so no state term): sum of applied updates + final buffer equals the
    sum of the full-rank gradients, whatever the selector."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 12))
    w0 = w.detach().clone()
    lr = 0.05
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], lr=lr, rank=2, update_proj_gap=3,
                            selector=selector, inner="sgd", momentum=0.0, error_feedback=True)
    total = torch.zeros_like(w0)
    for _ in range(15):
        g = torch.randn(8, 12)
        total += g
        w.grad = g.clone()
        opt.step()
        assert torch.equal(w.grad, g)  # the buffer is not kept in p.grad
    applied = (w0 - w.detach()) / lr
    buffer = opt.state[w]["error_buffer"]
    assert buffer.abs().max() > 0.1  # something was really lost and kept
    torch.testing.assert_close(applied + buffer, total, rtol=1e-5, atol=1e-4)


def test_error_buffer_is_not_touched_by_gradient_clipping_or_zero_grad():
    model = TinyNet()
    opt = LDAdamW(groups_for(model), rank=2, lr=1e-2)
    train(model, opt, batches(3))
    buffers = {p: opt.state[p]["error_buffer"].clone() for p in (model.up.weight, model.down.weight)}
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-6)
    opt.zero_grad()
    for p, b in buffers.items():
        assert torch.equal(opt.state[p]["error_buffer"], b)
        assert p.grad is None


@pytest.mark.parametrize("via_file", [False, True])
def test_resume_is_bit_identical_including_error_buffer(via_file):
    assert_resumes_identically(lambda m: LDAdamW(groups_for(m), rank=2, lr=1e-2), batches(10), 4, via_file)


def test_error_buffer_stays_fp32_with_bf16_params_after_load():
    model = TinyNet(dtype=torch.bfloat16)
    opt = LDAdamW(groups_for(model), rank=2, lr=1e-2)
    train(model, opt, batches(3, dtype=torch.bfloat16))
    model2 = copy.deepcopy(model)
    opt2 = LDAdamW(groups_for(model2), rank=2, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in (model2.up.weight, model2.down.weight):
        st = opt2.state[p]
        assert st["error_buffer"].dtype == torch.float32 and st["error_buffer"].shape == p.shape
        assert st["projector"].dtype == torch.float32
        assert st["exp_avg"].dtype == torch.bfloat16
    assert state_equal(opt.state_dict(), opt2.state_dict())


def test_power_basis_is_orthonormal_and_moves_every_step():
    model = TinyNet()
    opt = LDAdamW(groups_for(model), rank=2, lr=1e-2)
    previous = None
    for batch in batches(5):
        train(model, opt, [batch])
        P = opt.state[model.up.weight]["projector"]
        torch.testing.assert_close(P.T @ P, torch.eye(2), atol=1e-5, rtol=0)
        assert previous is None or not torch.equal(P, previous)
        previous = P.clone()
    assert opt.state[model.up.weight]["refresh_count"] == 5


@pytest.mark.parametrize("rho", [-0.1, 1.5])
def test_rho_range_checked(rho):
    with pytest.raises(ValueError, match="rho"):
        LDAdamW(groups_for(TinyNet()), rho=rho)


def test_error_feedback_flag_checked():
    with pytest.raises(ValueError, match="error_feedback"):
        SubspaceOptimizer(groups_for(TinyNet()), error_feedback=1)


def test_zero_gradient_keeps_everything_finite():
    w = nn.Parameter(torch.randn(5, 8))
    opt = LDAdamW([{"params": [w], "subspace": True}], rank=2)
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
    st = opt.state[w]
    assert torch.isfinite(st["projector"]).all() and not st["error_buffer"].any()


@pytest.mark.parametrize("inner,key,unit", [
    ("adam", "exp_avg", lambda k: 1 / (1 - 0.8**k)),  # m / (1 - beta1^k)
    ("lion", "exp_avg", lambda k: 1 / (1 - 0.9**k)),  # m / (1 - beta2^k): Lion's m uses beta2
    ("sgd", "momentum_buffer", lambda k: (1 - 0.5) / (1 - 0.5**k)),  # b (1 - mu) / (1 - mu^k)
])
def test_power_selector_reads_each_inner_rules_momentum_in_gradient_units(inner, key, unit):
    """One block power iteration on b = rho P m_hat + (1 - rho) G, m_hat the inner rule's momentum as
    a weighted mean of past gradients; checked at the third step (k = 2 steps done)."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 10, generator=g) for _ in range(3)]
    w = nn.Parameter(torch.zeros(6, 10))
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=2, selector="power", inner=inner,
                            betas=(0.8, 0.9), momentum=0.5, rho=0.7, lr=1e-2)
    for grad in grads[:2]:
        w.grad = grad.clone()
        opt.step()
    P, m = opt.state[w]["projector"].clone(), opt.state[w][key].float().clone()
    w.grad = grads[2].clone()
    opt.step()
    b = 0.7 * (P @ (m * unit(2))) + 0.3 * grads[2]
    torch.testing.assert_close(opt.state[w]["projector"], orthonormalize(b @ (b.T @ P)), atol=1e-5, rtol=0)
