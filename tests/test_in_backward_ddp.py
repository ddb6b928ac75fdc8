"""Updates inside backward under DDP (2 gloo ranks): after the all-reduce, equal to ordinary DDP."""

from __future__ import annotations

import os
import socket

import torch

from helpers import TinyNet, batches, groups_for, loss_of
from subspace_optim import I3SAdamW


def _run(rank, mode, accumulate=1):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(TinyNet(), bucket_cap_mb=1e-4)  # several buckets: updates run bucket by bucket
    opt = I3SAdamW(groups_for(model.module, rank=2, update_proj_gap=3), lr=1e-2)
    handle = opt.step_in_backward(ddp=model, accumulate=accumulate) if mode == "in_backward" else None
    data = batches(6 * accumulate, seed=100 + rank)  # different data per rank: the all-reduce matters
    for i in range(6):
        window = data[i * accumulate:(i + 1) * accumulate]
        for j, batch in enumerate(window):
            loss = loss_of(model, batch) / accumulate
            if handle is not None:
                handle.backward(loss)
                assert handle.active
            elif j < accumulate - 1:
                with model.no_sync():  # ordinary DDP accumulation: reduce once, at the last micro-batch
                    loss.backward()
            else:
                loss.backward()
        opt.step()
        opt.zero_grad()
        if handle is not None and i == 3 and accumulate == 1:
            handle.remove()  # back to ordinary DDP: the comm hook only all-reduces from now on
            handle = None
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {(mode, k): _run(rank, mode, k) for mode in ("ordinary", "in_backward") for k in (1, 2)}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter teardown


def test_ddp_in_backward_equals_ordinary_ddp(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.pt"
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(out, weights_only=False)
    for key in r0:  # every rank ends with the same weights
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key])), key
    # one step at a time: bitwise equal to ordinary DDP (which divides by the world size the same way)
    assert all(torch.equal(a, b) for a, b in zip(r0[("ordinary", 1)], r0[("in_backward", 1)]))
    # accumulation reduces every micro-batch and sums in the subspace: equal within fp32 tolerance
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in zip(r0[("ordinary", 2)], r0[("in_backward", 2)]))
    assert not all(torch.equal(a, b) for a, b in zip(r0[("ordinary", 1)], r0[("ordinary", 2)]))
