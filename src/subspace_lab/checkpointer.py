"""When the training loop saves, and what a checkpoint holds.

A checkpoint is saved every `checkpoint_every` steps, after the last step, and at `stop_at`;
rank 0 writes it (`checkpoint.save_checkpoint`: atomic, the newest `keep_last_k` kept) while the
other ranks wait. It holds the model, optimizer and scheduler state dicts and a `trainer` record:
step, skipped steps, data cursor, RNG states (rank 0's as `rng`, every rank's as `rng_by_rank`),
config, data fingerprint, world size, run length and versions (what `resume.py` checks and
restores). Under `--fsdp` every rank writes its shards of the model and optimizer state into the
same folder and rank 0 commits it (`sharded_checkpoint.py`).
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as D
from . import sharded_checkpoint
from .config import TrainConfig


class Checkpointer:
    def __init__(self, root: Path, cfg: TrainConfig, info: D.DistInfo, total: int, device=None):
        self.root, self.cfg, self.info, self.total, self.device = root, cfg, info, total, device

    def stop_due(self, step: int) -> bool:
        return self.cfg.stop_at is not None and step >= self.cfg.stop_at

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return self.stop_due(step) or bool(every and (step % every == 0 or step == self.total))

    def save(self, step: int, model, opt, sched, data, skipped: int) -> None:
        rngs = D.gather_objects(self.info, ckpt.capture_rng())  # every rank calls this
        objects = None
        if self.info.is_main:
            trainer = {"step": step, "skipped_steps": skipped, "data": data.state_dict(),
                       "rng": rngs[0], "rng_by_rank": rngs, "config": self.cfg.to_dict(),
                       "data_fingerprint": data.fingerprint(),
                       "world_size": self.info.world_size, "total_steps": self.total,
                       "versions": ckpt.versions()}
            objects = {"scheduler": sched.state_dict(), "trainer": trainer}
            if not self.cfg.fsdp:
                objects = {"model": model.state_dict(), "optimizer": opt.state_dict(), **objects}
        if self.cfg.fsdp:
            sharded_checkpoint.save(self.root, step, model, opt, objects, self.info, self.device,
                                    self.cfg.keep_last_k)
            return
        if self.info.is_main:
            ckpt.save_checkpoint(self.root, step, objects, self.cfg.keep_last_k)
        D.barrier(self.info)
