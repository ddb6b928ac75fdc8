"""Checkpoints of a `--fsdp` run: `torch.distributed.checkpoint` (DCP) inside the lab's atomic
scheme (`checkpoint.py`). The model is sharded by `distributed.shard_model`; the optimizer is
built on its sharded parameters, so its state is `DTensor`s sharded like them.

A checkpoint is one folder, as without FSDP: rank 0 creates `step-N.tmp/`; every rank writes its
shard of the model and optimizer state into `step-N.tmp/dcp/` (`dcp.save` of
`get_model_state_dict` / `get_optimizer_state_dict`: one `__<rank>_0.distcp` file per rank and
rank 0's `.metadata`); then rank 0 writes the small `.pt` files (scheduler, trainer), the
manifest over all of them LAST, and renames the folder. A kill at any moment leaves no folder
that counts. The folder must be on a file system every rank sees (one machine, or a shared one).
"""
from __future__ import annotations

from pathlib import Path


from . import checkpoint as ckpt
from . import distributed as D

DCP_DIR = "dcp"


def _state(model, opt) -> dict:
    # (for an optimizer without state yet, as at a resume, torch first takes one step with zero
    # gradients and lr 0 to create it; everything it sets is then overwritten by the load)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def save(root: Path, step: int, model, opt, objects: dict | None, info: D.DistInfo, device,
         keep_last_k: int) -> None:
    """Every rank calls this; `objects` (the small `.pt` files) matter on rank 0 only."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = ckpt.step_dir(root, step)
    tmp = ckpt.temp_dir(final)
    error = None
    if info.is_main:
        try:
            ckpt.begin(root, tmp)
        except Exception as e:  # noqa: BLE001
            error = e
    if not D.all_true(info, error is None, device):
        _raise(info, root, final, tmp, error, "rank 0 could not create the folder")
    try:  # a collective: a failure on any rank raises on every rank
        dcp.save(_state(model, opt), checkpoint_id=str(tmp / DCP_DIR))
    except Exception as e:  # noqa: BLE001
        _raise(info, root, final, tmp, e, "writing the shards failed")
    if info.is_main:
        try:
            ckpt.commit(root, final, tmp, step, objects)
        except Exception as e:  # noqa: BLE001
            error = e
    if not D.all_true(info, error is None, device):
        _raise(info, root, final, tmp, error, "rank 0 could not commit it")
    if info.is_main:
        ckpt.purge(root, keep_last_k)
    D.barrier(info)


def _raise(info, root, final, tmp, error, what: str):
    if info.is_main:
        raise ckpt.failed(root, final, tmp, error) from error
    raise ckpt.CheckpointWriteError(f"could not write checkpoint {final}: {what}")


def load(path: Path, model, opt, info: D.DistInfo, device) -> None:
    """Load the sharded model and optimizer state of checkpoint `path` into the freshly built
    (sharded) objects; rank 0 checks the shard files' sha256 first and every rank hears it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    error = None
    if info.is_main:
        try:
            ckpt.verify_files(path, DCP_DIR)
        except ValueError as e:
            error = e
    if not D.all_true(info, error is None, device):
        raise error if error is not None else ValueError(
            f"cannot resume from {path}: rank 0 found a corrupt shard file")
    state = _state(model, opt)
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optimizer"])
