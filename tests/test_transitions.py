"""The ``rotate`` transition (LDAdam's projection-aware state transfer) for every selector (S11)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import TinyNet, batches, groups_for, train
from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer
from subspace_optim.inner import get_inner
from subspace_optim.linalg import random_orthonormal
from subspace_optim.selectors import SELECTORS
from subspace_optim.selectors.dominant import DominantSelector
from subspace_optim.transitions import get_transition


def adam_state(r, l, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(r, l, generator=g)
    v = m**2 + torch.rand(r, l, generator=g)  # v >= m^2, as Adam's moments satisfy after bias correction
    return {"exp_avg": m, "exp_avg_sq": v, "inner_step": steps}


GROUP = {"betas": (0.9, 0.999)}


def test_rotate_is_bitwise_identity_when_the_basis_does_not_change():
    state = adam_state(3, 7, steps=5)
    before = copy.deepcopy(state)
    P = random_orthonormal(10, 3, torch.Generator().manual_seed(1))
    get_transition("rotate").apply(state, get_inner("adam"), P, P.clone(), GROUP)
    assert all(torch.equal(state[k], before[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_rotate_before_the_first_inner_step_is_a_no_op():
    state = {"exp_avg": torch.zeros(2, 4), "exp_avg_sq": torch.zeros(2, 4), "inner_step": 0}
    old = random_orthonormal(6, 2, torch.Generator().manual_seed(1))
    new = random_orthonormal(6, 2, torch.Generator().manual_seed(2))
    get_transition("rotate").apply(state, get_inner("adam"), old, new, GROUP)
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


@pytest.mark.parametrize("seed", range(5))
def test_rotate_variance_never_negative_and_matches_ldadam_rule(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    state = adam_state(4, 9, steps=3, seed=seed)
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    old = random_orthonormal(12, 4, gen)
    new = random_orthonormal(12, 4, gen)
    get_transition("rotate").apply(state, get_inner("adam"), old, new, GROUP)
    c = new.T @ old
    c1, c2 = 1 - 0.9**3, 1 - 0.999**3
    expected_v = c2 * ((c * c) @ (v / c2 - m**2 / c1**2) + (c @ m) ** 2 / c1**2).abs()
    torch.testing.assert_close(state["exp_avg"], c @ m)
    torch.testing.assert_close(state["exp_avg_sq"], expected_v)
    assert (state["exp_avg_sq"] >= 0).all()


def test_rotate_with_a_signed_permutation_permutes_the_moments():
    state = adam_state(3, 5, steps=4)
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    old = random_orthonormal(8, 3, torch.Generator().manual_seed(3))
    perm, signs = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, -1.0])
    new = old[:, perm] * signs
    get_transition("rotate").apply(state, get_inner("adam"), old, new, GROUP)
    torch.testing.assert_close(state["exp_avg"], m[perm] * signs[:, None])
    torch.testing.assert_close(state["exp_avg_sq"], v[perm], rtol=1e-5, atol=1e-6)


class SignedPermutedDominant(DominantSelector):
    """GaLore's basis with its columns permuted and sign-flipped differently at every refresh."""

    name = "dominant_signed_permuted"

    def select(self, grad, previous, rank, ctx):
        basis = super().select(grad, previous, rank, ctx)
        g = torch.Generator().manual_seed(1000 + ctx.refresh_index)
        perm = torch.randperm(basis.shape[1], generator=g)
        signs = torch.randint(0, 2, (basis.shape[1],), generator=g).float() * 2 - 1
        return basis[:, perm] * signs


@pytest.mark.parametrize("transition,invariant", [("rotate", True), ("keep", False)])
def test_trajectory_invariant_to_column_signs_and_order_under_rotate(monkeypatch, transition, invariant):
    """Metamorphic S11: P -> P D (D a signed permutation) leaves the trajectory unchanged under rotate;
    under keep it does not (moments pair with the wrong columns), which shows the test has teeth."""
    monkeypatch.setitem(SELECTORS, SignedPermutedDominant.name, SignedPermutedDominant())
    data = batches(10)
    runs = []
    for selector in ("dominant", SignedPermutedDominant.name):
        model = TinyNet()
        opt = SubspaceOptimizer(groups_for(model, rank=3, update_proj_gap=2), lr=1e-2, selector=selector,
                                transition=transition)
        train(model, opt, data)
        runs.append(model)
    close = all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(*(m.parameters() for m in runs)))
    assert close == invariant


@pytest.mark.parametrize("preset", [GaLoreAdamW, I3SAdamW])
def test_rotate_is_a_one_word_option_of_the_presets(preset):
    model = TinyNet()
    opt = preset(groups_for(model), rank=2, update_proj_gap=2, transition="rotate", lr=1e-2)
    losses = train(model, opt, batches(1) * 12)
    assert opt.param_groups[-1]["transition"] == "rotate"
    assert losses[-1] < losses[0]
    for p in (model.up.weight, model.down.weight):
        assert (opt.state[p]["exp_avg_sq"] >= 0).all()


@pytest.mark.parametrize("selector", ["dominant", "importance", "random", "online_pca", "power"])
@pytest.mark.parametrize("inner", ["adam", "lion", "sgd"])
def test_rotate_with_every_selector_and_inner_rule(selector, inner):
    model = TinyNet()
    opt = SubspaceOptimizer(groups_for(model, rank=2, update_proj_gap=2), lr=1e-2, selector=selector,
                            transition="rotate", inner=inner)
    losses = train(model, opt, batches(1) * 10)
    assert losses[-1] < losses[0]
    for st in opt.state.values():
        assert all(torch.isfinite(t).all() for t in st.values() if isinstance(t, torch.Tensor))
        if "exp_avg_sq" in st:
            assert (st["exp_avg_sq"] >= 0).all()


def test_rotate_with_bf16_moments_keeps_their_dtype():
    model = TinyNet(dtype=torch.bfloat16)
    opt = I3SAdamW(groups_for(model), rank=2, update_proj_gap=2, transition="rotate")
    train(model, opt, batches(5, dtype=torch.bfloat16))
    for p in (model.up.weight, model.down.weight):
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        assert (opt.state[p]["exp_avg_sq"] >= 0).all()


def test_rotate_equals_keep_bitwise_when_refreshes_return_the_same_basis():
    """The coordinate selector returns the same basis at every refresh: rotate must be the identity."""
    runs = []
    for transition in ("keep", "rotate"):
        model = TinyNet()
        opt = SubspaceOptimizer(groups_for(model, rank=2, update_proj_gap=1), lr=1e-2, selector="coordinate",
                                transition=transition)
        train(model, opt, batches(6))
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert all(torch.equal(o1.state[p][k], o2.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
