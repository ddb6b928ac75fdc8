"""svd_method="auto": a per-shape plan (gram or a randomized configuration), deterministic, bitwise
the planned method, >= 0.99 of the exact top-r energy on Gaussian and decaying matrices; the
randomized method's certificate, Gram sketch and LU steps it relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subspace_optim import auto_svd
from subspace_optim.auto_svd import gaussian_spectrum, plan, predicted_energy
from subspace_optim.linalg import SVD_METHODS
from subspace_optim.randomized import gaussian_test_matrix, randomized_svd_fp32, stacked_test_matrix
from subspace_optim.selectors import SelectionContext, get_selector
from subspace_optim.sketch_ops import certified, lu_basis, symmetric_gram


def _orth(k, n, g):
    return torch.linalg.qr(torch.randn(k, n, generator=g))[0]


def matrix(kind, k, l, seed=0, power=1.0):
    """``gaussian`` (i.i.d.) or ``decay`` (sigma_i ~ i^-power, Haar singular vectors), (k, l) fp32."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(k, l, generator=g)
    p = min(k, l)
    s = torch.arange(1, p + 1, dtype=torch.float32) ** -power
    return (_orth(k, p, g) * s) @ _orth(l, p, g).T


def energy_ratio(u, a, r):
    s = torch.linalg.svdvals(a.double())
    return float(((u[:, :r].double().T @ a.double()) ** 2).sum() / (s[:r] ** 2).sum())


def omega(seed=5):
    return gaussian_test_matrix(torch.Generator().manual_seed(seed))


SHAPES = [(320, 320, 80), (256, 683, 64)]  # moderate shapes where the plan is randomized (r = k/4)


def test_plan_depends_on_the_shape_only_and_is_gram_for_the_whole_spectrum():
    for k, l, r in SHAPES:
        method, options = plan((k, l), r)
        assert method == "randomized" and options["certify"] == auto_svd.TARGET
        assert plan((3, k, l), r) == (method, options)  # a batch of that shape: the same plan
    assert plan((320, 320), None) == ("gram", {})  # I3S's exact law needs every triplet
    assert plan((48, 120), 8) == ("gram", {})  # small: gram is the cheapest
    assert plan((120, 48), 8)[0] in ("gram", "randomized")  # a tall left form has no Gram sketch
    assert plan((120, 48), 8)[1].get("sketch", "direct") == "direct"


_CHILD = """
import json, sys
from subspace_optim.auto_svd import plan
print(json.dumps([plan(s, r) for s in [(320, 320), (256, 683), (2048, 5461), (512, 1376)] for r in (64, 128, 512)]))
"""


def test_plan_is_the_same_in_another_process():
    import json

    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(src)}).stdout
    here = [plan(s, r) for s in [(320, 320), (256, 683), (2048, 5461), (512, 1376)] for r in (64, 128, 512)]
    assert json.loads(out) == json.loads(json.dumps(here))


@pytest.mark.parametrize("k,l,r", SHAPES + [(48, 120, 8)])
@pytest.mark.parametrize("kind", ["gaussian", "decay"])
def test_auto_is_bitwise_the_planned_method(k, l, r, kind):
    a = matrix(kind, k, l)
    method, options = plan((k, l), r)
    u, s = SVD_METHODS["auto"](a, r, omega())
    u_ref, s_ref = SVD_METHODS[method](a, r, omega(), **options)
    assert torch.equal(u, u_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("k,l,r", SHAPES)
@pytest.mark.parametrize("kind", ["gaussian", "decay"])
def test_auto_captures_the_energy_target(k, l, r, kind):
    a = matrix(kind, k, l, seed=1)
    u, s = SVD_METHODS["auto"](a, r, omega())
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    assert energy_ratio(u, a, r) >= 0.99


@pytest.mark.parametrize("k,l,r", SHAPES)
def test_the_selector_runs_the_plan_with_its_own_sketch_stream(k, l, r):
    a = matrix("gaussian", k, l, seed=2)
    ctx = SelectionContext({}, {"seed": 4, "svd_method": "auto"}, "layers.0.mlp.up_proj.weight", 3)
    basis = get_selector("dominant").select(a, None, r, ctx)
    method, options = plan((k, l), r)
    u, _ = SVD_METHODS[method](a, r, gaussian_test_matrix(ctx.sketch_generator("cpu")), **options)
    assert torch.equal(basis, u[:, :r])


def test_a_decaying_spectrum_stops_after_one_sketch_and_a_flat_one_does_not():
    k, l, r = SHAPES[0]
    options = dict(plan((k, l), r)[1])
    decay, flat = matrix("decay", k, l), matrix("gaussian", k, l)
    stage0 = {**options, "power_iters": 0, "certify": None}
    full = {**options, "certify": None}
    # certified: bitwise the sketch alone (no power iteration); flat: bitwise the whole iteration
    assert torch.equal(randomized_svd_fp32(decay, r, omega(), **options)[0],
                       randomized_svd_fp32(decay, r, omega(), **stage0)[0])
    assert not torch.equal(randomized_svd_fp32(decay, r, omega(), **options)[0],
                           randomized_svd_fp32(decay, r, omega(), **full)[0])
    assert torch.equal(randomized_svd_fp32(flat, r, omega(), **options)[0],
                       randomized_svd_fp32(flat, r, omega(), **full)[0])


@pytest.mark.parametrize("sketch", ["direct", "gram"])
@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_the_certificate_is_a_lower_bound(sketch, power):
    # whenever the stage-0 sketch is certified, the exact energy ratio is at least the target
    k, l, r = 60, 90, 12
    for seed in range(4):
        a = matrix("decay", k, l, seed=seed, power=power) + 1e-3 * matrix("gaussian", k, l, seed=seed)
        for target in (0.9, 0.99, 0.999):
            u, _ = randomized_svd_fp32(a, r, omega(seed), 0.5, 0, sketch=sketch)
            b = r + r // 2
            q = torch.linalg.qr((a if sketch == "direct" else a @ a.T) @ omega(seed)(l if sketch == "direct" else k, b))[0]
            total, captured = (a ** 2).sum(), ((q.T @ a) ** 2).sum()
            top = ((u.T @ a) ** 2).sum()
            if certified(total.reshape(1), captured.reshape(1), top.reshape(1), target)[0]:
                assert energy_ratio(u, a, r) >= target - 1e-5


def test_the_certificate_never_passes_non_finite_or_zero_energy():
    one = torch.ones(1)
    assert certified(one * float("inf"), one, one, 0.9) == [False]
    assert certified(one, one * float("nan"), None, 0.9) == [False]
    assert certified(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.9) == [False]
    assert certified(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]), 0.9) == [True, False]


