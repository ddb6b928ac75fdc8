"""Generic optimizer properties G1-G21 (docs/testing.md) over tests/optim_db.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import TinyNet, batches, groups_for, loss_of, params_equal, state_equal, train, through_file
from optim_db import OPTIMIZERS, OptimInfo
from subspace_optim import SubspaceOptimizer, optimizer_state_bytes

ALL = pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
# dense-path properties that hold for the Adam inner rule only (Lion and SGD: tests/test_inner_rules.py)
ADAM = pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.inner == "adam"], ids=lambda i: i.name)


def build(info: OptimInfo, model=None, **overrides):
    model = model or TinyNet()
    return model, info.make(groups_for(model), **overrides)


# ---------------------------------------------------------------------------------------- G1
BAD = [
    (dict(lr=-1.0), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
    (dict(selector="nope"), "selector"),
    (dict(transition="nope"), "transition"),
    (dict(side="up"), "side"),
    (dict(nonfinite="maybe"), "nonfinite"),
    (dict(seed=-1), "seed"),
    (dict(lr=float("nan")), "lr"),
]


@ALL
@pytest.mark.parametrize("kwargs,match", BAD, ids=[m for _, m in BAD])
def test_g1_bad_hyperparameters_rejected(info, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(info, **kwargs)


@ALL
def test_g1_bad_params_rejected(info):
    model = TinyNet()
    with pytest.raises(TypeError):
        info.make(model.up.weight)
    with pytest.raises(ValueError, match="more than one parameter group"):
        info.make([{"params": [model.up.weight], "subspace": True}, {"params": [model.up.weight]}])
    with pytest.raises(ValueError, match="proj_type"):
        info.make([{"params": [model.up.weight], "proj_type": "two-sided"}])
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="dense group"):
        info.make([{"params": [conv.weight], "subspace": True}])


# ---------------------------------------------------------------------------------------- G2
@ALL
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("scheduler", [None, "step", "plateau"])
def test_g2_loss_decreases(info, contiguous, scheduler):
    torch.manual_seed(0)
    w0 = torch.randn(10, 5) if contiguous else torch.randn(5, 10).T
    weight = nn.Parameter(w0)
    bias = nn.Parameter(torch.randn(10))
    x = torch.randn(5)
    opt = info.make([{"params": [weight], "subspace": True}, {"params": [bias]}])
    sched = None
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    elif scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2)

    def fn():
        return (weight.mv(x) + bias).pow(2).sum()

    initial = fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss = fn()
        loss.backward()
        opt.step()
        if scheduler == "plateau":
            sched.step(loss.item())
        elif sched is not None:
            sched.step()
    assert fn().item() < initial


# ---------------------------------------------------------------------------------------- G3
@ALL
def test_g3_converges_on_matrix_parabola_and_mixed(info):
    torch.manual_seed(0)
    target = torch.randn(8, 6)
    w = nn.Parameter(torch.zeros(8, 6))
    b = nn.Parameter(torch.ones(6))
    opt = info.make([{"params": [w], "subspace": True}, {"params": [b]}], lr=0.05, rank=3, update_proj_gap=5)
    for _ in range(400):
        opt.zero_grad()
        loss = ((w - target) ** 2).sum() + (b**2).sum()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * (target**2).sum().item() + 6


@ADAM
@pytest.mark.filterwarnings("ignore:.*no parameter group is projected")
def test_g3_rosenbrock_dense_path(info):
    xy = nn.Parameter(torch.tensor([-1.5, 1.5]))
    opt = info.make([{"params": [xy]}], lr=0.02)
    for _ in range(3000):
        opt.zero_grad()
        loss = (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3  # from 62.5 at the start


# ---------------------------------------------------------------------------------------- G4
@ALL
def test_g4_groups_are_separate(info):
    model = TinyNet()
    frozen_w = model.up.weight.detach().clone()
    groups = [
        {"params": [model.up.weight], "subspace": True, "lr": 1e-28},
        {"params": [model.down.weight], "subspace": True, "weight_decay": 0.5},
        {"params": [model.up.bias, model.down.bias]},
    ]
    opt = info.make(groups)
    train(model, opt, batches(3))
    assert torch.equal(model.up.weight, frozen_w)
    assert opt.param_groups[1]["weight_decay"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.0


@ADAM
def test_g4_dense_group_equals_torch_adamw_bitwise(info):
    m1, m2 = TinyNet(), TinyNet()
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    ours = info.make([{"params": list(m1.parameters()), "subspace": False}], **hp)
    ref = torch.optim.AdamW(m2.parameters(), foreach=False, **hp)
    data = batches(10)
    train(m1, ours, data)
    train(m2, ref, data)
    assert params_equal(m1, m2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(ours.state[p1]["exp_avg_sq"], ref.state[p2]["exp_avg_sq"])


# ---------------------------------------------------------------------------------------- G5
@ALL
def test_g5_all_grads_none_is_noop(info):
    model, opt = build(info)
    before = copy.deepcopy(model.state_dict())
    opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@ALL
def test_g5_param_frozen_midway(info):
    model, opt = build(info)
    data = batches(8)
    for i, batch in enumerate(data):
        opt.zero_grad()
        loss_of(model, batch).backward()
        if 3 <= i < 5:
            model.up.weight.grad = None
        opt.step()
    # the per-parameter counter only counts steps the parameter took
    assert int(opt.state[model.up.weight]["step"]) == 6
    assert int(opt.state[model.down.weight]["step"]) == 8


# ---------------------------------------------------------------------------------------- G6
@ALL
def test_g6_zero_grads_leave_params_unchanged(info):
    model, opt = build(info, weight_decay=0.0)
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in model.parameters():
        assert all(torch.isfinite(t).all() for t in opt.state[p].values() if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------ G7/G8
@ALL
@pytest.mark.parametrize("k", [2, 3, 4, 7])
@pytest.mark.parametrize("via_file", [False, True])
def test_g7_g8_state_dict_round_trip_continues_identically(info, k, via_file):
    data = batches(12)
    model, opt = build(info)
    train(model, opt, data[:k])
    sd = copy.deepcopy(opt.state_dict())
    if via_file:
        sd = through_file(sd)
    model2 = copy.deepcopy(model)
    _, opt2 = build(info, model2)
    opt2.load_state_dict(sd)
    assert state_equal(opt.state_dict(), opt2.state_dict())
    for batch in data[k:]:
        train(model, opt, [batch])
        train(model2, opt2, [batch])
        assert params_equal(model, model2)
        assert state_equal(opt.state_dict(), opt2.state_dict())


# ---------------------------------------------------------------------------------------- G9
@ALL
def test_g9_state_dtypes_survive_load_with_bf16_params(info):
    model = TinyNet(dtype=torch.bfloat16)
    opt = info.make(groups_for(model))
    train(model, opt, batches(4, dtype=torch.bfloat16))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = info.make(groups_for(model2))
    opt2.load_state_dict(sd)
    for p in (model2.up.weight, model2.down.weight):
        st = opt2.state[p]
        assert st["projector"].dtype == torch.float32
        assert isinstance(st["refresh_count"], int) and isinstance(st["inner_step"], int)
        assert isinstance(st["step"], int)
    assert state_equal(opt.state_dict(), opt2.state_dict())


# --------------------------------------------------------------------------------------- G10
@ALL
def test_g10_backward_compatible_load(info):
    model, opt = build(info)
    train(model, opt, batches(2))
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        for key in ("transition", "selector", "skipped_steps", "inner", "seed"):
            g.pop(key, None)
    _, opt2 = build(info, copy.deepcopy(model))
    opt2.load_state_dict(sd)
    opt2.step()  # no KeyError
    assert opt2.param_groups[-1]["transition"] == opt.param_groups[-1]["transition"]


# --------------------------------------------------------------------------------------- G11
@ALL
def test_g11_named_and_unnamed_state_dicts(info):
    model = TinyNet()
    named = info.make([{"params": list(model.named_parameters()), "subspace": True}])
    train(model, named, batches(3))
    sd = named.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    unnamed = info.make([{"params": list(copy.deepcopy(model).parameters()), "subspace": True}])
    unnamed.load_state_dict(copy.deepcopy(sd))
    back = info.make([{"params": list(copy.deepcopy(model).named_parameters()), "subspace": True}])
    back.load_state_dict(copy.deepcopy(unnamed.state_dict()))
    assert state_equal(back.state_dict()["state"], sd["state"])


# --------------------------------------------------------------------------------------- G12
@ALL
def test_g12_deepcopy_repr_state(info):
    model, opt = build(info, nonfinite="skip")  # not the default: the copy must carry it
    train(model, opt, batches(1))
    assert set(opt.state) == set(model.parameters())  # every parameter got its state at its first step
    text = repr(opt)  # torch's format: the class, then every group's settings
    assert text.startswith(f"{type(opt).__name__} (") and "Parameter Group 1" in text
    assert f"rank: {info.kwargs['rank']}" in text and f"lr: {info.kwargs['lr']}" in text
    clone = copy.deepcopy(opt)
    assert (clone.nonfinite, clone.defaults) == ("skip", opt.defaults)
    assert state_equal(clone.state_dict(), opt.state_dict())
    # a deep copy: its state tensors are its own
    ours = {t.data_ptr() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    assert not ours & {t.data_ptr() for st in clone.state.values() for t in st.values() if isinstance(t, torch.Tensor)}


# --------------------------------------------------------------------------------------- G13
@ALL
def test_g13_hooks_fire(info):
    model, opt = build(info)
    fired = []
    opt.register_step_pre_hook(lambda o, a, k: fired.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: fired.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: fired.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: fired.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load_post"))
    train(model, opt, batches(1))
    opt.load_state_dict(opt.state_dict())
    assert fired == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


# --------------------------------------------------------------------------------------- G14
@ALL
def test_g14_closure(info):
    model, opt = build(info)
    batch = batches(1)[0]
    with torch.no_grad():
        expected = loss_of(model, batch)  # the loss at the weights before the step
    before = copy.deepcopy(model.state_dict())
    calls = []

    def closure():
        assert torch.is_grad_enabled()
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [1] and torch.equal(loss.detach(), expected)
    assert not torch.equal(model.up.weight, before["up.weight"])  # the step used the closure's gradients


# --------------------------------------------------------------------------------------- G15
@ALL
def test_g15_determinism(info):
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model, opt = build(info)
            losses = train(model, opt, batches(8))
            runs.append((model, opt, losses))
        (m1, o1, l1), (m2, o2, l2) = runs
        assert l1 == l2 and params_equal(m1, m2) and state_equal(o1.state_dict(), o2.state_dict())
    finally:
        torch.use_deterministic_algorithms(False)


# --------------------------------------------------------------------------------------- G16
@ALL
def test_g16_bf16_dtypes_stable_across_refreshes(info):
    model = TinyNet(dtype=torch.bfloat16)
    opt = info.make(groups_for(model))
    seen = None
    for batch in batches(8, dtype=torch.bfloat16):
        train(model, opt, [batch])
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        now = {(id(p), k): (v.dtype, v.shape) for p in opt.state for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert seen is None or now == seen
        seen = now
    moment = "momentum_buffer" if info.inner == "sgd" else "exp_avg"
    assert opt.state[model.up.weight][moment].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- G17
@ALL
def test_g17_runtime_lr_change_equals_construction(info):
    data = batches(6)
    m1, o1 = build(info)
    train(m1, o1, data[:3])
    for g in o1.param_groups:
        g["lr"] = 3e-2
    train(m1, o1, data[3:])
    m2, o2 = build(info)
    train(m2, o2, data[:3])
    sd = copy.deepcopy(o2.state_dict())
    m3 = copy.deepcopy(m2)
    _, o3 = build(info, m3, lr=3e-2)
    for g_saved in sd["param_groups"]:
        g_saved["lr"] = 3e-2
    o3.load_state_dict(sd)
    train(m3, o3, data[3:])
    assert params_equal(m1, m3)


@ALL
def test_g17_rank_change_mid_run_raises(info):
    model, opt = build(info)
    train(model, opt, batches(2))
    opt.param_groups[-1]["rank"] = 1
    with pytest.raises(ValueError, match="rank"):
        train(model, opt, batches(1))


# --------------------------------------------------------------------------------------- G18
@ALL
@pytest.mark.filterwarnings("ignore:.*no parameter group is projected")
def test_g18_sparse_and_complex_rejected(info):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = info.make([{"params": emb.parameters()}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = info.make([{"params": [z]}])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


# --------------------------------------------------------------------------------------- G19
def test_g19_identity_subspace_matches_adamw():
    m1, m2 = TinyNet(), TinyNet()
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours = SubspaceOptimizer(groups_for(m1, selector="coordinate", rank=100, scale=1.0), **hp)
    ref = torch.optim.AdamW(m2.parameters(), foreach=False, **hp)
    data = batches(10)
    train(m1, ours, data)
    train(m2, ref, data)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- G21
@ALL
def test_g21_state_bytes_match_formula(info):
    model, opt = build(info)
    train(model, opt, batches(2))
    expected = 0
    r = info.kwargs["rank"]
    moments = 2 if info.inner == "adam" else 1
    for p in model.parameters():
        if p.dim() == 2:
            k, l = sorted(p.shape)  # galore side rule: the smaller dimension is projected
            # moments, fp32 projector (the step is a plain int), and the entry's extra state
            expected += moments * r * l * 4 + k * r * 4 + info.extra_state_bytes(k, l, r)
        else:
            expected += moments * p.numel() * 4 + 4
    assert optimizer_state_bytes(opt) == expected


def test_warns_when_nothing_is_projected():
    with pytest.warns(UserWarning, match="no parameter group is projected"):
        SubspaceOptimizer(TinyNet().parameters())


@ALL
def test_g10_unpickles_a_pickle_without_newer_attributes(info):
    """An optimizer pickled by a version without the per-optimizer settings gets their defaults."""
    _, opt = build(info, nonfinite="skip")
    state = opt.__getstate__()
    del state["nonfinite"], state["_default_subspace"]
    clone = type(opt).__new__(type(opt))
    clone.__setstate__(state)
    assert clone.nonfinite == "error" and clone._default_subspace is None
