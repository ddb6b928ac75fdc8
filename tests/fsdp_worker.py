"""FSDP2 jobs run under ``torchrun`` by test_fsdp.py (gloo on CPU): ``python -m torch.distributed.run
--standalone --nproc_per_node N fsdp_worker.py JOB OUT_DIR [PRESETS]``. Rank 0 writes
``OUT_DIR/<job>-<world>.pt`` with what the test checks.

The model mixes every layout: (7, 10) and (4, 12) weights project left (their sharded rows are the
projected side), (12, 7) projects right (its sharded rows are the other side); 7 rows over 2 or 4
processes make uneven shards.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer, subspace_param_groups

GROUP = dict(rank=3, update_proj_gap=4)  # refreshes at steps 0, 4 and 8 of 10
PRESETS = {
    "galore": (GaLoreAdamW, {}),
    "galore_gram": (GaLoreAdamW, dict(svd_method="gram")),
    "i3s_randomized": (I3SAdamW, dict(svd_method="randomized", importance_pool=2.0)),
    "i3s": (I3SAdamW, {}),
    "i3s_rotate": (I3SAdamW, dict(transition="rotate")),
    "osd": (OnlineSubspaceAdamW, {}),
    "ldadam": (LDAdamW, {}),
    "random_reset": (SubspaceOptimizer, dict(selector="random", transition="reset")),
    "galore_lion": (GaLoreAdamW, dict(inner="lion", betas=(0.9, 0.99))),
    # two-sided: at a refresh P^T G Q is diagonal up to rounding noise, which Adam normalises to
    # O(noise / eps), so sharded and whole runs differ at O(noise / eps); a larger eps compares them
    "galore_full": (GaLoreAdamW, dict(side="full", eps=1e-3)),
}


def make_model(mesh=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 4))
    if mesh is not None:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def make_optimizer(name: str, model):
    cls, kwargs = PRESETS[name]
    return cls(subspace_param_groups(model, **GROUP), lr=1e-2, **kwargs)


def batches(n: int):
    return [torch.randn(8, 10, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


def train(model, opt, data) -> None:
    for x in data:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def equivalence(mesh, names):
    """Sharded vs whole, per preset: final weights, the bases every process holds, state placements
    and the bytes our collectives moved on ordinary and refresh steps."""
    out = {}
    for name in names:
        whole, sharded = make_model(), make_model(mesh)
        o_whole, o_sharded = make_optimizer(name, whole), make_optimizer(name, sharded)
        data = batches(10)
        train(whole, o_whole, data)
        train(sharded, o_sharded, data[:9])
        o_sharded.communication.clear()
        train(sharded, o_sharded, data[9:])  # step 10: an ordinary step for refresh-window selectors
        last_step = dict(o_sharded.communication)
        weights = [p for p in sharded.parameters()]
        local_bases = [o_sharded.state[p]["projector"].to_local().clone() for p in weights if p.dim() == 2]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local_bases)
        placements = {f"{i}.{key}": str(value.placements) for i, p in enumerate(weights) if p.dim() == 2
                      for key, value in o_sharded.state[p].items() if isinstance(value, DTensor)}
        out[name] = {
            "sharded": [full(p).detach() for p in sharded.parameters()],
            "whole": [p.detach() for p in whole.parameters()],
            "bases_by_rank": gathered,
            "placements": placements,
            "last_step_bytes": last_step,
            "overlaps": [o_sharded.state[p].get("overlap") for p in weights if p.dim() == 2],
            "overlaps_whole": [o_whole.state[p].get("overlap") for p in whole.parameters() if p.dim() == 2],
        }
    return out


def checkpoint_state(model, opt):
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def dcp_save(mesh, names, ckpt_dir):
    """Train 5 steps, save with DCP, train 5 more: the uninterrupted reference."""
    out = {}
    for name in names:
        model = make_model(mesh)
        opt = make_optimizer(name, model)
        data = batches(10)
        train(model, opt, data[:5])
        dcp.save(checkpoint_state(model, opt), checkpoint_id=os.path.join(ckpt_dir, name))
        train(model, opt, data[5:])
        out[name] = [full(p).detach() for p in model.parameters()]
    return out


def dcp_load(mesh, names, ckpt_dir):
    """Fresh objects (any world size), load the step-5 checkpoint, train the last 5 steps."""
    out = {}
    for name in names:
        model = make_model(mesh)
        torch.nn.init.zeros_(next(model.parameters()))  # everything must come from the checkpoint
        opt = make_optimizer(name, model)
        state = checkpoint_state(model, opt)
        dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, name))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        train(model, opt, batches(10)[5:])
        out[name] = [full(p).detach() for p in model.parameters()]
    return out


def nonfinite(mesh, names):
    """A NaN in one rank's shard: 'error' raises on every process naming the same parameter and
    changes nothing; 'skip' skips on every process."""
    out = {}
    for policy in ("error", "skip"):
        model = make_model(mesh)
        opt = GaLoreAdamW(subspace_param_groups(model, **GROUP), lr=1e-2, nonfinite=policy)
        train(model, opt, batches(2))
        before = [full(p).detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(batches(3)[2]).pow(2).mean().backward()
        if dist.get_rank() == dist.get_world_size() - 1:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        message = None
        try:
            opt.step()
        except RuntimeError as err:
            message = str(err)
        after = [full(p).detach() for p in model.parameters()]
        out[policy] = {"message": message, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                       "skipped": opt.skipped_steps}
    return out


# ----------------------------------------------------------------------------- in backward
def _window_loss(model, x, accumulate):
    return model(x).pow(2).mean() / accumulate


def train_ordinary(model, opt, data, accumulate=1, clip=None, max_norm=0.05):
    """Ordinary FSDP2 steps over windows of ``accumulate`` micro-batches (FSDP2 reduce-scatters each
    and sums the shards), optionally clipped per parameter or globally first."""
    for i in range(0, len(data), accumulate):
        opt.zero_grad()
        for x in data[i:i + accumulate]:
            _window_loss(model, x, accumulate).backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        if clip == "per_parameter":
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], max_norm)
        elif clip == "global":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()


def train_in_backward(model, opt, data, handle, accumulate=1):
    """Updates inside backward; returns how many gradients were left after the last backward of a
    window (the hooks use and free every one), how many such backwards changed no weight (the
    updates happen inside them) and how many gradients were held after the other micro-batches
    (accumulated in full; the others were projected and freed)."""
    left, idle, held = 0, 0, 0
    for i in range(0, len(data), accumulate):
        for j, x in enumerate(data[i:i + accumulate]):
            before = [p.to_local().clone() for p in model.parameters()]
            handle.backward(_window_loss(model, x, accumulate))
            grads = sum(p.grad is not None for p in model.parameters())
            moved = any(not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
            if j == accumulate - 1:
                left, idle = left + grads, idle + (not moved)
            else:
                held += grads
        opt.step()
    return left, idle, held


def full_state(opt, model):
    return [{key: full(value).detach().clone() if isinstance(value, torch.Tensor) else value
             for key, value in opt.state[p].items()} for p in model.parameters()]


def in_backward(mesh, names):
    """Updates inside backward on the FSDP2 model vs ordinary FSDP2 steps of the same optimizer:
    one micro-batch and 2 accumulated (in the subspace), the bytes of the last step, a DCP-style
    state-dict round trip; for galore also clipping per parameter and global (two_pass), and the
    non-finite policy with a NaN in one rank's shard."""
    out = {}
    data = batches(20)
    for name in names:
        r = out[name] = {}
        for k in (1, 2):
            model = make_model(mesh)
            opt = make_optimizer(name, model)
            train_ordinary(model, opt, data[: 9 * k], k)
            opt.communication.clear()
            train_ordinary(model, opt, data[9 * k: 10 * k], k)
            r[f"ordinary{k}"] = [full(p).detach() for p in model.parameters()]
            r[f"ordinary{k}_bytes"] = dict(opt.communication)
            r[f"ordinary{k}_state"] = full_state(opt, model)

            model = make_model(mesh)
            opt = make_optimizer(name, model)
            handle = opt.step_in_backward(accumulate=k)
            counts = train_in_backward(model, opt, data[: 9 * k], handle, k)
            opt.communication.clear()
            more = train_in_backward(model, opt, data[9 * k: 10 * k], handle, k)
            r[f"in_backward{k}"] = [full(p).detach() for p in model.parameters()]
            r[f"in_backward{k}_bytes"] = dict(opt.communication)
            r[f"in_backward{k}_state"] = full_state(opt, model)
            r[f"in_backward{k}_counts"] = [a + b for a, b in zip(counts, more)]  # left, idle, held
            r[f"in_backward{k}_skipped"] = opt.skipped_steps

        # resume at step 5 from the FSDP2 state dicts into fresh objects, updates in backward
        model = make_model(mesh)
        opt = make_optimizer(name, model)
        train_in_backward(model, opt, data[:5], opt.step_in_backward())
        state = checkpoint_state(model, opt)
        fresh = make_model(mesh)
        torch.nn.init.zeros_(next(fresh.parameters()))
        fresh_opt = make_optimizer(name, fresh)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
        train_in_backward(fresh, fresh_opt, data[5:10], fresh_opt.step_in_backward())
        r["resumed"] = [full(p).detach() for p in fresh.parameters()]

    if "galore" in names:
        r = out["clip"] = {}
        for clip, options in (("per_parameter", dict(max_grad_norm=0.05)),
                              ("global", dict(max_grad_norm=0.05, two_pass=True))):
            model = make_model(mesh)
            opt = make_optimizer("galore", model)
            train_ordinary(model, opt, data[:10], clip=clip)
            r[f"ordinary_{clip}"] = [full(p).detach() for p in model.parameters()]
            model = make_model(mesh)
            opt = make_optimizer("galore", model)
            r[f"in_backward_{clip}_counts"] = train_in_backward(model, opt, data[:10], opt.step_in_backward(**options))
            r[f"in_backward_{clip}"] = [full(p).detach() for p in model.parameters()]
        out["nonfinite"] = in_backward_nonfinite(mesh, data)
    return out


