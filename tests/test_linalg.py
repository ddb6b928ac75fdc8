"""linalg: the fp32 factorisations, the fast Gram path against the SVD reference, overlaps."""

import pytest
import torch

from subspace_optim.linalg import canonical_signs, random_orthonormal, subspace_overlap, svd_fp32, svd_gram_fp32
from subspace_optim.selectors import SelectionContext, get_selector


def planted(k, l, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(l, l, generator=g))[0]
    s = torch.tensor(spectrum, dtype=torch.float32)
    return u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T


@pytest.mark.parametrize("shape", [(8, 20), (16, 16), (20, 8)])
def test_gram_path_matches_svd_reference(shape):
    k = min(shape)
    a = planted(*shape, [2.0 ** -i for i in range(k)])
    u_ref, s_ref = svd_fp32(a)
    u, s = svd_gram_fp32(a)
    assert u.shape == u_ref.shape and s.shape == s_ref.shape
    # forming A A^T squares the condition number: a singular value's error is up to about
    # sqrt(eps) * s_1 (documented); measured 5.6e-5 * s_1 at most across CPU capabilities
    torch.testing.assert_close(s, s_ref, atol=1e-3 * s_ref[0].item(), rtol=0)
    # vectors of well-separated singular values agree up to rounding (signs are canonical)
    top = 6
    torch.testing.assert_close(u[:, :top], u_ref[:, :top], atol=2e-3, rtol=0)


@pytest.mark.parametrize("selector", ["dominant", "importance"])
def test_selectors_pick_the_same_subspace_with_either_method(selector):
    a = planted(12, 30, [10.0, 7.0, 5.0, 3.5, 2.5, 1.7, 1.2, 0.8, 0.5, 0.3, 0.2, 0.1])
    for i in range(10):
        bases = [
            get_selector(selector).select(a, None, 4, SelectionContext({}, {"seed": 0, "svd_method": m}, "w", i))
            for m in ("svd", "gram")
        ]
        assert subspace_overlap(*bases) > 0.9999


def test_canonical_signs_and_random_orthonormal():
    q = random_orthonormal(9, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)  # unit scale: atol is relative
    flipped = canonical_signs(-q)
    assert torch.equal(canonical_signs(q), flipped)
    assert subspace_overlap(q, q) == pytest.approx(1.0, abs=1e-6)
    assert subspace_overlap(torch.eye(6)[:, :2], torch.eye(6)[:, 2:4]) == 0.0


@pytest.mark.parametrize("selector", ["dominant", "online_pca", "power"])
@pytest.mark.parametrize("method", ["svd", "gram"])
def test_first_basis_comes_from_the_chosen_factorisation(selector, method):
    """``svd_method`` reaches every selector that factorises the gradient (online_pca and power at a
    parameter's first step): the basis is that path's top-r vectors, bit for bit."""
    from torch import nn

    from subspace_optim import SubspaceOptimizer

    grad = planted(6, 10, [3.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=3)
    w = nn.Parameter(torch.zeros(6, 10))
    opt = SubspaceOptimizer([{"params": [w], "subspace": True}], rank=2, selector=selector, svd_method=method)
    w.grad = grad
    opt.step()
    expected = (svd_gram_fp32 if method == "gram" else svd_fp32)(grad)[0][:, :2]
    assert torch.equal(opt.state[w]["projector"], expected)


@pytest.mark.parametrize("transposed", [False, True])
def test_lapack_method_is_galore_torchs_svd_of_the_gradient_as_stored(transposed):
    """``svd_method="lapack"``: LAPACK's singular vectors of the gradient as stored, signs kept; for a
    left form that is the stored gradient's transpose, the stored gradient's ``Vh^T``."""
    from subspace_optim.linalg import SVD_METHODS

    a = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    stored = a.T.contiguous() if transposed else a
    u, s, vh = torch.linalg.svd(stored, full_matrices=False)
    expected = vh.T if transposed else u
    got_u, got_s = SVD_METHODS["lapack"](a, None, None, transposed=transposed)
    assert torch.equal(got_u, expected) and torch.equal(got_s, s)
    # the selectors pass the orientation from the state (a right projection: project_left False)
    ctx = SelectionContext({"project_left": not transposed}, {"seed": 0, "svd_method": "lapack"}, "w", 0)
    assert torch.equal(get_selector("dominant").select(a, None, 3, ctx), expected[:, :3])
    basis = get_selector("importance").select(a, None, 3, ctx)  # I3S samples LAPACK's vectors
    assert all(any(torch.equal(basis[:, j], expected[:, i]) for i in range(7)) for j in range(3))


def test_lapack_method_refuses_sharded_weights():
    from subspace_optim.sharding import Whole

    class Sharded(Whole):
        sharded = True

    ctx = SelectionContext({}, {"seed": 0, "svd_method": "lapack"}, "w", 0, shard=Sharded())
    with pytest.raises(ValueError, match="svd_method='lapack'"):
        get_selector("dominant").select(torch.randn(4, 6), None, 2, ctx)
