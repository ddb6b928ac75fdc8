"""Resuming a run from its newest checkpoint, and what a resume refuses.

A resume continues the saved weights, optimizer state, data cursor, RNGs and LR schedule. It
refuses, naming what differs, whatever would change the meaning of that saved state:
- settings (`MUST_MATCH`): the model, the data settings (except where caches live), every
  optimizer setting, batch size, gradient accumulation, seed, the schedule's shape (warmup
  fraction, final LR ratio), clipping, the non-finite policy and the validation set's size;
- the data itself (`data.fingerprint()`: tokenizer and packed rows, by hash): an edited corpus
  retrains a different tokenizer under the same settings;
- the number of processes (the cursor counts global batches; under `--fsdp` DCP could reshard
  the state, but the global batch and the data shards change with the world size);
- `--fsdp` on or off (`MUST_MATCH`: the checkpoint's format differs);
- no valid checkpoint at all: a resume never silently starts again from step 0.

The length may change: `--steps` (or `--tokens`) can extend a finished or stopped run, or
shorten one down to the checkpoint's step. The schedule rule: the warmup and cosine are
recomputed over the new total (warmup = round(warmup_fraction * total)) and every step after the
resume point takes the new schedule's LR. From the resume point on, the LR is therefore exactly
that of an uninterrupted run of the new length; the run still differs from that uninterrupted
run, because its steps before the resume point followed the old schedule (a shorter run decays
sooner, so a finished run's LR jumps back up when extended). With an unchanged length a resume
is bit-identical to an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as D
from . import sharded_checkpoint
from .config import TrainConfig

MUST_MATCH = ("model", "data", "optim", "batch_size", "grad_accum", "seed", "warmup_fraction",
              "min_lr_ratio", "clip", "nonfinite", "eval_batches", "fsdp")
_MAY_DIFFER = ("data.cache_dir",)  # where caches live; the fingerprint checks what they hold


def find_checkpoint(root: Path, clean: bool) -> Path:
    """The newest valid checkpoint under `root`, or a ValueError naming what is there."""
    latest = ckpt.find_latest_valid(root, clean=clean)
    if latest is None:
        raise ValueError(f"--resume: no valid checkpoint to resume from ({ckpt.describe(root)}); "
                         f"a run saves checkpoints with --checkpoint-every N or --stop-at N")
    return latest


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_differences(saved: dict, now: dict) -> list[str]:
    saved = TrainConfig.from_dict(saved).to_dict()  # names of older versions, new fields' defaults
    a = _leaves({k: saved.get(k) for k in MUST_MATCH})
    b = _leaves({k: now.get(k) for k in MUST_MATCH})
    return [f"{k} (saved {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in _MAY_DIFFER and a.get(k) != b.get(k)]


def data_differences(saved: dict | None, now: dict) -> list[str]:
    if saved is None:  # checkpoints of older versions carry no fingerprint
        return []
    return [f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def check_settings(path: Path, cfg: TrainConfig, world_size: int, total: int) -> None:
    """The checks that need only the small trainer record: run before any data is built."""
    trainer = ckpt.load_checkpoint(path, only=("trainer",))["trainer"]
    where = f"cannot resume from {path}"
    diff = config_differences(trainer["config"], cfg.to_dict())
    if diff:
        raise ValueError(f"{where}: config differs in {'; '.join(diff)}; only --steps/--tokens "
                         f"and run-time settings may change (or choose another --out-dir)")
    saved_world = trainer.get("world_size", world_size)
    if saved_world != world_size:
        raise ValueError(f"{where}: it was saved by {saved_world} process(es), this run has "
                         f"{world_size}; the data cursor counts global batches")
    if total < trainer["step"]:
        raise ValueError(f"{where}: --steps {total} is below the checkpoint's step "
                         f"{trainer['step']}; a resume can only go forward")


def resume(path: Path, model, opt, sched, data, cfg: TrainConfig, info: D.DistInfo, total: int,
           device=None) -> tuple[int, int, int | None]:
    """Check, then load everything into the freshly built objects (under `--fsdp`: sharded, every
    rank calls this); returns the step, the skipped-step count and the run length the checkpoint
    was saved with (None if unknown)."""
    check_settings(path, cfg, info.world_size, total)
    state = ckpt.load_checkpoint(path, only=("scheduler", "trainer") if cfg.fsdp else None)
    trainer = state["trainer"]
    diff = data_differences(trainer.get("data_fingerprint"), data.fingerprint())
    if diff:
        raise ValueError(f"cannot resume from {path}: the data differs from the checkpoint's in "
                         f"{'; '.join(diff)}; the corpus or tokenizer changed since it was saved")
    if cfg.fsdp:
        sharded_checkpoint.load(path, model, opt, info, device)
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    # the schedule's lambdas are not saved: `sched` holds the one over the current total, so
    # the LR of the next step comes from it (the same float expression LambdaLR itself uses, so
    # an unchanged total gives the saved LR bit for bit)
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    data.load_state_dict(trainer["data"])
    # this rank's own RNG states (checkpoints of older versions hold rank 0's only)
    ckpt.restore_rng(trainer.get("rng_by_rank", [trainer["rng"]] * info.world_size)[info.rank])
    return int(trainer["step"]), int(trainer["skipped_steps"]), trainer.get("total_steps")
