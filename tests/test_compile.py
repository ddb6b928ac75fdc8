"""torch.compile(opt.step): the compiled step matches the eager reference across refreshes, ordinary
steps compile to one graph without a break, and the non-finite policy stays all-or-nothing.

Compiling is slow on CPU (inductor builds C++ kernels), so two presets run through inductor (the
numerics of fused kernels) and the others through ``aot_eager`` (the same dynamo tracing and
functionalisation with eager kernels).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from helpers import TinyNet, batches, groups_for, loss_of, state_equal
from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer

PRESETS = {
    "galore": (GaLoreAdamW, {}, "inductor"),
    "i3s_rotate": (I3SAdamW, dict(transition="rotate"), "inductor"),
    "i3s": (I3SAdamW, {}, "aot_eager"),
    "random_reset": (SubspaceOptimizer, dict(selector="random", transition="reset"), "aot_eager"),
    "osd": (OnlineSubspaceAdamW, {}, "aot_eager"),
    "ldadam": (LDAdamW, {}, "aot_eager"),
    "galore_lion": (GaLoreAdamW, dict(inner="lion", betas=(0.9, 0.99)), "aot_eager"),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo(single_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class SpectralProblem(torch.nn.Module):
    """Weights pulled towards targets whose singular values are well apart (8, 4, 2, 1, ...).

    Compiled kernels round differently from eager ones, and a refresh's SVD amplifies a rounding
    difference by 1 / (gap between singular values): on random tiny problems with near-equal singular
    values that is chaos, not a compiler bug. Well-separated spectra keep the comparison meaningful.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wide = torch.nn.Parameter(torch.zeros(6, 10))
        self.tall = torch.nn.Parameter(torch.zeros(10, 6))
        self.square = torch.nn.Parameter(torch.zeros(8, 8))
        self.bias = torch.nn.Parameter(torch.zeros(10))
        self.targets = []
        for w in (self.wide, self.tall, self.square):
            m, n = w.shape
            u = torch.linalg.qr(torch.randn(m, m, generator=g))[0][:, : min(m, n)]
            v = torch.linalg.qr(torch.randn(n, n, generator=g))[0][:, : min(m, n)]
            s = 8.0 * 0.5 ** torch.arange(min(m, n), dtype=torch.float32)
            self.targets.append(u @ torch.diag(s) @ v.T)
        self.bias_target = torch.randn(10, generator=g)

    def loss(self, step: int):
        # a slowly moving target so that gradients change from step to step
        drift = 1.0 + 0.05 * step
        total = ((self.bias - self.bias_target) ** 2).sum()
        for w, t in zip((self.wide, self.tall, self.square), self.targets):
            total = total + ((w - drift * t) ** 2).sum()
        return total


def _groups(model):
    return [{"params": [model.bias], "subspace": False},
            {"params": [model.wide, model.tall, model.square], "subspace": True, "rank": 2,
             "update_proj_gap": 3}]


def _pair(cls, kwargs, nonfinite="skip", foreach=False):
    models = [SpectralProblem(), SpectralProblem()]
    opts = [cls(_groups(m), lr=1e-2, nonfinite=nonfinite, foreach=foreach, **kwargs) for m in models]
    return models, opts


def _run(model, step, opt, data):
    for batch in data:
        opt.zero_grad()
        if isinstance(model, SpectralProblem):
            model.loss(batch).backward()
        else:
            loss_of(model, batch).backward()
        step()


def _assert_close_states(a, b):
    for (ka, va), (kb, vb) in zip(sorted(a.items()), sorted(b.items())):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            # relative to the tensor's size: LDAdam's error buffer holds small differences of large
            # numbers, whose rounding is relative to the gradient, not to the buffer's entries
            scale = float(va.abs().max()) if va.numel() else 0.0
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=max(1e-6, 1e-5 * scale), msg=ka)
        elif isinstance(va, float):
            assert va == pytest.approx(vb, rel=1e-5, abs=1e-6)
        else:
            assert va == vb


# foreach=True: the grouped path (grouped.py), which foreach=None takes for CUDA tensors, i.e. the
# default compiled GPU step
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "grouped"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_compiled_step_matches_eager_across_refreshes(name, foreach):
    cls, kwargs, backend = PRESETS[name]
    (m_eager, m_comp), (o_eager, o_comp) = _pair(cls, kwargs, foreach=foreach)
    data = range(8)  # refreshes at steps 0, 3 and 6
    _run(m_eager, o_eager.step, o_eager, data)
    _run(m_comp, torch.compile(o_comp.step, backend=backend), o_comp, data)
    for p, q in zip(m_eager.parameters(), m_comp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(m_eager.parameters(), m_comp.parameters()):
        _assert_close_states(o_eager.state[p], o_comp.state[q])


def _ordinary_step_explanation(cls, kwargs, nonfinite, foreach=False):
    model, opt = TinyNet(), None
    opt = cls(groups_for(model, rank=2, update_proj_gap=3), lr=1e-2, nonfinite=nonfinite, foreach=foreach,
              **kwargs)
    _run(model, opt.step, opt, batches(1))  # the first step (a refresh) eagerly
    opt.zero_grad()
    loss_of(model, batches(2)[1]).backward()
    return torch._dynamo.explain(opt.step)()


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "grouped"])
@pytest.mark.parametrize("name", ["galore", "i3s", "random_reset", "galore_lion"])
def test_ordinary_steps_have_no_graph_break(name, foreach):
    cls, kwargs, _ = PRESETS[name]
    explanation = _ordinary_step_explanation(cls, kwargs, nonfinite="skip", foreach=foreach)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_compiled_nonfinite_policy_changes_nothing(nonfinite):
    """An ordinary step with a NaN gradient: 'error' raises (it keeps the eager screen), 'skip'
    takes the branch-free path; either way weights and state are bitwise unchanged."""
    model = TinyNet()
    opt = GaLoreAdamW(groups_for(model, rank=2, update_proj_gap=5), lr=1e-2, nonfinite=nonfinite)
    step = torch.compile(opt.step, backend="aot_eager")
    data = batches(4)
    _run(model, step, opt, data[:2])
    params = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    model.up.weight.grad[0, 0] = float("nan")
    if nonfinite == "error":
        with pytest.raises(RuntimeError, match="non-finite gradient in parameter up.weight"):
            step()
    else:
        step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    for pid, st in state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after[pid][key]), key
    assert opt.skipped_steps == (1 if nonfinite == "skip" else 0)
    _run(model, step, opt, data[3:])  # and the run goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_run_saves_and_resumes_like_eager():
    (m1, m2), (o1, o2) = _pair(GaLoreAdamW, {})
    data = range(6)
    step = torch.compile(o1.step, backend="aot_eager")
    _run(m1, step, o1, data[:4])
    _run(m2, o2.step, o2, data[:4])
    sd = copy.deepcopy(o1.state_dict())
    o3 = GaLoreAdamW(_groups(m2), lr=1e-2, nonfinite="skip")
    o3.load_state_dict(sd)
    assert state_equal(o3.state_dict()["param_groups"], o2.state_dict()["param_groups"])
    _run(m1, step, o1, data[4:])
    _run(m2, o3.step, o3, data[4:])
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
