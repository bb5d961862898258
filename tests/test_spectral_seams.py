"""Every public op of the covariance / eigen-solver families through its PUBLIC name, with every
backend that runs here (cpu, triton under TRITON_INTERPRET=1, the cuBLAS-path "cuda" code on CPU
tensors, reference), fp64/fp32/bf16/fp16; the CUDA C++ seam (argument building checked against
the pybind signatures parsed from csrc/cuda/*.cu); torch.library.opcheck of every registered op.
Issue 12: batch_covariance(z) on CUDA raised TypeError because the launcher got float(correction)
where it required an int, and no test called the public op with backend="triton"."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import calrft_kernels as ck
from calrft_kernels import _backend, covariance, eigen, testing
from calrft_kernels.reference import covariance_reference

ROOT = Path(__file__).resolve().parents[1]
NATIVE = _backend.native()[0] is not None
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# max |Sigma - ref| / max |ref| by input dtype (16-bit: the centred values are rounded once)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _features(b, d, dtype, mean=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 0, d, dtype=torch.float64)
    z = torch.randn(b, d, generator=g, dtype=torch.float64) * spread
    return (z + mean * torch.rand(d, generator=g, dtype=torch.float64)).to(dtype)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def _backends():
    out = ["reference", "triton"]
    if NATIVE:
        out.append("cpu")
    return out


# ---- batch_covariance: every backend, every dtype, public name -------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("correction", [1, 0, 2.5])
def test_batch_covariance_public_every_backend(backend, dtype, correction):
    z = _features(67, 33, dtype)
    got = ck.batch_covariance(z, correction, backend=backend)
    assert got.dtype == dtype and got.shape == (33, 33)
    assert torch.equal(got, got.T), "exactly symmetric on every backend"
    ref, _ = covariance_reference(z.double(), correction)
    assert _rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backend_code_on_cpu_tensors(dtype):
    """The "cuda" backend is plain PyTorch (mean, centred copy, one product, exact
    symmetrisation): its code runs here on CPU tensors, at a mean 50x the spread."""
    z = _features(300, 65, dtype)
    cov, mean = covariance.covariance_impl(z, 1.0, "cuda")
    ref, ref_mean = covariance_reference(z.double(), 1)
    assert torch.equal(cov, cov.T)
    assert cov.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert _rel(cov, ref) < TOL[dtype]
    assert float((mean - ref_mean).abs().max()) < 1e-4 * 50


def test_cuda_backend_refuses_cpu_tensors_by_name():
    with pytest.raises(ValueError, match="backend='cuda' is unavailable"):
        ck.batch_covariance(torch.randn(5, 3), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.batch_covariance(torch.randn(5, 3), backend="cudnn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backends())
def test_covariance_sigma_min_public_every_backend(backend, dtype):
    z = _features(200, 12, dtype, mean=5.0)
    ref = float(torch.linalg.eigvalsh(covariance_reference(z.double(), 1)[0])[0])
    for accumulate in ("fp64", "fp32"):
        value = ck.covariance_sigma_min(z, backend=backend, accumulate=accumulate)
        assert value.dtype == dtype
        tol = 1e-6 if dtype == torch.float64 else (1e-3 if dtype == torch.float32 else 2e-2)
        assert abs(float(value) - ref) <= tol * ref, (accumulate, float(value), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["auto", "davidson", "lanczos", "eigh"])
def test_smallest_eigenvalue_public_every_method(method, dtype):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(70, 70, dtype=torch.float64, generator=g))
    a = ((q * torch.logspace(-3, 0, 70, dtype=torch.float64)) @ q.T).to(dtype)
    value, vector = ck.smallest_eigenvalue(a, method=method)
    assert value.dtype == dtype and vector.shape == (70,)
    ref = float(torch.linalg.eigvalsh(a.double())[0])
    assert abs(float(value) - ref) <= (1e-6 if dtype in (torch.float64, torch.float32)
                                       else 1e-2) * ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_value_and_orthogonality_public(dtype):
    w = (torch.randn(40, 24, dtype=torch.float64) / 40 ** 0.5).to(dtype)
    w64 = w.double()
    sv = ck.smallest_singular_value(w)
    assert sv.dtype == dtype
    ref = float(torch.linalg.svdvals(w64)[-1])
    tol = 1e-6 if dtype in (torch.float64, torch.float32) else 1e-2
    assert abs(float(sv) - ref) <= tol * ref
    loss = ck.orthogonality_loss(w)
    ref = float(torch.linalg.matrix_norm(w64.T @ w64 - torch.eye(24, dtype=torch.float64)))
    assert loss.dtype == dtype
    assert abs(float(loss) - ref) <= (1e-5 if dtype in (torch.float64, torch.float32)
                                      else 1e-2) * ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulator_public(dtype):
    z = _features(90, 10, dtype)
    acc = ck.CovarianceAccumulator(10)
    for part in z.split([40, 50]):
        acc.update(part)
    ref, _ = covariance_reference(z.double(), 1)
    assert _rel(acc.covariance(), ref) < max(TOL[dtype], 1e-10)


# ---- the CUDA C++ seam --------------------------------------------------------------------------

CUDA_SOURCE = (ROOT / "csrc" / "cuda" / "davidson.cu").read_text()
CPU_SOURCE = (ROOT / "csrc" / "cpu" / "davidson.cpp").read_text()


def test_binding_stub_catches_the_issue_12_bug():
    """The seam's conversion rules: the old covariance_cuda(z, int64_t correction) binding
    refused float(correction), as pybind11 does; a stub built from its signature refuses it."""
    old = "std::tuple<at::Tensor, at::Tensor> covariance_cuda(const at::Tensor& z, " \
          "int64_t correction) {"
    stub = testing.BindingStub(old, "covariance_cuda", lambda z, c: None)
    with pytest.raises(TypeError, match="correction needs a int"):
        stub(torch.ones(3, 2), float(1))
    stub(torch.ones(3, 2), 1)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        stub(torch.ones(3, 2))


def test_cuda_and_cpu_solver_bindings_share_one_signature():
    """eigen._native_davidson builds one argument list for both solvers: their C++ signatures
    must agree (names and types), and match the pybind argument names."""
    cuda = testing.cpp_signature(CUDA_SOURCE, "smallest_eig_cuda")
    cpu = testing.cpp_signature(CPU_SOURCE, "smallest_eig_cpu")
    assert [k for k, _ in cuda] == [k for k, _ in cpu] == [
        "tensor", "tensor", "tensor", "float", "int", "float", "int"]
    for name in ("matrix", "v0", "factor", "delta", "nev", "tol", "max_iter"):
        assert f'pybind11::arg("{name}")' in CUDA_SOURCE


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("warm", [False, True])
def test_cuda_dispatch_drives_the_checked_stub(monkeypatch, warm):
    """The public ops take their CUDA path (argument building, result reading, the policy around
    it) with CPU tensors: smallest_eig_cuda is a BindingStub of csrc/cuda/davidson.cu's signature
    whose implementation is the CPU solver (same result names)."""
    real = _backend.native()[0]
    stub = testing.BindingStub(CUDA_SOURCE, "smallest_eig_cuda", real.smallest_eig_cpu)

    class FakeNative:
        with_cuda = True
        smallest_eig_cuda = stub

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(_backend, "_NATIVE", (FakeNative(), ""))
    monkeypatch.setattr(eigen, "_davidson_kind", lambda device: "cuda")
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(120, 120, dtype=torch.float64, generator=g))
    a = (q * torch.logspace(-4, 0, 120, dtype=torch.float64)) @ q.T
    value, vector, info = ck.smallest_eigenvalue(a.float(), return_info=True)
    ref = float(torch.linalg.eigvalsh(a.float().double())[0])
    assert abs(float(value) - ref) <= 1e-4 * ref and info.method == "davidson"
    if warm:
        b = a + 1e-3 * ref * torch.eye(120, dtype=torch.float64)
        value, _, info2 = ck.smallest_eigenvalue(b, v0=vector, factor=info, return_info=True)
        ref_b = float(torch.linalg.eigvalsh(b)[0])
        assert abs(float(value) - ref_b) <= 1e-4 * ref_b
        bare = ck.smallest_eigenvalue(b, factor=info.factor)[0]     # delta re-derived
        assert abs(float(bare) - ref_b) <= 1e-4 * ref_b
    z = _features(400, 60, torch.float32, mean=3.0)
    sigma = ck.covariance_sigma_min(z)
    zref = float(torch.linalg.eigvalsh(covariance_reference(z.double(), 1)[0])[0])
    assert abs(float(sigma) - zref) <= 1e-4 * zref
    assert len(stub.calls) >= (4 if warm else 2)
    for call in stub.calls:                    # what a GPU would have received
        assert call[0].dtype == torch.float64 and torch.equal(call[0], call[0].T)


# ---- torch.library.opcheck --------------------------------------------------------------------

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor"))


def test_opcheck_spectral_ops():
    from calrft_kernels import orthogonality
    z = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    _opcheck(covariance._batch_covariance_op, (z, 1.0, "auto"))
    a = torch.randn(60, 60, dtype=torch.float64)
    a = (a @ a.T + torch.eye(60, dtype=torch.float64)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _opcheck(eigen._smallest_eig_op, (a, None, None, -1.0, 1, 1e-8, 0, "auto"))
        _opcheck(eigen._smallest_eig_op, (a, None, None, -1.0, 1, 1e-8, 0, "lanczos"))
        _opcheck(eigen._cov_eig_op, (z, None, None, -1.0, 1, 1e-8, 0, 1.0, "auto", True))
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    _opcheck(eigen._gram_eig_op, (w, 1e-10, 1.0))
    _opcheck(orthogonality._orth_op, (w, 1.0))


# ---- the CUDA solver's host-side building blocks, run on CPU tensors -----------------------

@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_cuda_davidson_blocks_on_cpu_tensors():
    """csrc/cuda/davidson_blocks.h is plain ATen (the GPU loop's thin GEMMs, solves and basis
    updates): compiled into the CPU build's test hooks, it runs here on CPU tensors."""
    hooks = testing.spectral_hooks()
    g = torch.Generator().manual_seed(2)
    d, m, k = 70, 16, 8
    v, _ = torch.linalg.qr(torch.randn(d, m, dtype=torch.float64, generator=g))
    w = torch.randn(d, k, dtype=torch.float64, generator=g)
    w[:, 1] = v[:, 3]                                      # a column inside span(V)
    ext = hooks.davidson_blocks_extension(v, w)
    basis = torch.cat([v, ext], 1)
    eye = torch.eye(m + k, dtype=torch.float64)
    assert float((basis.T @ basis - eye).abs().max()) < 1e-12
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    a = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    factor = torch.linalg.cholesky(a).float()
    r = torch.randn(d, 3, dtype=torch.float64, generator=g)
    got = hooks.davidson_blocks_precondition(factor, r)
    ref = torch.cholesky_solve(r, factor.double())
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    # one basis update with a thick restart: m + blk > mmax -> keep the `keep` lowest Ritz
    # vectors, then extend by blk directions; V stays orthonormal and AV = A V
    mmax, blk, keep = 24, 8, 16
    V = torch.zeros(d, mmax, dtype=torch.float64)
    AV = torch.zeros_like(V)
    V[:, :mmax - 4] = torch.linalg.qr(torch.randn(d, mmax - 4, dtype=torch.float64,
                                                  generator=g))[0]
    AV[:, :mmax - 4] = a @ V[:, :mmax - 4]
    h = V[:, :mmax - 4].T @ AV[:, :mmax - 4]
    _, y = torch.linalg.eigh((h + h.T) / 2)
    V2, AV2, m2 = hooks.davidson_blocks_update(a, V, AV, mmax - 4, y.contiguous(), w, blk, keep)
    assert m2 == keep + blk
    vb = V2[:, :m2]
    assert float((vb.T @ vb - torch.eye(m2, dtype=torch.float64)).abs().max()) < 1e-12
    assert float((AV2[:, :m2] - a @ vb).abs().max()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublas_path_centres_16_bit_features_exactly_when_the_mean_dominates(dtype):
    """The "cuda" backend (run here on CPU tensors) centres 16-bit rows on the mean rounded to
    their dtype: with every feature's mean 50-100x its spread, z - s is exact (Sterbenz), so the
    covariance matches float64 on the same 16-bit values far better than rounding centred values
    to 16 bits would (that gave ~1e-3 here)."""
    from calrft_kernels.covariance import covariance_centred_mm
    g = torch.Generator().manual_seed(3)
    b, d = 2048, 48
    mean = 50.0 * (1.0 + torch.rand(d, generator=g)) * torch.sign(torch.randn(d, generator=g))
    z = (torch.randn(b, d, generator=g) * torch.logspace(-1, 0, d) + mean).to(dtype)
    want = torch.cov(z.double().T)
    got, got_mean = covariance_centred_mm(z, 1.0)
    assert torch.equal(got, got.T)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 2e-5
    assert torch.allclose(got_mean.double(), z.double().mean(0), rtol=1e-6)
