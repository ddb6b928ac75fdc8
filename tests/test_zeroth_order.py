"""MeZO and SubZero: the zeroth-order properties Z1-Z8 of docs/testing.md, the estimator's expectation
on a quadratic, precision of the perturb/restore round trip, resume, and bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from subspace_optim.rng import generator_for
from subspace_optim.zeroth_order import MeZO, SubZero

OPTIMIZERS = {"mezo": MeZO, "subzero": SubZero}
SMALL = {"mezo": dict(lr=1e-2, eps=1e-3), "subzero": dict(lr=1e-2, eps=1e-3, rank=2, update_proj_gap=3)}


pytestmark = pytest.mark.usefixtures("single_thread")


def make(name, params, **overrides):
    return OPTIMIZERS[name](params, **{**SMALL[name], **overrides})


class Net(nn.Module):
    """A wide and a tall weight, biases, and a thin LoRA-like matrix (reshaped by SubZero)."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        self.up = nn.Linear(6, 40)
        self.down = nn.Linear(40, 4)
        self.lora = nn.Parameter(torch.zeros(40, 2))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        return self.down(h + h @ self.lora @ self.lora.T)


def data(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)) for _ in range(n)]


def closure_for(model, batch):
    x, y = batch
    return lambda: ((model(x) - y) ** 2).float().mean()


def run(model, opt, batches):
    return [float(opt.step(closure_for(model, b))) for b in batches]


def flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------------- Z1
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z1_closure_is_mandatory(name):
    model = Net()
    opt = make(name, model.parameters())
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="returned None"):
        opt.step(lambda: None)
    assert opt.param_groups[0]["step"] == 0


# ---------------------------------------------------------------------------------------------- Z2
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z2_no_gradients_and_no_parameter_sized_state(name):
    model = Net()
    opt = make(name, model.named_parameters())
    run(model, opt, data(4))
    assert all(p.grad is None for p in model.parameters())
    for p, st in opt.state.items():
        for k, v in st.items():
            assert k in ("U", "V"), k  # MeZO keeps nothing; SubZero only its bases
            assert v.numel() < p.numel()
    if name == "mezo":
        assert all(len(st) == 0 for st in opt.state.values())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z2_closure_runs_without_autograd(name):
    model = Net()
    opt = make(name, model.parameters())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return closure_for(model, data(1)[0])()

    opt.step(closure)
    assert seen == [False, False]


