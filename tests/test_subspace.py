"""Subspace-specific properties S1-S16 (docs/testing.md) over tests/optim_db.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import (TinyNet, batches, groups_for, loss_of, params_equal, plackett_luce_marginals,
                     rounding_tolerance, state_equal, train)
from optim_db import OPTIMIZERS
from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer, subspace_diagnostics, subspace_param_groups
from subspace_optim.selectors import sample_without_replacement, SelectionContext, get_selector

ALL = pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
WINDOWED = pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.windowed], ids=lambda i: i.name)
RANDOM = pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.random], ids=lambda i: i.name)
HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def build(info, model=None, **overrides):
    model = model or TinyNet()
    return model, info.make(groups_for(model), **overrides)


def projectors(opt):
    """Bases by parameter name."""
    return {
        name: opt.state[p]["projector"].clone()
        for g in opt.param_groups
        for name, p in zip(g["param_names"], g["params"])
        if "projector" in opt.state.get(p, {})
    }


# ---------------------------------------------------------------------------------------- S1
def test_s1_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Cut at refresh-1, refresh and refresh+1 (gap 3: refreshes at steps 0, 3, 6, ...)."""
    total, jobs, expected = 9, [], {}
    for info in OPTIMIZERS:
        model, opt = build(info)
        train(model, opt, batches(total))
        expected[info.name] = (model.state_dict(), opt.state_dict())
        for k in (2, 3, 4):
            model, opt = build(info)
            train(model, opt, batches(total)[:k])
            ckpt = tmp_path / f"{info.name}-{k}.pt"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
            jobs.append(dict(optimizer=info.name, checkpoint=str(ckpt), start=k, total=total,
                             out=str(tmp_path / f"{info.name}-{k}-final.pt")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    # this tree's library first: an installed copy elsewhere must not be what the worker tests
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    subprocess.run([sys.executable, str(HERE / "resume_worker.py"), str(tmp_path / "jobs.json"), str(SRC)],
                   check=True, env=env)
    for job in jobs:
        final = torch.load(job["out"], weights_only=True)
        want_model, want_opt = expected[job["optimizer"]]
        assert state_equal(final["model"], want_model), job
        assert state_equal(final["optimizer"], want_opt), job


# ---------------------------------------------------------------------------------------- S2
@ALL
def test_s2_state_is_tensors_and_plain_values(info):
    model, opt = build(info)
    train(model, opt, batches(4))

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    for leaf in leaves(opt.state_dict()):
        assert isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None))), type(leaf)


# ---------------------------------------------------------------------------------------- S3
@ALL
def test_s3_orthonormal_basis_after_every_refresh(info):
    model, opt = build(info)
    for batch in batches(10):
        train(model, opt, [batch])
        for p in (model.up.weight, model.down.weight):
            P = opt.state[p]["projector"]
            assert P.dtype == torch.float32
            torch.testing.assert_close(P.T @ P, torch.eye(P.shape[1]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- S4
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.windowed and i.update_in_subspace], ids=lambda i: i.name)
def test_s4_update_lies_in_the_subspace(info):
    model, opt = build(info, weight_decay=0.0)
    for batch in batches(7):
        before = {p: p.detach().clone() for p in (model.up.weight, model.down.weight)}
        train(model, opt, [batch])
        for p, w0 in before.items():
            delta = p.detach() - w0
            P = opt.state[p]["projector"]
            left = opt.state[p]["project_left"]
            d = delta if left else delta.T  # (k, l)
            residual = d - P @ (P.T @ d)
            assert residual.abs().max() <= rounding_tolerance(w0)  # the rounding of w - lr * U


# ---------------------------------------------------------------------------------------- S5
@WINDOWED
def test_s5_refresh_schedule(info):
    model, opt = build(info, update_proj_gap=3)
    counts, bases = [], []
    for batch in batches(10):
        train(model, opt, [batch])
        counts.append(opt.state[model.up.weight]["refresh_count"])
        bases.append(opt.state[model.up.weight]["projector"].clone())
    # refreshes happen before steps 0, 3, 6, 9 (step counted before the increment, as GaLore)
    assert counts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    for i in range(1, 10):
        if counts[i] == counts[i - 1]:
            assert torch.equal(bases[i], bases[i - 1])
    # with update_proj_gap=1 every step refreshes
    model, opt = build(info, update_proj_gap=1)
    train(model, opt, batches(4))
    assert opt.state[model.up.weight]["refresh_count"] == 4


