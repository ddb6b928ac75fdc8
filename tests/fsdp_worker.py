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


JOBS = {"equivalence": equivalence, "dcp_save": dcp_save, "dcp_load": dcp_load, "nonfinite": nonfinite}


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
