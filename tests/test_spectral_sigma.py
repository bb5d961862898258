"""covariance_sigma_min, smallest_singular_value, orthogonality_loss; torch.compile."""
import warnings

import pytest
import torch

from calrft_kernels import _backend, testing
from calrft_kernels.eigen import covariance_sigma_min, smallest_singular_value
from calrft_kernels.orthogonality import orthogonality_loss
from calrft_kernels.reference import covariance_reference


def _native():
    return _backend.native()[0]


def features(b, d, mean=50.0, dtype=torch.float32, kappa_sqrt=1e2):
    spread = torch.logspace(-torch.log10(torch.tensor(kappa_sqrt)).item(), 0, d)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    z = (torch.randn(b, d, dtype=torch.float64) * spread.double()) @ q.T + mean * torch.randn(d).double()
    return z.to(dtype)


def ref_lambda_min(z, correction=1):
    return torch.linalg.eigvalsh(covariance_reference(z.double(), correction)[0])[0]


@pytest.mark.parametrize("b,d", [(3, 1), (5, 2), (300, 64), (1100, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_large_mean(b, d, dtype):
    z = features(b, d, dtype=dtype)
    value, vec = covariance_sigma_min(z, return_vector=True)
    assert value.dtype == dtype and vec.shape == (d,)
    ref = ref_lambda_min(z)
    assert abs(float(value) - float(ref)) <= 1e-4 * float(ref)


@pytest.mark.parametrize("b,d", [(260, 65), (1100, 257), (2053, 512)])
def test_fp32_accumulation_certified_to_fp64_accuracy(b, d):
    """Default (accumulate="fp64") on fp32 features: Sigma is formed in fp32, and the answer is
    the exact Rayleigh quotient on the features' covariance, certified by the stopping test on
    the exact residual: fp64-level accuracy (the fp32 covariance alone is ~1e-5 off)."""
    from calrft_kernels import eigen
    z = features(b, d)
    certified = eigen._cov_eig_fp32_certified(z, None, None, -1.0, 1e-6, None, 1)
    assert certified is not None                       # this path answered, no fp64 Sigma
    value, _, info = covariance_sigma_min(z, return_vector=True, return_info=True)
    ref = float(ref_lambda_min(z))
    assert abs(float(certified[0].values[0]) - ref) <= 1e-6 * ref
    assert abs(float(value) - ref) <= 1e-6 * ref and info.error_estimate <= 1e-6
    fp32_only = float(covariance_sigma_min(z, accumulate="fp32"))
    assert abs(fp32_only - ref) > abs(float(certified[0].values[0]) - ref)   # the refinement did work


@pytest.mark.skipif(_native() is None, reason="native extension not built")
@pytest.mark.parametrize("b,d,p", [(7, 5, 1), (130, 65, 3), (301, 9, 8), (640, 97, 11)])
def test_solver_on_features_finds_the_exact_covariance_eigenvalue(b, d, p):
    """refine_covariance_eig_cpu runs the solver on Sigma = Zc^T Zc / (B - 1) applied from z (never
    formed): from any start block it converges to float64 eigvalsh of that Sigma."""
    z = features(b, d, mean=3.0)
    x, _ = torch.linalg.qr(torch.randn(d, p, dtype=torch.float64))
    sigma, mean = covariance_reference(z.double(), 1)
    delta = 1e-7 * float(sigma.diagonal().max())
    factor = torch.linalg.cholesky(sigma.float() + delta * torch.eye(d))
    out = _native().refine_covariance_eig_cpu(
        z, mean, x, factor, delta, 1.0, float(sigma.diagonal().max()), 1e-10, 100)
    values, vectors = out["values"], out["vectors"]
    ref = torch.linalg.eigvalsh(sigma)[0]
    assert out["converged"]
    assert abs(float(values[0]) - float(ref)) <= 1e-8 * float(ref)
    v = vectors[:, 0]
    assert float((sigma @ v - values[0] * v).norm()) <= 1e-3 * float(ref)


@pytest.mark.skipif(_native() is None, reason="native extension not built")
@pytest.mark.parametrize("b,d", [(1, 1), (3, 7), (257, 9), (1031, 67)])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 13])
def test_exact_covariance_product_matches_fp64(b, d, k):
    """The refinement's Sigma W from z (never formed) against float64: the one-column path
    (k < 4, column by column along rows of z) and the 8-wide register tiles (k >= 4, padded)."""
    z = features(b, d, mean=30.0)
    correction = 0.0 if b == 1 else 1.0
    sigma, mean = covariance_reference(z.double(), correction)
    w = torch.randn(d, k, dtype=torch.float64)
    out = testing.spectral_hooks().covariance_times_cpu(z, mean, w, correction)
    ref = sigma @ w
    scale = float((sigma.abs() @ w.abs()).max())
    assert float((out - ref).abs().max()) <= 1e-12 * max(scale, 1e-300)


def _refinement_problem(b=1031, d=40):
    """fp32 features, their mean and exact covariance (fp64), the solver's shift, and a random
    orthonormal start block of 8 columns for refine_covariance_eig_cpu."""
    z = features(b, d, mean=3.0)
    sigma, mean = covariance_reference(z.double(), 1)
    delta = 1e-7 * float(sigma.diagonal().max())
    x, _ = torch.linalg.qr(torch.randn(d, 8, dtype=torch.float64))
    return z, mean, sigma, delta, x


@pytest.mark.skipif(_native() is None, reason="native extension not built")
def test_features_solver_row_ranges_in_parallel_agree():
    """The exact-covariance product splits its rows over the caller's threads (partial sums
    added at the end): 1, 2 and 3 threads give the same eigenpair up to rounding."""
    z, mean, sigma, delta, x = _refinement_problem()
    factor = torch.linalg.cholesky(sigma.float() + delta * torch.eye(sigma.shape[0]))
    saved = torch.get_num_threads()
    values = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = _native().refine_covariance_eig_cpu(
                z, mean, x, factor, delta, 1.0, float(sigma.diagonal().max()), 1e-10, 100)
            values.append(float(out["values"][0]))
    finally:
        torch.set_num_threads(saved)
    ref = float(torch.linalg.eigvalsh(sigma)[0])
    assert all(abs(v - ref) <= 1e-8 * ref for v in values)
    assert max(values) - min(values) <= 1e-12 * ref


def test_refinement_steps_scale_with_d(monkeypatch):
    """The exact-covariance steps are allowed while they cost less than forming Sigma in fp64
    (d // 64 of them, at least 4): d = 512 at condition number 1e7 needs 5, which a fixed
    limit of 4 refused (and paid for the fp64 covariance)."""
    from calrft_kernels import eigen
    torch.manual_seed(0)
    z = features(2048, 512, mean=50.0, kappa_sqrt=10 ** 3.5)
    ref = float(ref_lambda_min(z))
    certified = eigen._cov_eig_fp32_certified(z, None, None, -1.0, 1e-6, None, 1)
    assert certified is not None and abs(float(certified[0].values[0]) - ref) <= 1e-6 * ref
    monkeypatch.setattr(eigen, "_refine_max_steps", lambda d: 4)
    assert eigen._cov_eig_fp32_certified(z, None, None, -1.0, 1e-6, None, 1) is None


@pytest.mark.skipif(_native() is None, reason="native extension not built")
def test_refinement_refuses_a_factor_that_does_not_fit():
    """The refinement's stopping test bounds the error with the norm of Sigma_32's factor: a
    factor that does not act like (Sigma + delta I)^-1 at the answer (here that of 2 Sigma)
    leaves the answer unconverged (the caller then forms Sigma in fp64), even where the
    iteration itself settles."""
    z, mean, sigma, delta, x = _refinement_problem()
    for scale, fits in ((1.0, True), (2.0, False)):
        factor = torch.linalg.cholesky((scale * sigma + delta * torch.eye(sigma.shape[0])).float())
        out = _native().refine_covariance_eig_cpu(
            z, mean, x, factor, delta, 1.0, float(sigma.diagonal().max()), 1e-8, 100)
        values = out["values"]
        assert out["converged"] == fits
        if fits:
            ref = float(torch.linalg.eigvalsh(sigma)[0])
            assert abs(float(values[0]) - ref) <= 1e-7 * ref


def test_fp32_path_at_condition_1e7_and_its_fallback(monkeypatch):
    """Condition number 1e7 (the range docs/spectral.md measures): the fp32-accumulated Sigma is
    off at the bottom, the exact-covariance steps still certify 1e-6; when they are not allowed
    to (0 steps), the answer is refused and the fp64 covariance answers instead."""
    from calrft_kernels import eigen
    z = features(2000, 100, mean=10.0, kappa_sqrt=10 ** 3.5)
    ref = float(ref_lambda_min(z))
    certified = eigen._cov_eig_fp32_certified(z, None, None, -1.0, 1e-6, None, 1)
    assert certified is not None and abs(float(certified[0].values[0]) - ref) <= 1e-6 * ref
    monkeypatch.setattr(eigen, "_refine_max_steps", lambda d: 0)
    assert eigen._cov_eig_fp32_certified(z, None, None, -1.0, 1e-6, None, 1) is None
    value = covariance_sigma_min(z)
    assert abs(float(value) - ref) <= 1e-6 * ref


def test_condition_1e8_is_answered_to_1e_6_certified_or_not():
    """Condition 1e8: fp32 rounding of Sigma (~eps ||Sigma|| = 6e-8) is larger than lambda_min
    (1e-8), so whether Sigma_32's factor still certifies depends on the rounding of this
    machine's BLAS; either way the answer is the fp64-accurate one."""
    z = features(2000, 100, mean=10.0, kappa_sqrt=1e4)
    ref = float(ref_lambda_min(z))
    assert abs(float(covariance_sigma_min(z)) - ref) <= 1e-6 * ref


def test_half_inputs():
    for dtype in (torch.float16, torch.bfloat16):
        z = features(200, 20, mean=2.0, dtype=dtype, kappa_sqrt=10)
        value = covariance_sigma_min(z)
        assert value.dtype == dtype
        assert abs(float(value) - float(ref_lambda_min(z))) <= 1e-2 * float(ref_lambda_min(z))


def test_gradcheck_and_eps_softmin():
    z = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: covariance_sigma_min(t), (z,))
    assert torch.autograd.gradcheck(lambda t: covariance_sigma_min(t, eps=1e-3), (z,))
    assert torch.autograd.gradcheck(lambda t: covariance_sigma_min(t, softmin_k=3), (z,))
    assert torch.autograd.gradcheck(lambda t: covariance_sigma_min(t, correction=0), (z,))