@WINDOWED
def test_s5_counter_is_per_parameter(info):
    model, opt = build(info, update_proj_gap=3)
    for i, batch in enumerate(batches(7)):
        opt.zero_grad()
        loss_of(model, batch).backward()
        if i in (1, 2):
            model.down.weight.grad = None  # misses two steps
        opt.step()
    assert opt.state[model.up.weight]["refresh_count"] == 3  # steps 0, 3, 6
    assert opt.state[model.down.weight]["refresh_count"] == 2  # its own steps 0, 3


# ---------------------------------------------------------------------------------------- S6
@ALL
@pytest.mark.parametrize("shape,rank", [((6, 4), 4), ((6, 4), 9), ((1, 7), 3), ((7, 1), 3), ((2, 2), 2)])
def test_s6_rank_edge_cases_are_clipped(info, shape, rank):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    opt = info.make([{"params": [w], "subspace": True}], rank=rank)
    target = torch.randn(shape)
    for _ in range(6):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
    P = opt.state[w]["projector"]
    assert P.shape[1] == min(rank, min(shape))
    assert torch.isfinite(w).all()


# ---------------------------------------------------------------------------------------- S7
@ALL
def test_s7_degenerate_shapes(info):
    scalar = nn.Parameter(torch.tensor(1.0))
    empty_rows = nn.Parameter(torch.zeros(0, 4))
    empty_cols = nn.Parameter(torch.zeros(4, 0))
    base = torch.randn(8, 5)
    view = nn.Parameter(base.T)  # non-contiguous (5, 8)
    opt = info.make([{"params": [scalar, empty_rows, empty_cols, view], "subspace": True}])
    for _ in range(4):
        for p in (scalar, empty_rows, empty_cols, view):
            p.grad = torch.ones_like(p)
        view.grad = torch.randn(8, 5).T
        opt.step()
    assert "projector" in opt.state[view] and "projector" not in opt.state[empty_rows]
    assert torch.isfinite(view).all()


def test_s7_tied_weights_appear_once():
    emb = nn.Embedding(12, 4)
    head = nn.Linear(4, 12, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "proj": nn.Linear(4, 4), "lm_head": head})
    groups = subspace_param_groups(model, "all-linear")
    names = [n for g in groups for n, _ in g["params"]]
    assert len(names) == len(set(id(p) for g in groups for _, p in g["params"])) == 3
    assert [n for n, _ in groups[1]["params"]] == ["proj.weight"]


# ---------------------------------------------------------------------------------------- S8
@RANDOM
def test_s8_seeded_reproducibility_and_global_rng_untouched(info):
    def bases(seed):
        model, opt = build(info, seed=seed)
        state = torch.get_rng_state()
        train(model, opt, batches(4))
        assert torch.equal(state, torch.get_rng_state())
        return projectors(opt)

    a, b, c = bases(0), bases(0), bases(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_s8_basis_keyed_by_name_not_position():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 9))
    extra = nn.Parameter(torch.randn(5, 7))
    grad = torch.randn(12, 9)

    def basis(params):
        opt = SubspaceOptimizer([{"params": params, "subspace": True}], rank=3, selector="random", seed=7)
        for _, p in params:
            p.grad = grad if p is w else torch.randn(p.shape)
        opt.step()
        return opt.state[w]["projector"]

    alone = basis([("layer.w", w)])
    with_other = basis([("other", extra), ("layer.w", w)])
    assert torch.equal(alone, with_other)


# ---------------------------------------------------------------------------------------- S9
def _dp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name in ("i3s", "random"):
        model = DDP(TinyNet())
        info = next(i for i in OPTIMIZERS if i.name == name)
        opt = info.make(groups_for(model.module))
        train(model, opt, batches(7, seed=100 + rank))  # different data per rank, all-reduced grads
        results[name] = [opt.state[p]["projector"] for p in (model.module.up.weight, model.module.down.weight)]
        results[name + "_params"] = [p.detach().clone() for p in model.parameters()]
    # negative control: no all-reduce, different grads: the dominant bases differ, random ones agree
    for name in ("galore", "random"):
        model = TinyNet()
        info = next(i for i in OPTIMIZERS if i.name == name)
        opt = info.make(groups_for(model))
        train(model, opt, batches(4, seed=200 + rank))
        results[name + "_local"] = [opt.state[p]["projector"] for p in (model.up.weight, model.down.weight)]
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown at random ("terminate called without an
    # active exception"); everything is written, so leave without it (docs/testing.md, "Harness")
    os._exit(0)


def test_s9_identical_subspaces_across_data_parallel_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.pt"
    mp.spawn(_dp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(out, weights_only=False)
    for key in ("i3s", "random", "i3s_params", "random_params", "random_local"):
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key])), key
    assert not all(torch.equal(a, b) for a, b in zip(r0["galore_local"], r1["galore_local"]))


