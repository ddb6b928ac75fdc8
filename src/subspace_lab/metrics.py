"""Run-directory records: JSON-lines metric files and memory readings.

`metrics.jsonl` holds one JSON object per line with an `event` key: `train` (loss, lr, grad norm,
tokens/s over the window's training time only, optimizer-state bytes, peak memory) and `eval`
(token-weighted validation loss and its exponential, the perplexity). `overlap.jsonl` holds one
record per subspace refresh of a projected parameter: `{step, name, overlap, refresh_count}`.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


class JsonlWriter:
    """Appends records to a .jsonl file (a no-op on non-zero ranks: `enabled=False`)."""

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:  # drop records written after the checkpoint we resume from
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: max_memory_allocated since the last reset (one window). CPU: the process's peak RSS
    (the OS cannot reset it, so it is a lifetime peak, reported under its own name)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def rss_peak_mb() -> float:
    """The process's lifetime peak RSS (cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float | None:
    """Current resident set size (Linux /proc), sampled every step to get a per-window peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return None
