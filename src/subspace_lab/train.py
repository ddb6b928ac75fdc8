"""The pretraining loop, readable top to bottom (nanoGPT style).

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per rank, mean loss,
backward, global-norm clip, a finiteness check, then the update. A non-finite loss or gradient
norm either raises `NonFiniteLossError` before the optimizer touches anything (policy 'error'; no
checkpoint is written), or skips the update and counts it (policy 'skip'). bf16 autocast on CUDA,
fp32 on CPU (bf16 is ~28x slower on CPU). Under `torchrun` the model is wrapped in DDP; rank 0
writes metrics.jsonl, overlap.jsonl and checkpoints. Tokens/s counts training time only
(evaluation and checkpointing are outside the timed window).
Order after a step: metrics, then the checkpoint, then (after the last step) summary.json, and
only then the evaluation: a run whose evaluation fails keeps its checkpoint and summary, and a
resume redoes the evaluation of the step it resumes from. A perplexity too large for a float
is `inf`. Resuming (and what it refuses) is `resume.py`.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as D
from . import in_backward_step
from .config import TrainConfig
from .data import build_data
from .metrics import JsonlWriter, peak_memory_mb, reset_peak_memory, rss_mb, write_summary
from .models import build_model, check_seq_len, count_params, lm_nll
from .optimizers import build_optimizer, diagnostics, options_from_config, state_bytes
from .preflight import prepare_out_dir, preflight
from .resume import check_settings, find_checkpoint, resume
from .schedule import warmup_cosine


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


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, info: D.DistInfo, device, autocast) -> dict:
    """Validation loss = token-weighted mean NLL over the fixed validation set; ppl = exp(loss)."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x in data.val_batches(cfg.batch_size, cfg.eval_batches, info.rank, info.world_size):
        with autocast():
            s, n = lm_nll(model, x.to(device))
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


def _refresh_overhead(opt_times: dict[bool, list[float]]) -> float | None:
    """Total extra time of the optimizer steps that refreshed a subspace, over the median plain
    step (None when no step refreshed, e.g. AdamW). Included in tokens/s, reported separately."""
    plain, refresh = sorted(opt_times[False]), opt_times[True]
    if not refresh:
        return None
    base = plain[len(plain) // 2] if plain else 0.0
    return sum(max(0.0, t - base) for t in refresh)


def _checkpoint_objects(model, opt, sched, data, step, skipped, cfg, world_size, total) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "trainer": {"step": step, "skipped_steps": skipped, "data": data.state_dict(),
                        "rng": ckpt.capture_rng(), "config": cfg.to_dict(),
                        "data_fingerprint": data.fingerprint(), "world_size": world_size,
                        "total_steps": total, "versions": ckpt.versions()}}


def _summary(result: TrainResult, cfg: TrainConfig, device) -> dict:
    summary = {k: getattr(result, k) for k in (
        "steps", "final_val_loss", "final_val_ppl", "optimizer_state_bytes", "tokens_per_s",
        "refresh_time_s", "peak_memory_mb", "skipped_steps")}
    summary.update(optimizer=cfg.optim.name, lr=cfg.optim.lr, seed=cfg.seed,
                   peak_memory_kind="cuda_max_allocated" if device.type == "cuda"
                   else "cpu_rss_sampled")
    return summary


