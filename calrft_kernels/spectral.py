"""Spectral ops: covariance, streaming covariance, smallest eigenvalue / singular value.

Public (api.md): batch_covariance, CovarianceAccumulator, smallest_eigenvalue,
covariance_sigma_min, smallest_singular_value, orthogonality_loss.

Design (docs/spectral.md): the smallest eigenpair comes from a block generalized Davidson
iteration preconditioned by an fp32 Cholesky factor of (A + delta I), with Rayleigh-Ritz and
residuals in fp64 on the exact matrix. The fp32 factor only steers the search space, so it may be
stale (reused from the previous training step) or inaccurate without making the answer wrong;
the stopping test bounds the eigenvalue error relative to the eigenvalue. When the iteration does
not converge within max_iter, method="auto" falls back to dense fp64 eigh and says so (warning +
EigenInfo.fallback).

Every op goes through one validation function, then a torch.library custom op (fake kernel +
autograd registered) that dispatches to the C++ CPU kernels (csrc/cpu/spectral.cpp), the CUDA
kernels (csrc/cuda/lanczos.cu, the covariance helpers of another module) or plain PyTorch.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DENSE_BELOW = 48          # d <= this: dense eigh is cheaper than any iteration
DEFAULT_MAX_ITER = 100    # block iterations before the dense fallback
METHODS = ("auto", "lanczos", "eigh")


# ---- validation -----------------------------------------------------------------------------

def _check_tensor(name: str, x, ndim: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinity")


def _check_square(name: str, x: Tensor) -> None:
    _check_tensor(name, x)
    if x.shape[0] != x.shape[1] or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(x.shape)}")


def _check_tol(tol, max_iter) -> None:
    if not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")


def _check_v0(v0, d: int, device) -> Optional[Tensor]:
    if v0 is None:
        return None
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor or None, got {type(v0).__name__}")
    if v0.numel() != d:
        raise ValueError(f"v0 must have {d} entries, got shape {tuple(v0.shape)}")
    v0 = v0.detach().reshape(d).to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and non-zero")
    return v0


def _check_factor(factor, d: int, device) -> tuple[Optional[Tensor], float]:
    """(fp32 factor or None, its shift or -1 = derive it from the factor)."""
    delta = -1.0
    if isinstance(factor, EigenInfo):
        factor, delta = factor.factor, factor.delta
    if factor is None:
        return None, -1.0
    if not isinstance(factor, Tensor):
        raise TypeError(f"factor must be a torch.Tensor (EigenInfo.factor) or None, "
                        f"got {type(factor).__name__}")
    if factor.shape != (d, d):
        raise ValueError(f"factor must be [{d}, {d}] (EigenInfo.factor of a previous call), "
                         f"got shape {tuple(factor.shape)}")
    return factor.detach().to(device=device, dtype=torch.float32), delta


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- covariance: backends -------------------------------------------------------------------

def _covariance_reference(z: Tensor, correction: float):
    """Two-pass covariance in the compute dtype (fp64 mean)."""
    mean = z.sum(0, dtype=torch.float64) / max(z.shape[0], 1)
    zc = z.to(_compute_dtype(z.dtype)) - mean.to(_compute_dtype(z.dtype))
    return (zc.T @ zc) / (z.shape[0] - correction), mean


def _covariance_impl(z: Tensor, correction: float, backend: str, fp64: bool = False,
                     lower_only: bool = False):
    """(cov [d, d] in fp32/fp64, mean [d] fp64) from any backend. fp64=True: accumulate in fp64
    whatever z's dtype (what an accurate lambda_min of an ill-conditioned Sigma needs).
    lower_only=True: the solver's input; the CPU kernel then leaves the strict upper triangle
    zero instead of mirroring it (other backends return the full matrix)."""
    which = _backend.resolve(backend, z.device, "batch_covariance", cuda_symbol="covariance_cuda")
    z = z.contiguous()
    if fp64 and z.dtype != torch.float64 and which != "cpu":
        # the GPU covariance kernels accumulate in fp32: use fp64 PyTorch there (a B x d copy)
        return _covariance_reference(z.to(torch.float64), correction)
    if which == "cpu":
        cov, mean = _backend.native()[0].covariance_cpu(z, float(correction), fp64, lower_only)
    elif which == "cuda":
        cov, mean = _backend.native()[0].covariance_cuda(z, float(correction))
    elif which == "triton":
        try:
            from .triton.covariance import covariance_triton  # lazy: another module's kernel
        except ImportError:
            if backend != "auto":
                raise ValueError("backend='triton' is unavailable for batch_covariance: "
                                 "calrft_kernels.triton.covariance is missing") from None
            return _covariance_reference(z, correction)
        cov, mean = covariance_triton(z, float(correction))
    else:
        cov, mean = _covariance_reference(z, correction)
    return cov, mean.to(torch.float64)


@torch.library.custom_op("calrft::batch_covariance", mutates_args=())
def _batch_covariance_op(z: Tensor, correction: float, backend: str) -> Tensor:
    cov, _ = _covariance_impl(z, correction, backend)
    return cov.to(z.dtype)


@_batch_covariance_op.register_fake
def _(z, correction, backend):
    return z.new_empty(z.shape[1], z.shape[1])


def _batch_covariance_setup(ctx, inputs, output):
    z, correction, _ = inputs
    ctx.save_for_backward(z)
    ctx.correction = correction


def _batch_covariance_backward(ctx, grad):
    (z,) = ctx.saved_tensors
    ct = _compute_dtype(z.dtype)
    zc = z.to(ct) - z.to(ct).mean(0)
    g = grad.to(ct)
    # d/dz of Zc^T Zc / n with upstream G: Zc (G + G^T) / n (the mean's term vanishes: sum Zc = 0)
    dz = zc @ (g + g.T) / (z.shape[0] - ctx.correction)
    return dz.to(z.dtype), None, None


_batch_covariance_op.register_autograd(_batch_covariance_backward,
                                       setup_context=_batch_covariance_setup)


def _check_correction(correction, rows: int) -> float:
    if isinstance(correction, bool) or not isinstance(correction, (int, float)):
        raise TypeError(f"correction must be a number, got {type(correction).__name__}")
    if correction < 0 or rows - correction <= 0:
        raise ValueError(f"correction must be >= 0 and below the number of rows ({rows}), "
                         f"got {correction}")
    return float(correction)


def batch_covariance(z: Tensor, correction: float = 1, *, backend: str = "auto") -> Tensor:
    """Centred covariance of the rows of z [B, d]: (z - mean)^T (z - mean) / (B - correction).

    Two-pass quality (the rows are centred inside the product on a first-pass mean, whose own
    rounding is removed exactly afterwards), so a feature mean far larger than the spread costs
    no accuracy. Accumulates in fp32 (fp64 for
    fp64 input); returns z's dtype; differentiable."""
    _check_tensor("z", z)
    correction = _check_correction(correction, z.shape[0])
    out = _batch_covariance_op(z, correction, backend)
    _check_finite("z", out)  # cheap (d x d): a NaN/inf anywhere in z reaches the covariance
    return out