def test_a_batch_with_certified_and_uncertified_matrices_equals_each_alone():
    k, l, r = SHAPES[0]
    options = dict(plan((k, l), r)[1])
    a = torch.stack([matrix("decay", k, l, 0), matrix("gaussian", k, l, 1), matrix("decay", k, l, 2, power=2.0)])
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(3)]  # noqa: E731
    u, s = randomized_svd_fp32(a, r, stacked_test_matrix(gens()), **options)
    for i in range(3):
        u1, s1 = randomized_svd_fp32(a[i], r, gaussian_test_matrix(gens()[i]), **options)
        assert torch.equal(u[i], u1) and torch.equal(s[i], s1)


@pytest.mark.parametrize("sketch", ["direct", "gram"])
def test_sketches_are_orthonormal_and_match_exact_values(sketch):
    a = matrix("decay", 48, 120)
    u, s = randomized_svd_fp32(a, 8, omega(), 0.5, 2, sketch=sketch)
    torch.testing.assert_close(u.T @ u, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(s[:4], torch.linalg.svdvals(a)[:4], rtol=1e-3, atol=0)
    assert energy_ratio(u, a, 8) > 0.9998


def test_gram_sketch_needs_a_wide_left_form_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match="sketch"):
        randomized_svd_fp32(torch.randn(40, 20), 4, omega(), sketch="gram")
    with pytest.raises(ValueError, match="sketch"):
        randomized_svd_fp32(torch.randn(20, 40), 4, omega(), sketch="lanczos")
    with pytest.raises(ValueError, match="certify"):
        randomized_svd_fp32(torch.randn(20, 40), 4, omega(), certify=1.0)


def test_lu_basis_spans_the_sketch_with_bounded_entries():
    y = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) @ torch.randn(7, 7)
    basis = lu_basis(y)
    assert float(basis.abs().max()) <= 1.0
    q = torch.linalg.qr(basis)[0]
    torch.testing.assert_close(q @ (q.T @ y), y, atol=1e-4 * float(y.abs().max()), rtol=0)
    deficient = torch.zeros(10, 3)
    deficient[:, 0] = 1.0  # rank 1: zero pivots leave unit columns, never NaN
    assert bool(torch.isfinite(lu_basis(deficient)).all()) and torch.linalg.matrix_rank(lu_basis(deficient)) == 3


def test_symmetric_gram_is_the_gram_matrix():
    a = torch.randn(600, 900, generator=torch.Generator().manual_seed(0))
    c = symmetric_gram(a)
    ref = a.double() @ a.double().T
    torch.testing.assert_close(c.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    torch.testing.assert_close(symmetric_gram(torch.stack([a, 2 * a]))[1], symmetric_gram(2 * a), atol=0, rtol=0)


def test_the_energy_model_errs_low_on_gaussian_matrices():
    k, l, r = 256, 683, 64
    spectrum = gaussian_spectrum(k, l)
    sample = torch.linalg.svdvals(matrix("gaussian", k, l).double())
    torch.testing.assert_close(torch.tensor(spectrum, dtype=torch.float64) / spectrum[0], sample / sample[0], atol=0.03, rtol=0)
    a = matrix("gaussian", k, l, seed=3)
    for sketch, q in (("direct", 1), ("gram", 1), ("gram", 3)):
        u, _ = randomized_svd_fp32(a, r, omega(), 0.5, q, sketch=sketch)
        degree = 2 * q + (1 if sketch == "direct" else 2)
        assert predicted_energy(spectrum, r, r + r // 2, degree) <= energy_ratio(u, a, r)
