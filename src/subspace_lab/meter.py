"""What the training loop measures: loss, throughput and peak memory over one logging window
(between two metric records) and over the whole run, and the extra time of refresh steps.

Tokens/s counts training time only (evaluation and checkpointing happen outside `add`). The
peak memory of a window is `metrics.peak_memory_mb` since the window began; the run's is the
largest window's.
"""
from __future__ import annotations

import torch

from .metrics import peak_memory_mb, reset_peak_memory


class Meter:
    def __init__(self, device: torch.device):
        self.device = device
        self.memory_kind = reset_peak_memory(device)
        self.run_tokens, self.run_time, self.run_peak_mb = 0, 0.0, None
        self.opt_times: dict[bool, list[float]] = {False: [], True: []}  # by "a refresh ran"
        self._window()

    def _window(self) -> None:
        self.win_tokens, self.win_time, self.win_losses = 0, 0.0, []

    def add(self, tokens: int, seconds: float, loss: float) -> None:
        self.win_tokens, self.win_time = self.win_tokens + tokens, self.win_time + seconds
        self.run_tokens, self.run_time = self.run_tokens + tokens, self.run_time + seconds
        self.win_losses.append(loss)

    def add_optimizer_time(self, seconds: float, refreshed: bool) -> None:
        self.opt_times[refreshed].append(seconds)

    def window_tokens_per_s(self) -> float:
        return self.win_tokens / max(self.win_time, 1e-9)

    def close_window(self) -> dict:
        """The window's record fields; a new window (and peak-memory window) begins."""
        peak = self._peak()
        record = {"loss_window_mean": sum(self.win_losses) / len(self.win_losses),
                  "tokens_per_s": self.window_tokens_per_s(), "peak_memory_mb": peak,
                  "train_time_s": self.run_time}
        self._window()
        reset_peak_memory(self.device)
        return record

    def _peak(self) -> float | None:
        peak = peak_memory_mb(self.device)
        if peak is not None:
            self.run_peak_mb = max(peak, self.run_peak_mb or 0.0)
        return peak

    def run_summary(self) -> dict:
        """Tokens/s, peak memory and refresh time of the run so far (None before any step)."""
        if not self.run_tokens:
            return {"tokens_per_s": None, "peak_memory_mb": None, "refresh_time_s": None}
        self._peak()
        return {"tokens_per_s": self.run_tokens / self.run_time if self.run_time > 0 else None,
                "peak_memory_mb": self.run_peak_mb, "refresh_time_s": self.refresh_overhead()}

    def refresh_overhead(self) -> float | None:
        """Total extra time of the optimizer steps that refreshed a subspace, over the median plain
        step (None when no step refreshed, e.g. AdamW). Included in tokens/s, reported apart."""
        plain, refresh = sorted(self.opt_times[False]), self.opt_times[True]
        if not refresh:
            return None
        base = plain[len(plain) // 2] if plain else 0.0
        return sum(max(0.0, t - base) for t in refresh)
