"""MeZO and SubZero: bad input, the non-finite-loss policy, weight decay, momentum, SubZero's lazy
refresh and reshape, and data-parallel ranks (Z7, 2-process gloo)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from subspace_optim.zeroth_order import MeZO, SubZero
from subspace_optim.zeroth_order.reshape import most_square, subspace_shape


pytestmark = pytest.mark.usefixtures("single_thread")


def small_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def closure_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    return lambda: ((model(x) - y) ** 2).mean()


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls", [MeZO, SubZero])
@pytest.mark.parametrize("kwargs, arg", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(eps=0.0), "eps"),
    (dict(eps=-1e-3), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"), (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"), (dict(estimator="three-sided"), "estimator"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(exact_restore="yes"), "exact_restore"),
])
def test_bad_hyperparameters_name_the_argument(cls, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        cls(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(reshape_min_dim=-1), "reshape_min_dim"),
])
def test_bad_subzero_hyperparameters(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        SubZero(small_model().parameters(), **kwargs)


def test_subzero_smallest_valid_settings_accepted():
    """The lower bounds themselves are valid: rank 1, a refresh every step, no reshape."""
    model = small_model()
    opt = SubZero(model.named_parameters(), rank=1, update_proj_gap=1, reshape_min_dim=0)
    opt.step(closure_for(model))
    assert opt.state[model[0].weight]["U"].shape[1] == 1


def test_eps_must_agree_across_groups():
    model = small_model()
    with pytest.raises(ValueError, match="eps"):
        MeZO([{"params": model[0].parameters(), "eps": 1e-2}, {"params": model[2].parameters()}])


def test_all_reduce_without_process_group_is_a_clear_error():
    model = small_model()
    opt = MeZO(model.parameters(), all_reduce=True)
    with pytest.raises(RuntimeError, match="process group"):
        opt.step(closure_for(model))


# --------------------------------------------------------------------------------- non-finite loss
def _nan_on_second_call(model):
    calls = []
    inner = closure_for(model)

    def closure():
        calls.append(1)
        return inner() * (float("nan") if len(calls) == 2 else 1.0)

    return closure


@pytest.mark.parametrize("cls", [MeZO, SubZero])
def test_nonfinite_error_restores_weights_and_state(cls):
    model = small_model()
    opt = cls(model.parameters(), lr=1e-2, exact_restore=True, update_proj_gap=2) if cls is SubZero \
        else cls(model.parameters(), lr=1e-2, exact_restore=True)
    opt.step(closure_for(model))
    opt.step(closure_for(model))  # SubZero: the next step (2) refreshes its bases
    before = [p.detach().clone() for p in model.parameters()]

    def snapshot():  # keyed by (parameter, state key): every parameter's restore is checked
        return {(i, k): v.clone() for i, p in enumerate(model.parameters())
                for k, v in opt.state.get(p, {}).items()}

    state_before = snapshot()
    holders = len({i for i, _ in state_before})
    assert holders == 0 if cls is MeZO else holders > 1  # MeZO-SGD keeps no state; SubZero: U, V per matrix
    with pytest.raises(RuntimeError, match="non-finite loss at step 2"):
        opt.step(_nan_on_second_call(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.param_groups[0]["step"] == 2
    state_after = snapshot()
    assert state_before.keys() == state_after.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)


@pytest.mark.parametrize("cls", [MeZO, SubZero])
def test_nonfinite_skip_leaves_weights_within_rounding(cls):
    model = small_model()
    opt = cls(model.parameters(), lr=1e-2, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(_nan_on_second_call(model))
    assert math.isfinite(float(loss))  # the first evaluation's loss is returned
    assert opt.param_groups[0]["step"] == 0
    for p, q in zip(model.parameters(), before):
        assert torch.allclose(p, q, rtol=0, atol=4 * torch.finfo(torch.float32).eps * q.abs().max())


@pytest.mark.parametrize("cls", [MeZO, SubZero])
def test_skipped_steps_are_counted_in_the_groups_and_survive_a_resume(cls):
    model = small_model()
    params = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = cls(params, lr=1e-2, nonfinite="skip")
    opt.step(closure_for(model))
    opt.step(_nan_on_second_call(model))
    opt.step(_nan_on_second_call(model))
    opt.step(closure_for(model))
    assert opt.skipped_steps == 2 and opt.param_groups[0]["step"] == 2
    assert [g["skipped_steps"] for g in opt.param_groups] == [2, 2]
    saved = opt.state_dict()
    assert all(type(g["skipped_steps"]) is int for g in saved["param_groups"])  # weights_only-safe
    again = cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                lr=1e-2, nonfinite="skip")
    assert again.skipped_steps == 0
    again.load_state_dict(saved)
    assert again.skipped_steps == 2
    again.load_state_dict(saved)  # a second load is accepted too (torch added a default key)
    saved["param_groups"][0]["skipped_steps"] = -1
    with pytest.raises(ValueError, match="skipped_steps must"):
        again.load_state_dict(saved)


def test_an_exception_in_the_closure_restores_the_weights():
    model = small_model()
    opt = MeZO(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader broke")
        return closure_for(model)()

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        assert torch.allclose(p, q, rtol=0, atol=4 * torch.finfo(torch.float32).eps * q.abs().max())


# ------------------------------------------------------------------------- weight decay, momentum
@pytest.mark.parametrize("cls", [MeZO, SubZero])
def test_weight_decay_is_decoupled_and_skips_1d_parameters(cls):
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = cls(model.named_parameters(), lr=0.1, weight_decay=0.5, exact_restore=True)
    opt.step(lambda: torch.tensor(1.0))  # constant loss: g = 0, only the decay acts
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[n])


@pytest.mark.parametrize("exact_restore", [False, True])  # the fused path, and restore-then-update
def test_momentum_matches_heavy_ball_on_regenerated_directions(exact_restore):
    # A linear loss <c, w> makes the two-sided estimate exact: g = <c, z>.
    g0 = torch.Generator().manual_seed(0)
    c = torch.randn(7, 5, generator=g0, dtype=torch.float64)
    w = nn.Parameter(torch.randn(7, 5, generator=g0, dtype=torch.float64))
    ref = w.detach().clone()
    buf = torch.zeros_like(ref)
    opt = MeZO([w], lr=1e-2, momentum=0.9, seed=5, exact_restore=exact_restore)
    for _ in range(4):
        group, p, key = opt._entries()[0]
        z = opt._direction(group, p, key)
        opt.step(lambda: (c * w).sum())
        buf = 0.9 * buf + (c * z).sum() * z
        ref = ref - 1e-2 * buf
    assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-9)
    assert torch.allclose(opt.state[w]["momentum_buffer"], buf, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------- SubZero
def test_most_square_factorisation():
    assert most_square(80) == (8, 10)
    assert most_square(64) == (8, 8)
    assert most_square(13) == (1, 13)
    assert subspace_shape((4096, 8), 32) == (128, 256)
    assert subspace_shape((576, 576), 32) == (576, 576)
    assert subspace_shape((1, 10, 20), 0) == (10, 20)
    assert subspace_shape((7,), 32) is None and subspace_shape((2, 3, 4), 0) is None


def test_subzero_bases_fp32_orthonormal_and_refreshed_lazily():
    model = nn.Linear(20, 30).to(torch.bfloat16)
    opt = SubZero(model.named_parameters(), rank=4, update_proj_gap=3, lr=1e-3, reshape_min_dim=0)
    seen = []
    x = torch.randn(4, 20, dtype=torch.bfloat16)
    for _ in range(7):
        opt.step(lambda: model(x).float().pow(2).mean())
        seen.append(opt.state[model.weight]["U"].clone())
    u, v = opt.state[model.weight]["U"], opt.state[model.weight]["V"]
    assert u.dtype == v.dtype == torch.float32 and u.shape == (30, 4) and v.shape == (20, 4)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-5)
    # Refreshed at steps 0, 3, 6 (pre-increment counter, like the code's global_step % F == 0).
    same = [torch.equal(seen[i], seen[i + 1]) for i in range(6)]
    assert same == [True, True, False, True, True, False]
    assert "U" not in opt.state[model.bias]  # 1-D: full Gaussian, no state


def test_subzero_reshapes_thin_matrices_and_clips_rank():
    lora_a = nn.Parameter(torch.randn(64, 4))
    opt = SubZero([lora_a], rank=8, reshape_min_dim=32)
    opt.step(lambda: lora_a.sum() ** 2)
    assert opt.state[lora_a]["U"].shape == (16, 8) and opt.state[lora_a]["V"].shape == (16, 8)
    thin = nn.Parameter(torch.randn(64, 4))
    opt2 = SubZero([thin], rank=8, reshape_min_dim=0)  # no reshape: rank clipped to 4
    opt2.step(lambda: thin.sum() ** 2)
    assert opt2.state[thin]["U"].shape == (64, 4) and opt2.state[thin]["V"].shape == (4, 4)


def test_subzero_update_lies_in_the_subspace():
    w = nn.Parameter(torch.randn(24, 18, dtype=torch.float64))
    opt = SubZero([w], rank=3, lr=1.0, reshape_min_dim=0, exact_restore=True)
    w0 = w.detach().clone()
    opt.step(lambda: (w**3).sum())
    u, v = opt.state[w]["U"].double(), opt.state[w]["V"].double()
    delta = w.detach() - w0
    assert delta.norm() > 0
    # d is built in fp32, so it lies in span(U) x span(V) to fp32 rounding.
    assert (u @ u.T @ delta @ v @ v.T - delta).norm() <= 1e-5 * delta.norm()


# ------------------------------------------------------------------------------ Z7: DP with gloo
def _dp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for cls in (MeZO, SubZero):
            for all_reduce in (True, False):
                model = small_model()  # same initial weights on every rank
                opt = cls(model.named_parameters(), lr=1e-2, all_reduce=all_reduce, seed=11)
                for i in range(4):
                    opt.step(closure_for(model, seed=100 * rank + i))  # different data per rank
                results[f"{cls.__name__}-{all_reduce}"] = [p.detach() for p in model.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown at random; everything is written, so
    # leave without it (an exception above still reaches mp.spawn; docs/testing.md, "Harness")
    os._exit(0)


def test_z7_data_parallel_ranks_stay_identical(tmp_path):
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in ("MeZO", "SubZero"):
        same = {red: all(torch.equal(a, b) for a, b in zip(r0[f"{name}-{red}"], r1[f"{name}-{red}"]))
                for red in (True, False)}
        assert same[True], f"{name}: with all_reduce the ranks must apply identical updates"
        assert not same[False], f"{name}: sanity: without it, different data gives different weights"


def test_a_rejected_param_group_is_not_kept():
    model = small_model()
    opt = MeZO(model[0].parameters())
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1.0})
    assert len(opt.param_groups) == 1
