"""Bad input to the covariance / eigen-solver families becomes a clear ValueError/TypeError
naming the argument (issue 14), and finite input at the edges of the floating-point range is
either answered correctly (scaled first) or reported as an overflow, never as NaN."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import calrft_kernels as ck
from calrft_kernels import _backend
from calrft_kernels.reference import covariance_reference

NATIVE = _backend.native()[0]


def _acc(dim=8, rows=20):
    acc = ck.CovarianceAccumulator(dim)
    acc.update(torch.randn(rows, dim, dtype=torch.float64))
    return acc


# ---- CovarianceAccumulator state ------------------------------------------------------------

@pytest.mark.parametrize("key,value,exc,match", [
    ("comoment", torch.zeros(3, 3, dtype=torch.float64), ValueError, r"comoment.*\[8, 8\]"),
    ("comoment", torch.tensor(1.0, dtype=torch.float64), ValueError, r"comoment.*\[8, 8\]"),
    ("comoment", torch.zeros(16, 16, dtype=torch.float64), ValueError, r"comoment.*\[8, 8\]"),
    ("comoment", torch.zeros(8, 8, dtype=torch.int64), TypeError, "comoment.*floating"),
    ("comoment", torch.full((8, 8), float("nan"), dtype=torch.float64), ValueError,
     "comoment.*NaN"),
    ("comoment", -torch.eye(8, dtype=torch.float64), ValueError, "negative diagonal"),
    ("comoment", [[0.0] * 8] * 8, TypeError, "comoment.*torch.Tensor"),
    ("mean", torch.zeros(3, dtype=torch.float64), ValueError, r"mean.*\[8\]"),
    ("mean", torch.full((8,), float("inf"), dtype=torch.float64), ValueError, "mean.*NaN"),
    ("count", -1, ValueError, "count.*non-negative"),
    ("count", 2.5, ValueError, "count.*non-negative integer"),
    ("count", float("nan"), ValueError, "count"),
    ("count", True, TypeError, "count"),
    ("count", "20", TypeError, "count"),
    ("dim", 16, ValueError, "dim"),
])
def test_load_state_dict_validates_the_whole_state(key, value, exc, match):
    acc = _acc()
    before = acc.state_dict()
    state = acc.state_dict()
    state[key] = value
    with pytest.raises(exc, match=match):
        acc.load_state_dict(state)
    # nothing changed, and the accumulator still works
    assert acc.count == before["count"] and torch.equal(acc.comoment, before["comoment"])
    acc.update(torch.randn(5, 8, dtype=torch.float64))


def test_load_state_dict_accepts_valid_states():
    acc = _acc()
    state = acc.state_dict()
    state["count"] = torch.tensor(20)          # a 0-dim integer tensor is a count too
    state["mean"] = state["mean"].float()      # other float dtypes are converted
    other = ck.CovarianceAccumulator(8)
    other.load_state_dict(state)
    assert other.count == 20
    with pytest.raises(ValueError, match="count.*0"):
        bad = ck.CovarianceAccumulator(8).state_dict()
        bad["mean"] = torch.ones(8, dtype=torch.float64)
        ck.CovarianceAccumulator(8).load_state_dict(bad)


@pytest.mark.skipif(NATIVE is None, reason="native extension not built")
@pytest.mark.parametrize("comoment", [torch.zeros(3, 3), torch.tensor(1.0), torch.zeros(16, 16)])
def test_native_merge_checks_every_shape_it_writes(comoment):
    """A state corrupted behind load_state_dict's back (attributes set directly) reaches the C++
    merge: it must refuse the shapes (RuntimeError from TORCH_CHECK) instead of writing d x d
    values through a smaller buffer (malloc(): invalid size, exit 134 before)."""
    acc = _acc()
    acc.comoment = comoment.double()
    with pytest.raises(RuntimeError, match="chan_merge_cpu: comoment a must be"):
        acc.update(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="comoment b must be"):
        NATIVE.chan_merge_cpu(torch.zeros(8, 8), comoment, torch.zeros(8), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="mean difference"):
        NATIVE.chan_merge_cpu(torch.zeros(8, 8), torch.zeros(8, 8), torch.zeros(2, 4), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="counts"):
        NATIVE.chan_merge_cpu(torch.zeros(8, 8), torch.zeros(8, 8), torch.zeros(8), -1.0, 1.0)


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"eps": "0"}, TypeError, "eps"),
    ({"softmin_k": 2, "softmin_temperature": 0.0}, ValueError, "softmin_temperature"),
    ({"softmin_k": 2, "softmin_temperature": -0.1}, ValueError, "softmin_temperature"),
    ({"softmin_temperature": float("nan")}, ValueError, "softmin_temperature"),
    ({"correction": float("nan")}, ValueError, "correction"),
    ({"return_vector": 1}, TypeError, "return_vector"),
])
def test_covariance_sigma_min_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ck.covariance_sigma_min(torch.randn(40, 5, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize("factor,match", [
    (torch.zeros(60, 60), "factor must be a Cholesky factor"),
    (torch.full((60, 60), float("nan")), "factor must be a Cholesky factor"),
    (-torch.eye(60), "factor must be a Cholesky factor"),
    (torch.eye(60, dtype=torch.int32), "factor must be a floating-point"),
])
def test_smallest_eigenvalue_bad_factor(factor, match):
    """A zero/NaN factor used to reach MKL (its error printed) and end in an IndexError."""
    a = torch.randn(60, 60, dtype=torch.float64)
    a = a @ a.T + torch.eye(60, dtype=torch.float64)
    exc = TypeError if not factor.is_floating_point() else ValueError
    with pytest.raises(exc, match=match):
        ck.smallest_eigenvalue(a, factor=factor)
    with pytest.raises(exc, match=match):
        ck.covariance_sigma_min(torch.randn(300, 60, dtype=torch.float64), factor=factor)


def test_method_and_factor_combinations():
    a = torch.eye(60, dtype=torch.float64) + 0.01
    _, _, info = ck.smallest_eigenvalue(a, return_info=True)
    with pytest.raises(ValueError, match="factor is the Davidson preconditioner"):
        ck.smallest_eigenvalue(a, factor=info, method="lanczos")
    with pytest.raises(ValueError, match="method"):
        ck.smallest_eigenvalue(a, method="power")


# ---- the edges of the floating-point range ------------------------------------------------------

def test_fp32_overflow_is_reported_as_overflow():
    """Finite fp32 features of size 1e20: their covariance (1e40) does not fit fp32. The error
    says so (it used to say the features contain NaN or infinity)."""
    z = torch.randn(50, 6) * 1e20
    with pytest.raises(ValueError, match="z is finite.*overflows torch.float32"):
        ck.batch_covariance(z)
    acc = ck.CovarianceAccumulator(6, dtype=torch.float32)
    with pytest.raises(ValueError, match="z is finite.*overflows"):
        acc.update(z)
    # float64 holds it: the same features in fp64 are answered
    got = ck.batch_covariance(z.double())
    ref, _ = covariance_reference(z.double(), 1)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-12
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or infinity"):
        ck.batch_covariance(bad)


@pytest.mark.parametrize("scale", [1e-200, 1e-100, 1.0, 1e100, 1e200])
@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_smallest_singular_value_at_extreme_scales(scale, shape):
    """sigma_min(w) = s sigma_min(w / s): the Gram matrix of w * 1e-200 underflowed to 0 (0.0
    returned) and that of w * 1e200 overflowed (NaN reported)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, dtype=torch.float64, generator=g)
    ref = float(torch.linalg.svdvals(w)[-1]) * scale
    got = float(ck.smallest_singular_value(w * scale))
    assert math.isfinite(got) and abs(got - ref) <= 1e-8 * ref
    with_eps = float(ck.smallest_singular_value(w * scale, eps=1e-6))
    assert abs(with_eps - math.sqrt(ref * ref + 1e-6)) <= 1e-8 * math.sqrt(ref * ref + 1e-6)