# ---------------------------------------------------------------------------------------------- Z3
def _drift_bound(dtype, steps, ref):
    # Each step rounds three times (+eps, -2eps, +eps); the errors are independent, so the drift is a
    # random walk: about sqrt(3 * steps) ulps. Measured (1000 steps, this Net, fp32 and bf16):
    # at most ~45 ulps of max|p|. The bound leaves a factor ~3.
    return 3.0 * math.sqrt(3 * steps) * torch.finfo(dtype).eps * ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z3_replay_restores_within_documented_drift(name, dtype):
    # One matrix (low-rank directions for SubZero) and one vector (full Gaussian): per-step cost is
    # generator set-up, so fewer tensors keep 1,000 steps fast.
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(48, 40)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(name, model.named_parameters(), lr=0.0)
    x = torch.randn(8, 48, generator=g).to(dtype)
    steps = 1000
    for _ in range(steps):
        opt.step(lambda: model(x).float().pow(2).mean())
    for p, q in zip(model.parameters(), before):
        drift = (p.float() - q.float()).abs().max().item()
        assert drift > 0  # not bitwise: that is what exact_restore is for
        assert drift <= _drift_bound(dtype, steps, q.float().abs().max().item()), (p.shape, drift)
    # One step: at most a couple of roundings.
    model2 = Net(dtype)
    before2 = [p.detach().clone() for p in model2.parameters()]
    opt2 = make(name, model2.parameters(), lr=0.0)
    opt2.step(closure_for(model2, data(1, dtype=dtype)[0]))
    for p, q in zip(model2.parameters(), before2):
        assert (p.float() - q.float()).abs().max().item() <= 4 * torch.finfo(dtype).eps * q.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z3_exact_restore_is_bitwise(name, dtype):
    model = Net(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(name, model.parameters(), lr=0.0, exact_restore=True)
    for b in data(50, dtype=dtype):
        opt.step(closure_for(model, b))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---------------------------------------------------------------------------------------------- Z4
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z4_global_rng_untouched(name):
    model = Net()
    opt = make(name, model.parameters())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    run(model, opt, data(3))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z4_same_seed_same_directions_and_steps_differ(name):
    m1, m2, m3 = Net(), Net(), Net()
    o1 = make(name, m1.named_parameters(), seed=7)
    o2 = make(name, m2.named_parameters(), seed=7)
    o3 = make(name, m3.named_parameters(), seed=8)
    batches = data(3)
    run(m1, o1, batches), run(m2, o2, batches), run(m3, o3, batches)
    assert torch.equal(flat(m1), flat(m2))
    assert not torch.equal(flat(m1), flat(m3))
    # The direction is keyed by (seed, key, step): consecutive steps differ.
    g, p, key = o1._entries()[1]
    z_now = o1._direction(g, p, key)
    g["step"] -= 1
    z_prev = o1._direction(g, p, key)
    g["step"] += 1
    assert not torch.equal(z_now, z_prev)
    assert torch.equal(z_now, o1._direction(g, p, key))


def test_z4_mezo_direction_is_the_keyed_gaussian():
    model = Net()
    opt = MeZO(model.named_parameters(), seed=3)
    group, p, key = next(e for e in opt._entries() if e[2] == "up.weight")
    assert p is model.up.weight
    expected = torch.randn(p.shape, generator=generator_for(3, "up.weight", 0))
    assert torch.equal(opt._direction(group, p, key), expected)


# ---------------------------------------------------------------------------------------------- Z5
def _quadratic(m=6, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, m * n, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    w = nn.Parameter(torch.randn(m, n, generator=g, dtype=torch.float64))

    def f():
        r = a @ w.reshape(-1) - b
        return 0.5 * (r @ r)

    grad = (a.T @ (a @ w.detach().reshape(-1) - b)).reshape(m, n)
    return w, f, grad


def _estimates(opt, w, f, n):
    w0 = w.detach().clone()
    out = []
    for _ in range(n):
        opt.step(f)
        out.append((w0 - w.detach()).clone())  # lr = 1: the estimate itself
        with torch.no_grad():
            w.copy_(w0)
    return torch.stack(out)


def _assert_mean_matches(samples, expected, sigmas=5.0):
    mean, std = samples.mean(0), samples.std(0)
    tol = sigmas * std / math.sqrt(samples.shape[0]) + 1e-9
    assert torch.all((mean - expected).abs() <= tol), ((mean - expected).abs() / tol).max()


def test_z5_mezo_estimator_is_unbiased_on_a_quadratic():
    # Two-sided SPSA on a quadratic is exact per sample: (f(x+ez) - f(x-ez)) / 2e = z.g, so the
    # estimate (z.g) z has mean g and per-entry variance ||g||^2 + g_i^2.
    w, f, grad = _quadratic()
    opt = MeZO([w], lr=1.0, eps=1e-3, seed=1)
    samples = _estimates(opt, w, f, 3000)
    _assert_mean_matches(samples, grad)
    var_theory = grad.norm() ** 2 + grad**2
    assert torch.allclose(samples.var(0), var_theory, rtol=0.25)


def test_z5_mezo_one_sided_estimator():
    # One-sided: (f(x+ez) - f(x)) / e = z.g + (e/2) z^T H z; with a tiny eps the bias is negligible.
    w, f, grad = _quadratic()
    opt = MeZO([w], lr=1.0, eps=1e-7, seed=2, estimator="one-sided")
    _assert_mean_matches(_estimates(opt, w, f, 3000), grad)


def test_z5_subzero_estimator_is_the_scaled_projected_gradient():
    # d = mu vec(U Z V^T) = mu (V kron U) vec(Z) with Z ~ N(0, I): E[d d^T] = mu^2 (VV^T kron UU^T),
    # so E[(d.g) d] = mu^2 U U^T G V V^T with mu^2 = m n / r^2 (U, V fixed within a window).
    m, n, r = 6, 5, 2
    w, f, grad = _quadratic(m, n)
    opt = SubZero([w], lr=1.0, eps=1e-3, rank=r, update_proj_gap=10**6, reshape_min_dim=0, seed=4)
    samples = _estimates(opt, w, f, 3000)
    u, v = (opt.state[w][k].double() for k in ("U", "V"))
    expected = (m * n / r**2) * (u @ u.T @ grad @ v @ v.T)
    _assert_mean_matches(samples, expected)
    # And it is not the full gradient: the projection loses a visible part of it.
    assert (expected - grad).norm() > 0.3 * grad.norm()


def test_subzero_direction_has_full_gaussian_norm_in_expectation():
    w, _, _ = _quadratic(30, 20)
    opt = SubZero([w], rank=4, reshape_min_dim=0)
    group, p, key = opt._entries()[0]
    opt._prepare(group, p, key)
    norms = []
    for t in range(400):
        group["step"] = t
        norms.append(opt._direction(group, p, key).double().norm() ** 2)
    # ||mu U Z V^T||_F^2 = mu^2 ||Z||_F^2, mean mu^2 r^2 = m n = 600, std mu^2 sqrt(2 r^2) = 212.
    assert abs(torch.stack(norms).mean().item() - 600) < 5 * 212 / math.sqrt(400)


# ---------------------------------------------------------------------------------------------- Z6
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_z6_resume_is_bitwise_identical(name, dtype, momentum):
    batches = data(10, dtype=dtype)
    ref = Net(dtype)
    ref_opt = make(name, ref.named_parameters(), momentum=momentum, weight_decay=0.1, lr=1e-3)
    run(ref, ref_opt, batches)

    first = Net(dtype)
    opt = make(name, first.named_parameters(), momentum=momentum, weight_decay=0.1, lr=1e-3)
    run(first, opt, batches[:4])  # a SubZero refresh (gap 3) happened at step 3, the next is at 6
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = Net(dtype, seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(name, resumed.named_parameters(), momentum=0.5, seed=12345)  # overwritten by load
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["step"] == 4 and opt2.param_groups[0]["seed"] == 0
    if name == "subzero":
        assert all(st["U"].dtype == torch.float32 for st in opt2.state.values() if "U" in st)
    run(resumed, opt2, batches[4:])
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), resumed.parameters()))
    sa, sb = ref_opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            assert sa[k][key].dtype == sb[k][key].dtype and torch.equal(sa[k][key], sb[k][key])


