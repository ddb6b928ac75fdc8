"""Staggered refresh: each projected weight refreshes on its own phase of ``update_proj_gap``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_resumes_identically, batches, groups_for
from subspace_optim import GaLoreAdamW, I3SAdamW


def _refresh_counts(stagger: bool, gap: int = 4, n: int = 4, steps: int = 13):
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(6, 10)) for _ in range(n)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": gap}], stagger_refresh=stagger)
    history = []
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(6, 10)
        opt.step()
        history.append([opt.state[w]["refresh_count"] for w in ws])
    return history


def test_without_stagger_every_weight_refreshes_on_the_same_steps():
    history = _refresh_counts(stagger=False)
    assert all(len(set(counts)) == 1 for counts in history)


def test_stagger_spreads_refreshes_evenly_over_the_gap():
    gap, n = 4, 4
    history = _refresh_counts(stagger=True, gap=gap, n=n)
    assert history[0] == [1] * n  # every weight takes its first basis at its first step
    refreshed = [[b - a for a, b in zip(prev, now)] for prev, now in zip(history, history[1:])]
    # after the first step exactly one weight refreshes per step, each one every `gap` steps
    assert all(sum(r) == 1 for r in refreshed)
    for i in range(n):
        steps = [t for t, r in enumerate(refreshed, start=1) if r[i]]
        assert all(b - a == gap for a, b in zip(steps, steps[1:]))
        assert steps[0] == (i * gap // n) or (i == 0 and steps[0] == gap)


def test_stagger_with_fewer_weights_than_steps_in_the_gap():
    history = _refresh_counts(stagger=True, gap=10, n=3, steps=21)
    final = history[-1]
    assert final == [3, 3, 3]  # 1 + two refreshes in 20 further steps, each on its own step


@pytest.mark.parametrize("k", [3, 4, 5])
def test_stagger_resumes_bitwise(k):
    data = batches(9)
    assert_resumes_identically(
        lambda m: I3SAdamW(groups_for(m, rank=2, update_proj_gap=3), lr=1e-2, stagger_refresh=True),
        data, k, via_file=True)


def test_stagger_must_be_boolean():
    with pytest.raises(ValueError, match="stagger_refresh"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2}], stagger_refresh="yes")
