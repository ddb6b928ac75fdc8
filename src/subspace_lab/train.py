"""The pretraining loop, readable top to bottom (nanoGPT style).

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per rank, mean loss,
backward, global-norm clip, a finiteness check, then the update. A non-finite loss or gradient
norm either raises `NonFiniteLossError` before the optimizer touches anything (policy 'error'; no
checkpoint is written), or skips the update and counts it (policy 'skip'). bf16 autocast on CUDA,
fp32 on CPU (bf16 is ~28x slower on CPU). Under `torchrun` the model is wrapped in DDP, or with
`--fsdp` sharded by FSDP2 before the optimizer is built on its shards (docs/fsdp.md); rank 0
writes metrics.jsonl, overlap.jsonl and checkpoints. The LR schedule is transformers'
`get_cosine_with_min_lr_schedule_with_warmup`, the Trainer's `cosine_with_min_lr`.
Order after a step: metrics, then the checkpoint, then (after the last step) summary.json, and
only then the evaluation: a run whose evaluation fails keeps its checkpoint and summary, and a
resume redoes the evaluation of the step it resumes from. A perplexity too large for a float
is `inf`. The parts: `meter.py` (what is measured), `refreshes.py` (subspace refreshes),
`checkpointer.py` (when to save), `resume.py` (what a resume restores and refuses).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as D
from . import in_backward_step
from .checkpointer import Checkpointer
from .config import TrainConfig
from .data import build_data
from .meter import Meter
from .metrics import JsonlWriter, write_run_files, write_summary
from .models import build_model, check_seq_len, count_params, lm_nll
from .optimizers import build_optimizer, state_bytes
from .preflight import prepare_out_dir, preflight
from .refreshes import RefreshCounter
from .resume import check_settings, find_checkpoint, resume
from .trackers import open_tracker


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    losses: list[float] = field(default_factory=list)  # per step run in this call
    evals: list[dict] = field(default_factory=list)
    final_val_loss: float | None = None
    final_val_ppl: float | None = None
    optimizer_state_bytes: int = 0
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    skipped_steps: int = 0
    refresh_time_s: float | None = None  # extra optimizer time of refresh steps (SVD, sampling)
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


def lr_schedule(opt: torch.optim.Optimizer, total: int, cfg: TrainConfig):
    """Linear warmup over round(warmup_fraction * total) steps, then cosine to min_lr_ratio."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=int(round(cfg.warmup_fraction * total)), num_training_steps=total,
        min_lr_rate=cfg.min_lr_ratio)


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, info: D.DistInfo, device, autocast) -> dict:
    """Validation loss = token-weighted mean NLL over the fixed validation set; ppl = exp(loss)."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = data.val_batches(cfg.batch_size, cfg.eval_batches, info.rank, info.world_size)
    runs = len(mine)
    if cfg.fsdp:  # each forward gathers weights with every rank: all run as many, extras unused
        runs = int(D.max_across(info, torch.tensor(runs, device=device)).item())
    for i in range(runs):
        with autocast():
            s, n = lm_nll(model, (mine[i] if i < len(mine) else data.val[:1]).to(device))
        if i < len(mine):
            nll += s.double()
            count += n
    nll, count = D.sum_across(info, nll), D.sum_across(info, count)
    model.train(was_training)
    if count.item() == 0:
        return {"val_loss": None, "val_ppl": None, "val_tokens": 0}
    loss = (nll / count).item()
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": int(count.item())}


def perplexity(loss: float) -> float:
    """exp(loss); `inf` once it overflows a double (a diverged run is a result, not a crash)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _forward_backward(model, data, cfg: TrainConfig, info, device, autocast) -> torch.Tensor:
    """`grad_accum` micro-batches: gradients of the mean loss; returns it, averaged over ranks."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x = data.next_batch(cfg.batch_size, info.rank, info.world_size).to(device)
        last = micro == cfg.grad_accum - 1
        # (FSDP reduce-scatters every micro-batch: skipping it would hold whole gradients)
        ddp = info.enabled and not cfg.fsdp
        sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                nll, n = lm_nll(model, x)
            loss = nll / n
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    return D.mean_across(info, loss_sum / cfg.grad_accum)


def _update(opt, finite: bool, step_loss, gnorm, step: int, cfg: TrainConfig) -> float | None:
    """The optimizer step, or none (weights and optimizer state untouched) for a non-finite loss or
    gradient norm: policy 'error' raises, 'skip' returns None. Returns the optimizer's seconds."""
    if finite:
        t_opt = time.perf_counter()
        opt.step()
        return time.perf_counter() - t_opt
    opt.zero_grad(set_to_none=True)
    if cfg.nonfinite == "error":
        raise NonFiniteLossError(
            f"non-finite loss {step_loss.item()} or grad norm {gnorm.item()} at step "
            f"{step + 1}; no update was applied (use --nonfinite skip to skip such steps)")
    return None


