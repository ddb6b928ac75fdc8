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
    for stacked in (None, True):  # the CPU default (one at a time) and the stacked kernels
        batched = refresh_batch(sel, grads, previous, [rank] * 4, ctxs, stacked=stacked)
        for ref, got in zip(reference, batched):
            assert got.shape == ref.shape and torch.equal(got, ref)


def test_zero_gradient_in_a_batch_keeps_its_previous_basis():
    grads = _grads(3, (20, 30))
    grads[1] = torch.zeros(20, 30)
    previous = [torch.eye(20, 4)] * 3
    out = refresh_batch(get_selector("dominant"), grads, previous, [4] * 3, _contexts(3, "randomized", {}),
                        stacked=True)
    assert out[1] is previous[1]
    assert not torch.equal(out[0], previous[0])


def test_each_weight_keeps_its_own_stream():
    # the same gradient under two keys: different test matrices and draws, as per weight
    g = torch.randn(30, 50, generator=torch.Generator().manual_seed(2))
    ctxs = _contexts(2, "randomized", {"rsvd_power_iters": 0})
    out = refresh_batch(get_selector("importance"), [g, g], [None, None], [4, 4], ctxs, stacked=True)
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


# ------------------------------------------------------------------ the optimizer's batched path
# (batch_refresh=True): the same trajectory as the per-weight path, bitwise on CPU
import copy  # noqa: E402

from torch import nn  # noqa: E402

import subspace_optim.batched_refresh as batched_module  # noqa: E402
from helpers import state_equal, through_file  # noqa: E402
from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer  # noqa: E402


