"""Inner rules beyond Adam: Lion and SGD with momentum, dense and in every subspace (inner.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, batches, groups_for, train
from subspace_optim import GaLoreAdamW, SubspaceOptimizer

SELECTORS = ["dominant", "importance", "random", "online_pca", "power"]


@pytest.mark.filterwarnings("ignore:.*no parameter group is projected")
def test_sgd_dense_equals_torch_sgd_bitwise():
    m1, m2 = TinyNet(), TinyNet()
    ours = SubspaceOptimizer(m1.parameters(), lr=3e-2, inner="sgd", momentum=0.8)
    ref = torch.optim.SGD(m2.parameters(), lr=3e-2, momentum=0.8, foreach=False)
    data = batches(8)
    train(m1, ours, data)
    train(m2, ref, data)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def lion_reference(params, grads_per_step, lr, betas, wd):
    """Lion (arXiv 2302.06675, Alg. 2), written out for a list of tensors."""
    params = [p.clone() for p in params]
    moms = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, m, g in zip(params, moms, grads):
            c = m * betas[0] + g * (1 - betas[0])
            p.mul_(1 - lr * wd).add_(c.sign(), alpha=-lr)
            m.mul_(betas[1]).add_(g, alpha=1 - betas[1])
    return params


@pytest.mark.filterwarnings("ignore:.*no parameter group is projected")
def test_lion_dense_matches_reference():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    start = w.detach().clone()
    grads = [[torch.randn(4, 3)] for _ in range(6)]
    opt = SubspaceOptimizer([w], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, inner="lion")
    for (g,) in grads:
        w.grad = g.clone()
        opt.step()
    (expected,) = lion_reference([start], grads, 1e-2, (0.9, 0.99), 0.1)
    assert torch.equal(w.detach(), expected)


def test_lion_sign_taken_after_backprojection_so_scale_is_irrelevant():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    w_scaled = nn.Parameter(w.detach().clone())
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2, inner="lion", scale=0.25)
    opt_scaled = GaLoreAdamW([{"params": [w_scaled], "rank": 2}], lr=1e-2, inner="lion", scale=3.0)
    for _ in range(4):
        g = torch.randn(6, 10)
        before = w.detach().clone()
        w.grad, w_scaled.grad = g.clone(), g.clone()
        opt.step()
        opt_scaled.step()
        delta = (w.detach() - before).abs()
        # a full-rank sign pattern: every entry moves by lr, whatever the rank-2 subspace
        torch.testing.assert_close(delta, torch.full_like(delta, 1e-2), rtol=1e-4, atol=0)
    assert torch.equal(w, w_scaled)


@pytest.mark.parametrize("inner", ["lion", "sgd"])
@pytest.mark.parametrize("selector", SELECTORS)
def test_every_inner_rule_with_every_selector(inner, selector):
    model = TinyNet()
    opt = SubspaceOptimizer(groups_for(model, rank=2, update_proj_gap=3), lr=1e-2, selector=selector,
                            inner=inner, momentum=0.5)
    data = batches(1) * 25
    losses = train(model, opt, data)
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("inner", ["lion", "sgd"])
def test_bf16_state_dtype_and_resume(inner):
    model = TinyNet(dtype=torch.bfloat16)
    opt = GaLoreAdamW(groups_for(model, rank=2, update_proj_gap=2), lr=1e-2, inner=inner)
    data = batches(6, dtype=torch.bfloat16)
    train(model, opt, data[:3])
    model2 = copy.deepcopy(model)
    opt2 = GaLoreAdamW(groups_for(model2, rank=2, update_proj_gap=2), lr=1e-2, inner=inner)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    key = "exp_avg" if inner == "lion" else "momentum_buffer"
    assert opt2.state[model2.up.weight][key].dtype == torch.bfloat16
    train(model, opt, data[3:])
    train(model2, opt2, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("momentum", [-0.1, 1.0, float("nan"), "0.9"])
def test_momentum_range_checked(momentum):
    with pytest.raises(ValueError, match="momentum"):
        SubspaceOptimizer(groups_for(TinyNet()), inner="sgd", momentum=momentum)


def test_unknown_inner_rule_rejected():
    with pytest.raises(ValueError, match="inner"):
        SubspaceOptimizer(groups_for(TinyNet()), inner="adafactor")


def test_sgd_zero_momentum_is_plain_projected_sgd():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=0.1, scale=1.0, inner="sgd", momentum=0.0)
    for _ in range(3):
        g = torch.randn(6, 10)
        before = w.detach().clone()
        w.grad = g
        opt.step()
        P = opt.state[w]["projector"]
        torch.testing.assert_close(w.detach() - before, -0.1 * P @ (P.T @ g), rtol=1e-5, atol=1e-6)