# ---- smallest eigenpairs: the solver --------------------------------------------------------

@dataclasses.dataclass
class EigenInfo:
    """How an eigenvalue was obtained. `factor` (fp32 Cholesky of A + delta I) and the returned
    vector are what a warm start passes back in: smallest_eigenvalue(A_next, v0=vec, factor=...)."""
    iterations: int
    converged: bool
    fallback: bool            # True when the dense fp64 solver produced the answer
    method: str               # "davidson" or "eigh"
    error_estimate: float     # relative eigenvalue error bound at the last iteration
    factor: Optional[Tensor]
    delta: float


def _solver_kind(device) -> str:
    if device.type == "cpu" and _backend.cpu_native_usable(device)[0]:
        return "cpu"
    if device.type == "cuda" and _backend.cuda_native_usable(device, "smallest_eig_cuda")[0]:
        return "cuda"
    return "dense"


def _lower_symmetric64(a: Tensor) -> Tensor:
    """The symmetric fp64 matrix of a's lower triangle, whole (the CUDA solver multiplies by it;
    the CPU solver and eigh read the lower triangle in place)."""
    a64 = a.to(torch.float64)
    return (a64.tril() + a64.tril(-1).T).contiguous()


def _check_finite_lower(name: str, a: Tensor) -> None:
    if not bool(torch.isfinite(a.tril()).all()):
        raise ValueError(f"{name} contains NaN or infinity")


def _dense_smallest(a64: Tensor, nev: int):
    w, v = torch.linalg.eigh(a64)
    return w[:nev].clone(), v[:, :nev].clone()