class EqualShapes(nn.Module):
    """Five weights of left form (12, 20) (three right-projected (20, 12), two left-projected
    (12, 20)), two of left form (7, 12), and one odd (5, 7): two batches and a weight alone."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.ModuleList(nn.Linear(12, 20) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(20, 12) for _ in range(2))
        self.c = nn.ModuleList(nn.Linear(12, 7) for _ in range(2))
        self.odd = nn.Linear(7, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        s = sum(torch.tanh(m(x)) for m in self.a)
        t = sum(m(s) for m in self.b)
        u = sum(torch.tanh(m(t)) for m in self.c)
        return self.odd(u)


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 5, generator=g)) for _ in range(n)]


def _groups(model, **options):
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    biases = [(n, p) for n, p in model.named_parameters() if p.dim() != 2]
    return [{"params": weights, "subspace": True, "rank": 3, "update_proj_gap": 4, **options},
            {"params": biases, "subspace": False}]


CONFIGS = {
    "galore_svd": (GaLoreAdamW, {"svd_method": "svd"}),
    "galore_gram": (GaLoreAdamW, {"svd_method": "gram"}),
    "galore_randomized": (GaLoreAdamW, {"svd_method": "randomized"}),
    "galore_auto": (GaLoreAdamW, {"svd_method": "auto"}),
    "i3s_exact": (I3SAdamW, {}),
    "i3s_gram": (I3SAdamW, {"svd_method": "gram"}),
    "i3s_pool": (I3SAdamW, {"svd_method": "randomized", "importance_pool": 2.0}),
    "i3s_rotate": (I3SAdamW, {"transition": "rotate"}),
    "i3s_rotate_feedback": (I3SAdamW, {"transition": "rotate", "error_feedback": True}),
    "galore_reset_stagger": (GaLoreAdamW, {"transition": "reset", "stagger_refresh": True}),
    "galore_two_sided": (GaLoreAdamW, {"side": "full", "svd_method": "gram"}),
    "i3s_projector_bf16": (I3SAdamW, {"projector_bits": 16, "state_bits": 16}),
}


def _make(name, model, batch):
    cls, options = CONFIGS[name]
    return cls(_groups(model, **options), lr=2e-2, batch_refresh=batch)


def _step(model, opt, batch, step):
    opt.zero_grad()
    x, y = batch
    ((model(x) - y) ** 2).mean().backward()
    if step == 4:  # a zero gradient at a refresh step: keeps its previous basis, batched or not
        model.a[1].weight.grad.zero_()
    opt.step()


def _run(name, batch, data, model=None, opt=None, start=0):
    model = model or EqualShapes()
    opt = opt or _make(name, model, batch)
    for step, b in enumerate(data, start=start):
        _step(model, opt, b, step)
    return model, opt


def _same_run(m1, o1, m2, o2):
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert state_equal(s1["state"], s2["state"])
    strip = [{k: v for k, v in g.items() if k != "batch_refresh"} for g in s1["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k != "batch_refresh"} for g in s2["param_groups"]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_refresh_equals_per_weight_bitwise(name):
    data = _data()
    m1, o1 = _run(name, False, data)
    m2, o2 = _run(name, True, data)
    _same_run(m1, o1, m2, o2)
    # the first basis and two refreshes in 10 steps (gap 4), and the bases moved
    counts = [o2.state[m.weight]["refresh_count"] for m in [*m2.a, *m2.b, *m2.c, m2.odd]]
    assert min(counts) >= 3 if "stagger" in name else counts == [3] * 8
    assert o2.state[m2.b[0].weight]["overlap"] < 1


@pytest.mark.parametrize("k", [4, 6])
@pytest.mark.parametrize("name", ["galore_randomized", "i3s_pool", "i3s_rotate_feedback"])
def test_batch_refresh_resumes_bitwise(name, k):
    data = _data()
    reference, ref_opt = _run(name, False, data)  # per weight, straight through
    model, opt = _run(name, True, data[:k])
    saved = through_file(copy.deepcopy(opt.state_dict()))
    model2 = EqualShapes(seed=7)  # a different init: everything comes from the checkpoint
    model2.load_state_dict(model.state_dict())
    opt2 = _make(name, model2, True)
    opt2.load_state_dict(saved)
    _run(name, True, data[k:], model2, opt2, start=k)
    _same_run(reference, ref_opt, model2, opt2)


def _count_calls(monkeypatch, stacked=None):
    """Record ``(shape, batch size)`` of every ``refresh_batch`` call the optimizer makes."""
    calls = []
    real = batched_module.refresh_batch

    def counting(selector, grads, previous, ranks, contexts):
        calls.append((tuple(grads[0].shape), len(grads)))
        return real(selector, grads, previous, ranks, contexts, stacked=stacked)
    monkeypatch.setattr(batched_module, "refresh_batch", counting)
    return calls


def _count_factorisations(monkeypatch, method):
    """Record the shape of every input to the ``method`` factorisation."""
    from subspace_optim.linalg import SVD_METHODS

    shapes = []
    real = SVD_METHODS[method]
    monkeypatch.setitem(SVD_METHODS, method, lambda m, *a, **k: shapes.append(tuple(m.shape)) or real(m, *a, **k))
    return shapes


@pytest.mark.parametrize("name,method", [("galore_svd", "svd"), ("galore_randomized", "randomized"),
                                         ("i3s_pool", "randomized")])
def test_one_batched_call_per_shape_group(name, method, monkeypatch):
    calls = _count_calls(monkeypatch, stacked=True)  # the stacked kernels, as on a GPU
    shapes = _count_factorisations(monkeypatch, method)
    _run(name, True, _data())
    # refreshes at steps 1, 5 and 9: per refresh one call for the five (12, 20) weights, one for the
    # two (7, 12) ones, and the odd (5, 7) weight alone through its selector
    assert calls == [((12, 20), 5), ((7, 12), 2)] * 3
    assert shapes == [(5, 12, 20), (2, 7, 12), (5, 7)] * 3


def test_cpu_default_calls_refresh_batch_per_group_and_factorises_per_weight(monkeypatch):
    calls = _count_calls(monkeypatch)
    shapes = _count_factorisations(monkeypatch, "gram")
    _run("galore_gram", True, _data(6))
    assert calls == [((12, 20), 5), ((7, 12), 2)] * 2
    assert sorted(set(shapes)) == [(5, 7), (7, 12), (12, 20)] and len(shapes) == 2 * 8


@pytest.mark.parametrize("name", ["galore_gram", "galore_randomized", "galore_two_sided"])
def test_stacked_kernels_follow_the_per_weight_path_to_rounding(name, monkeypatch):
    calls = _count_calls(monkeypatch, stacked=True)
    data = _data()
    m1, o1 = _run(name, False, data)
    m2, o2 = _run(name, True, data)
    assert calls
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5), (p - q).abs().max()
    for p, q in zip(m1.parameters(), m2.parameters()):
        if p.dim() == 2:
            s1, s2 = o1.state[p], o2.state[q]
            assert s1["refresh_count"] == s2["refresh_count"] == 3
            assert torch.allclose(s1["projector"], s2["projector"], rtol=0, atol=1e-4)


def test_batched_path_is_off_by_default_and_in_presets(monkeypatch):
    calls = _count_calls(monkeypatch)
    model = EqualShapes()
    for opt in (GaLoreAdamW(_groups(model), lr=1e-2), I3SAdamW(_groups(model), lr=1e-2),
                SubspaceOptimizer(_groups(model))):
        assert all(g["batch_refresh"] is False for g in opt.param_groups)
    _run("galore_svd", False, _data(3))
    assert calls == []


def test_batching_is_per_group_option(monkeypatch):
    calls = _count_calls(monkeypatch)
    model = EqualShapes()
    groups = _groups(model)
    groups[0]["batch_refresh"] = True
    opt = GaLoreAdamW(groups, lr=1e-2)  # the optimizer's default off, the group's on
    _run("galore_svd", True, _data(2), model, opt)
    assert calls == [((12, 20), 5), ((7, 12), 2)]


def test_sharded_weights_keep_the_per_weight_path(monkeypatch):
    import subspace_optim.refresh_stage as refresh_stage

    calls = _count_calls(monkeypatch)
    model = EqualShapes()
    sharded = {id(m.weight) for m in model.a}  # as if FSDP2 had sharded the a-layers
    monkeypatch.setattr(refresh_stage, "is_dtensor", lambda p: id(p) in sharded)
    opt = _make("galore_gram", model, True)
    assert opt._batched_selections([(opt.param_groups[0], n, p) for n, p in model.named_parameters()
                                    if p.dim() == 2 and not setattr(p, "grad", torch.ones_like(p))]) != {}
    assert calls == [((12, 20), 2), ((7, 12), 2)]  # the two b-layers only, not the three a-layers


def test_in_backward_updates_never_batch(monkeypatch):
    calls = _count_calls(monkeypatch)
    data = _data(6)
    m1, m2 = EqualShapes(), EqualShapes()
    o1, o2 = _make("galore_gram", m1, False), _make("galore_gram", m2, True)
    with o2.step_in_backward():
        for x, y in data:  # two refreshes (steps 1 and 5), each weight updated inside backward
            o1.zero_grad()
            ((m1(x) - y) ** 2).mean().backward()
            o1.step()
            ((m2(x) - y) ** 2).mean().backward()
            o2.step()
    assert calls == []
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert o2.state[m2.a[0].weight]["refresh_count"] == 2


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "True"])
def test_batch_refresh_must_be_boolean(bad):
    with pytest.raises(ValueError, match=r"batch_refresh must be True or False"):
        GaLoreAdamW(_groups(EqualShapes()), batch_refresh=bad)
    with pytest.raises(ValueError, match="batch_refresh"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(4, 6))], "rank": 2, "batch_refresh": bad}])


def test_batch_refresh_is_documented():
    assert "batch_refresh (bool, False)" in SubspaceOptimizer.__doc__
