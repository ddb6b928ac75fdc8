"""Batched refresh: one linalg call for the due weights of one shape gives the per-weight bases."""

from __future__ import annotations

import pytest
import torch

from subspace_optim.batched_refresh import batch_key, refresh_batch
from subspace_optim.linalg import svd_fp32
from subspace_optim.selectors import SelectionContext, get_selector

METHODS = [("svd", {}), ("gram", {}), ("randomized", {}), ("randomized", {"rsvd_power_iters": 0}),
           ("randomized", {"rsvd_oversampling": 3, "rsvd_power_iters": 2})]


def _grads(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    decay = 1.0 / torch.arange(1, min(shape) + 1, dtype=torch.float32)
    out = []
    for _ in range(n):
        u = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))[0]
        v = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))[0]
        out.append((u * decay) @ v.T + 1e-3 * torch.randn(shape, generator=g))
    return out


def _contexts(n, method, options, selector="dominant", pool=2.0):
    group = {"seed": 3, "svd_method": method, "importance_pool": pool, **options}
    return [SelectionContext({}, group, f"layers.{i}.q_proj.weight", refresh_index=i % 3) for i in range(n)]


@pytest.mark.parametrize("selector", ["dominant", "importance"])
@pytest.mark.parametrize("method,options", METHODS)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_batched_equals_per_weight_bitwise(selector, method, options, shape):
    grads, rank = _grads(4, shape), 5
    previous = [None, torch.eye(shape[0], rank), None, torch.eye(shape[0], rank)]
    ctxs = _contexts(4, method, options)
    sel = get_selector(selector)
    reference = [sel.select(g, p, rank, c) for g, p, c in zip(grads, previous, ctxs)]
    batched = refresh_batch(sel, grads, previous, [rank] * 4, ctxs)
    for ref, got in zip(reference, batched):
        assert got.shape == ref.shape and torch.equal(got, ref)


def test_zero_gradient_in_a_batch_keeps_its_previous_basis():
    grads = _grads(3, (20, 30))
    grads[1] = torch.zeros(20, 30)
    previous = [torch.eye(20, 4)] * 3
    out = refresh_batch(get_selector("dominant"), grads, previous, [4] * 3, _contexts(3, "randomized", {}))
    assert out[1] is previous[1]
    assert not torch.equal(out[0], previous[0])


def test_each_weight_keeps_its_own_stream():
    # the same gradient under two keys: different test matrices and draws, as per weight
    g = torch.randn(30, 50, generator=torch.Generator().manual_seed(2))
    ctxs = _contexts(2, "randomized", {"rsvd_power_iters": 0})
    out = refresh_batch(get_selector("importance"), [g, g], [None, None], [4, 4], ctxs)
    assert not torch.equal(out[0], out[1])


def test_batched_svd_retries_only_the_failing_matrix(monkeypatch):
    a = torch.stack(_grads(3, (12, 20)))
    real = torch.linalg.svd

    def flaky(x, full_matrices=True):
        if x.dim() > 2 and x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real(x, full_matrices=full_matrices)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s = svd_fp32(a)
    for i in range(3):
        u1, s1 = svd_fp32(a[i])
        assert torch.equal(u[i], u1) and torch.equal(s[i], s1)


def test_mixed_batches_are_rejected():
    sel = get_selector("dominant")
    grads = _grads(2, (10, 20)) + _grads(1, (20, 10))
    with pytest.raises(ValueError, match="batch key"):
        refresh_batch(sel, grads, [None] * 3, [2] * 3, _contexts(3, "gram", {}))
    with pytest.raises(ValueError, match="batch key"):  # different ranks: different triplet counts
        refresh_batch(sel, _grads(2, (10, 20)), [None] * 2, [2, 3], _contexts(2, "randomized", {}))
    with pytest.raises(ValueError, match="same length"):
        refresh_batch(sel, _grads(2, (10, 20)), [None], [2, 2], _contexts(2, "gram", {}))
    assert batch_key(get_selector("random"), grads[0], 2, {"seed": 0}) is None
    assert batch_key(get_selector("power"), grads[0], 2, {"seed": 0}) is None
    assert refresh_batch(sel, [], [], [], []) == []