# ---------------------------------------------------------------------------------------------- Z8
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_z8_fixed_order_and_name_keys(name):
    model = Net()
    opt = make(name, model.named_parameters())
    assert [k for _, _, k in opt._entries()] == [n for n, _ in model.named_parameters()]
    positional = make(name, model.parameters())
    assert [k for _, _, k in positional._entries()] == [f"group0.param{i}" for i in range(5)]
    # Directions are keyed by name, not position: a different group layout gives the same run.
    m1, m2 = Net(), Net()
    o1 = make(name, m1.named_parameters())
    named = list(m2.named_parameters())
    o2 = make(name, [{"params": named[3:]}, {"params": named[:3]}])
    batches = data(4)
    run(m1, o1, batches), run(m2, o2, batches)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_frozen_parameters_are_not_perturbed():
    model = Net()
    model.up.weight.requires_grad_(False)
    before = model.up.weight.detach().clone()
    opt = MeZO(model.parameters(), lr=1e-2)
    run(model, opt, data(3))
    assert torch.equal(model.up.weight, before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_restore_and_update_match_the_reference_loop(name):
    # Reference: MeZO Algorithm 1 literally (perturb, eval, perturb, eval, restore, then update with
    # z regenerated once more). The optimizer fuses the last two passes; results must be bitwise equal.
    m1, m2 = Net(), Net()
    opt = make(name, m1.named_parameters(), weight_decay=0.1)
    probe = make(name, m2.named_parameters(), weight_decay=0.1, lr=0.0)
    for batch in data(4):
        opt.step(closure_for(m1, batch))
        entries = probe._entries()
        for g, p, k in entries:
            probe._prepare(g, p, k)
        f = closure_for(m2, batch)
        with torch.no_grad():
            for g, p, k in entries:
                p.add_(probe._direction(g, p, k), alpha=1e-3)
            lp = float(f())
            for g, p, k in entries:
                p.add_(probe._direction(g, p, k), alpha=-2e-3)
            lm = float(f())
            for g, p, k in entries:
                p.add_(probe._direction(g, p, k), alpha=1e-3)
            grad = (lp - lm) / 2e-3
            for g, p, k in entries:
                if p.dim() >= 2:
                    p.mul_(1 - 1e-2 * 0.1)
                p.add_(probe._direction(g, p, k), alpha=-1e-2 * grad)
            for g in probe.param_groups:
                g["step"] += 1
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_z4_subzero_direction_is_keyed_and_built_from_its_bases():
    model = Net()
    opt = SubZero(model.named_parameters(), seed=3, rank=2)
    group, p, key = next(e for e in opt._entries() if e[2] == "up.weight")
    opt._prepare(group, p, key)
    u, v = opt.state[p]["U"], opt.state[p]["V"]  # up.weight 40 x 6 is reshaped to 15 x 16
    m, n = u.shape[0], v.shape[0]
    z = torch.randn(2, 2, generator=generator_for(3, "up.weight", 0))
    expected = (math.sqrt(m * n) / 2) * (u @ z @ v.T)
    assert torch.allclose(opt._direction(group, p, key), expected.reshape(p.shape), rtol=1e-5, atol=1e-6)