def train(cfg: TrainConfig, data=None) -> TrainResult:
    """Run (or resume) one pretraining run described by `cfg`. `data` may be prebuilt (compare
    builds it once for all optimizers); it must come from `build_data(cfg.data, cfg.seed)`."""
    # ---- checks and the run directory; refusing a resume costs nothing and touches nothing
    preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info, device = D.setup_device(cfg.device, cfg.fsdp)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if info.is_main:
        prepare_out_dir(out)
        ckpt.clean_leftovers(ckpt_root)
        if not cfg.resume and ckpt.list_valid(ckpt_root):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that "
                             f"run or choose another --out-dir")
    latest = find_checkpoint(ckpt_root, clean=False) if cfg.resume else None
    total = cfg.total_steps(info.world_size)
    if latest is not None:
        check_settings(latest, cfg, info.world_size, total)

    # ---- data (rank 0 first, so that only it trains and caches the tokenizer), model, optimizer
    if data is None:
        if not info.is_main:
            D.barrier(info)
        data = build_data(cfg.data, cfg.seed, cfg.eval_batches * cfg.batch_size * info.world_size)
        if info.is_main:
            D.barrier(info)
    raw_model = build_model(cfg.model, data.tokenizer.vocab_size, cfg.seed)
    check_seq_len(raw_model, cfg.data.seq_len)
    raw_model.to(device)
    if cfg.fsdp:  # in place: the optimizer is built on (and its state shaped like) the shards
        D.shard_model(raw_model, device)
    opt = build_optimizer(cfg.optim, raw_model, seed=cfg.seed, nonfinite=cfg.nonfinite)
    sched = lr_schedule(opt, total, cfg)
    step, skipped = 0, 0
    D.barrier(info)
    if latest is not None:
        step, skipped, saved_total = resume(latest, raw_model, opt, sched, data, cfg, info,
                                            total, device)
        if saved_total not in (None, total) and info.is_main:
            print(f"[resume] {latest.name}: the run had {saved_total} steps, now {total}; the LR "
                  f"schedule is recomputed over {total} steps from step {step} on",
                  file=sys.stderr, flush=True)
    model = raw_model
    if info.enabled and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    # updates inside backward (--step-in-backward): the optimizer's handle steps each weight as its
    # gradient completes; no global gradient norm exists then (in_backward_step.py). Under DDP the
    # handle all-reduces each bucket itself; under FSDP2 the hooks see the reduce-scattered shards.
    ddp_model = model if info.enabled and not cfg.fsdp else None
    handle = in_backward_step.start(opt, cfg, ddp_model) if cfg.step_in_backward \
        else None

    # ---- records: metrics.jsonl (mirrored to --report-to), overlap.jsonl, run files
    resume_step = step if latest is not None else None
    tracker = open_tracker(cfg.report_to, out, cfg.to_dict(), resume_step) if info.is_main \
        else None
    metrics = JsonlWriter(out / "metrics.jsonl", info.is_main, resume_step, tracker)
    overlaps = JsonlWriter(out / "overlap.jsonl", info.is_main, resume_step)
    if info.is_main:
        write_run_files(out, cfg, count_params(raw_model), data, info.world_size, device, total)
    tokens_per_step = cfg.tokens_per_step(info.world_size)
    result = TrainResult(str(out), total, skipped_steps=skipped, model=raw_model, optimizer=opt)
    meter, refreshes = Meter(device), RefreshCounter(opt)
    checkpointer = Checkpointer(ckpt_root, cfg, info, total, device)

    def eval_due(s: int) -> bool:
        return s > 0 and (bool(cfg.eval_every and s % cfg.eval_every == 0) or s == total)

    def run_eval() -> None:
        ev = {"event": "eval", "step": step, "tokens": step * tokens_per_step,
              **evaluate(model, data, cfg, info, device, autocast)}
        metrics.write(ev)
        result.evals.append(ev)

    def summarise(with_eval: bool) -> None:
        """Fill the result (every rank); rank 0 writes summary.json. Without `with_eval` the
        validation fields are None: written before a final evaluation that may fail."""
        last_eval = result.evals[-1] if result.evals and with_eval else {}
        result.final_val_loss, result.final_val_ppl = last_eval.get("val_loss"), last_eval.get("val_ppl")
        result.optimizer_state_bytes = state_bytes(opt)
        run = meter.run_summary()
        result.tokens_per_s, result.peak_memory_mb = run["tokens_per_s"], run["peak_memory_mb"]
        result.refresh_time_s, result.skipped_steps = run["refresh_time_s"], skipped
        if info.is_main:
            summary = {k: getattr(result, k) for k in (
                "steps", "final_val_loss", "final_val_ppl", "optimizer_state_bytes",
                "tokens_per_s", "refresh_time_s", "peak_memory_mb", "skipped_steps")}
            summary.update(optimizer=cfg.optim.method, lr=cfg.optim.lr, seed=cfg.seed,
                           peak_memory_kind=meter.memory_kind)
            write_summary(out / "summary.json", summary, ran_steps=bool(result.losses))

    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=cfg.optim.method, dynamic_ncols=True)
    model.train()
    if latest is not None and eval_due(step):  # it ran after the checkpoint: redo it
        if step == total:
            summarise(with_eval=False)
        run_eval()

    # ---- the loop
    try:
        while step < total:
            # forward and backward, clip, check
            t0 = time.perf_counter()
            if handle is not None:  # forward, backward and the updates in one; skips counted by opt
                step_loss, was_skipped = in_backward_step.step(
                    handle, model, opt, data, cfg, info, device, autocast, NonFiniteLossError)
                skipped += was_skipped
                gnorm, t_opt = None, None  # no global norm; the updates ran inside backward
            else:
                step_loss = _forward_backward(model, data, cfg, info, device, autocast)
                gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       cfg.clip if cfg.clip > 0 else float("inf"))
                if hasattr(gnorm, "full_tensor"):  # FSDP: a replicated DTensor, the global norm
                    gnorm = gnorm.full_tensor()
                finite = bool(torch.isfinite(step_loss) & torch.isfinite(gnorm))
                t_opt = _update(opt, finite, step_loss, gnorm, step, cfg)
                skipped += t_opt is None
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1

            # measure: loss, time, refreshes
            loss_value = step_loss.item()
            meter.add(tokens_per_step, time.perf_counter() - t0, loss_value)
            result.losses.append(loss_value)
            refreshed = refreshes.refreshed()
            for d in refreshed:
                if d["overlap"] is not None:
                    overlaps.write({"step": step, "name": d["name"], "overlap": float(d["overlap"]),
                                    "refresh_count": d["refresh_count"]})
            if t_opt is not None:
                meter.add_optimizer_time(t_opt, bool(refreshed))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{meter.window_tokens_per_s():.0f}")

            # record, checkpoint, summary, evaluation, in this order
            if step % cfg.log_every == 0 or step == total:
                metrics.write({"event": "train", "step": step, "loss": loss_value,
                               "lr": sched.get_last_lr()[0],
                               "grad_norm": None if gnorm is None else gnorm.item(),
                               "tokens": step * tokens_per_step,
                               "optimizer_state_bytes": state_bytes(opt),
                               "skipped_steps": skipped, **meter.close_window()})
            if checkpointer.due(step):
                checkpointer.save(step, raw_model, opt, sched, data, skipped)
            if step == total:
                summarise(with_eval=False)
            if eval_due(step):
                run_eval()
            if checkpointer.stop_due(step):
                break
        summarise(with_eval=True)
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.close()
    D.teardown(info)
    return result
