"""Updates inside backward: the same trajectory as ordinary steps, one checkpointable optimizer,
clipping and the non-finite policy."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import TinyNet, batches, groups_for, loss_of, params_equal, state_equal, through_file, train
from optim_db import OPTIMIZERS
from subspace_optim import GaLoreAdamW, I3SAdamW

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(info, **overrides):
    models = TinyNet(), TinyNet()
    opts = [info.make(groups_for(m, rank=2, update_proj_gap=3), **overrides) for m in models]
    return models, opts


def train_in_backward(model, opt, handle, data, two_pass=False):
    for batch in data:
        handle.backward(loss_of(model, batch))
        assert all(p.grad is None for p in model.parameters())
        opt.step()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_trajectory_equals_ordinary_steps_bitwise(info):
    (m1, m2), (o1, o2) = _pair(info)
    handle = o2.step_in_backward()
    for batch in batches(8):  # straddles two refreshes (gap 3)
        train(m1, o1, [batch])
        train_in_backward(m2, o2, handle, [batch])
        assert params_equal(m1, m2)
        assert state_equal(o1.state_dict(), o2.state_dict())


def test_each_gradient_is_freed_before_the_next_parameter_is_updated():
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2, update_proj_gap=3), lr=1e-2)
    live = []
    with opt.step_in_backward():
        for p in model.parameters():  # run after the handle's hooks: see the state after each update
            p.register_post_accumulate_grad_hook(
                lambda p: live.append(sum(q.grad is not None for q in model.parameters())))
        loss_of(model, batches(1)[0]).backward()
    assert live == [0] * 4  # no gradient ever outlives its parameter's update


def test_lr_scheduler_sees_steps_and_matches_ordinary():
    (m1, m2), (o1, o2) = _pair(OPTIMIZERS[0])
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    handle = o2.step_in_backward()
    with torch.autograd.set_grad_enabled(True):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the "scheduler.step() before optimizer.step()" warning
            for batch in batches(6):
                train(m1, o1, [batch])
                s1.step()
                train_in_backward(m2, o2, handle, [batch])
                s2.step()
    assert params_equal(m1, m2) and o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_resume_in_backward_is_bitwise(k):
    data = batches(8)

    def make(m):
        return I3SAdamW(groups_for(m, rank=2, update_proj_gap=3), lr=1e-2)

    m1 = TinyNet()
    o1 = make(m1)
    h1 = o1.step_in_backward()
    train_in_backward(m1, o1, h1, data[:k])
    sd = through_file(copy.deepcopy(o1.state_dict()))
    m2 = TinyNet(seed=5)
    m2.load_state_dict(m1.state_dict())
    o2 = make(m2)
    o2.load_state_dict(sd)
    h2 = o2.step_in_backward()
    for batch in data[k:]:
        train_in_backward(m1, o1, h1, [batch])
        train_in_backward(m2, o2, h2, [batch])
        assert params_equal(m1, m2)
    assert state_equal(o1.state_dict(), o2.state_dict())


def test_remove_returns_to_ordinary_steps():
    (m1, m2), (o1, o2) = _pair(OPTIMIZERS[1])
    data = batches(6)
    with o2.step_in_backward() as handle:
        train_in_backward(m2, o2, handle, data[:3])
    train(m1, o1, data[:3])
    loss_of(m2, data[3]).backward()
    assert all(p.grad is not None for p in m2.parameters())  # no hook left
    o2.step()
    o2.zero_grad()
    train(m2, o2, data[4:])
    train(m1, o1, data[3:])
    assert params_equal(m1, m2) and state_equal(o1.state_dict(), o2.state_dict())


def test_per_parameter_clipping_equals_clip_grad_norm_per_parameter():
    (m1, m2), (o1, o2) = _pair(OPTIMIZERS[0])
    handle = o2.step_in_backward(max_grad_norm=0.3)
    for batch in batches(5):
        o1.zero_grad()
        loss_of(m1, batch).backward()
        for p in m1.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.3)
        o1.step()
        train_in_backward(m2, o2, handle, [batch])
    assert params_equal(m1, m2)


def _opt_order(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("via_closure", [False, True])
def test_two_pass_clipping_equals_global_clip_grad_norm(via_closure):
    (m1, m2), (o1, o2) = _pair(OPTIMIZERS[1])
    handle = o2.step_in_backward(max_grad_norm=0.3, two_pass=True)
    for batch in batches(5):
        o1.zero_grad()
        loss_of(m1, batch).backward()
        torch.nn.utils.clip_grad_norm_(_opt_order(o1), 0.3)
        o1.step()
        if via_closure:
            loss = o2.step(lambda: loss_of(m2, batch).backward())
        else:
            handle.backward(loss_of(m2, batch))
            o2.step()
        assert params_equal(m1, m2)
    assert state_equal(o1.state_dict(), o2.state_dict())


def test_two_pass_needs_handle_backward_or_closure():
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2), lr=1e-2)
    opt.step_in_backward(two_pass=True)
    with pytest.raises(RuntimeError, match="handle.backward"):
        loss_of(model, batches(1)[0]).backward()


# ------------------------------------------------------------------------------ non-finite
def _loss(model, batch, where):
    """A loss whose backward gives NaN: everywhere, the first gradient to arrive included (``loss``:
    a NaN loss; ``down``: a finite loss, NaN from the output's gradient on), or only in ``up``'s
    weight, which arrives after ``down`` was updated."""
    x, y = batch
    out = model(x)
    if where == "down":
        out.register_hook(lambda g: torch.full_like(g, float("nan")))
    if where == "up":  # one backward only: a parameter's tensor hook outlives it otherwise
        def once(g):
            handle.remove()
            return torch.full_like(g, float("nan"))
        handle = model.up.weight.register_hook(once)
    loss = ((out - y) ** 2).mean()
    return loss * float("nan") if where == "loss" else loss


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("where", ["loss", "down", "up"])
def test_nonfinite_skip_is_all_or_nothing(where, two_pass):
    """``down`` gets its gradient first in backward (a non-finite first gradient), ``up`` after
    ``down`` was updated: torn in one pass, skipped cleanly with two passes."""
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2), lr=1e-2, nonfinite="skip")
    handle = opt.step_in_backward(two_pass=two_pass)
    train_in_backward(model, opt, handle, batches(2))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    loss = _loss(model, batches(1, seed=7)[0], where)
    if where == "up" and not two_pass:
        with pytest.raises(RuntimeError, match="torn"):
            handle.backward(loss)
        return
    handle.backward(loss)
    opt.step()
    assert params_equal_dict(model.state_dict(), before[0])
    assert state_equal(opt.state_dict()["state"], before[1]["state"])
    assert opt.skipped_steps == 1
    train_in_backward(model, opt, handle, batches(1))  # the next finite step proceeds
    assert not params_equal_dict(model.state_dict(), before[0])


@pytest.mark.parametrize("where", ["loss", "down"])
def test_nonfinite_error_names_what_and_changes_nothing(where):
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2), lr=1e-2)
    handle = opt.step_in_backward()
    train_in_backward(model, opt, handle, batches(2))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    loss = _loss(model, batches(1)[0], where)
    match = "non-finite loss" if where == "loss" else r"non-finite gradient in parameter down.\w+ at its step 3"
    with pytest.raises(RuntimeError, match=match):
        handle.backward(loss)
    assert params_equal_dict(model.state_dict(), before[0]) and state_equal(opt.state_dict(), before[1])


def params_equal_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ misuse
def test_two_backwards_without_step_raise():
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2), lr=1e-2)
    handle = opt.step_in_backward()
    handle.backward(loss_of(model, batches(1)[0]))
    with pytest.raises(RuntimeError, match="call opt.step"):
        handle.backward(loss_of(model, batches(1)[0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(accumulate=0), "accumulate"), (dict(accumulate=1.5), "accumulate"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(two_pass="yes"), "two_pass"), (dict(accumulate=2, max_grad_norm=1.0), "accumulate=1"),
    (dict(accumulate=2, two_pass=True), "accumulate=1"),
])
def test_bad_options_are_rejected(kwargs, match):
    opt = GaLoreAdamW(groups_for(TinyNet(), rank=2), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.step_in_backward(**kwargs)


def test_one_handle_at_a_time():
    opt = GaLoreAdamW(groups_for(TinyNet(), rank=2), lr=1e-2)
    handle = opt.step_in_backward()
    with pytest.raises(RuntimeError, match="already has an active handle"):
        opt.step_in_backward()
    handle.remove()
    opt.step_in_backward().remove()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_llama_with_activation_checkpointing_equals_ordinary_steps(checkpointing):
    """A real transformers model (micro LLaMA), with and without its activation checkpointing."""
    from subspace_lab.models import build_model
    from subspace_optim import subspace_param_groups

    models = [build_model("micro", 64, seed=0) for _ in range(2)]
    opts = [I3SAdamW(subspace_param_groups(m, "all-linear", rank=4, update_proj_gap=2), lr=1e-2)
            for m in models]
    for m in models:
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    handle = opts[1].step_in_backward()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        opts[0].zero_grad()
        models[0](input_ids=ids, labels=ids).loss.backward()
        opts[0].step()
        handle.backward(models[1](input_ids=ids, labels=ids).loss)
        opts[1].step()
        assert params_equal(*models)
    assert state_equal(opts[0].state_dict(), opts[1].state_dict())


def test_handle_follows_param_groups_replaced_by_load_state_dict():
    """load_state_dict replaces the param-group dicts (a resume; accelerate's device placement): the
    hooks must read the live groups, whose lr the scheduler changes."""
    (m1, m2), (o1, o2) = _pair(OPTIMIZERS[0])
    handle = o2.step_in_backward()
    o2.load_state_dict(copy.deepcopy(o2.state_dict()))
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda step: 0.5 ** step)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda step: 0.5 ** step)
    for batch in batches(4):
        train(m1, o1, [batch])
        s1.step()
        train_in_backward(m2, o2, handle, [batch])
        s2.step()
    assert params_equal(m1, m2)
