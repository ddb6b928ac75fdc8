"""The pooled I3S law: the TV distance to the full law is the probability of a draw past the pool."""

from __future__ import annotations

import itertools

import pytest
import torch

from subspace_optim.pool_law import tail_draw_probability
from subspace_optim.selectors import sample_without_replacement


def _head_only_probability(w, rank, pool):
    """P_full(every draw within the top ``pool``), by enumerating ordered draws (Plackett-Luce)."""
    total = 0.0
    for seq in itertools.permutations(range(pool), rank):
        prob, remaining = 1.0, sum(w)
        for i in seq:
            prob *= w[i] / remaining
            remaining -= w[i]
        total += prob
    return total


@pytest.mark.parametrize("w,rank,pool", [([5, 4, 3, 2, 1, 0.5], 2, 3), ([1, 1, 1, 1], 1, 2),
                                         ([9, 3, 1, 0.3, 0.1, 0.05, 0.01], 3, 4), ([2, 1, 1, 0.5], 3, 3)])
def test_matches_enumeration(w, rank, pool):
    low, high = tail_draw_probability(torch.tensor(w), rank, pool)
    exact = 1 - _head_only_probability(w, rank, pool)
    assert low <= exact + 1e-12 and exact <= high + 1e-12
    assert high - low <= 0.02 * exact + 1e-9


def test_matches_the_sampler_by_monte_carlo():
    s = 1.0 / torch.arange(1, 41, dtype=torch.float64) ** 0.5
    rank, pool, draws = 6, 12, 20000
    hits = sum(int(sample_without_replacement(s / s.sum(), rank, torch.Generator().manual_seed(i)).max()) >= pool
               for i in range(draws))
    low, high = tail_draw_probability(s, rank, pool)
    p = hits / draws
    sd = (p * (1 - p) / draws) ** 0.5
    assert low - 5 * sd <= p <= high + 5 * sd


def test_edge_cases():
    assert tail_draw_probability(torch.tensor([3.0, 2.0, 1.0]), 2, 3) == (0.0, 0.0)  # no tail
    assert tail_draw_probability(torch.tensor([3.0, 2.0, 0.0, 0.0]), 1, 2) == (0.0, 0.0)  # zeros never drawn
    low, high = tail_draw_probability(torch.tensor([1.0, 1e-9, 1e-9]), 1, 2)
    assert high < 1e-6  # a negligible tail is (almost) never drawn
    with pytest.raises(ValueError, match="rank"):
        tail_draw_probability(torch.tensor([1.0, 1.0]), 3, 2)
