"""The row-blocked back-projected update of low-precision weights equals the unblocked reference."""

import pytest
import torch

from subspace_optim import I3SAdamW
from subspace_optim.blocked_update import back_project_and_apply
from subspace_optim.linalg import orthonormalize


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("sign", [False, True])
def test_blocks_equal_the_whole_update(left, sign):
    g = torch.Generator().manual_seed(0)
    m, n, r = 300, 200, 16
    k, l = (m, n) if left else (n, m)
    basis = orthonormalize(torch.randn(k, r, generator=g))
    direction = torch.randn(r, l, generator=g)
    weights = [torch.randn(m, n, generator=g).to(torch.bfloat16) for _ in range(1)] * 2
    whole, blocked = weights[0].clone(), weights[1].clone()
    back_project_and_apply(whole, basis, direction, left, 1e-2, 1e-2, 0.1, sign, block_bytes=None)
    back_project_and_apply(blocked, basis, direction, left, 1e-2, 1e-2, 0.1, sign, block_bytes=4 * 200 * 7)
    assert torch.equal(whole, blocked)


def test_bf16_training_with_blocks_matches_the_reference(monkeypatch):
    import subspace_optim.blocked_update as B

    runs = []
    for block in (None, 4 * 64 * 5):
        monkeypatch.setattr(B.back_project_and_apply, "__defaults__", (block, None, False))
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(48, 64).to(torch.bfloat16))
        opt = I3SAdamW([{"params": [w], "rank": 8, "update_proj_gap": 2}], lr=1e-2)
        for s in range(4):
            w.grad = torch.randn(48, 64, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16)
            opt.step()
        runs.append(w.detach().clone())
    assert torch.equal(*runs)
