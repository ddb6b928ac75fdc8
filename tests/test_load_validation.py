"""load_state_dict checks what it loads; a failed step leaves nothing behind; fp16 and galore-torch
arguments (the library faults of the portability-and-faults issue)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, batches, groups_for, state_equal, train
from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, MeZO, OnlineSubspaceAdamW, SubspaceOptimizer, SubZero
from subspace_optim.selectors import SELECTORS, Selector


def trained(cls=GaLoreAdamW, steps=3, **kw):
    model = TinyNet()
    opt = cls(groups_for(model, rank=2, update_proj_gap=2), lr=1e-2, **kw)
    train(model, opt, batches(steps))
    return model, opt


def fresh(model, cls=GaLoreAdamW, rank=2, **kw):
    return cls(groups_for(copy.deepcopy(model), rank=rank, update_proj_gap=2), lr=1e-2, **kw)


def assert_refused(opt, sd, match, **kw):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd, **kw)
    assert state_equal(opt.state_dict(), before)  # nothing was loaded


def test_method_switch_is_refused_unless_allowed():
    model, galore = trained()
    i3s = fresh(model, I3SAdamW)
    assert_refused(i3s, copy.deepcopy(galore.state_dict()), r"selector='dominant'.*allow_method_change")
    i3s.load_state_dict(copy.deepcopy(galore.state_dict()), allow_method_change=True)
    assert i3s.param_groups[-1]["selector"] == "dominant"  # the saved method, deliberately


@pytest.mark.parametrize("key,value", [("transition", "rotate"), ("inner", "lion"), ("error_feedback", True),
                                       ("side", "left"), ("subspace", False)])
def test_every_method_key_is_guarded(key, value):
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][-1][key] = value
    assert_refused(fresh(model), sd, f"{key}=")


def test_torch_adamw_state_is_refused():
    model = TinyNet()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, adamw, batches(2))
    opt = GaLoreAdamW([{"params": list(model.parameters()), "rank": 2}], lr=1e-2)
    assert_refused(opt, copy.deepcopy(adamw.state_dict()), "no 'subspace' key")
    # deliberately: the dense AdamW state fits, the projected weights lack projectors
    with pytest.raises(ValueError, match="projector"):
        opt.load_state_dict(copy.deepcopy(adamw.state_dict()), allow_method_change=True)


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), "lr"), ("betas", (0.9, 1.5), r"betas\[1\]"), ("weight_decay", -1.0, "weight_decay"),
    ("update_proj_gap", 0, "update_proj_gap"), ("selector", "nonsense", "selector")])
def test_bad_group_values_are_refused(key, value, match):
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][-1][key] = value
    assert_refused(fresh(model), sd, match, allow_method_change=True)


def test_nan_projector_is_refused():
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    pid = sd["param_groups"][-1]["params"][0]
    sd["state"][pid]["projector"][0, 0] = float("nan")
    assert_refused(fresh(model), sd, "projector holds non-finite")


def test_state_of_another_rank_is_refused():
    model, opt = trained()
    assert_refused(fresh(model, rank=3), copy.deepcopy(opt.state_dict()), "rank=2")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][-1]["rank"] = 3  # rank-2 state under a group that claims rank 3
    assert_refused(fresh(model, rank=3), sd, r"projector has shape .*expected")


@pytest.mark.parametrize("key", ["projector", "exp_avg_sq", "inner_step"])
def test_missing_state_key_fails_at_load_naming_it(key):
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    pid = sd["param_groups"][-1]["params"][0]
    del sd["state"][pid][key]
    assert_refused(fresh(model), sd, f"lacks .*{key}")


def test_missing_error_buffer_and_osd_keys_are_named():
    model, opt = trained(LDAdamW)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][sd["param_groups"][-1]["params"][0]]["error_buffer"]
    assert_refused(fresh(model, LDAdamW), sd, "error_buffer")
    model, opt = trained(OnlineSubspaceAdamW)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][sd["param_groups"][-1]["params"][0]]["osd_exp_avg"]
    assert_refused(fresh(model, OnlineSubspaceAdamW), sd, "osd_exp_avg")


def test_valid_state_still_loads_and_older_states_gain_new_keys():
    model, opt = trained()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st.pop("refresh_phase", None)  # saved before staggered refresh existed
    opt2 = fresh(model)
    opt2.load_state_dict(sd)
    assert all(opt2.state[p]["refresh_phase"] == 0 for p in opt2.param_groups[-1]["params"])


def test_mezo_state_into_subzero_fails_at_load_naming_the_keys():
    model = TinyNet()
    mezo = MeZO(model.parameters(), lr=1e-3)
    loss = lambda: ((model(batches(1)[0][0]) - batches(1)[0][1]) ** 2).mean()  # noqa: E731
    mezo.step(loss)
    sub = SubZero(copy.deepcopy(model).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="reshape_min_dim"):
        sub.load_state_dict(copy.deepcopy(mezo.state_dict()))
    sub.step(loss)
    with pytest.raises(ValueError, match="not saved by MeZO"):
        MeZO(copy.deepcopy(model).parameters()).load_state_dict(copy.deepcopy(sub.state_dict()))


class _Failing(Selector):
    name = "failing_for_test"

    def select(self, grad, previous, rank, ctx):
        raise RuntimeError("selection failed")


def test_failed_first_step_leaves_no_empty_state(monkeypatch):
    monkeypatch.setitem(SELECTORS, _Failing.name, _Failing())
    w = nn.Parameter(torch.randn(6, 10))
    opt = SubspaceOptimizer([{"params": [w], "rank": 2}], selector=_Failing.name)
    w.grad = torch.randn(6, 10)
    with pytest.raises(RuntimeError, match="selection failed"):
        opt.step()
    assert w not in opt.state and opt.state_dict()["state"] == {}


def test_rank_change_fails_before_any_parameter_moves():
    model, opt = trained()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[-1]["rank"] = 3
    opt.zero_grad()
    model(batches(1)[0][0]).sum().backward()
    with pytest.raises(ValueError, match="rank/side"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_weights_with_a_large_finite_gradient_stay_finite():
    # A projected gradient sums a whole dimension: 3000 * 1024 / sqrt(1024) ~ 1e5 > fp16's 65504.
    p = nn.Parameter(torch.randn(1024, 1024, dtype=torch.float16))
    opt = GaLoreAdamW([{"params": [p], "rank": 8}])
    p.grad = torch.full_like(p, 3000.0)
    opt.step()
    assert torch.isfinite(p).all()
    assert opt.state[p]["exp_avg"].dtype == torch.float32  # fp16 weights keep fp32 subspace state


def test_galore_torch_arguments_are_accepted():
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2), lr=1e-2, no_deprecation_warning=True, correct_bias=True)
    train(model, opt, batches(2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        GaLoreAdamW(groups_for(model, rank=2), lr=1e-2, no_such_option=1)


def test_correct_bias_false_drops_both_bias_corrections():
    """transformers' / galore-torch's AdamW with correct_bias=False: step size lr, no sqrt(1 - beta2^t)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    start = w.detach().clone()
    opt = SubspaceOptimizer([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, correct_bias=False)
    m = torch.zeros(5)
    v = torch.zeros(5)
    for _ in range(3):
        g = torch.randn(5)
        w.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        start = start - 0.1 * m / (v.sqrt() + 1e-6)
    torch.testing.assert_close(w.detach(), start, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="correct_bias"):
        SubspaceOptimizer([w], correct_bias="no")
