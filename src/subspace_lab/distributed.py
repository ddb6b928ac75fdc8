"""Process-group helpers: the same training code runs alone or under `torchrun` (DDP or, with
`--fsdp`, FSDP2; gloo on CPU, nccl on CUDA). Every rank reads a different data shard; rank 0 writes
metrics and checkpoints."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str, fsdp: bool = False) -> DistInfo:
    """Join the process group described by torchrun's env vars (or an existing one). `fsdp`
    needs a group even for one process (its device mesh is built on it): under torchrun one is
    made; a process started alone is refused, since FSDP without torchrun has no rendezvous."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if fsdp and not launched:
        raise ValueError("--fsdp runs under torchrun (e.g. torchrun --standalone --nproc_per_node 2 "
                         "-m subspace_lab.cli pretrain --fsdp ...; one process is fine too); this "
                         "process was started alone")
    if world <= 1 and not fsdp:
        return DistInfo()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    owns_group=True)


def setup_device(device: str, fsdp: bool = False) -> tuple[DistInfo, torch.device]:
    """The process group (`setup`) and this rank's device for `--device` (auto, cpu, cuda)."""
    dev_type = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = setup(dev_type, fsdp)
    out = torch.device(f"cuda:{info.local_rank}" if dev_type == "cuda" else "cpu")
    if dev_type == "cuda":
        torch.cuda.set_device(out)
    return info, out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def sum_across(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def max_across(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_true(info: DistInfo, ok: bool, device) -> bool:
    """Whether `ok` holds on every rank (a collective: every rank calls it)."""
    flag = torch.tensor(1.0 if ok else 0.0, device=device)
    if info.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def gather_objects(info: DistInfo, obj) -> list:
    """`obj` of every rank, in rank order, on every rank (pickled; small values only)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 (`--fsdp`): `fully_shard` on every decoder block, then on the root (embeddings, final
    norm, LM head), in place, on a 1-D mesh over all processes. A block's weights are gathered for
    its forward and backward only; its gradients are reduce-scattered (averaged, as DDP's
    all-reduce) into row shards, the `DTensor`s the optimizer then steps without gathering."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
