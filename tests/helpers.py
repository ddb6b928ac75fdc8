"""Small models, data and comparisons shared by the optimizer property tests."""

from __future__ import annotations

import copy
import io
import itertools

import torch
from torch import nn


class TinyNet(nn.Module):
    """Two 2-D weights (one wide, one tall, one square-ish) and biases: both projection sides."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def batches(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def groups_for(model: nn.Module, **subspace_options):
    """Dense group for biases, subspace group for the two weights, with names."""
    from subspace_optim import subspace_param_groups

    return subspace_param_groups(model, "all-linear", **subspace_options)


def train(model, opt, data):
    losses = []
    for batch in data:
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def rounding_tolerance(*tensors: torch.Tensor, ulps: int = 8) -> float:
    """An absolute tolerance for rounding, relative to the size of what was computed: ``ulps``
    units in the last place of the largest magnitude among ``tensors`` (docs/testing.md,
    "Portability"). Other CPU kernels round differently; this scales with the values."""
    eps = max(torch.finfo(t.dtype).eps for t in tensors)
    return ulps * eps * max(float(t.detach().abs().max()) for t in tensors if t.numel())


def state_equal(a: dict, b: dict) -> bool:
    """Bitwise equality of two (nested) optimizer state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def through_file(state_dict: dict) -> dict:
    """``state_dict`` after ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def params_equal(m1: nn.Module, m2: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def assert_resumes_identically(make_optimizer, data, k: int, via_file: bool) -> None:
    """Train ``k`` steps, load the state into fresh objects (``torch.save``/``load`` when
    ``via_file``), then both runs continue on ``data[k:]`` bitwise identically."""
    model = TinyNet()
    opt = make_optimizer(model)
    train(model, opt, data[:k])
    sd = copy.deepcopy(opt.state_dict())
    if via_file:
        sd = through_file(sd)
    model2 = TinyNet(seed=5)  # a different init: everything must come from the checkpoint
    model2.load_state_dict(model.state_dict())
    opt2 = make_optimizer(model2)
    opt2.load_state_dict(sd)
    assert state_equal(opt.state_dict(), opt2.state_dict())
    for batch in data[k:]:
        train(model, opt, [batch])
        train(model2, opt2, [batch])
        assert params_equal(model, model2)
    assert state_equal(opt.state_dict(), opt2.state_dict())


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def plackett_luce_marginals(weights, r: int) -> list[float]:
    """Exact inclusion probabilities of each index when ``r`` indices are drawn one at a time without
    replacement, each with probability proportional to the weights left (docs/testing.md, S14).
    Enumerates every ordered draw: for small problems only."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    incl = [0.0] * len(w)
    for perm in itertools.permutations(range(len(w)), r):
        prob, remaining = 1.0, 1.0
        for i in perm:
            if w[i] == 0:
                prob = 0.0
                break
            prob *= w[i] / remaining
            remaining -= w[i]
        for i in perm:
            incl[i] += prob
    return incl
