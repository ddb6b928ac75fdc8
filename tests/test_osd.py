"""Online Subspace Descent: the online-PCA selector, its two variants, order of updates, resume (S14)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, assert_resumes_identically, batches, groups_for, rounding_tolerance, state_equal, train
from subspace_optim import OnlineSubspaceAdamW, SubspaceOptimizer
from subspace_optim.linalg import orthonormalize, random_orthonormal, svd_fp32
from subspace_optim.selectors import SelectionContext, get_selector
from subspace_optim.selectors.online_pca import online_pca_gradient

OSD_KEYS = ("osd_exp_avg", "osd_exp_avg_sq")


@pytest.mark.parametrize("penalty", [0.0, 0.1])
def test_analytic_gradient_matches_autograd(penalty):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)  # not orthonormal
    G = torch.randn(7, 11, generator=g, dtype=torch.float64)
    Gn = G / G.norm()
    loss = (P @ P.T @ Gn - Gn).pow(2).sum() + penalty * (P.T @ P - torch.eye(3, dtype=P.dtype)).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, P)
    torch.testing.assert_close(online_pca_gradient(P.detach(), G, penalty), expected)


def planted_run(steps=300, **options):
    """The selector alone, from a random basis, on gradients U diag(s) Z + noise (top-3 subspace U)."""
    k, l, r = 20, 30, 3
    g = torch.Generator().manual_seed(0)
    U = random_orthonormal(k, r, g)
    w = nn.Parameter(torch.zeros(k, l))
    group = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=r, update_proj_gap=20,
                              selector="online_pca", **options).param_groups[0]
    selector, state = get_selector("online_pca"), {}
    P = random_orthonormal(k, r, torch.Generator().manual_seed(1))
    s = torch.tensor([3.0, 2.0, 1.5])
    cosines, drift = [], []
    for t in range(steps):
        G = U @ (s[:, None] * torch.randn(r, l, generator=g)) + 0.1 * torch.randn(k, l, generator=g)
        P = selector.select(G, P, r, SelectionContext(state, group, "w", t))
        cosines.append(torch.linalg.svdvals(U.T @ orthonormalize(P)).min().item())
        drift.append((P.T @ P - torch.eye(r)).norm().item())
    return cosines, drift


@pytest.mark.parametrize("options", [
    dict(osd_variant="paper", lr=1e-3),
    dict(osd_variant="paper", lr=1e-3, osd_orthonormalize=False),
    dict(osd_variant="code", lr=1e-3),
    dict(osd_variant="code", lr=1e-3, osd_orthonormalize=False),
    dict(osd_variant="paper", lr=1e-2, osd_p_optimizer="sgd"),
], ids=["paper", "paper-faithful", "code", "code-faithful", "paper-sgd"])
def test_planted_subspace_is_found(options):
    """S14: the principal angles to the planted subspace go to 0 (cosines to 1) from a random start."""
    cosines, drift = planted_run(**options)
    assert cosines[0] < 0.2
    assert min(cosines[-20:]) > 0.99
    if options.get("osd_orthonormalize", True):
        assert max(drift) < 1e-5  # S3: re-orthonormalised after every online step
    elif options["osd_variant"] == "paper":
        assert max(drift) < 0.15 and drift[-1] < 0.01  # the penalty keeps P near-orthonormal


def test_order_weight_step_uses_P_t_and_P_next_comes_from_G_t():
    torch.manual_seed(0)
    G0, G1, G2a, G2b = (torch.randn(6, 10) for _ in range(4))
    bases = []
    for G2 in (G2a, G2b):
        w = nn.Parameter(torch.randn(6, 10))
        opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], lr=1e-2, scale=1.0)
        w.grad = G0.clone()
        before = w.detach().clone()
        opt.step()
        P0 = svd_fp32(G0)[0][:, :2]
        assert torch.equal(opt.state[w]["projector"], P0)
        delta = w.detach() - before
        # step 0 used P_0: what P_0 P_0^T removes from the update is the rounding of w - lr * U
        residual = delta - P0 @ (P0.T @ delta)
        assert residual.abs().max() <= rounding_tolerance(before)
        w.grad = G1.clone()
        opt.step()
        P1 = opt.state[w]["projector"].clone()
        # the PCA gradient at (P_0, G_0) is exactly zero, so P_1 is P_0 (up to the QR's rounding)
        torch.testing.assert_close(P1, P0, atol=1e-5, rtol=0)  # unit columns: atol is relative
        w.grad = G2.clone()
        opt.step()
        bases.append(opt.state[w]["projector"].clone())
    assert torch.equal(bases[0], bases[1])  # P_2 does not depend on G_2
    # P_2 = QR(P_1 - 5 lr * Adam's second step, whose moments hold a zero and the gradient at (P_1, G_1))
    grad = online_pca_gradient(P1, G1, 0.1)
    m, v = 0.1 * grad, 0.001 * grad * grad
    denom = (v.sqrt() / (1 - 0.999**2) ** 0.5) + 1e-8
    expected = orthonormalize(P1 - 5 * 1e-2 * (m / (1 - 0.9**2)) / denom)
    torch.testing.assert_close(bases[0], expected, rtol=1e-5, atol=1e-6)


def test_code_variant_skips_the_first_P_step_and_follows_the_lr_schedule():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], lr=1e-2, osd_variant="code", update_proj_gap=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    bases, lrs = [], []
    for _ in range(4):
        w.grad = torch.randn(6, 10)
        opt.step()
        sched.step()
        bases.append(opt.state[w]["projector"].clone())
        lrs.append(opt.state[w]["osd_lr"])
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])
    assert opt.state[w]["osd_step"] == 3
    # lr_P = (1 / update_proj_gap) * lr / initial_lr, the lr of the step that computed the gradient
    assert lrs[1:] == pytest.approx([0.25 * 0.5, 0.25 * 0.25, 0.25 * 0.125])
    assert opt.state[w]["osd_weight_decay"] == 0.01


def test_code_variant_initial_lr_survives_state_dict():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], lr=1e-2, osd_variant="code", update_proj_gap=4)
    for _ in range(2):
        w.grad = torch.randn(6, 10)
        opt.step()
    opt.param_groups[0]["lr"] = 5e-3  # as a schedule would
    w2 = nn.Parameter(w.detach().clone())
    opt2 = OnlineSubspaceAdamW([{"params": [w2], "rank": 2}], lr=5e-3, osd_variant="code", update_proj_gap=4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["initial_lr"] == 1e-2
    w2.grad = torch.randn(6, 10)
    opt2.step()
    assert opt2.state[w2]["osd_lr"] == pytest.approx(0.25 * 0.5)


def test_paper_variant_P_lr_and_weight_decay():
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], lr=2e-3, weight_decay=0.1, osd_alpha=3.0)
    w.grad = torch.randn(6, 10)
    opt.step()
    assert opt.state[w]["osd_lr"] == pytest.approx(6e-3) and opt.state[w]["osd_weight_decay"] == 0.1
    assert opt.state[w]["osd_step"] == 1  # the paper updates P from the first gradient on


@pytest.mark.parametrize("options", [dict(), dict(osd_variant="code", osd_p_optimizer="sgd")])
@pytest.mark.parametrize("via_file", [False, True])
def test_resume_is_bit_identical_including_P_optimizer_state(options, via_file):
    assert_resumes_identically(lambda m: OnlineSubspaceAdamW(groups_for(m), rank=2, lr=1e-2, **options),
                               batches(10), 4, via_file)


@pytest.mark.parametrize("p_optimizer,keys", [("adam", OSD_KEYS), ("sgd", ("osd_grad",))])
def test_P_optimizer_state_stays_fp32_with_bf16_params_after_load(p_optimizer, keys):
    model = TinyNet(dtype=torch.bfloat16)
    opt = OnlineSubspaceAdamW(groups_for(model), rank=2, lr=1e-2, osd_p_optimizer=p_optimizer)
    train(model, opt, batches(3, dtype=torch.bfloat16))
    model2 = copy.deepcopy(model)
    opt2 = OnlineSubspaceAdamW(groups_for(model2), rank=2, lr=1e-2, osd_p_optimizer=p_optimizer)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in (model2.up.weight, model2.down.weight):
        st = opt2.state[p]
        assert all(st[key].dtype == torch.float32 for key in (*keys, "projector"))
        assert isinstance(st["osd_step"], int) and isinstance(st["osd_lr"], float)
    assert state_equal(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(osd_variant="official"), "osd_variant"),
    (dict(osd_alpha=0.0), "osd_alpha"),
    (dict(osd_p_optimizer="lion"), "osd_p_optimizer"),
    (dict(osd_orthonormalize="yes"), "osd_orthonormalize"),
    (dict(selector="dominant"), "selector"),
])
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineSubspaceAdamW(groups_for(TinyNet()), **kwargs)


def test_trains_with_lion_inner_rule():
    model = TinyNet()
    opt = OnlineSubspaceAdamW(groups_for(model), rank=2, lr=1e-2, inner="lion", betas=(0.9, 0.99))
    losses = train(model, opt, batches(1) * 15)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_zero_gradients_keep_weights_and_basis_finite(variant):
    """G~ = G / ||G|| is taken as 0 for a zero gradient (autograd would give NaN): only the penalty acts."""
    assert not online_pca_gradient(random_orthonormal(5, 2, torch.Generator().manual_seed(0)),
                                   torch.zeros(5, 8), 0.0).any()
    w = nn.Parameter(torch.randn(5, 8))
    before = w.detach().clone()
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], osd_variant=variant)
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert torch.equal(w.detach(), before)
    st = opt.state[w]
    assert all(torch.isfinite(st[k]).all() for k in ("projector", *OSD_KEYS))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_P_trajectory_matches_autograd_and_torch_adamw_reference(variant):
    """The faithful mode (no QR) against the official code's mechanics: autograd on the PCA loss and
    ``torch.optim.AdamW`` on P (code: lr (1/gap) * lr/initial_lr, wd 0.01, no step at the first
    gradient; paper: penalty 0.1, lr alpha * lr, wd = the weights' wd, a step from the first gradient)."""
    torch.manual_seed(0)
    grads = [torch.randn(6, 10) for _ in range(8)]
    lrs = [1e-2 * 0.8**t for t in range(8)]  # a schedule
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], lr=lrs[0], weight_decay=0.05, osd_variant=variant,
                              update_proj_gap=4, osd_orthonormalize=False)
    ours = []
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
        ours.append(opt.state[w]["projector"].clone())
    P = nn.Parameter(svd_fp32(grads[0])[0][:, :2].clone())
    penalty = 0.1 if variant == "paper" else 0.0
    ref_opt = torch.optim.AdamW([P], lr=1.0, weight_decay=0.01 if variant == "code" else 0.05, foreach=False)
    reference = []
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        reference.append(P.detach().clone())  # the weight step of step t uses P_t
        if variant == "code" and t == 0:
            continue
        if t == 0:  # paper: the gradient at P_0 = SVD(G_0) is exactly zero (autograd gives noise)
            P.grad = torch.zeros_like(P)
            ref_opt.param_groups[0]["lr"] = 5 * lr
            ref_opt.step()
            continue
        with torch.enable_grad():
            gn = g / g.norm()
            loss = (P @ P.T @ gn - gn).pow(2).sum() + penalty * (P.T @ P - torch.eye(2)).pow(2).sum()
            ref_opt.zero_grad()
            loss.backward()
        ref_opt.param_groups[0]["lr"] = (lr / lrs[0]) / 4 if variant == "code" else 5 * lr
        ref_opt.step()  # P_{t+1} from G_t
    for t, (a, b) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, t=t: f"step {t}: {m}")
    assert not torch.equal(ours[1], ours[-1])


def test_code_variant_with_sgd_P_has_no_P_weight_decay():
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}], osd_variant="code", osd_p_optimizer="sgd")
    for _ in range(2):
        w.grad = torch.randn(6, 10)
        opt.step()
    assert opt.state[w]["osd_weight_decay"] == 0.0  # torch.optim.SGD's default, as the code uses


def test_switching_the_P_optimizer_mid_run_drops_the_old_state():
    w = nn.Parameter(torch.randn(6, 10))
    opt = OnlineSubspaceAdamW([{"params": [w], "rank": 2}])
    for p_opt in ("adam", "adam", "sgd", "sgd"):
        opt.param_groups[0]["osd_p_optimizer"] = p_opt
        w.grad = torch.randn(6, 10)
        opt.step()
    assert "osd_grad" in opt.state[w] and not {"osd_exp_avg", "osd_exp_avg_sq"} & opt.state[w].keys()
