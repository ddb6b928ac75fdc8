"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` of the peak
(GaLore's recipe: 10% warmup, cosine to 10%). A `LambdaLR`, so its state saves and resumes with
the stock scheduler `state_dict`."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, min_lr_ratio))