def test_gradient_vs_eigvalsh_autograd():
    """O(B d) backward against float64 autograd through torch.cov + eigvalsh (d = 64 > dense cut)."""
    z = features(400, 64, dtype=torch.float64, mean=3.0).requires_grad_()
    (grad,) = torch.autograd.grad(covariance_sigma_min(z, tol=1e-10), z)
    z_ref = z.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(torch.linalg.eigvalsh(torch.cov(z_ref.T))[0], z_ref)
    assert float((grad - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_gradient_of_the_certified_fp32_path():
    """fp32 features, d = 65: the default answers through the fp32-covariance + exact-refinement
    path; its vector must give the O(B d) backward of float64 autograd through eigvalsh."""
    from calrft_kernels import eigen
    z = features(521, 65, mean=3.0).requires_grad_()
    assert eigen._cov_eig_fp32_certified(z.detach(), None, None, -1.0, 1e-10, None, 1) is not None
    (grad,) = torch.autograd.grad(covariance_sigma_min(z, tol=1e-10), z)
    z_ref = z.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.linalg.eigvalsh(torch.cov(z_ref.T))[0], z_ref)
    assert grad.dtype == torch.float32
    # 3e-5 measured; the unrefined fp32-covariance vector is 7e-4 off, so this tells them apart
    assert float((grad.double() - ref).abs().max()) <= 2e-4 * float(ref.abs().max())


def test_softmin_properties():
    z = features(500, 40, dtype=torch.float64, mean=1.0)
    lam = torch.linalg.eigvalsh(torch.cov(z.T))
    soft = covariance_sigma_min(z, softmin_k=4, softmin_temperature=0.1)
    # soft-min lies between the smallest and the mean of the k smallest
    assert float(lam[0]) - 1e-12 <= float(soft) <= float(lam[:4].mean()) + 1e-12
    sharp = covariance_sigma_min(z, softmin_k=4, softmin_temperature=1e-3)
    assert abs(float(sharp) - float(lam[0])) <= 0.02 * float(lam[0])


def test_rank_deficient():
    z = torch.randn(10, 20, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="singular"):
        value = covariance_sigma_min(z, eps=1e-3)
    assert float(value.detach()) == pytest.approx(1e-3)
    value.backward()
    assert float(z.grad.abs().max()) == 0
    with pytest.raises(ValueError, match="singular"):
        covariance_sigma_min(z, rank_deficient="raise")


def test_warm_start_info():
    z = features(600, 100, dtype=torch.float64, mean=1.0)
    value, vec, info = covariance_sigma_min(z, return_vector=True, return_info=True)
    z2 = z + 1e-3 * torch.randn_like(z)
    value2, _, info2 = covariance_sigma_min(z2, v0=vec, factor=info, return_vector=True,
                                            return_info=True)
    assert abs(float(value2) - float(ref_lambda_min(z2))) <= 1e-4 * float(ref_lambda_min(z2))
    assert info2.converged and torch.equal(info2.factor, info.factor)   # no factorisation


@pytest.mark.parametrize("bad,exc,name,kwargs", [
    (torch.randn(5), ValueError, "z", {}),
    (torch.ones(4, 3, dtype=torch.int32), TypeError, "z", {}),
    (torch.randn(8, 3), ValueError, "softmin_k", {"softmin_k": 4}),
    (torch.randn(8, 3), ValueError, "eps", {"eps": -1.0}),
    (torch.randn(8, 3), ValueError, "rank_deficient", {"rank_deficient": "ignore"}),
])
def test_bad_input(bad, exc, name, kwargs):
    with pytest.raises(exc, match=name):
        covariance_sigma_min(bad, **kwargs)


def test_nonfinite():
    z = torch.randn(50, 4)
    z[0, 0] = float("inf")
    with pytest.raises(ValueError, match="z"):
        covariance_sigma_min(z)


# ---- general matrices -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (768, 64), (70, 300), (512, 512)])
def test_smallest_singular_value(shape):
    w = torch.randn(*shape)
    got = smallest_singular_value(w)
    ref = torch.linalg.svdvals(w.double())[-1]
    assert got.dtype == torch.float32
    assert abs(float(got) - float(ref)) <= 1e-4 * float(ref)


def test_smallest_singular_value_grad():
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(smallest_singular_value, (w,))
    wide = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(smallest_singular_value, (wide,))
    assert torch.autograd.gradcheck(lambda t: smallest_singular_value(t, eps=1e-2), (wide,))
    # against float64 autograd of svdvals
    w2 = torch.randn(100, 60, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(smallest_singular_value(w2, tol=1e-12), w2)
    (r,) = torch.autograd.grad(torch.linalg.svdvals(w2)[-1], w2)
    assert float((g - r).abs().max()) < 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (768, 512), (50, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_orthogonality_loss(shape, dtype):
    w = (torch.randn(*shape) / shape[0] ** 0.5).to(dtype)
    got = orthogonality_loss(w)
    w64 = w.double()
    ref = torch.linalg.matrix_norm(w64.T @ w64 - torch.eye(shape[1], dtype=torch.float64))
    assert got.dtype == dtype and got.shape == ()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(got) - float(ref)) <= tol * float(ref)


def test_orthogonality_loss_near_orthogonal_and_grad():
    q, _ = torch.linalg.qr(torch.randn(300, 200, dtype=torch.float64))
    w = q + 1e-7 * torch.randn_like(q)       # the cancelling formula would return noise here
    ref = torch.linalg.matrix_norm(w.T @ w - torch.eye(200, dtype=torch.float64))
    assert abs(float(orthogonality_loss(w)) - float(ref)) <= 1e-6 * float(ref)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonality_loss, (x,))


def test_general_bad_input():
    with pytest.raises(ValueError, match="w"):
        smallest_singular_value(torch.randn(3))
    with pytest.raises(TypeError, match="w"):
        orthogonality_loss(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="w"):
        orthogonality_loss(torch.full((3, 3), float("nan")))


def test_torch_compile_aot_eager():
    """The custom ops' fake kernels and autograd work under torch.compile."""
    z = torch.randn(200, 60, requires_grad=True)
    w = torch.randn(40, 30, requires_grad=True)

    def objective(z, w):
        return covariance_sigma_min(z) + orthogonality_loss(w) + smallest_singular_value(w)

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(z, w)
    out.backward()
    ref = objective(z.detach().requires_grad_(), w.detach().requires_grad_())
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-5 * abs(float(ref.detach()))
    assert z.grad is not None and w.grad is not None


def test_fp32_overflow_takes_the_fp64_path():
    """Features of size 1e20: their fp32-accumulated covariance overflows; the default path must
    still answer from the fp64 covariance instead of reporting a NaN/inf that z does not hold."""
    z = features(300, 64, mean=0.0, kappa_sqrt=10).double() * 1e20
    ref = float(ref_lambda_min(z))
    with pytest.warns(RuntimeWarning, match="fp32 range"):   # its 1e40 entries: no fp32 factor
        value = covariance_sigma_min(z.float())
    assert abs(float(value) - ref) <= 1e-4 * ref
