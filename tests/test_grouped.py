"""The grouped (foreach) path matches the per-tensor reference: params and every state tensor, across
refreshes, with a frozen-midway weight, an empty and a 0-dim parameter, for each inner rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subspace_optim import GaLoreAdamW, I3SAdamW, SubspaceOptimizer


class Stack(nn.Module):
    """Same-shaped weights (three 8x8, two 6x10 left, one 10x6 right), biases, a scalar and an empty
    tensor."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = [(8, 8), (8, 8), (8, 8), (6, 10), (6, 10), (10, 6)]
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g) * 0.3) for s in shapes])
        self.biases = nn.ParameterList([nn.Parameter(torch.randn(8, generator=g)) for _ in range(3)])
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.empty = nn.Parameter(torch.zeros(0, 4))

    def groups(self):
        return [{"params": list(self.weights), "subspace": True, "rank": 3, "update_proj_gap": 3},
                {"params": [*self.biases, self.scalar, self.empty], "subspace": False}]

    def set_grads(self, step: int, frozen: bool):
        g = torch.Generator().manual_seed(100 + step)
        for i, w in enumerate(self.weights):
            w.grad = None if (frozen and i == 1) else torch.randn(w.shape, generator=g)
        for b in self.biases:
            b.grad = torch.randn(b.shape, generator=g)
        self.scalar.grad = torch.randn((), generator=g)
        self.empty.grad = torch.zeros(0, 4)


def run(foreach: bool, cls=SubspaceOptimizer, steps: int = 8, **kwargs):
    model = Stack()
    opt = cls(model.groups(), lr=1e-2, weight_decay=0.1, foreach=foreach, **kwargs)
    for t in range(steps):
        model.set_grads(t, frozen=3 <= t < 5)  # weight 1 misses steps 3 and 4
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls,kwargs", [
    (GaLoreAdamW, {}), (I3SAdamW, dict(transition="rotate")), (GaLoreAdamW, dict(correct_bias=False)),
    (SubspaceOptimizer, dict(inner="sgd", momentum=0.9)), (SubspaceOptimizer, dict(selector="random"))])
def test_grouped_path_matches_per_tensor_reference(cls, kwargs):
    reference, r_opt = run(False, cls, **kwargs)
    grouped, g_opt = run(True, cls, **kwargs)
    for p, q in zip(reference.parameters(), grouped.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for p, q in zip(reference.parameters(), grouped.parameters()):
        for key, value in r_opt.state[p].items():
            other = g_opt.state[q][key]
            if isinstance(value, torch.Tensor):
                size = float(value.abs().max()) if value.numel() else 0.0
                torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-7 * max(1.0, size))
            else:
                assert other == value, key


def test_dense_grouped_path_is_torch_adamw_foreach_bitwise():
    model = Stack()
    ref = Stack()
    ours = SubspaceOptimizer([{"params": list(model.biases), "subspace": False}], lr=1e-2, weight_decay=0.1,
                             foreach=True)
    torch_opt = torch.optim.AdamW(list(ref.biases), lr=1e-2, weight_decay=0.1, foreach=False)
    for t in range(5):
        model.set_grads(t, frozen=False)
        ref.set_grads(t, frozen=False)
        ours.step()
        torch_opt.step()
    for p, q in zip(model.biases, ref.biases):
        assert torch.equal(p, q)


def test_grouped_path_is_taken_for_ordinary_steps_only(monkeypatch):
    import subspace_optim.optimizer as optimizer_module

    calls = []
    original = optimizer_module.grouped_step
    monkeypatch.setattr(optimizer_module, "grouped_step", lambda *a: calls.append(len(a[1])) or original(*a))
    run(True, GaLoreAdamW, steps=4)
    # step 0 refreshes every weight; steps 1 and 2 are ordinary: buckets of the three 8x8, the two
    # 6x10 and the one 10x6 weights; step 3 refreshes the five weights that have a gradient
    assert calls == [3, 2, 1, 3, 2, 1]


def test_foreach_must_be_boolean_or_none():
    with pytest.raises(ValueError, match="foreach"):
        SubspaceOptimizer(Stack().groups(), foreach="yes")