def _solve(a: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float, nev: int,
           tol: float, max_iter: Optional[int], method: str, name: str = "matrix"):
    """Smallest `nev` eigenpairs of the symmetric matrix whose lower triangle is a's (the upper
    triangle is not read, as in torch.linalg.eigh) -> (values, vectors, factor, stats
    [iterations, converged, delta, estimate, fallback]). Raises ValueError naming `name` if the
    lower triangle holds a NaN or infinity; never raises on non-convergence. `values` and
    `vectors` may hold more than nev pairs (the iteration's final Ritz block): callers slice."""
    d = a.shape[0]
    kind = _solver_kind(a.device)
    # The CPU solver reads fp32 and fp64 matrices as they are (its sums are fp64 either way);
    # everything else gets fp64.
    native_dtype = kind == "cpu" and a.dtype in (torch.float32, torch.float64)
    mat = a if native_dtype else a.to(torch.float64)
    empty = mat.new_empty(0, dtype=torch.float64)

    def zeros():  # the factor output when no factor was built (dense paths)
        return torch.zeros(d, d, dtype=torch.float32, device=mat.device)

    if method == "eigh" or d <= DENSE_BELOW or kind == "dense":
        a64 = mat.to(torch.float64)
        _check_finite_lower(name, a64)
        w, v = _dense_smallest(a64, nev)
        stats = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0 if method != "eigh" and d > DENSE_BELOW
                              else 0.0], dtype=torch.float64)
        return w, v, zeros(), stats
    if kind == "cuda":
        _check_finite_lower(name, mat)
        mat = _lower_symmetric64(mat)
    if factor is not None and delta < 0:
        # the shift a reused factor was built with: diag(L L^T) - diag(A)
        diagonal = mat.diagonal().double()
        rebuilt = float(((factor.double() ** 2).sum(1) - diagonal).median())
        delta = max(rebuilt, 1e-7 * float(diagonal.max()))
    fn = getattr(_backend.native()[0], f"smallest_eig_{kind}")
    iters = DEFAULT_MAX_ITER if max_iter is None else max_iter
    w, v, f, st = fn(mat, empty if v0 is None else v0, empty if factor is None else factor,
                     float(delta), nev, float(tol), iters)
    if float(st[0]) < 0:
        raise ValueError(f"{name} contains NaN or infinity")
    converged = bool(st[1] > 0) and w.numel() >= nev
    if kind == "cuda" and factor is not None and (
            not converged or not _factor_fits(f, v[:, 0], float(w[0]), float(st[2]))):
        # A reused factor only preconditions, but the stopping test reads its norm: if it no
        # longer fits this matrix (or did not converge), redo with a fresh factor from here
        # (the CPU solver does this check itself).
        w, v, f, st = fn(mat, v[:, 0].contiguous() if w.numel() else
                         (empty if v0 is None else v0), empty, 0.0, nev, float(tol), iters)
        converged = bool(st[1] > 0) and w.numel() >= nev
    if not converged and method == "auto":
        why = (f"the iteration did not reach tol={tol:g} in {iters} iterations (error estimate "
               f"{float(st[3]):.2e})" if w.numel() else "no fp32 preconditioner could be built "
               "(is the matrix PSD, with entries inside the fp32 range?)")
        warnings.warn(f"smallest_eigenvalue: {why}; using dense fp64 eigh", RuntimeWarning,
                      stacklevel=4)
        w, v = _dense_smallest(mat.double(), nev)
        stats = torch.cat([st.cpu(), st.new_ones(1).cpu()])
        return w, v, (f if f.numel() else zeros()), stats
    if not converged:
        warnings.warn(f"smallest_eigenvalue(method='lanczos'): not converged to tol={tol:g} in "
                      f"{iters} iterations (error estimate {float(st[3]):.2e}); returning the "
                      f"current estimate", RuntimeWarning, stacklevel=4)
        if w.numel() < nev:  # no preconditioner could be built: nothing to return but eigh
            w, v = _dense_smallest(mat.double(), nev)
    return w, v, (f if f.numel() else zeros()), torch.cat([st.cpu(), st.new_zeros(1).cpu()])


def _factor_fits(factor: Tensor, x: Tensor, theta: float, delta: float) -> bool:
    """Does T = (L L^T)^-1 act like (A + delta I)^-1 on the Ritz vector x of A? The error bound of
    the stopping test uses r^T T r, valid only while it does. A factor reused from a matrix that
    moved by more than ~lambda_min fails this (x^T T x off by > 25%): it must be rebuilt."""
    x32 = x.to(torch.float32).reshape(-1, 1)
    # x^T (L L^T)^-1 x = |L^-1 x|^2: one triangular solve (cholesky_solve would also copy L)
    y = torch.linalg.solve_triangular(factor, x32, upper=False)
    ratio = float((y * y).sum()) * (theta + delta) / max(float((x32 * x32).sum()), 1e-300)
    return 0.8 <= ratio <= 1.25


