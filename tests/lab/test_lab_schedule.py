"""The lab's learning-rate schedule without a training run: linear warmup to the peak, then cosine
decay to `min_lr_ratio` of it (GaLore's recipe): transformers' `cosine_with_min_lr`, as the
LambdaLR that training steps (step s of a W-step warmup trains at s / W of the peak)."""
import math

import pytest
import torch

from lab_helpers import make_cfg
from subspace_lab.train import lr_schedule


def lrs(total, warmup_fraction, min_ratio, steps=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    cfg = make_cfg("unused", "unused", warmup_fraction=warmup_fraction, min_lr_ratio=min_ratio)
    sched = lr_schedule(opt, total, cfg)
    out = []
    for _ in range(total + 3 if steps is None else steps):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_the_floor():
    total, warmup, floor = 20, 4, 0.1  # warmup_fraction 0.2 of 20 steps
    f = lrs(total, 0.2, floor)
    assert f[:warmup] == pytest.approx([s / warmup for s in range(warmup)])
    for s in range(warmup, total + 1):
        cosine = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert f[s] == pytest.approx(floor + (1 - floor) * cosine, rel=1e-12), s
    assert f[total] == pytest.approx(floor)  # (past the end transformers' cosine rises again: the
    # lab never steps there, a resume that extends a run recomputes the schedule over the new total)


def test_no_warmup_starts_at_the_peak():
    f = lrs(10, 0.0, 0.25)
    assert f[0] == 1.0 and f[10] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(f[:10], f[1:11]))
