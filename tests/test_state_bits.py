"""Compressed optimizer state (``state_bits`` 8/16, ``projector_bits`` 16): plain tensors that survive
``weights_only`` loads and resume bit-identically; chunked dense updates equal the unchunked ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import state_equal, through_file
from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer
from subspace_optim import quantization as q
from subspace_optim import state_storage

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """Moments large enough to be compressed (>= 4,096 elements): a 64 x 256 projected weight at rank
    16, a dense 80 x 64 embedding-like matrix, and a small bias that stays unquantised."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(80, 64, generator=g) * 0.1)
        self.w = nn.Parameter(torch.randn(64, 256, generator=g) * 0.1)
        self.b = nn.Parameter(torch.zeros(256))
        self.to(dtype)

    def loss(self, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 80, (8,), generator=g)
        y = torch.randn(8, 256, generator=g).to(self.w.dtype)
        return ((self.emb[ids] @ self.w + self.b - y) ** 2).mean()


def make(model, cls=GaLoreAdamW, rank=16, **kw):
    groups = [{"params": [model.emb, model.b]},
              {"params": [model.w], "rank": rank, "update_proj_gap": 3}]
    return cls(groups, lr=1e-2, **kw)


def run(model, opt, seeds):
    for s in seeds:
        opt.zero_grad()
        model.loss(s).backward()
        opt.step()


@pytest.mark.parametrize("bits", [8, 16])
def test_state_is_plain_compressed_tensors(bits):
    model = Net()
    opt = make(model, state_bits=bits, projector_bits=16)
    run(model, opt, range(4))
    st = opt.state[model.w]
    suffix = {8: ("_codes", "_absmax"), 16: ("_bf16",)}[bits]
    for key in ("exp_avg", "exp_avg_sq"):
        assert key not in st and all(key + s in st for s in suffix)
        assert key not in opt.state[model.emb]
    if bits == 8:
        assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_codes"].shape == (16, 256)
        assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].shape == (16,)
    else:
        assert st["exp_avg_bf16"].dtype == torch.bfloat16
    assert st["projector"].dtype == torch.bfloat16
    assert opt.state[model.b]["exp_avg"].dtype == torch.float32  # 256 elements: unquantised


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, I3SAdamW, OnlineSubspaceAdamW, LDAdamW])
@pytest.mark.parametrize("k", [2, 3])
def test_resume_is_bitwise_through_a_weights_only_file(cls, k, param_dtype):
    m1 = Net(dtype=param_dtype)
    o1 = make(m1, cls, state_bits=8, projector_bits=16)
    run(m1, o1, range(k))
    sd = through_file(copy.deepcopy(o1.state_dict()))
    m2 = Net(seed=4, dtype=param_dtype)
    m2.load_state_dict(m1.state_dict())
    o2 = make(m2, cls, state_bits=8, projector_bits=16)
    o2.load_state_dict(sd)
    assert state_equal(o1.state_dict(), o2.state_dict())  # codes, scales, bf16 basis keep their dtypes
    for s in range(k, 7):
        run(m1, o1, [s])
        run(m2, o2, [s])
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert state_equal(o1.state_dict(), o2.state_dict())


def test_quantised_round_trip_error_is_small_and_zeros_stay_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    for signed, values in ((True, x), (False, x.abs() ** 2)):
        codes, absmax = q.empty_codes(values.shape, "cpu")
        q.quantize_into(values, codes, absmax, signed)
        back = q.dequantize(codes, absmax, signed)
        assert (back - values).norm() / values.norm() < 0.02
        assert torch.equal(q.dequantize(codes, absmax, signed), back)  # decoding is deterministic
    codes, absmax = q.empty_codes((300,), "cpu")
    assert torch.equal(q.dequantize(codes, absmax, True), torch.zeros(300))


def test_chunked_quantisation_equals_whole():
    x = torch.randn(5000)
    whole = q.empty_codes(x.shape, "cpu")
    q.quantize_into(x, *whole, True)
    parts = q.empty_codes(x.shape, "cpu")
    for s in range(0, 5000, 1024):
        e = min(5000, s + 1024)
        q.quantize_into(x[s:e], parts[0][s:e], parts[1][s // 256:q.blocks(e)], True)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("inner", ["adam", "lion", "sgd"])
def test_chunked_dense_update_equals_unchunked(bits, inner, monkeypatch):
    runs = []
    for chunk in (1 << 20, 512):  # one chunk (the reference), then 10 chunks with a ragged end
        monkeypatch.setattr(state_storage, "CHUNK", chunk)
        monkeypatch.setattr(state_storage.dense_update, "__defaults__", (chunk,))
        model = Net()
        opt = make(model, state_bits=bits, inner=inner)
        run(model, opt, range(4))
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert state_equal(o1.state_dict(), o2.state_dict())


def test_small_dense_tensors_keep_adamw_exactly():
    p1 = nn.Parameter(torch.randn(100))
    p2 = nn.Parameter(p1.detach().clone())
    ours = SubspaceOptimizer([p1], lr=1e-2, state_bits=8)
    ref = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.0)
    for s in range(3):
        g = torch.randn(100, generator=torch.Generator().manual_seed(s))
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(p1, p2)


def test_8bit_tracks_fp32_states_closely():
    losses = {}
    for bits in (32, 8):
        model = Net()
        opt = make(model, state_bits=bits)
        run(model, opt, range(30))
        losses[bits] = model.loss(99).item()
    assert abs(losses[8] - losses[32]) < 0.02 * losses[32]


def test_a_failing_step_leaves_the_stored_state_unchanged():
    model = Net()
    opt = make(model, state_bits=8, projector_bits=16)
    run(model, opt, range(2))
    before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model.loss(5).backward()
    opt.param_groups[1]["rank"] = 8  # a mid-run rank change raises before any update
    with pytest.raises(ValueError, match="rank"):
        opt.step()
    assert state_equal(opt.state_dict()["state"], before["state"])


@pytest.mark.parametrize("key, value", [("state_bits", 4), ("state_bits", True), ("state_bits", "8"),
                                        ("projector_bits", 4), ("projector_bits", 32.5)])
def test_bad_bits_are_rejected(key, value):
    with pytest.raises(ValueError, match=key):
        make(Net(), **{key: value})


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_in_backward_with_8bit_states_equals_ordinary_steps(param_dtype):
    models = Net(dtype=param_dtype), Net(dtype=param_dtype)
    opts = [make(m, I3SAdamW, state_bits=8, projector_bits=16) for m in models]
    handle = opts[1].step_in_backward()
    for s in range(6):
        run(models[0], opts[0], [s])
        handle.backward(models[1].loss(s))
        opts[1].step()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    assert state_equal(opts[0].state_dict(), opts[1].state_dict())
