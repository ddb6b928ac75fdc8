"""When the training loop saves, and what a checkpoint holds.

A checkpoint is saved every `checkpoint_every` steps, after the last step, and at `stop_at`;
rank 0 writes it (`checkpoint.save_checkpoint`: atomic, the newest `keep_last_k` kept) while the
other ranks wait. It holds the model, optimizer and scheduler state dicts and a `trainer` record:
step, skipped steps, data cursor, RNG states, config, data fingerprint, world size, run length and
versions (what `resume.py` checks and restores).
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as D
from .config import TrainConfig


class Checkpointer:
    def __init__(self, root: Path, cfg: TrainConfig, info: D.DistInfo, total: int):
        self.root, self.cfg, self.info, self.total = root, cfg, info, total

    def stop_due(self, step: int) -> bool:
        return self.cfg.stop_at is not None and step >= self.cfg.stop_at

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return self.stop_due(step) or bool(every and (step % every == 0 or step == self.total))

    def save(self, step: int, model, opt, sched, data, skipped: int) -> None:
        if self.info.is_main:
            trainer = {"step": step, "skipped_steps": skipped, "data": data.state_dict(),
                       "rng": ckpt.capture_rng(), "config": self.cfg.to_dict(),
                       "data_fingerprint": data.fingerprint(),
                       "world_size": self.info.world_size, "total_steps": self.total,
                       "versions": ckpt.versions()}
            objects = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "trainer": trainer}
            ckpt.save_checkpoint(self.root, step, objects, self.cfg.keep_last_k)
        D.barrier(self.info)