def test_smallest_singular_value_scaled_gradcheck():
    w = (torch.randn(7, 4, dtype=torch.float64) * 37.0).requires_grad_()   # scale 32, not 1
    assert torch.autograd.gradcheck(ck.smallest_singular_value, (w,))
    (g,) = torch.autograd.grad(ck.smallest_singular_value(w * 1e-150), w)
    (r,) = torch.autograd.grad(torch.linalg.svdvals(w)[-1], w)
    assert float((g * 1e150 - r).abs().max()) <= 1e-8 * float(r.abs().max())


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e18), (torch.float32, 1e-30),
                                         (torch.float64, 1e150), (torch.float64, 1e-200)])
def test_orthogonality_loss_at_extreme_scales(dtype, scale):
    """||W^T W - I||_F on the exactly rescaled W: an fp32 W * 1e18 (loss ~1e36, inside fp32)
    gives the right value, not NaN; tiny W gives sqrt(n)."""
    w64 = torch.randn(20, 8, dtype=torch.float64)
    w = (w64 * scale).to(dtype)
    wr = w.double()
    ref = float(torch.linalg.matrix_norm(
        (wr / scale).T @ (wr / scale) * scale * scale - torch.eye(8, dtype=torch.float64)))
    got = float(ck.orthogonality_loss(w))
    assert math.isfinite(got) and abs(got - ref) <= 1e-5 * ref