def in_backward_nonfinite(mesh, data):
    """A NaN in the last rank's shard of one gradient at step 2 (0-based), under updates in backward.
    skip: model[4] (its gradient arrives first): every rank skips that step, vs the ordinary skip;
    torn (skip): model[0] (arrives last, after model[4] and model[2] were updated): every rank
    raises; error: every rank raises, naming the same parameter, nothing changed."""
    from subspace_optim.in_backward import NonFiniteGradientError

    out = {}
    for case, policy, layer in (("skip", "skip", 4), ("torn", "skip", 0), ("error", "error", 4)):
        runs = {}
        for mode in ("ordinary", "in_backward"):
            if mode == "ordinary" and case != "skip":
                continue
            model = make_model(mesh)
            opt = GaLoreAdamW(subspace_param_groups(model, **GROUP), lr=1e-2, nonfinite=policy)
            calls = {"n": 0}

            def poison(p, calls=calls):
                calls["n"] += 1
                if calls["n"] == 3 and dist.get_rank() == dist.get_world_size() - 1:
                    p.grad.to_local()[0, 0] = float("nan")

            model[layer].weight.register_post_accumulate_grad_hook(poison)  # before the handle's: runs first
            handle = opt.step_in_backward() if mode == "in_backward" else None
            message, unchanged = None, None
            for i, x in enumerate(data[:5]):
                before = [full(p).detach().clone() for p in model.parameters()]
                try:
                    if handle is None:
                        train_ordinary(model, opt, [x])
                    else:
                        handle.backward(_window_loss(model, x, 1))
                        opt.step()
                except RuntimeError as err:
                    message = f"{type(err).__name__}: {err}"
                if i == 2:
                    unchanged = [torch.equal(a, full(b)) for a, b in zip(before, model.parameters())]
                if message is not None:
                    break
            runs[mode] = {"message": message, "unchanged": unchanged, "skipped": opt.skipped_steps,
                          "weights": [full(p).detach() for p in model.parameters()]}
        out[case] = runs
    return out


JOBS = {"equivalence": equivalence, "dcp_save": dcp_save, "dcp_load": dcp_load, "nonfinite": nonfinite}
JOBS["in_backward"] = in_backward


def main() -> None:
    job, out_dir = sys.argv[1], sys.argv[2]
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(PRESETS)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    args = (mesh, names, os.path.join(out_dir, "ckpt")) if job.startswith("dcp") else (mesh, names)
    result = JOBS[job](*args)
    results = [None] * world
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, f"{job}-{world}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter teardown


if __name__ == "__main__":
    main()
