"""Loaded state is the optimizer's own (G7), and state round trips keep every dtype for any mix of
parameter dtypes (G9, a property test). See docs/testing.md."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import TinyNet, batches, groups_for, state_equal, through_file, train
from optim_db import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread is faster

ALL = pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)


def state_tensors(opt) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


@ALL
@pytest.mark.parametrize("via_file", [False, True])
def test_g7_loaded_state_does_not_share_storage_with_the_loaded_dict(info, via_file):
    """``state_dict()`` returns the live state tensors; an optimizer loaded from it must copy them,
    or stepping one optimizer would move the other (and a checkpoint dict kept in memory)."""
    data = batches(6)
    model = TinyNet()
    opt = info.make(groups_for(model))
    train(model, opt, data[:3])
    sd = opt.state_dict()
    if via_file:
        sd = through_file(sd)
    saved = copy.deepcopy(sd)
    model2 = copy.deepcopy(model)
    opt2 = info.make(groups_for(model2))
    opt2.load_state_dict(sd)
    loaded = {t.data_ptr() for t in state_tensors(opt2)}
    assert not loaded & {t.data_ptr() for st in sd["state"].values() for t in st.values()
                         if isinstance(t, torch.Tensor)}
    train(model2, opt2, data[3:])
    assert state_equal(sd, saved)  # the loaded dict is untouched by the loaded optimizer's steps
    assert state_equal(opt.state_dict(), saved)  # and so is the optimizer it came from


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@settings(max_examples=15, deadline=None)
@given(info=st.sampled_from(OPTIMIZERS), dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
       steps=st.integers(1, 4))
def test_g9_state_round_trip_for_any_dtype_mix(info, dtypes, steps):
    """Parameters of mixed dtypes (a 2-D weight and a bias each): after ``steps`` steps, a
    save/load round trip gives a state equal bitwise and in dtype, and an identical continuation."""
    g = torch.Generator().manual_seed(len(dtypes) * 10 + steps)
    shapes = [(5, 7), (7,), (6, 4), (4,), (3, 8), (8,)]

    def make_params():
        return [nn.Parameter((torch.randn(shapes[j], generator=torch.Generator().manual_seed(j)) * 0.5)
                             .to(dtypes[j // 2])) for j in range(2 * len(dtypes))]

    def groups(params):
        return [{"params": [(f"w{j}", p) for j, p in enumerate(params) if p.dim() == 2], "subspace": True},
                {"params": [(f"b{j}", p) for j, p in enumerate(params) if p.dim() == 1]}]

    grads = [[torch.randn(s, generator=g) for s in shapes[: 2 * len(dtypes)]] for _ in range(steps + 2)]

    def step(opt, params, gs):
        for p, grad in zip(params, gs):
            p.grad = grad.to(p.dtype)
        opt.step()

    params = make_params()
    opt = info.make(groups(params))
    for gs in grads[:steps]:
        step(opt, params, gs)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = info.make(groups(params2))
    opt2.load_state_dict(through_file(opt.state_dict()))
    assert state_equal(opt.state_dict(), opt2.state_dict())  # dtypes included
    for p in params2:
        if p.dim() == 2:
            assert opt2.state[p]["projector"].dtype == torch.float32
    for gs in grads[steps:]:
        step(opt, params, gs)
        step(opt2, params2, gs)
        assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert state_equal(opt.state_dict(), opt2.state_dict())