def train(cfg: TrainConfig, data=None) -> TrainResult:
    """Run (or resume) one pretraining run described by `cfg`. `data` may be prebuilt (compare
    builds it once for all optimizers); it must come from `build_data(cfg.data, cfg.seed)`."""
    preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev_type = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = D.setup(dev_type)
    device = torch.device(f"cuda:{info.local_rank}" if dev_type == "cuda" else "cpu")
    if dev_type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if info.is_main:
        prepare_out_dir(out)
        ckpt.clean_leftovers(ckpt_root)
        if not cfg.resume and ckpt.list_valid(ckpt_root):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that "
                             f"run or choose another --out-dir")
    # before any data is built: refusing to resume must cost nothing and touch nothing
    latest = find_checkpoint(ckpt_root, clean=False) if cfg.resume else None
    if latest is not None:
        check_settings(latest, cfg, info.world_size, cfg.total_steps(info.world_size))
    if data is None:  # rank 0 first, so only it trains and caches the tokenizer
        if not info.is_main:
            D.barrier(info)
        data = build_data(cfg.data, cfg.seed, cfg.eval_batches * cfg.batch_size * info.world_size)
        if info.is_main:
            D.barrier(info)

    model = build_model(cfg.model.name, data.tokenizer.vocab_size, cfg.seed)
    check_seq_len(model, cfg.data.seq_len)
    model.to(device)
    opt = build_optimizer(cfg.optim.name, model, options_from_config(cfg))
    total = cfg.total_steps(info.world_size)
    sched = warmup_cosine(opt, total, cfg.warmup_fraction, cfg.min_lr_ratio)
    step, skipped = 0, 0
    D.barrier(info)
    if latest is not None:
        step, skipped, saved_total = resume(latest, model, opt, sched, data, cfg,
                                            info.world_size, total)
        if saved_total not in (None, total) and info.is_main:
            print(f"[resume] {latest.name}: the run had {saved_total} steps, now {total}; the LR "
                  f"schedule is recomputed over {total} steps from step {step} on",
                  file=sys.stderr, flush=True)
    raw_model = model
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if dev_type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev_type == "cuda" \
        else contextlib.nullcontext
    handle = in_backward_step.start(opt, cfg, model if info.enabled else None) \
        if cfg.step_in_backward else None
    resume_step = step if latest is not None else None
    metrics = JsonlWriter(out / "metrics.jsonl", info.is_main, resume_step)
    overlaps = JsonlWriter(out / "overlap.jsonl", info.is_main, resume_step)
    tokens_per_step = cfg.tokens_per_step(info.world_size)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (out / "run.json").write_text(json.dumps({
            "params": count_params(raw_model), "vocab_size": data.tokenizer.vocab_size,
            "train_sequences": len(data.train), "val_sequences": len(data.val),
            "tokens_per_step": tokens_per_step, "total_steps": total,
            "world_size": info.world_size, "device": str(device),
            "versions": ckpt.versions()}, indent=1))

    result = TrainResult(str(out), total, skipped_steps=skipped, model=raw_model, optimizer=opt)

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
        result.tokens_per_s = all_tokens / all_time if all_time > 0 else None
        result.peak_memory_mb = (torch.cuda.max_memory_allocated(device) / 2**20
                                 if device.type == "cuda" else run_rss or None)
        result.skipped_steps = skipped
        result.refresh_time_s = _refresh_overhead(opt_times)
        if info.is_main:
            write_summary(out / "summary.json", _summary(result, cfg, device),
                          ran_steps=bool(result.losses))
    refreshes = {d["name"]: d["refresh_count"] for d in diagnostics(opt)}
    opt_times: dict[bool, list[float]] = {False: [], True: []}
    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=f"{cfg.optim.name}", dynamic_ncols=True)
    win_tokens, win_time, win_losses, win_rss = 0, 0.0, [], 0.0
    all_tokens, all_time, run_rss = 0, 0.0, 0.0
    reset_peak_memory(device)
    model.train()
    if latest is not None and eval_due(step):  # it ran after the checkpoint: redo it
        if step == total:
            summarise(with_eval=False)
        run_eval()
    while step < total:
        t0, t_opt = time.perf_counter(), None
        if handle is not None:  # updates inside backward: no global grad norm, no separate opt time
            step_loss, was_skipped = in_backward_step.step(
                handle, model, opt, data, cfg, info, device, autocast, NonFiniteLossError)
            skipped += was_skipped
            gnorm = None
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum if handle is None else 0):
            x = data.next_batch(cfg.batch_size, info.rank, info.world_size).to(device)
            last = micro == cfg.grad_accum - 1
            sync = model.no_sync() if info.enabled and not last else contextlib.nullcontext()
            with sync:
                with autocast():
                    nll, n = lm_nll(model, x)
                loss = nll / n
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if handle is None:
            step_loss = D.mean_across(info, loss_sum / cfg.grad_accum)
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   cfg.clip if cfg.clip > 0 else float("inf"))
        if handle is not None:
            pass  # the update ran inside backward (in_backward_step.step above)
        elif not bool(torch.isfinite(step_loss) & torch.isfinite(gnorm)):
            opt.zero_grad(set_to_none=True)  # the update never happens: weights and state intact
            if cfg.nonfinite == "error":
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"non-finite loss {step_loss.item()} or grad norm {gnorm.item()} at step "
                    f"{step + 1}; no update was applied (use --nonfinite skip to skip such steps)")
            skipped += 1
        else:
            t_opt = time.perf_counter()
            opt.step()
            t_opt = time.perf_counter() - t_opt
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        loss_value = step_loss.item()
        dt = time.perf_counter() - t0
        win_tokens, win_time = win_tokens + tokens_per_step, win_time + dt
        all_tokens, all_time = all_tokens + tokens_per_step, all_time + dt
        result.losses.append(loss_value)
        win_losses.append(loss_value)
        if device.type == "cpu":  # sampled after each step: activations are freed by then, so a
            # lower bound of the true peak (the OS cannot reset ru_maxrss per window or run)
            win_rss = max(win_rss, rss_mb() or 0.0)
            run_rss = max(run_rss, win_rss)

        refreshed = False
        for d in diagnostics(opt):  # one record per refresh that has an overlap to report
            if d["refresh_count"] > refreshes.get(d["name"], 0):
                refreshed = True
                refreshes[d["name"]] = d["refresh_count"]
                if d["overlap"] is not None:
                    overlaps.write({"step": step, "name": d["name"], "overlap": float(d["overlap"]),
                                    "refresh_count": d["refresh_count"]})
        if t_opt is not None:  # optimizer-step time, split by whether a subspace refresh ran
            opt_times[refreshed].append(t_opt)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{win_tokens / max(win_time, 1e-9):.0f}")
        if step % cfg.log_every == 0 or step == total:
            metrics.write({
                "event": "train", "step": step, "loss": loss_value,
                "loss_window_mean": sum(win_losses) / len(win_losses),
                "lr": sched.get_last_lr()[0], "grad_norm": None if gnorm is None else gnorm.item(),
                "tokens": step * tokens_per_step, "tokens_per_s": win_tokens / max(win_time, 1e-9),
                "optimizer_state_bytes": state_bytes(opt), "peak_memory_mb": peak_memory_mb(device),
                "rss_peak_mb": win_rss or None, "skipped_steps": skipped, "train_time_s": all_time})
            win_tokens, win_time, win_losses, win_rss = 0, 0.0, [], 0.0
            reset_peak_memory(device)
        stop = cfg.stop_at is not None and step >= cfg.stop_at
        if stop or (cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total)):
            if info.is_main:
                ckpt.save_checkpoint(ckpt_root, step, _checkpoint_objects(
                    raw_model, opt, sched, data, step, skipped, cfg, info.world_size, total),
                    cfg.keep_last_k)
            D.barrier(info)
        if step == total:  # before the final evaluation, which may fail
            summarise(with_eval=False)
        if eval_due(step):
            run_eval()
        if stop:
            break
    if bar is not None:
        bar.close()
    summarise(with_eval=True)
    D.teardown(info)
    return result