def _no_alias(out: Tensor, given: Optional[Tensor]) -> Tensor:
    """custom ops may not return an input: a reused factor comes back as a copy."""
    if given is not None and out.data_ptr() == given.data_ptr():
        return out.clone()
    return out


def _info(stats: Tensor, factor: Tensor) -> EigenInfo:
    s = stats.tolist()
    used_dense = s[4] > 0 or (s[0] == 0 and s[2] == 0)
    return EigenInfo(iterations=int(s[0]), converged=bool(s[1] > 0), fallback=bool(s[4] > 0),
                     method="eigh" if used_dense else "davidson", error_estimate=float(s[3]),
                     factor=None if s[2] == 0 else factor, delta=float(s[2]))


@torch.library.custom_op("calrft::smallest_eig", mutates_args=())
def _smallest_eig_op(matrix: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float,
                     nev: int, tol: float, max_iter: int, method: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w, v, f, st = _solve(matrix, v0, factor, delta, nev, tol, max_iter if max_iter > 0 else None,
                         method)
    return w[:nev].clone(), v[:, :nev].clone(), _no_alias(f, factor), st


@_smallest_eig_op.register_fake
def _(matrix, v0, factor, delta, nev, tol, max_iter, method):
    d = matrix.shape[0]
    f64 = dict(dtype=torch.float64, device=matrix.device)
    return (matrix.new_empty(nev, **f64), matrix.new_empty(d, nev, **f64),
            matrix.new_empty(d, d, dtype=torch.float32), matrix.new_empty(5, dtype=torch.float64,
                                                                          device="cpu"))


def _smallest_eig_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype


def _smallest_eig_backward(ctx, grad_w, grad_v, grad_f, grad_st):
    (vecs,) = ctx.saved_tensors
    if grad_w is None:
        return (None,) * 8
    # d lambda_i / d A = v_i v_i^T (simple eigenvalues); eigenvector gradients are not provided.
    ga = (vecs * grad_w.to(vecs.dtype)) @ vecs.T
    return ga.to(ctx.dtype), None, None, None, None, None, None, None


_smallest_eig_op.register_autograd(_smallest_eig_backward, setup_context=_smallest_eig_setup)


def smallest_eigenvalue(matrix: Tensor, *, v0: Optional[Tensor] = None, tol: float = 1e-6,
                        max_iter: Optional[int] = None, method: str = "auto",
                        factor: Optional[Tensor] = None, return_info: bool = False):
    """Smallest eigenvalue and its unit eigenvector of a symmetric PSD matrix [d, d]. Only the
    lower triangle is read (as torch.linalg.eigh does); a NaN/inf there raises ValueError.

    method: "lanczos" - the iterative shift-invert solver (preconditioned block Davidson, see the
    module doc; no fallback, warns if not converged); "eigh" - dense fp64 reference; "auto" -
    the iteration, with a reported (RuntimeWarning, EigenInfo.fallback) dense fallback.
    tol: target RELATIVE error of the eigenvalue (the stopping test bounds it, docs/spectral.md).
    v0: warm start (previous vector); factor: EigenInfo.factor of a previous call on a nearby
    matrix (skips the factorisation; a stale factor slows convergence, it cannot bias the result).
    Returns (value, vector) in matrix's dtype, or (value, vector, EigenInfo) with return_info.
    Differentiable in matrix (d lambda / d A = v v^T)."""
    _check_square("matrix", matrix)
    _check_tol(tol, max_iter)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    d = matrix.shape[0]
    v0 = _check_v0(v0, d, matrix.device)
    factor, delta = _check_factor(factor, d, matrix.device)
    w, v, f, st = _smallest_eig_op(matrix, v0, factor, delta, 1, float(tol), max_iter or 0,
                                   method)
    value, vector = w[0].to(matrix.dtype), v[:, 0].to(matrix.dtype)
    if return_info:
        return value, vector, _info(st, f)
    return value, vector


# ---- covariance + smallest eigenpairs, fused ------------------------------------------------

@torch.library.custom_op("calrft::covariance_smallest_eig", mutates_args=())
def _cov_eig_op(z: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float, nev: int,
                tol: float, max_iter: int, correction: float, backend: str, fp64: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    iters = max_iter if max_iter > 0 else None
    if fp64 and nev == 1 and _refinable(z, backend):
        out = _cov_eig_fp32_certified(z, v0, factor, delta, tol, iters, correction)
        if out is not None:
            return out
    cov, mean = _covariance_impl(z, correction, backend, fp64, lower_only=True)
    w, v, f, st = _solve(cov, v0, factor, delta, nev, tol, iters, "auto", name="z")
    return w[:nev].clone(), v[:, :nev].clone(), mean, _no_alias(f, factor), st


def _refine_max_steps(d: int) -> int:
    """Exact-covariance steps before giving up on the fp32-accumulated Sigma: as many as cost
    less than what giving up costs. A step is two O(B d) fp64 passes over z (one column; the
    start block's 8 columns cost 0.67 / 2.5 ms); giving up forms Sigma in fp64 (O(B d^2)) and
    solves afresh. Measured, B = 4d: a step <= 0.75 / 3 ms, giving up 16 / 105 ms at d = 512 /
    1024 (break-even >= 20 / 35 steps); d // 64 keeps a margin. Log spectra needed 0 / 2 / 4 / 5
    steps at d = 512 and 1 / 2 / 5 / 8 at d = 1024 for condition numbers 1e4 / 1e5 / 1e6 / 1e7
    (a fixed limit of 4 sent d = 1024, 1e6 to the fp64 path: 170 ms instead of ~70)."""
    return max(4, d // 64)


# The solve on Sigma_32 only starts the refinement, and Sigma_32's own lambda_min is 1e-5..1e-3 off
# the exact one (condition 1e4..1e6): past this tolerance its steps are wasted. Solve + refinement,
# ms (min of 3 x 15, one process), phase-one tol 1e-6 / 1e-4: d = 512, condition 1e4 3.74 / 3.65,
# 1e6 4.95 / 4.66; d = 1024 23.3 / 23.2, 28.2 / 25.9 (1e-3 was slower again at d = 1024, 1e4).
_SIGMA32_TOL = 1e-4


def _refinable(z: Tensor, backend: str) -> bool:
    return (z.dtype == torch.float32 and z.device.type == "cpu" and backend in ("auto", "cpu")
            and _solver_kind(z.device) == "cpu" and z.shape[1] > DENSE_BELOW)


def _cov_eig_fp32_certified(z, v0, factor, delta, tol, max_iter, correction):
    """lambda_min of the fp64-accurate covariance at the cost of an fp32-accumulated one: solve
    on Sigma_32 (the GEMM in fp32, ~2x faster than fp64) to _SIGMA32_TOL, then continue the
    solver on the features' exact covariance from that solve's final Ritz block (fp64 passes
    over z: O(B d 8) for the block, O(B d) for each one-column step after it; nothing d x d in
    fp64; the stopping test now bounds the error on the exact Sigma). None when that does not
    converge in _refine_max_steps(d) steps (condition numbers where fp32 accumulation moves the
    bottom far) or Sigma_32's factor does not fit the exact Sigma at the answer (the error bound
    reads its norm): the caller then forms Sigma in fp64."""
    cov, mean = _covariance_impl(z, correction, "cpu", False, lower_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # a fallback here only means: no certificate
            w, v, f, st = _solve(cov, v0, factor, delta, 1, max(tol, _SIGMA32_TOL), max_iter,
                                 "auto", name="z")
    except ValueError:  # NaN/inf in Sigma_32: in z (the fp64 path says so) or an fp32 overflow
        return None
    if float(st[4]) > 0 or float(st[1]) <= 0 or w.numel() < 2:
        return None
    values, vectors, rst = _backend.native()[0].refine_covariance_eig_cpu(
        z, mean, v, f, float(st[2]), float(correction), float(cov.diagonal().max()), float(tol),
        _refine_max_steps(z.shape[1]))
    if float(rst[1]) <= 0:
        return None
    st = st.clone()
    st[0] += rst[0]
    st[3] = rst[3]
    return values[:1].clone(), vectors[:, :1].clone(), mean, _no_alias(f, factor), st


@_cov_eig_op.register_fake
def _(z, v0, factor, delta, nev, tol, max_iter, correction, backend, fp64):
    d = z.shape[1]
    f64 = dict(dtype=torch.float64, device=z.device)
    return (z.new_empty(nev, **f64), z.new_empty(d, nev, **f64), z.new_empty(d, **f64),
            z.new_empty(d, d, dtype=torch.float32), z.new_empty(5, dtype=torch.float64,
                                                                device="cpu"))


def _cov_eig_setup(ctx, inputs, output):
    z, correction = inputs[0], inputs[7]
    # Only z (the caller's own tensor, no copy), the eigenvectors [d, k] and the mean [d].
    ctx.save_for_backward(z, output[1], output[2])
    ctx.correction = correction


def _cov_eig_backward(ctx, grad_w, grad_v, grad_mean, grad_f, grad_st):
    z, vecs, mean = ctx.saved_tensors
    if grad_w is None:
        return (None,) * 10
    ct = _compute_dtype(z.dtype)
    v = vecs.to(ct)
    # d lambda_i / dZ = 2/(B-c) Zc v_i v_i^T; Zc v = Z v - 1 (mean . v): no centred copy of Z.
    zv = z.to(ct) @ v - (mean.to(ct) @ v)
    scale = (2.0 / (z.shape[0] - ctx.correction)) * grad_w.to(ct)
    dz = (zv * scale) @ v.T
    return dz.to(z.dtype), None, None, None, None, None, None, None, None, None


_cov_eig_op.register_autograd(_cov_eig_backward, setup_context=_cov_eig_setup)


def _soft_min(values: Tensor, temperature: float) -> Tensor:
    """-T log sum exp(-lambda_i / T), T relative to the smallest value (scale-free)."""
    t = temperature * values[0].abs().clamp_min(torch.finfo(values.dtype).tiny)
    return -t * torch.logsumexp(-values / t, 0) + t * math.log(values.numel())


def _finish_value(value: Tensor, eps: float, root: bool) -> Tensor:
    return torch.sqrt((value + eps).clamp_min(0.0)) if root else value + eps


def covariance_sigma_min(z: Tensor, *, v0: Optional[Tensor] = None, tol: float = 1e-6,
                         eps: float = 0.0, return_vector: bool = False, correction: float = 1,
                         softmin_k: int = 1, softmin_temperature: float = 0.1,
                         rank_deficient: str = "warn", factor: Optional[Tensor] = None,
                         max_iter: Optional[int] = None, return_info: bool = False,
                         accumulate: str = "fp64", root: bool = False, backend: str = "auto"):
    """sigma_min (= lambda_min) of batch_covariance(z, correction) + eps, differentiable in z.

    Backward: 2/(B-c) * Zc v v^T * grad, O(B d); only z, the mean and v are kept.
    eps: Tikhonov term (the value of Sigma + eps I): keeps log/reciprocal regularisers finite.
    softmin_k > 1: a smooth soft-min over the k smallest eigenvalues,
    -T log(mean_i exp(-lambda_i / T)) with T = softmin_temperature * lambda_1 (use it when the
    bottom eigenvalues are near-degenerate: lambda_1 alone then has a jumping gradient).
    rank_deficient: B - correction < d makes Sigma singular (lambda_min exactly 0 with
    multiplicity >= d - B + c): "warn" returns exactly eps (zero gradient) with a warning,
    "raise" raises ValueError.
    accumulate: "fp64" (default) gives an fp64-accurate lambda_min, which an ill-conditioned
    Sigma needs for 1e-4 accuracy: for fp32 features on CPU, Sigma is formed with fp32
    accumulation, solved, and the answer refined and certified on the features' exact covariance
    (Sigma formed in fp64, chunk-wise, only if that fails); "fp32" returns the fp32-accumulated
    Sigma's answer: 10-15% faster and as accurate as fp32 eigvalsh (errors 1e-5..1e-3 at
    condition numbers 1e4..1e6).
    root=True returns sqrt(lambda_min + eps) instead: the smallest singular value of the centred
    features / sqrt(B - correction); its derivative is bounded by 1 / (2 sqrt(eps)) where
    sqrt(lambda) alone has an unbounded one at 0 (so use eps > 0 with root=True).
    Returns value (z's dtype), or (value, vector) with return_vector, (+ EigenInfo) with
    return_info."""
    _check_tensor("z", z)
    if not isinstance(root, bool):
        raise TypeError(f"root must be a bool, got {type(root).__name__}")
    _check_tol(tol, max_iter)
    correction = _check_correction(correction, z.shape[0])
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not isinstance(softmin_k, int) or not 1 <= softmin_k <= z.shape[1]:
        raise ValueError(f"softmin_k must be an int in [1, d={z.shape[1]}], got {softmin_k!r}")
    if accumulate not in ("fp64", "fp32"):
        raise ValueError(f"accumulate must be 'fp64' or 'fp32', got {accumulate!r}")
    if rank_deficient not in ("warn", "raise"):
        raise ValueError(f"rank_deficient must be 'warn' or 'raise', got {rank_deficient!r}")
    B, d = z.shape
    v0 = _check_v0(v0, d, z.device)
    factor, delta = _check_factor(factor, d, z.device)
    if B - correction < d:
        msg = (f"covariance_sigma_min: B - correction = {B - correction:g} < d = {d}: the "
               f"covariance is singular, sigma_min is exactly 0")
        if rank_deficient == "raise":
            raise ValueError(msg)
        warnings.warn(msg + "; returning eps with zero gradient", RuntimeWarning, stacklevel=2)
        _check_finite("z", z)
        value = _finish_value((z * 0).sum(), eps, root)  # zero gradient, graph stays connected
        vec = z.new_zeros(d)
        out = (value, vec) if return_vector else value
        return out
    fp64 = accumulate == "fp64" or z.dtype == torch.float64
    w, v, _, f, st = _cov_eig_op(z, v0, factor, delta, softmin_k, float(tol), max_iter or 0,
                                 correction, backend, fp64)
    value = w[0] if softmin_k == 1 else _soft_min(w, softmin_temperature)
    value = _finish_value(value, eps, root).to(z.dtype)
    vector = v[:, 0].to(z.dtype)
    result = (value, vector) if return_vector else (value,)
    if return_info:
        result = result + (_info(st, f),)
    return result if len(result) > 1 else result[0]


# ---- general matrices: smallest singular value, orthogonality loss --------------------------

@torch.library.custom_op("calrft::gram_smallest_eig", mutates_args=())
def _gram_eig_op(w: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    w64 = w.to(torch.float64)
    gram = w64.T @ w64 if w.shape[0] >= w.shape[1] else w64 @ w64.T
    val, vec, _, _ = _solve(gram, None, None, 0.0, 1, tol, None, "auto", name="w")
    return val[:1].clone(), vec[:, 0].contiguous()


@_gram_eig_op.register_fake
def _(w, tol):
    n = min(w.shape)
    return w.new_empty(1, dtype=torch.float64), w.new_empty(n, dtype=torch.float64)


def _gram_eig_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _gram_eig_backward(ctx, grad_val, grad_vec):
    w, v = ctx.saved_tensors
    if grad_val is None:
        return None, None
    ct = _compute_dtype(w.dtype)
    w_, v_, g = w.to(ct), v.to(ct), grad_val.to(ct)[0]
    # lambda = v^T G v with G = W^T W (or W W^T): dlambda/dW = 2 W v v^T (or 2 v v^T W)
    if w.shape[0] >= w.shape[1]:
        dw = 2 * g * torch.outer(w_ @ v_, v_)
    else:
        dw = 2 * g * torch.outer(v_, v_ @ w_)
    return dw.to(w.dtype), None


_gram_eig_op.register_autograd(_gram_eig_backward, setup_context=_gram_eig_setup)


def smallest_singular_value(w: Tensor, *, eps: float = 0.0, tol: float = 1e-8) -> Tensor:
    """sigma_min of a general matrix w [m, n] = sqrt(lambda_min(Gram) + eps), Gram = w^T w (or
    w w^T, whichever is smaller) formed in fp64. Differentiable; eps > 0 bounds the derivative
    of the square root at a rank-deficient w (sqrt has an infinite slope at 0)."""
    _check_tensor("w", w)
    if min(w.shape) == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    _check_tol(tol, None)
    _check_finite("w", w)
    lam, _ = _gram_eig_op(w, float(tol))
    return torch.sqrt(lam[0].clamp_min(0) + eps).to(w.dtype)


@torch.library.custom_op("calrft::orthogonality_loss", mutates_args=())
def _orth_op(w: Tensor) -> Tensor:
    ct = _compute_dtype(w.dtype)
    w_ = w.to(ct)
    gram = w_.T @ w_
    gram.diagonal().sub_(1.0)
    return torch.linalg.matrix_norm(gram).to(w.dtype)


@_orth_op.register_fake
def _(w):
    return w.new_empty(())


def _orth_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _orth_backward(ctx, grad):
    w, loss = ctx.saved_tensors
    ct = _compute_dtype(w.dtype)
    w_ = w.to(ct)
    e = w_.T @ w_
    e.diagonal().sub_(1.0)
    # d||E||_F / dW = 2 W E / ||E||_F (E symmetric); at E = 0 the norm has no gradient: use 0.
    denom = loss.to(ct)
    scale = torch.where(denom > 0, grad.to(ct) / denom.clamp_min(torch.finfo(ct).tiny),
                        torch.zeros_like(denom))
    return (2 * scale * (w_ @ e)).to(w.dtype)


_orth_op.register_autograd(_orth_backward, setup_context=_orth_setup)


def orthogonality_loss(w: Tensor) -> Tensor:
    """||w^T w - I||_F (Frobenius norm, not squared): CaRot's OC term for w [m, n] (e.g. the
    visual projection, 768 x 512). w^T w - I is formed directly (never via ||w^T w||^2 - 2||w||^2
    + n, which cancels catastrophically near orthogonality)."""
    _check_tensor("w", w)
    if min(w.shape) == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    _check_finite("w", w)
    return _orth_op(w)


# ---- streaming covariance -------------------------------------------------------------------

class CovarianceAccumulator:
    """Streaming, mergeable covariance (Chan et al. pairwise update), in float64 by default.

    State: count, mean [dim], comoment M = sum (z - mean)(z - mean)^T [dim, dim]. Each update()
    computes its batch's mean and comoment with the covariance kernel (exact for large means) and
    merges them in; merge() combines two accumulators the same way, so any split of the rows -
    across batches, ranks (all_reduce_accumulator) or checkpoints (state_dict) - gives the
    covariance of all rows seen, equal to batch_covariance of their concatenation."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.dtype = dim, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=self.device)
        self.comoment = torch.zeros(dim, dim, dtype=dtype, device=self.device)

    @torch.no_grad()
    def update(self, z: Tensor) -> "CovarianceAccumulator":
        _check_tensor("z", z)
        if z.shape[1] != self.dim:
            raise ValueError(f"z must have {self.dim} columns, got shape {tuple(z.shape)}")
        if z.shape[0] == 0:
            return self
        z = z.detach().to(self.device)
        backend = "auto" if z.device.type != "cpu" or _backend.native()[0] else "reference"
        cov, mean = _covariance_impl(z, 0.0, backend, fp64=self.dtype == torch.float64)
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("z contains NaN or infinity")
        self._merge_state(z.shape[0], mean.to(self.dtype), cov.to(self.dtype) * z.shape[0])
        return self

    def _merge_state(self, n_b: int, mean_b: Tensor, comoment_b: Tensor) -> None:
        n_a = self.count
        if n_b == 0:
            return
        if n_a == 0:
            self.count, self.mean, self.comoment = n_b, mean_b.clone(), comoment_b.clone()
            return
        delta = mean_b - self.mean
        native = _backend.native()[0]
        if native is not None and self.device.type == "cpu":
            merged = native.chan_merge_cpu(self.comoment, comoment_b, delta, float(n_a),
                                           float(n_b)).to(self.dtype)
        else:
            merged = self.comoment + comoment_b + torch.outer(delta, delta) * (n_a * n_b / (n_a + n_b))
        self.mean = self.mean + delta * (n_b / (n_a + n_b))
        self.comoment = merged
        self.count = n_a + n_b

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"other must be a CovarianceAccumulator, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has dim {other.dim}, this accumulator {self.dim}")
        self._merge_state(other.count, other.mean.to(self.device, self.dtype),
                          other.comoment.to(self.device, self.dtype))
        return self

    def covariance(self, correction: float = 1) -> Tensor:
        if self.count - correction <= 0:
            raise ValueError(f"correction={correction} needs more than {correction} rows, "
                             f"the accumulator has seen {self.count}")
        return self.comoment / (self.count - correction)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "count": self.count, "mean": self.mean.clone(),
                "comoment": self.comoment.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("dim", "count", "mean", "comoment"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        if state["dim"] != self.dim:
            raise ValueError(f"state has dim {state['dim']}, this accumulator {self.dim}")
        self.count = int(state["count"])
        self.mean = state["mean"].to(self.device, self.dtype).clone()
        self.comoment = state["comoment"].to(self.device, self.dtype).clone()
