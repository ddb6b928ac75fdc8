"""Run-directory records: JSON-lines metric files and memory readings.

`metrics.jsonl` holds one JSON object per line with an `event` key: `train` (loss, lr, grad norm,
tokens/s over the window's training time only, optimizer-state bytes, peak memory of the window)
and `eval`
(token-weighted validation loss and its exponential, the perplexity). `overlap.jsonl` holds one
record per subspace refresh of a projected parameter: `{step, name, overlap, refresh_count}`.
A process killed mid-write leaves a torn last line (no newline, not valid JSON): readers drop it,
since it is what every crash may leave; an unreadable line anywhere else is an error naming the
file and line.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


class JsonlWriter:
    """Appends records to a .jsonl file (a no-op on non-zero ranks: `enabled=False`), and mirrors
    them to a tracker (`trackers.py`) if one is given."""

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tracker=None):
        self.path, self.enabled, self.tracker = Path(path), enabled, tracker
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:  # drop records written after the checkpoint we resume from, and the evaluation of
            # that step itself: it runs after the checkpoint is saved, so the resume redoes it
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) < resume_step or
                    (r.get("step", 0) == resume_step and r.get("event") != "eval")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a .jsonl file ([] if it does not exist); a torn last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")  # a complete file ends with "\n": its last piece is ""
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({e}); fix or remove it") from None
    return out


def write_summary(path: str | Path, summary: dict, ran_steps: bool) -> None:
    """Write a run's summary.json. A resume that ran no step (it only redid the final
    evaluation) measured no speed or memory: it keeps the earlier call's values."""
    path = Path(path)
    if not ran_steps and path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        for k in ("tokens_per_s", "refresh_time_s", "peak_memory_mb"):
            summary[k] = old.get(k) if summary.get(k) is None else summary[k]
    path.write_text(json.dumps(summary, indent=1))


def reset_peak_memory(device: torch.device) -> str:
    """Start a peak-memory window; returns what `peak_memory_mb` then measures (for reports)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_lifetime"


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory (MiB) since the last `reset_peak_memory`: on CUDA `max_memory_allocated`; on
    CPU the peak resident set size (VmHWM; where it cannot be reset, the process's lifetime peak,
    as `reset_peak_memory` says)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_run_files(out: Path, cfg, params: int, data, world_size: int, device, total: int) -> None:
    """`config.json` (the run's settings) and `run.json` (what it ran on, how large it is)."""
    from .checkpoint import versions

    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (out / "run.json").write_text(json.dumps({
        "params": params, "vocab_size": data.tokenizer.vocab_size,
        "train_sequences": len(data.train), "val_sequences": len(data.val),
        "tokens_per_step": cfg.tokens_per_step(world_size), "total_steps": total,
        "world_size": world_size, "device": str(device), "versions": versions()}, indent=1))
