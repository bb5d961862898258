"""smallest_eigenvalue against float64 eigvalsh on hard spectra; the shared Jacobi solver."""
import math
import warnings

import pytest
import torch

from calrft_kernels import _backend, testing
from calrft_kernels.eigen import EigenInfo, smallest_eigenvalue


def spectrum(kind, d, kappa):
    if kind == "log":
        return torch.logspace(-math.log10(kappa), 0, d, dtype=torch.float64)
    if kind == "power":   # lambda_i ~ i^-2, floored at 1/kappa
        return (torch.arange(1, d + 1, dtype=torch.float64) ** -2.0).clamp(min=1 / kappa)
    lam = torch.logspace(-math.log10(kappa), 0, d, dtype=torch.float64)   # clustered bottom
    k = min(5, d)
    lam[:k] = lam[0] * (1 + 1e-3 * torch.arange(k, dtype=torch.float64))
    return lam


def matrix(kind, d, kappa, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    a = (q * spectrum(kind, d, kappa)) @ q.T
    return ((a + a.T) / 2).to(dtype)


def check(a, value, vector, tol=1e-4):
    a64 = a.double()
    ref = torch.linalg.eigvalsh(a64)[0]
    assert abs(float(value) - float(ref)) <= tol * float(ref), (float(value), float(ref))
    v = vector.double()
    assert abs(float(v.norm()) - 1) < 1e-5
    # v is (close to) the bottom eigenvector: its Rayleigh quotient matches as well
    assert abs(float(v @ a64 @ v) - float(ref)) <= 2 * tol * float(ref)


CASES = [(kind, d, kappa) for kind in ("log", "power", "cluster")
         for d in (1, 2, 64, 257) for kappa in (1e2, 1e6)]
CASES += [("log", 512, 1e2), ("cluster", 512, 1e6), ("log", 1024, 1e4)]


@pytest.mark.parametrize("kind,d,kappa", CASES)
def test_accuracy(kind, d, kappa):
    a = matrix(kind, d, kappa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no fallback needed on any of these
        value, vector, info = smallest_eigenvalue(a, return_info=True)
    check(a, value, vector)
    assert isinstance(info, EigenInfo) and info.converged and not info.fallback
    if d > 48 and _backend.native()[0] is not None:
        assert info.method == "davidson"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    """The reference is eigvalsh of the matrix AS RECEIVED (rounded to dtype), in float64."""
    a = matrix("log", 100, 1e2, dtype)
    value, vector = smallest_eigenvalue(a)
    assert value.dtype == dtype and vector.dtype == dtype
    ref = torch.linalg.eigvalsh(a.double())[0]
    assert abs(float(value) - float(ref)) <= 1e-2 * float(ref)   # output rounding only
    value64, _, _ = smallest_eigenvalue(a.double(), return_info=True)
    assert abs(float(value64) - float(ref)) <= 1e-6 * float(ref)


def test_noncontiguous():
    a = matrix("log", 130, 1e3)
    big = torch.zeros(260, 260, dtype=torch.float64)
    big[::2, ::2] = a
    view = big[::2, ::2]
    assert not view.is_contiguous()
    check(a, *smallest_eigenvalue(view))


def test_warm_start_and_factor_reuse():
    a = matrix("log", 300, 1e4)
    _, v, info = smallest_eigenvalue(a, return_info=True)
    lam = float(torch.linalg.eigvalsh(a)[0])
    e = matrix("log", 300, 1e4)
    e = (e + e.T) / torch.linalg.matrix_norm(e + e.T, 2)
    slow = a + 1e-3 * lam * e                    # slowly drifting: v0 passes the test at once
    value, vector, warm = smallest_eigenvalue(slow, v0=v, factor=info, return_info=True)
    check(slow, value, vector)
    assert warm.converged and warm.iterations == 0 and torch.equal(warm.factor, info.factor)
    b = a + 0.1 * lam * e                        # a larger drift: more steps, same factor
    value, vector, warm = smallest_eigenvalue(b, v0=v, factor=info, return_info=True)
    check(b, value, vector)
    assert warm.converged and torch.equal(warm.factor, info.factor)
    # a factor from a matrix that moved by 50 lambda_min (here even to indefinite) no longer
    # bounds the error: without the check the value came out 1.9e-3 off; it is rebuilt instead
    e = torch.randn(300, 300, dtype=torch.float64)
    e = (e + e.T) / torch.linalg.matrix_norm(e + e.T, 2)
    far = a + 50 * lam * e
    value, _ = smallest_eigenvalue(far, v0=v, factor=info)
    ref = float(torch.linalg.eigvalsh(far)[0])
    assert abs(float(value) - ref) <= 1e-4 * abs(ref)
    # a bare factor tensor (shift re-derived) works too, and a bad one is only slower
    check(b, *smallest_eigenvalue(b, factor=info.factor))
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # retried with a fresh factor, no fallback
        check(b, *smallest_eigenvalue(b, factor=torch.eye(300), max_iter=30))


def test_tol_is_relative():
    """Scaling the matrix by 1e-8 must not change the iteration count (relative stopping test)."""
    a = matrix("log", 200, 1e3)
    _, _, i1 = smallest_eigenvalue(a, return_info=True)
    _, _, i2 = smallest_eigenvalue(a * 1e-8, return_info=True)
    assert i1.iterations == i2.iterations


def test_fallback_is_reported():
    a = matrix("log", 400, 1e2)
    with pytest.warns(RuntimeWarning, match="dense"):
        value, vector, info = smallest_eigenvalue(a, max_iter=1, return_info=True)
    assert info.fallback and info.method == "eigh"
    check(a, value, vector, tol=1e-10)
    with pytest.warns(RuntimeWarning, match="not converged"):
        _, _, info = smallest_eigenvalue(a, max_iter=1, method="davidson", return_info=True)
    assert not info.converged and not info.fallback


def test_method_eigh_and_singular():
    a = matrix("log", 80, 1e3)
    check(a, *smallest_eigenvalue(a, method="eigh"), tol=1e-12)
    x = torch.randn(80, 30, dtype=torch.float64)
    singular = x @ x.T                             # rank 30: lambda_min = 0 (multiplicity 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # converges: no dense fallback
        value, _ = smallest_eigenvalue(singular)
    assert abs(float(value)) <= 1e-9 * float(singular.diagonal().max())


def test_gradient_matches_eigvalsh_autograd():
    a = matrix("log", 120, 1e2).requires_grad_()
    value, _ = smallest_eigenvalue(a, tol=1e-12)   # the gradient needs an accurate vector
    (grad,) = torch.autograd.grad(value, a)
    a_ref = a.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(torch.linalg.eigvalsh(a_ref)[0], a_ref)
    assert float((grad - ref).abs().max()) < 1e-6


@pytest.mark.parametrize("bad,exc,name", [
    (torch.randn(3, 4), ValueError, "matrix"),
    (torch.randn(3), ValueError, "matrix"),
    (torch.eye(3, dtype=torch.int64), TypeError, "matrix"),
    (torch.full((3, 3), float("inf")), ValueError, "matrix"),
])
def test_bad_input(bad, exc, name):
    with pytest.raises(exc, match=name):
        smallest_eigenvalue(bad)


def test_bad_options():
    a = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        smallest_eigenvalue(a, method="power")
    with pytest.raises(ValueError, match="tol"):
        smallest_eigenvalue(a, tol=0)
    with pytest.raises(ValueError, match="v0"):
        smallest_eigenvalue(a, v0=torch.ones(5))
    with pytest.raises(ValueError, match="factor"):
        smallest_eigenvalue(a, factor=torch.eye(5))


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("n", [1, 2, 7, 24, 48])
def test_shared_jacobi_solver(n):
    """common/spectral_math.h's Jacobi (what the CUDA kernel runs per iteration) vs eigh."""
    a = matrix("log", n, 1e6) + 0.1 * torch.randn(n, n, dtype=torch.float64)
    a = (a + a.T) / 2
    w, v = testing.spectral_hooks().jacobi_eigh_cpu(a)
    ref = torch.linalg.eigvalsh(a)
    assert float((w - ref).abs().max()) < 1e-12 * max(1.0, float(ref.abs().max()))
    assert float((a @ v - v * w).abs().max()) < 1e-11
    assert float((v.T @ v - torch.eye(n, dtype=torch.float64)).abs().max()) < 1e-12


def _nan_above_diagonal(a):
    upper = torch.ones_like(a, dtype=torch.bool).triu(1)
    return torch.where(upper, torch.full_like(a, float("nan")), a)


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("rows,inner,k", [(1, 1, 1), (3, 5, 7), (131, 17, 9), (257, 129, 16),
                                          (5, 64, 24), (512, 512, 8), (37, 3, 19)])
def test_thin_block_kernels(rows, inner, k):
    """cpu/dense_blocks.h (the Davidson loop's products) against float64 torch at awkward sizes:
    every row-tile remainder (rows mod 4) and column chunk remainder (k mod 8)."""
    native = testing.spectral_hooks()
    a = torch.randn(rows, inner, dtype=torch.float64)
    w = torch.randn(inner, k, dtype=torch.float64)
    scale = float(a.abs().sum(1).max() * w.abs().max())
    assert float((native.dense_block_cpu("nn", a, w) - a @ w).abs().max()) <= 1e-14 * scale
    at = a.T.contiguous()                                   # tn: at^T @ w
    assert float((native.dense_block_cpu("tn", at, w) - a @ w).abs().max()) <= 1e-14 * scale
    s = torch.randn(inner, inner, dtype=torch.float64)
    s_upper_junk = _nan_above_diagonal(s)                   # the upper triangle is never read
    sym = s.tril() + s.tril(-1).T
    out = native.dense_block_cpu("symm", s_upper_junk, w)
    assert float((out - sym @ w).abs().max()) <= 1e-13 * float(sym.abs().sum(1).max() * w.abs().max())


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("d,k", [(1, 1), (7, 3), (17, 8), (65, 9), (130, 16), (513, 17)])
def test_preconditioner_solves(d, k):
    """The fp32 triangular solves (blocked, both directions) equal (L L^T)^-1 r to fp32 accuracy."""
    m = torch.randn(d, d, dtype=torch.float64)
    l = torch.linalg.cholesky(m @ m.T + d * torch.eye(d, dtype=torch.float64)).float()
    r = torch.randn(d, k, dtype=torch.float64)
    ref = torch.cholesky_solve(r, l.double())
    out = testing.spectral_hooks().dense_block_cpu("precondition", l, r)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("d", [1, 2, 7, 8, 9, 63, 64, 65, 130, 257, 449])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_preconditioner_cholesky(d, threads):
    """The blocked fp32 Cholesky (64-column blocks, 8-row diagonal sub-blocks, rows split over
    threads) against float64 at every block remainder: L L^T = A to fp32 accuracy, L within fp32
    rounding of float64's factor, zeros above the diagonal, the upper triangle never read."""
    g = torch.randn(d, 2 * d + 1, dtype=torch.float64)
    a64 = g @ g.T / d + 1e-2 * torch.eye(d, dtype=torch.float64)
    a = a64.float()
    l, ok = testing.spectral_hooks().cholesky_cpu(_nan_above_diagonal(a), threads)
    assert ok and torch.equal(l, l.tril())
    l64 = torch.linalg.cholesky(a.double())
    assert float((l.double() @ l.double().T - a.double()).norm() / a.double().norm()) < 5e-7
    kappa = float(torch.linalg.cond(a64))
    assert float((l.double() - l64).abs().max() / l64.abs().max()) < 1e-6 * max(kappa, 10.0)
    same, _ = testing.spectral_hooks().cholesky_cpu(a, 1)       # threads split rows, not sums
    assert torch.equal(l, same)


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("bad", ["indefinite", "nan", "inf"])
def test_preconditioner_cholesky_refuses(bad):
    """Not positive definite in fp32, or a non-finite entry anywhere in the lower triangle
    (here in the last block, past the first pivot): ok is False."""
    d = 200
    g = torch.randn(d, 2 * d, dtype=torch.float64)
    a = (g @ g.T / d).float()
    if bad == "indefinite":
        a[150, 150] = -1.0
    else:
        a[180, 170] = float(bad)
    for threads in (1, 2):
        _, ok = testing.spectral_hooks().cholesky_cpu(a, threads)
        assert not ok


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upper_triangle_is_not_read(dtype):
    """Like torch.linalg.eigh, the solver reads the lower triangle; NaN there is an error."""
    a = matrix("log", 100, 1e3, dtype)
    check(a, *smallest_eigenvalue(_nan_above_diagonal(a)))
    bad = a.clone()
    bad[50, 3] = float("inf")
    with pytest.raises(ValueError, match="matrix"):
        smallest_eigenvalue(bad)


@pytest.mark.parametrize("d,kappa", [(257, 1e4), (512, 1e6)])
def test_fp32_matrix_is_solved_as_received(d, kappa):
    """An fp32 matrix goes to the solver as it is (fp64 products of its entries, no fp64 copy):
    the answer is that of the fp64 solve of the same entries, to fp64 accuracy."""
    a = matrix("log", d, kappa, torch.float32)
    value, _, info = smallest_eigenvalue(a, return_info=True)
    value64, _, info64 = smallest_eigenvalue(a.double(), return_info=True)
    ref = float(torch.linalg.eigvalsh(a.double())[0])
    assert info.converged and not info.fallback and info.method == info64.method
    assert abs(float(value64) - ref) <= 1e-6 * ref
    assert abs(float(value) - float(value64)) <= 2 * torch.finfo(torch.float32).eps * ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_start_block_columns_in_parallel_agree(dtype):
    """From d = 384 on, the start block's sweeps run in column parts of 8 on the caller's
    threads; each column's arithmetic is the same in any part, so with one factor 1, 2 and 3
    threads give the same bits (d = 389: the last block of every triangular solve is partial).
    The factorisation's own thread-count independence is test_preconditioner_cholesky's."""
    a = matrix("log", 389, 1e5, dtype)
    _, _, first = smallest_eigenvalue(a, return_info=True)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(smallest_eigenvalue(a, factor=first, return_info=True))
    finally:
        torch.set_num_threads(saved)
    check(a, results[0][0], results[0][1])
    for value, vector, info in results[1:]:
        assert info.iterations == results[0][2].iterations and torch.equal(info.factor, first.factor)
        assert torch.equal(value, results[0][0]) and torch.equal(vector, results[0][1])


def test_factor_fit_check_of_the_stale_factor_policy():
    """The stale-factor policy's fit test (common/spectral_math.h, run by both the CPU and the
    CUDA solver; here through the CPU hook): an fp32 factor of A + delta I fits A's bottom
    eigenpair, one of 2 A or of a matrix that moved by 50 lambda_min does not."""
    fits = testing.spectral_hooks().factor_fits_cpu
    a = matrix("log", 200, 1e4)
    w, v = torch.linalg.eigh(a)
    delta = 1e-7 * float(a.diagonal().max())
    eye = torch.eye(200, dtype=torch.float64)
    def factor(m):
        return torch.linalg.cholesky((m + delta * eye).float())
    assert fits(factor(a), v[:, 0], float(w[0]), delta)
    assert not fits(factor(2 * a), v[:, 0], float(w[0]), delta)
    assert not fits(factor(a + 50 * float(w[0]) * eye), v[:, 0], float(w[0]), delta)


# ---- method="lanczos": the genuine shift-invert Lanczos solver ---------------------------------

LANCZOS_CASES = [(kind, d, kappa) for kind in ("log", "power", "cluster")
                 for d in (1, 2, 64, 257) for kappa in (1e2, 1e6)] + [("log", 512, 1e6)]


@pytest.mark.parametrize("kind,d,kappa", LANCZOS_CASES)
def test_lanczos_accuracy(kind, d, kappa):
    a = matrix(kind, d, kappa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # converges on every one of these
        value, vector, info = smallest_eigenvalue(a, method="lanczos", return_info=True)
    check(a, value, vector)
    assert info.method == "lanczos" and info.converged and not info.fallback
    assert info.factor is None and info.error_estimate <= 1e-6
    assert info.iterations <= min(d, 60)


def test_lanczos_warm_start_and_relative_tol():
    a = matrix("log", 300, 1e5)
    _, v, cold = smallest_eigenvalue(a, method="lanczos", return_info=True)
    lam = float(torch.linalg.eigvalsh(a)[0])
    e = matrix("log", 300, 1e2)
    b = a + 1e-3 * lam * e / torch.linalg.matrix_norm(e, 2)
    value, vector, warm = smallest_eigenvalue(b, method="lanczos", v0=v, return_info=True)
    check(b, value, vector)
    assert warm.iterations < cold.iterations
    _, _, scaled = smallest_eigenvalue(a * 1e-8, method="lanczos", return_info=True)
    assert scaled.iterations == cold.iterations                  # the test is relative


def test_lanczos_not_converged_warns_and_gradcheck():
    a = matrix("log", 200, 1e6)
    with pytest.warns(RuntimeWarning, match="not converged"):
        _, _, info = smallest_eigenvalue(a, method="lanczos", max_iter=2, return_info=True)
    assert not info.converged and info.iterations == 2
    x = torch.randn(6, 6, dtype=torch.float64)
    m = (x @ x.T + 0.1 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: smallest_eigenvalue((t + t.T) / 2, method="lanczos", tol=1e-12)[0], (m,))


def test_lanczos_agrees_with_davidson():
    a = matrix("cluster", 257, 1e4)
    v_l, _ = smallest_eigenvalue(a, method="lanczos", tol=1e-10)
    v_d, _ = smallest_eigenvalue(a, method="davidson", tol=1e-10)
    assert abs(float(v_l) - float(v_d)) <= 1e-9 * float(v_d)


def test_stale_factor_is_replaced_early_not_after_max_iter():
    """The shared stale-factor policy (spectral_math.h): a factor from a matrix that moved by
    ~500 lambda_min (the H200 suite's warm case, which took 206 ms on CUDA: 100 unconverged
    steps, then a redo) is checked at step 4 and replaced; the solve converges in a few steps."""
    a = matrix("log", 300, 1e6)
    _, v, info = smallest_eigenvalue(a, return_info=True)
    other = matrix("log", 300, 1e6)
    b = a + 1e-3 * (other - a) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, vector, warm = smallest_eigenvalue(b, v0=v, factor=info, return_info=True)
    check(b, value, vector)
    assert warm.converged and not warm.fallback and warm.iterations < 30
    assert not torch.equal(warm.factor, info.factor)             # a fresh factor was built