def test_orthogonality_loss_overflow_is_reported():
    """fp32 W * 1e20: the loss (~1e40) does not fit fp32 (it was NaN): a ValueError saying so."""
    w = torch.randn(20, 8) * 1e20
    with pytest.raises(ValueError, match="w is finite but .* overflows torch.float32"):
        ck.orthogonality_loss(w)
    assert math.isfinite(float(ck.orthogonality_loss(w.double())))


def test_orthogonality_loss_scaled_gradcheck():
    w = (torch.randn(6, 4, dtype=torch.float64) * 9.0).requires_grad_()   # scale 8, not 1
    assert torch.autograd.gradcheck(ck.orthogonality_loss, (w,))


def test_covariance_sigma_min_fp32_accumulation_overflow():
    """accumulate="fp32" on finite fp32 features of size 1e20: the fp32 covariance overflows,
    so the covariance is accumulated in fp64 instead (it used to say "z contains NaN or
    infinity"); a smallest eigenvalue beyond the fp32 range is reported as an overflow."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 64, dtype=torch.float64, generator=g) * torch.logspace(
        -1, 0, 64, dtype=torch.float64)
    z = (base * 1e20).float()
    ref = float(torch.linalg.eigvalsh(covariance_reference(z.double(), 1)[0])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # no fp32 factor of 1e40 entries: dense answer
        value = float(ck.covariance_sigma_min(z, accumulate="fp32"))
    assert abs(value - ref) <= 1e-4 * ref
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="z is finite.*smallest covariance eigenvalue "
                                             "overflows torch.float32"):
            ck.covariance_sigma_min((base * 1e22).float(), accumulate="fp32")
    bad = z.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or infinity"):
        ck.covariance_sigma_min(bad, accumulate="fp32")


def test_orthogonality_checks_cpu_tensors_even_inside_device_checks_off():
    """device_checks(False) only skips checks that would synchronise with a GPU: CPU tensors are
    still checked, and a finite weight gives the same loss either way."""
    w = torch.randn(12, 5, dtype=torch.float64)
    with ck.device_checks(False):
        with pytest.raises(ValueError, match="w contains NaN"):
            ck.orthogonality_loss(torch.full((3, 2), float("nan")))
        inside = ck.orthogonality_loss(w)
    assert inside == ck.orthogonality_loss(w)
    assert _backend.host_checks_for(torch.empty((), device="meta"))


# ---- issue 22: too few rows is the rows' fault, not the correction's -------------------------

@pytest.mark.parametrize("op", [
    lambda z, **kw: ck.covariance_sigma_min(z, **kw),
    lambda z, **kw: ck.batch_covariance(z, **kw),
], ids=["covariance_sigma_min", "batch_covariance"])
@pytest.mark.parametrize("rows,kwargs,match", [
    (1, {}, r"^z has 1 row: a covariance needs at least two rows$"),
    (0, {}, r"^z has 0 rows: a covariance needs at least two rows$"),
    (1, {"correction": 1}, r"^z has 1 row: a covariance needs at least two rows$"),
    (0, {"correction": 0}, r"^z has 0 rows: a covariance needs at least one row$"),
    (3, {"correction": 3}, r"^correction must be below the number of rows of z \(3\), got 3\.0$"),
    (3, {"correction": -1}, r"^correction must be a finite number >= 0"),
])
def test_too_few_rows_names_the_rows(op, rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        op(torch.randn(rows, 4, dtype=torch.float64), **kwargs)


def test_one_row_with_correction_zero_is_a_zero_covariance():
    z = torch.randn(1, 4, dtype=torch.float64)
    assert torch.equal(ck.batch_covariance(z, correction=0), torch.zeros(4, 4, dtype=torch.float64))


def test_accumulator_with_one_row_names_the_rows():
    acc = _acc(rows=1)
    with pytest.raises(ValueError, match=r"^the accumulator has 1 row: a covariance needs at least two rows$"):
        acc.covariance()
    with pytest.raises(TypeError, match="correction must be a number"):
        acc.covariance(correction="1")
    assert torch.equal(acc.covariance(correction=0), torch.zeros(8, 8, dtype=torch.float64))
