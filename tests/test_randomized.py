"""svd_method="randomized": pinned against the exact SVD (captured energy, orthonormality, singular
values), its own counter-based stream (same across processes and resumes), its options checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import assert_resumes_identically, batches, groups_for
from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW
from subspace_optim.linalg import SVD_METHODS, svd_fp32, svd_gram_fp32
from subspace_optim.randomized import gaussian_test_matrix, randomized_svd_fp32, validate_randomized
from subspace_optim.selectors import SelectionContext, get_selector


def planted(k, l, spectrum, seed=0):
    """A (k, l) matrix with the given singular values and Haar-random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(k, len(spectrum), generator=g))[0]
    v = torch.linalg.qr(torch.randn(l, len(spectrum), generator=g))[0]
    return (u * torch.tensor(spectrum, dtype=torch.float32)) @ v.T


def energy_ratio(basis, a, r):
    """Energy of ``a`` captured by ``basis`` over that of the exact top-r subspace."""
    s = torch.linalg.svdvals(a.double())
    return float(((basis.double().T @ a.double()) ** 2).sum() / (s[:r] ** 2).sum())


def rsvd(a, count, seed=0, oversampling=0.5, power_iters=1):
    return randomized_svd_fp32(a, count, gaussian_test_matrix(torch.Generator().manual_seed(seed)),
                               oversampling, power_iters)


def ctx(i=0, **group):
    return SelectionContext({}, {"seed": 0, "svd_method": "randomized", **group}, "layer.weight", i)


DECAYING = [1.0 / i for i in range(1, 49)]  # sigma_i ~ 1/i, GaLore's regime


@pytest.mark.parametrize("shape", [(48, 120), (48, 48), (120, 48)])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_captures_the_energy_of_the_exact_subspace(shape, power_iters):
    a = planted(*shape, DECAYING)
    u, s = rsvd(a, 8, power_iters=power_iters)
    assert u.shape == (shape[0], 8) and s.shape == (8,)
    torch.testing.assert_close(u.T @ u, torch.eye(8), atol=1e-5, rtol=0)
    # one pass each way already captures most of it; each power iteration sharpens it
    assert energy_ratio(u, a, 8) >= (0.94, 0.998, 0.9998)[power_iters]
    # the leading singular values are those of the exact SVD (Rayleigh-Ritz values, from below)
    s_ref = svd_fp32(a)[1][:8]
    torch.testing.assert_close(s[:4], s_ref[:4], rtol=(0.25, 5e-3, 5e-4)[power_iters], atol=0)
    assert bool((s <= s_ref * (1 + 1e-4)).all())


def test_power_iterations_help_on_a_flat_spectrum():
    a = torch.randn(96, 160, generator=torch.Generator().manual_seed(3))
    ratios = [energy_ratio(rsvd(a, 16, power_iters=q)[0], a, 16) for q in (0, 1, 3)]
    assert ratios[0] < ratios[1] < ratios[2] <= 1 + 1e-6
    assert ratios[2] > 0.97


def test_well_separated_vectors_match_the_exact_ones():
    a = planted(40, 70, [10.0, 5.0, 2.5, 1.2, 0.6, 0.3] + [0.01] * 10)
    u, _ = rsvd(a, 4, power_iters=2)
    u_ref = svd_fp32(a)[0][:, :4]
    torch.testing.assert_close(u, u_ref, atol=1e-4, rtol=0)  # canonical signs on both


def test_a_sketch_as_large_as_the_matrix_is_the_exact_gram_path():
    a = planted(12, 30, [3.0, 2.0, 1.0, 0.5, 0.2])
    for count, oversampling in ((4, 2.0), (12, 0.0), (None, 0.5)):
        u, s = rsvd(a, count, oversampling=oversampling)
        u_ref, s_ref = svd_gram_fp32(a)
        assert torch.equal(u, u_ref) and torch.equal(s, s_ref)


def test_zero_matrix_has_zero_singular_values_and_keeps_the_previous_basis():
    u, s = rsvd(torch.zeros(30, 50), 4)
    assert not bool(s.any())
    previous = torch.eye(30, 4)
    basis = get_selector("dominant").select(torch.zeros(30, 50), previous, 4, ctx())
    assert basis is previous


def test_same_stream_same_basis_other_refresh_other_test_matrix():
    a = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    dom = get_selector("dominant")
    b1, b2 = dom.select(a, None, 4, ctx(0)), dom.select(a, None, 4, ctx(0))
    assert torch.equal(b1, b2)
    assert not torch.equal(b1, dom.select(a, None, 4, ctx(1)))  # a flat spectrum: the sketch shows
    state = torch.get_rng_state()
    dom.select(a, None, 4, ctx(2))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


_CHILD = """
import sys, torch
from subspace_optim.selectors import SelectionContext, get_selector
a = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
ctx = SelectionContext({}, {"seed": 7, "svd_method": "randomized"}, "layer.weight", 3)
torch.save(get_selector("dominant").select(a, None, 4, ctx), sys.argv[1])
"""


