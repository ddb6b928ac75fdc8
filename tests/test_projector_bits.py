"""The 8-bit projector (``projector_bits=8``): uint8 codes of the linear map plus fp32 block scales,
quantised once per basis, plain tensors that resume bit-identically, and a decoded basis that is
orthonormal to about 1e-2."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import state_equal, through_file
from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW
from subspace_optim.state_storage import stored_basis
from test_state_bits import Net, make, run

pytestmark = pytest.mark.usefixtures("single_thread")


def test_basis_is_codes_and_scales_quantised_once_per_refresh():
    model = Net()
    opt = make(model, I3SAdamW, projector_bits=8)  # update_proj_gap 3: refreshes at steps 1, 4
    run(model, opt, [0])
    st = opt.state[model.w]
    codes, absmax = st["projector"], st["projector_absmax"]
    assert codes.dtype == torch.uint8 and codes.shape == (64, 16)  # (k, r): the rank reads as before
    assert absmax.dtype == torch.float32 and absmax.shape == (4,)  # 1024 entries, blocks of 256
    run(model, opt, [1, 2])
    # steps that keep the basis put its codes back: no re-quantisation of the decoded copy
    assert st["projector"] is codes and st["projector_absmax"] is absmax
    run(model, opt, [3])
    assert not torch.equal(st["projector"], codes)


def test_decoded_basis_is_nearly_orthonormal():
    model = Net()
    opt = make(model, GaLoreAdamW, projector_bits=8)
    run(model, opt, range(2))
    basis = stored_basis(opt.state[model.w])
    error = torch.linalg.matrix_norm(basis.T @ basis - torch.eye(basis.shape[1]), 2)
    assert 1e-4 < error < 3e-2  # quantised (not exact), but close (measured ~1e-2)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, I3SAdamW, OnlineSubspaceAdamW, LDAdamW])
def test_resume_is_bitwise_through_a_weights_only_file(cls, param_dtype):
    m1 = Net(dtype=param_dtype)
    o1 = make(m1, cls, state_bits=8, projector_bits=8)
    run(m1, o1, range(2))
    sd = through_file(copy.deepcopy(o1.state_dict()))
    m2 = Net(seed=4, dtype=param_dtype)
    m2.load_state_dict(m1.state_dict())
    o2 = make(m2, cls, state_bits=8, projector_bits=8)
    o2.load_state_dict(sd)  # the fp32 scales keep their dtype (bf16 weights) through torch's load
    assert state_equal(o1.state_dict(), o2.state_dict())
    for s in range(2, 6):
        run(m1, o1, [s])
        run(m2, o2, [s])
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert state_equal(o1.state_dict(), o2.state_dict())


def test_missing_scales_are_refused_on_load():
    model = Net()
    opt = make(model, projector_bits=8)
    run(model, opt, range(2))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][2]["projector_absmax"]  # the projected weight's state
    with pytest.raises(ValueError, match="projector_absmax"):
        make(Net(), projector_bits=8).load_state_dict(sd)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_in_backward_with_8bit_projector_follows_ordinary_steps(accumulate):
    models = Net(), Net()
    # accumulate=2: rank 4, below the gradients' rank (8 rows a micro-batch), so that no direction of
    # the subspace holds only rounding noise for Adam to normalise; and fp32 moments, as 8-bit ones
    # would turn accumulation's rounding differences into whole code steps
    kw = dict(state_bits=8) if accumulate == 1 else dict(state_bits=32, rank=4)
    opts = [make(m, I3SAdamW, projector_bits=8, **kw) for m in models]
    handle = opts[1].step_in_backward(accumulate=accumulate)
    for s in range(6):
        opts[0].zero_grad()
        for j in range(accumulate):
            (models[0].loss(10 * s + j) / accumulate).backward()
            handle.backward(models[1].loss(10 * s + j) / accumulate)
        opts[0].step()
        opts[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        if accumulate == 1:  # the same arithmetic: P^T G from the same decoded basis
            assert torch.equal(a, b)
        else:  # projected accumulation sums in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))


def test_8bit_projector_tracks_fp32_closely():
    losses = {}
    for bits in (32, 8):
        model = Net()
        run(model, make(model, projector_bits=bits), range(30))
        losses[bits] = model.loss(99).item()
    assert abs(losses[8] - losses[32]) < 0.02 * losses[32]