# --------------------------------------------------------------------------------------- S10
@ALL
@pytest.mark.parametrize("at_refresh", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_s10_nonfinite_gradient_error_and_skip(info, at_refresh, bad):
    for policy in ("error", "skip"):
        model, opt = build(info, nonfinite=policy, update_proj_gap=3)
        data = batches(6)
        train(model, opt, data[: 3 if at_refresh else 2])
        before_model, before_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        opt.zero_grad()
        loss_of(model, data[4]).backward()
        model.down.weight.grad[0, 0] = bad
        if policy == "error":
            with pytest.raises(RuntimeError, match=r"down\.weight.*step"):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        assert state_equal(model.state_dict(), before_model)
        after = opt.state_dict()
        for g in after["param_groups"]:
            g["skipped_steps"] = 0
        assert state_equal(after, before_opt)
        train(model, opt, data[5:])  # the next finite step proceeds
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("selector", ["dominant", "importance"])
def test_s10_all_zero_gradient_has_a_documented_basis(selector):
    w = nn.Parameter(torch.randn(5, 8))
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=2, selector=selector, update_proj_gap=1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(opt.state[w]["projector"], torch.eye(5, 2))  # first step: coordinate axes
    w.grad = torch.randn(5, 8)
    opt.step()
    kept = opt.state[w]["projector"].clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(opt.state[w]["projector"], kept)  # later: the previous basis is kept
    assert torch.isfinite(w).all()


# --------------------------------------------------------------------------------------- S11
@pytest.mark.parametrize("transition", ["keep", "reset"])
def test_s11_keep_and_reset(transition):
    model = TinyNet()
    opt = I3SAdamW(groups_for(model), rank=2, update_proj_gap=3, transition=transition)
    data = batches(4)
    train(model, opt, data[:3])
    p = model.up.weight
    m_before = opt.state[p]["exp_avg"].clone()
    opt.zero_grad()
    loss_of(model, data[3]).backward()
    opt.step()  # refresh happens at the start of this step
    m_after = opt.state[p]["exp_avg"]
    P_new = opt.state[p]["projector"]
    R = P_new.T @ (p.grad if opt.state[p]["project_left"] else p.grad.T)
    if transition == "keep":
        torch.testing.assert_close(m_after, 0.9 * m_before + 0.1 * R)
    else:
        torch.testing.assert_close(m_after, 0.1 * R)
        assert opt.state[p]["inner_step"] == 1


# --------------------------------------------------------------------------------------- S12
def test_s12_sign_flip_of_basis_within_a_window_gives_identical_updates():
    m1 = TinyNet()
    opt1 = GaLoreAdamW(groups_for(m1), rank=2, update_proj_gap=100)
    data = batches(6)
    train(m1, opt1, data[:1])
    m2 = copy.deepcopy(m1)
    opt2 = GaLoreAdamW(groups_for(m2), rank=2, update_proj_gap=100)
    sd = copy.deepcopy(opt1.state_dict())
    for st in sd["state"].values():
        if "projector" in st:
            flip = torch.tensor([-1.0, 1.0])
            st["projector"] = st["projector"] * flip
            st["exp_avg"] = st["exp_avg"] * flip[:, None]
    opt2.load_state_dict(sd)
    train(m1, opt1, data[1:])
    train(m2, opt2, data[1:])
    assert params_equal(m1, m2)


# --------------------------------------------------------------------------------------- S14
def test_s14_importance_sampling_follows_the_documented_law():
    w = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    draws = 20000
    counts = torch.zeros(5)
    for c in range(draws):
        g = torch.Generator().manual_seed(c)
        idx = sample_without_replacement(w, 2, g)
        assert idx.tolist() == sorted(idx.tolist()) and 4 not in idx.tolist()
        counts[idx] += 1
    expected = torch.tensor(plackett_luce_marginals(w.tolist(), 2))
    freq = counts / draws
    sd = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-12).all(), (freq, expected)
    # marginals are not proportional to w (successive sampling), as documented
    assert not torch.allclose(expected[:4] / expected[:4].sum(), w[:4], atol=0.01)


def test_s14_importance_with_few_nonzero_singular_values_equals_dominant():
    u = torch.linalg.qr(torch.randn(8, 8))[0]
    v = torch.linalg.qr(torch.randn(6, 6))[0]
    grad = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ v[:, :2].T  # rank 2, r = 3
    ctx = SelectionContext({}, {"seed": 0}, "w", 0)
    imp = get_selector("importance").select(grad, None, 3, ctx)
    dom = get_selector("dominant").select(grad, None, 3, ctx)
    assert torch.equal(imp, dom)


