"""Gradient accumulation in the subspace (``step_in_backward(accumulate=k)``): equal to ordinary
accumulation (linear, so within fp32 tolerance; bitwise where the full gradient is accumulated),
and holding only ``P^T G`` for the weights that need no full gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, batches, groups_for, loss_of, state_equal, through_file
from optim_db import OPTIMIZERS
from subspace_optim import GaLoreAdamW, I3SAdamW

pytestmark = pytest.mark.usefixtures("single_thread")
K = 3


def ordinary_accumulation(model, opt, windows):
    for window in windows:
        opt.zero_grad()
        for batch in window:
            (loss_of(model, batch) / len(window)).backward()
        opt.step()


def accumulation_in_backward(model, opt, handle, windows):
    for window in windows:
        for batch in window:
            handle.backward(loss_of(model, batch) / len(window))
        opt.step()


def _windows(n, k=K, seed=1):
    data = batches(n * k, seed=seed)
    return [data[i * k:(i + 1) * k] for i in range(n)]


def _close(a, b) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_equals_ordinary_accumulation(info):
    models = TinyNet(), TinyNet()
    opts = [info.make(groups_for(m, rank=2, update_proj_gap=3), stagger_refresh=True) for m in models]
    handle = opts[1].step_in_backward(accumulate=K)
    for window in _windows(7):  # windows with and without refreshes
        ordinary_accumulation(models[0], opts[0], [window])
        accumulation_in_backward(models[1], opts[1], handle, [window])
        if info.windowed:
            assert _close(*models)
        else:  # every-step selectors accumulate full gradients exactly as autograd does
            assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_only_refreshing_weights_hold_full_gradients():
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(6, 10)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": ws, "rank": 2, "update_proj_gap": 4}], stagger_refresh=True)
    handle = opt.step_in_backward(accumulate=2)
    x = torch.randn(10, 3)
    full_per_step = []
    for _ in range(9):
        sum((w @ x).square().sum() for w in ws).backward()  # first micro-batch
        full_per_step.append(sum(w.grad is not None for w in ws))
        assert all(handle._reduced[w].shape == (2, 10) for w in ws if w.grad is None)
        sum((w @ x).square().sum() for w in ws).backward()
        assert all(w.grad is None for w in ws)
        opt.step()
    # every weight's first step, then one refreshing weight per step (4 weights, gap 4, staggered)
    assert full_per_step == [4] + [1] * 8


def test_a_weight_missing_a_micro_batch_is_updated_at_step_like_ordinary_accumulation():
    models = TinyNet(), TinyNet()
    opts = [GaLoreAdamW(groups_for(m, rank=2, update_proj_gap=3), lr=1e-2) for m in models]
    handle = opts[1].step_in_backward(accumulate=2)

    def partial_loss(model, batch, only_bias):
        x, y = batch
        out = model(x) if not only_bias else model.down.bias.expand(len(x), -1)
        return ((out - y) ** 2).mean()

    for window in _windows(5, k=2):
        opts[0].zero_grad()
        partial_loss(models[0], window[0], False).backward()
        partial_loss(models[0], window[1], True).backward()  # the weights miss this micro-batch
        opts[0].step()
        handle.backward(partial_loss(models[1], window[0], False))
        handle.backward(partial_loss(models[1], window[1], True))
        opts[1].step()
        assert _close(*models)


def test_skip_in_an_early_micro_batch_discards_the_window():
    model = TinyNet()
    opt = I3SAdamW(groups_for(model, rank=2, update_proj_gap=3), lr=1e-2, nonfinite="skip")
    handle = opt.step_in_backward(accumulate=2)
    accumulation_in_backward(model, opt, handle, _windows(2, k=2))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()["state"]))
    window = _windows(1, k=2, seed=9)[0]
    handle.backward(loss_of(model, window[0]) * float("nan"))
    handle.backward(loss_of(model, window[1]))
    opt.step()
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert state_equal(opt.state_dict()["state"], before[1]) and opt.skipped_steps == 1


def test_state_dict_mid_window_raises_and_resume_after_window_is_bitwise():
    def make(m):
        return I3SAdamW(groups_for(m, rank=2, update_proj_gap=3), lr=1e-2, stagger_refresh=True)

    m1 = TinyNet()
    o1 = make(m1)
    h1 = o1.step_in_backward(accumulate=2)
    windows = _windows(6, k=2)
    accumulation_in_backward(m1, o1, h1, windows[:2])
    h1.backward(loss_of(m1, windows[2][0]))
    with pytest.raises(RuntimeError, match="accumulation window"):
        o1.state_dict()
    h1.backward(loss_of(m1, windows[2][1]))
    o1.step()
    sd = through_file(copy.deepcopy(o1.state_dict()))
    m2 = TinyNet(seed=3)
    m2.load_state_dict(m1.state_dict())
    o2 = make(m2)
    o2.load_state_dict(sd)
    h2 = o2.step_in_backward(accumulate=2)
    accumulation_in_backward(m1, o1, h1, windows[3:])
    accumulation_in_backward(m2, o2, h2, windows[3:])
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert state_equal(o1.state_dict(), o2.state_dict())
