"""I3S's sampling law (docs/testing.md, S14): r singular vectors drawn one at a time without
replacement with probability proportional to the singular value sigma (not sigma^2).

Checked twice: through ``I3SAdamW`` on a gradient whose spectrum we set, so what is checked is what
the selector feeds the sampler; and, for any weights, the sampler's marginals (a property test).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import plackett_luce_marginals
from subspace_optim import I3SAdamW
from subspace_optim.selectors import sample_without_replacement

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster

SIGMA = [4.0, 2.5, 1.5, 1.0, 0.5]


def planted_gradient(sigma, rows=5, cols=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g))[0]
    k = len(sigma)
    return u[:, :k] @ torch.diag(torch.tensor(sigma)) @ v[:, :k].T, u[:, :k]


def inclusion_counts(draws: int, rank: int = 2) -> torch.Tensor:
    """How often each singular vector is in I3S's basis over ``draws`` refreshes (gap 1) on one
    gradient. The basis is read from the optimizer's state_dict (key "projector")."""
    grad, u = planted_gradient(SIGMA)
    w = nn.Parameter(torch.zeros(grad.shape))
    opt = I3SAdamW([{"params": [("w", w)], "rank": rank, "update_proj_gap": 1}], lr=0.0, seed=3)
    counts = torch.zeros(len(SIGMA))
    for _ in range(draws):
        w.grad = grad.clone()
        opt.step()
        basis = opt.state_dict()["state"][0]["projector"]  # (5, rank)
        cos = (u.T @ basis).abs()  # each column: one singular vector, cosine 1
        idx = cos.argmax(dim=0)
        assert torch.allclose(cos.max(dim=0).values, torch.ones(rank), atol=1e-4)
        counts[idx] += 1
    return counts


def test_s14_i3s_samples_in_proportion_to_sigma_not_sigma_squared():
    draws = 1500
    freq = inclusion_counts(draws) / draws
    by_sigma = torch.tensor(plackett_luce_marginals(SIGMA, 2))
    by_sigma_squared = torch.tensor(plackett_luce_marginals([s * s for s in SIGMA], 2))
    sd = (by_sigma * (1 - by_sigma) / draws).sqrt()
    assert ((freq - by_sigma).abs() <= 5 * sd).all(), (freq, by_sigma)
    # the test tells the two laws apart: sigma^2 is far outside the band
    assert ((freq - by_sigma_squared).abs() > 10 * sd).any(), (freq, by_sigma_squared)


weights = st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=5).filter(
    lambda w: sum(x > 0 for x in w) >= 1)


@settings(max_examples=12, deadline=None)
@given(w=weights, data=st.data())
def test_s14_sampler_marginals_for_any_weights(w, data):
    positive = sum(x > 0 for x in w)
    count = data.draw(st.integers(1, positive), label="count")
    draws = 1500
    counts = torch.zeros(len(w))
    weights_t = torch.tensor(w)
    for c in range(draws):
        idx = sample_without_replacement(weights_t, count, torch.Generator().manual_seed(c))
        picked = idx.tolist()
        assert picked == sorted(set(picked)) and len(picked) == count
        assert all(w[i] > 0 for i in picked)  # never a zero weight
        counts[idx] += 1
    expected = torch.tensor(plackett_luce_marginals(w, count))
    sd = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 5 * sd + 1e-9).all(), (counts / draws, expected)