def test_s14_importance_picks_singular_vectors_tail_ones_included():
    """Every drawn basis is made of the gradient's own singular vectors, in spectrum order, and the
    draws reach beyond the top r (which the dominant selector always takes)."""
    torch.manual_seed(0)
    grad = torch.randn(16, 12)
    u = torch.linalg.svd(grad, full_matrices=False)[0]  # (16, 12)
    dom = get_selector("dominant").select(grad, None, 3, SelectionContext({}, {"seed": 0}, "w", 0))
    torch.testing.assert_close((u[:, :3].T @ dom).abs(), torch.eye(3), atol=1e-4, rtol=0)
    picked = set()
    for i in range(20):
        imp = get_selector("importance").select(grad, None, 3, SelectionContext({}, {"seed": 0}, "w", i))
        cos = (u.T @ imp).abs()  # (12, 3): one 1 per column, zeros elsewhere
        idx = cos.argmax(dim=0)
        torch.testing.assert_close(cos, torch.eye(12)[:, idx], atol=1e-4, rtol=0)
        assert idx.tolist() == sorted(set(idx.tolist()))
        picked.update(idx.tolist())
    assert len(picked) > 3 and max(picked) >= 3


# --------------------------------------------------------------------------------------- S15
def test_s15_memory_of_a_256_square_matrix_at_rank_8():
    w = nn.Parameter(torch.randn(256, 256))
    opt = GaLoreAdamW([{"params": [w], "rank": 8}])
    w.grad = torch.randn(256, 256)
    opt.step()
    st = opt.state[w]
    assert st["exp_avg"].numel() == st["exp_avg_sq"].numel() == 8 * 256
    assert st["projector"].numel() == 8 * 256
    assert subspace_diagnostics(opt)[0]["state_bytes"] == 3 * 8 * 256 * 4  # the step is a plain int


# --------------------------------------------------------------------------------------- S16
@ALL
def test_s16_factorisations_in_fp32_for_bf16_params(info):
    model = TinyNet(dtype=torch.bfloat16)
    opt = info.make(groups_for(model))
    train(model, opt, batches(4, dtype=torch.bfloat16))
    for p in (model.up.weight, model.down.weight):
        assert opt.state[p]["projector"].dtype == torch.float32
        assert p.dtype == torch.bfloat16


def test_diagnostics_overlap_is_against_the_previous_basis():
    """``overlap`` compares the basis a refresh replaced with the new one: ||U_0^T U_2||_F^2 / r for
    GaLore's bases of the gradients at steps 0 and 2 (gap 2), computed here from our own SVDs. Against
    the new basis itself it would always be 1."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = GaLoreAdamW([{"params": [("w", w)], "rank": 2, "update_proj_gap": 2}], lr=1e-3)
    grads = [torch.randn(6, 10) for _ in range(3)]
    records = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        records.append(subspace_diagnostics(opt))
    assert [r[0]["overlap"] for r in records[:2]] == [None, None]  # no refresh has replaced a basis yet
    (rec,) = records[2]
    u0, u2 = (torch.linalg.svd(grads[i], full_matrices=False)[0][:, :2] for i in (0, 2))
    expected = float((u0.T @ u2).pow(2).sum() / 2)
    assert expected < 0.9
    assert rec["overlap"] == pytest.approx(expected, rel=1e-5)
    assert (rec["name"], rec["shape"], rec["rank"], rec["refresh_count"]) == ("w", (6, 10), 2, 2)


@ALL
def test_s10_huge_finite_gradient_is_not_mistaken_for_nonfinite(info):
    """The fast screen sums each gradient; a finite gradient whose sum overflows must still step."""
    model, opt = build(info, nonfinite="error")
    for p in model.parameters():
        p.grad = torch.full_like(p, 3e38)
    opt.step()
    assert opt.skipped_steps == 0 and int(opt.state[model.up.weight]["step"]) == 1


@pytest.mark.parametrize("selector", ["dominant", "importance", "online_pca", "power"])
def test_s10_zero_gradient_fallback_is_for_zero_only(selector):
    """A gradient whose top singular value is exactly 1 is not "all zero": its basis is its own
    singular vector (the second axis here), not the fallback's first coordinate axes."""
    w = nn.Parameter(torch.zeros(4, 6))
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=1, selector=selector)
    grad = torch.zeros(4, 6)
    grad[1, 0] = 1.0
    w.grad = grad
    opt.step()
    assert torch.equal(opt.state[w]["projector"], torch.eye(4)[:, 1:2])