def test_same_basis_in_another_process(tmp_path):
    path = tmp_path / "basis.pt"
    # the child imports this checkout's library (not an installed copy), on one thread like the tests
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, env=env)
    a = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    here = get_selector("dominant").select(
        a, None, 4, SelectionContext({}, {"seed": 7, "svd_method": "randomized"}, "layer.weight", 3))
    assert torch.equal(torch.load(path, weights_only=True), here)


def test_sketch_stream_is_not_the_sampling_stream():
    # the test matrix has its own key: a different stream from the one I3S samples with
    c = ctx(0)
    assert not torch.equal(torch.randn(8, generator=c.sketch_generator("cpu")),
                           torch.randn(8, generator=c.generator("cpu")))
    # with a pool as large as the spectrum the randomized method is the exact Gram path, and I3S
    # draws exactly the indices the gram path draws
    a = planted(16, 40, [2.0 ** -i for i in range(16)])
    for i in range(5):
        sampled = [get_selector("importance").select(a, None, 3, SelectionContext(
            {}, {"seed": 0, "svd_method": m, "importance_pool": 16.0}, "w", i)) for m in ("gram", "randomized")]
        assert torch.equal(*sampled)


@pytest.mark.parametrize("selector", ["power", "online_pca"])
def test_first_step_of_every_step_selectors_uses_the_method(selector):
    a = planted(30, 50, DECAYING[:30])
    c = ctx(0, rho=0.9, osd_variant="paper", osd_alpha=5.0, osd_p_optimizer="adam",
            osd_orthonormalize=True, lr=1e-3, weight_decay=0.0, update_proj_gap=10)
    first = get_selector(selector).select(a, None, 3, c)
    assert torch.equal(first, get_selector("dominant").select(a, None, 3, ctx(0)))
    assert not torch.equal(first, svd_fp32(a)[0][:, :3])  # really the randomized path (rounding differs)
    assert energy_ratio(first, a, 3) > 0.998


def test_methods_share_one_signature():
    a = planted(20, 36, DECAYING[:20])
    for name, method in SVD_METHODS.items():
        u, s = method(a, 4, gaussian_test_matrix(torch.Generator().manual_seed(0)))
        assert energy_ratio(u[:, :4], a, 4) > 0.999, name


@pytest.mark.parametrize("key,value", [("rsvd_oversampling", -1), ("rsvd_power_iters", 1.5),
                                       ("rsvd_power_iters", True), ("rsvd_oversampling", "8")])
def test_bad_options_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        validate_randomized({key: value})
    with pytest.raises(ValueError, match=key):  # at a refresh too, before anything is computed
        get_selector("dominant").select(torch.randn(30, 40), None, 3, ctx(**{key: value}))


def test_bad_pool_is_rejected_at_construction():
    with pytest.raises(ValueError, match="importance_pool"):
        I3SAdamW([{"params": [nn.Parameter(torch.randn(8, 8))], "rank": 2}], importance_pool=0.5)


def _randomized(cls, **extra):
    return lambda m: cls(groups_for(m, rank=1, update_proj_gap=3, svd_method="randomized",
                                    rsvd_oversampling=1, **extra), lr=1e-2)


@pytest.mark.parametrize("make", [_randomized(GaLoreAdamW), _randomized(I3SAdamW, importance_pool=2.0),
                                  _randomized(OnlineSubspaceAdamW), _randomized(LDAdamW)],
                         ids=["galore", "i3s_pool", "osd", "ldadam"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_resume_through_state_dict_continues_bitwise(make, k):
    assert_resumes_identically(make, batches(8), k, via_file=True)


def test_i3s_pool_never_draws_past_the_pool():
    # slow decay, so the tail has mass, with a gap after the pool so that drawn directions are identifiable
    a = planted(40, 90, [1.0 / i ** 0.5 for i in range(1, 9)] + [0.3 / i ** 0.5 for i in range(9, 41)])
    exact_u = svd_fp32(a)[0]
    pool, rank = 2.0, 4
    seen = set()
    for i in range(200):
        basis = get_selector("importance").select(a, None, rank, ctx(i, importance_pool=pool, rsvd_power_iters=3))
        # which exact singular directions were drawn (randomized vectors are close to exact ones)
        match = (exact_u.T @ basis).abs().argmax(dim=0)
        seen.update(match.tolist())
    assert max(seen) < pool * rank and len(seen) == pool * rank


def test_pool_none_is_the_exact_law():
    a = planted(40, 90, [1.0 / i ** 0.5 for i in range(1, 41)])
    for i in range(3):
        picks = [get_selector("importance").select(a, None, 4, SelectionContext(
            {}, {"seed": 0, "svd_method": m, "importance_pool": None}, "w", i)) for m in ("gram", "randomized")]
        assert torch.equal(*picks)


def test_oversampling_is_relative_to_the_rank():
    from subspace_optim.randomized import sketch_width
    assert sketch_width(32, 0.5, (128, 352)) == 48 and sketch_width(512, 0.5, (2048, 5461)) == 768
    assert sketch_width(100, 0.5, (120, 300)) == 120  # at most the matrix
