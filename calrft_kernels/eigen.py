"""Eigen-solver family: smallest_eigenvalue, covariance_sigma_min, smallest_singular_value.

Solvers (docs/spectral.md), chosen by `method`:
  davidson  block generalized Davidson preconditioned by an fp32 Cholesky factor of A + delta I,
            with Rayleigh-Ritz and residuals in fp64 on the exact matrix (C++: csrc/cpu/davidson.cpp,
            CUDA: csrc/cuda/davidson.cu). The fp32 factor only steers the search space, so it may
            be reused from the previous training step; the stopping test bounds the eigenvalue
            error relative to the eigenvalue.
  lanczos   genuine shift-invert Lanczos (calrft_kernels/lanczos.py, plain PyTorch): fp64
            Cholesky of A + delta I, full reorthogonalisation, fp64 tridiagonal, warm start.
  eigh      dense fp64 torch.linalg.eigh (the reference).
  auto      davidson where measured fastest (CPU: docs/spectral.md "auto"; CUDA: the only
            solver measured there), dense below DENSE_BELOW, with a reported dense fallback
            (RuntimeWarning + EigenInfo.fallback) when the iteration does not converge.
One dispatcher (`solve`) returns one named result (`SolveResult`) whatever ran; the
stale-factor policy (when a reused Davidson factor is rebuilt or the solve redone with a fresh
one) lives in csrc/common/spectral_math.h, which the CPU and CUDA solvers both call.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._checks import (check_correction, check_finite, check_real, check_result_finite,
                               check_square, check_tensor, check_tol, compute_dtype,
                               power_of_two_scale)
from .covariance import covariance_impl, resolve_covariance_backend
from .lanczos import lanczos_smallest

DENSE_BELOW = 48          # d <= this: dense eigh is cheaper than any iteration (auto, davidson)
DEFAULT_MAX_ITER = 100    # iterations before the dense fallback
METHODS = ("auto", "davidson", "lanczos", "eigh")
# What "auto" runs per device type (docs/spectral.md "auto": the CPU choice was measured with
# benchmarks/bench_spectral.py; on CUDA Davidson is the only solver measured so far).
AUTO_METHOD = {"cpu": "davidson", "cuda": "davidson"}


# ---- results --------------------------------------------------------------------------------

@dataclasses.dataclass
class EigenInfo:
    """How an eigenvalue was obtained. `factor` (fp32 Cholesky of A + delta I, Davidson only) and
    the returned vector are what a warm start passes back in:
    smallest_eigenvalue(A_next, v0=vec, factor=info)."""
    iterations: int
    converged: bool
    fallback: bool            # True when the dense fp64 solver produced the answer
    method: str               # "davidson", "lanczos" or "eigh"
    error_estimate: float     # relative eigenvalue error bound at the last iteration
    factor: Optional[Tensor]
    delta: float


_METHOD_CODES = ("eigh", "davidson", "lanczos")


@dataclasses.dataclass
class SolveResult:
    """One solve, whichever solver ran. values [k] / vectors [d, k] (fp64) may hold more pairs
    than asked (Davidson's final Ritz block): callers slice."""
    values: Tensor
    vectors: Tensor
    factor: Optional[Tensor]  # fp32 preconditioner factor (Davidson), else None
    delta: float
    iterations: int
    converged: bool
    estimate: float
    method: str
    fallback: bool = False

    # The custom ops carry the scalar fields as one small fp64 tensor (ops return tensors); this
    # pair of methods is the only place that knows its layout.
    def stats(self) -> Tensor:
        return torch.tensor([self.iterations, float(self.converged), self.delta, self.estimate,
                             float(self.fallback), _METHOD_CODES.index(self.method),
                             float(self.factor is not None and self.factor.numel() > 0)],
                            dtype=torch.float64)

    @staticmethod
    def info_from_stats(stats: Tensor, factor: Tensor) -> EigenInfo:
        it, conv, delta, est, fb, code, has_factor = stats.tolist()
        method = _METHOD_CODES[int(code)]
        return EigenInfo(iterations=int(it), converged=bool(conv), fallback=bool(fb),
                         method=method, error_estimate=float(est),
                         factor=factor if has_factor else None,
                         delta=float(delta))


STATS_SIZE = 7


# ---- validation -----------------------------------------------------------------------------

def _check_method(method) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_v0(v0, d: int, device) -> Optional[Tensor]:
    if v0 is None:
        return None
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a torch.Tensor or None, got {type(v0).__name__}")
    if not v0.is_floating_point():
        raise TypeError(f"v0 must be a floating-point tensor, got {v0.dtype}")
    if v0.numel() != d:
        raise ValueError(f"v0 must have {d} entries, got shape {tuple(v0.shape)}")
    v0 = v0.detach().reshape(d).to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and non-zero")
    return v0


def _check_factor(factor, d: int, device) -> tuple[Optional[Tensor], float]:
    """(fp32 factor or None, its shift or -1 = derive it from the factor). A factor must be what
    EigenInfo.factor holds: a finite [d, d] lower-triangular Cholesky factor with a positive
    diagonal (a zero or NaN one used to reach the solver and fail inside MKL)."""
    delta = -1.0
    if isinstance(factor, EigenInfo):
        factor, delta = factor.factor, factor.delta
    if factor is None:
        return None, -1.0
    if not isinstance(factor, Tensor):
        raise TypeError(f"factor must be a torch.Tensor (EigenInfo.factor) or None, "
                        f"got {type(factor).__name__}")
    if not factor.is_floating_point():
        raise TypeError(f"factor must be a floating-point tensor, got {factor.dtype}")
    if factor.shape != (d, d):
        raise ValueError(f"factor must be [{d}, {d}] (EigenInfo.factor of a previous call), "
                         f"got shape {tuple(factor.shape)}")
    f32 = factor.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(f32.tril()).all()) or not bool((f32.diagonal() > 0).all()):
        raise ValueError("factor must be a Cholesky factor (EigenInfo.factor): finite, with a "
                         "positive diagonal")
    if not math.isfinite(delta) or (delta != -1.0 and delta < 0):
        raise ValueError(f"factor's shift (EigenInfo.delta) must be finite and >= 0, got {delta}")
    return f32, delta


# ---- the dispatcher -------------------------------------------------------------------------

def _davidson_kind(device) -> Optional[str]:
    """Which native Davidson solver serves this device ("cpu", "cuda"), or None."""
    if device.type == "cpu" and _backend.cpu_native_usable(device)[0]:
        return "cpu"
    if device.type == "cuda" and _backend.cuda_native_usable(device, "smallest_eig_cuda")[0]:
        return "cuda"
    return None


def _lower_symmetric64(a: Tensor) -> Tensor:
    """The symmetric fp64 matrix of a's lower triangle, whole (the CUDA solver multiplies by it;
    the CPU solver and eigh read the lower triangle in place)."""
    a64 = a.to(torch.float64)
    return (a64.tril() + a64.tril(-1).T).contiguous()


def _check_finite_lower(name: str, a: Tensor) -> None:
    if not bool(torch.isfinite(a.tril()).all()):
        raise ValueError(f"{name} contains NaN or infinity")


def _dense(a: Tensor, nev: int, fallback: bool = False, base: Optional[SolveResult] = None,
           name: str = "matrix") -> SolveResult:
    a64 = a.to(torch.float64)
    _check_finite_lower(name, a64)
    w, v = torch.linalg.eigh(a64)
    if base is None:
        return SolveResult(w[:nev].clone(), v[:, :nev].clone(), None, 0.0, 0, True, 0.0,
                           "eigh", fallback)
    return dataclasses.replace(base, values=w[:nev].clone(), vectors=v[:, :nev].clone(),
                               method="eigh", fallback=fallback)


def _derive_delta(mat: Tensor, factor: Tensor) -> float:
    """The shift a bare reused factor was built with: diag(L L^T) - diag(A)."""
    diagonal = mat.diagonal().double()
    rebuilt = float(((factor.double() ** 2).sum(1) - diagonal).median())
    return max(rebuilt, 1e-7 * float(diagonal.abs().max()), 0.0)


def _native_davidson(kind: str, mat: Tensor, v0, factor, delta, nev, tol, iters,
                     name: str) -> Optional[SolveResult]:
    """The C++ solver's answer as a SolveResult (None: no preconditioner could be built). The
    arguments are built here, once, for both solvers: their bindings have the same signature
    (tests/test_spectral_seams.py checks it against the C++ sources)."""
    empty = mat.new_empty(0, dtype=torch.float64)
    fn = getattr(_backend.native()[0], f"smallest_eig_{kind}")
    out = fn(mat, empty if v0 is None else v0, empty if factor is None else factor,
             float(delta), int(nev), float(tol), int(iters))
    if out["status"] == "nonfinite":
        raise ValueError(f"{name} contains NaN or infinity")
    if out["status"] == "no_factor":
        return None
    return SolveResult(values=out["values"], vectors=out["vectors"], factor=out["factor"],
                       delta=float(out["delta"]), iterations=int(out["iterations"]),
                       converged=bool(out["converged"]), estimate=float(out["estimate"]),
                       method="davidson")


def solve(a: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float, nev: int,
          tol: float, max_iter: Optional[int], method: str, name: str = "matrix") -> SolveResult:
    """Smallest `nev` eigenpairs of the symmetric matrix whose lower triangle is a's (the upper
    triangle is not read, as in torch.linalg.eigh). Raises ValueError naming `name` if that
    triangle holds a NaN or infinity; never raises on non-convergence (auto falls back to dense
    eigh with a RuntimeWarning, the explicit methods warn and return their last iterate)."""
    d = a.shape[0]
    kind = _davidson_kind(a.device)
    iters = DEFAULT_MAX_ITER if max_iter is None else max_iter
    chosen = method
    if method == "auto":
        chosen = AUTO_METHOD.get(a.device.type, "davidson")
        if factor is not None:
            chosen = "davidson"        # only Davidson reuses a factor
        if chosen == "lanczos" and nev > 1:
            chosen = "davidson"
    if chosen == "eigh" or (chosen == "davidson" and (d <= DENSE_BELOW or kind is None)):
        # (no native Davidson here and d above the dense cut: the dense answer is a fallback)
        return _dense(a, nev, fallback=chosen != "eigh" and d > DENSE_BELOW, name=name)
    if chosen == "lanczos":
        if nev != 1:
            raise ValueError("method='lanczos' computes one eigenpair (nev=1)")
        if factor is not None:
            raise ValueError("factor is the Davidson preconditioner: method='lanczos' factors "
                             "A + delta I in fp64 itself (pass v0 to warm-start it)")
        _check_finite_lower(name, a)
        res = lanczos_smallest(a, v0=v0, tol=tol, max_iter=iters)
        result = None if res is None else SolveResult(
            torch.tensor([res.value], dtype=torch.float64, device=a.device),
            res.vector.reshape(d, 1), None, res.delta, res.iterations, res.converged,
            res.estimate, "lanczos")
    else:
        # The CPU solver reads fp32 and fp64 matrices as they are (its sums are fp64 either
        # way); the CUDA one gets the whole symmetric fp64 matrix.
        if kind == "cpu":
            mat = a if a.dtype in (torch.float32, torch.float64) else a.to(torch.float64)
        else:
            _check_finite_lower(name, a)
            mat = _lower_symmetric64(a)
        if factor is not None and delta < 0:
            delta = _derive_delta(mat, factor)
        result = _native_davidson(kind, mat, v0, factor, delta, nev, tol, iters, name)
    if result is not None and result.converged and result.values.numel() >= nev:
        return result
    if method == "auto":
        why = (f"the iteration did not reach tol={tol:g} in {iters} iterations (error estimate "
               f"{result.estimate:.2e})" if result is not None else "no preconditioner could "
               "be built (is the matrix PSD, with entries inside the fp32 range?)")
        warnings.warn(f"smallest_eigenvalue: {why}; using dense fp64 eigh", RuntimeWarning,
                      stacklevel=4)
        return _dense(a, nev, fallback=True, base=result, name=name)
    if result is None:   # nothing to return but eigh
        warnings.warn(f"smallest_eigenvalue(method={chosen!r}): the matrix could not be "
                      f"factored (not PSD?); using dense fp64 eigh", RuntimeWarning, stacklevel=4)
        return _dense(a, nev, fallback=True, name=name)
    warnings.warn(f"smallest_eigenvalue(method={chosen!r}): not converged to tol={tol:g} in "
                  f"{iters} iterations (error estimate {result.estimate:.2e}); returning the "
                  f"current estimate", RuntimeWarning, stacklevel=4)
    return result


def _factor_out(result: SolveResult, d: int, device, given: Optional[Tensor]) -> Tensor:
    """The op's factor output [d, d] fp32: the solver's factor (a copy when a factor was given:
    the solver may return that very tensor, and custom ops may not return an input; one d x d
    copy costs less than one iteration), or zeros when none was built (fixed shape: the fake
    kernels need it)."""
    f = result.factor
    if f is None or f.numel() == 0:
        return torch.zeros(d, d, dtype=torch.float32, device=device)
    return f.clone() if given is not None else f


# ---- smallest_eigenvalue --------------------------------------------------------------------

@torch.library.custom_op("calrft::smallest_eig", mutates_args=())
def _smallest_eig_op(matrix: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float,
                     nev: int, tol: float, max_iter: int, method: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r = solve(matrix, v0, factor, delta, nev, tol, max_iter if max_iter > 0 else None, method)
    return (r.values[:nev].clone(), r.vectors[:, :nev].clone(),
            _factor_out(r, matrix.shape[0], matrix.device, factor), r.stats())


@_smallest_eig_op.register_fake
def _(matrix, v0, factor, delta, nev, tol, max_iter, method):
    d = matrix.shape[0]
    f64 = dict(dtype=torch.float64, device=matrix.device)
    return (matrix.new_empty(nev, **f64), matrix.new_empty(d, nev, **f64),
            matrix.new_empty(d, d, dtype=torch.float32),
            matrix.new_empty(STATS_SIZE, dtype=torch.float64, device="cpu"))


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

    method: "davidson" - preconditioned block Davidson (module doc; warns if not converged, no
    fallback); "lanczos" - shift-invert Lanczos (fp64 factor, full reorthogonalisation; warns if
    not converged); "eigh" - dense fp64 reference; "auto" - Davidson (the measured faster one),
    dense for d <= 48, with a reported (RuntimeWarning, EigenInfo.fallback) dense fallback.
    tol: target RELATIVE error of the eigenvalue (the stopping test bounds it, docs/spectral.md).
    v0: warm start (previous vector); factor: EigenInfo (or EigenInfo.factor) of a previous
    Davidson call on a nearby matrix (skips the factorisation; a stale factor is detected and
    rebuilt, it cannot bias the result).
    Returns (value, vector) in matrix's dtype, or (value, vector, EigenInfo) with return_info.
    Differentiable in matrix (d lambda / d A = v v^T)."""
    check_square("matrix", matrix)
    check_tol(tol, max_iter)
    method = _check_method(method)
    if not isinstance(return_info, bool):
        raise TypeError(f"return_info must be a bool, got {type(return_info).__name__}")
    d = matrix.shape[0]
    v0 = _check_v0(v0, d, matrix.device)
    factor, delta = _check_factor(factor, d, matrix.device)
    if factor is not None and method in ("lanczos", "eigh"):
        raise ValueError(f"factor is the Davidson preconditioner; method={method!r} does not "
                         f"use one")
    w, v, f, st = _smallest_eig_op(matrix, v0, factor, delta, 1, float(tol), max_iter or 0,
                                   method)
    value, vector = w[0].to(matrix.dtype), v[:, 0].to(matrix.dtype)
    if return_info:
        return value, vector, SolveResult.info_from_stats(st, f)
    return value, vector


# ---- covariance + smallest eigenpairs, fused ------------------------------------------------

@torch.library.custom_op("calrft::covariance_smallest_eig", mutates_args=())
def _cov_eig_op(z: Tensor, v0: Optional[Tensor], factor: Optional[Tensor], delta: float, nev: int,
                tol: float, max_iter: int, correction: float, backend: str, fp64: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    iters = max_iter if max_iter > 0 else None
    which = resolve_covariance_backend(backend, z.device)
    if fp64 and nev == 1 and _refinable(z, which):
        out = _cov_eig_fp32_certified(z, v0, factor, delta, tol, iters, correction)
        if out is not None:
            r, mean = out
            return (r.values[:1].clone(), r.vectors[:, :1].clone(), mean,
                    _factor_out(r, z.shape[1], z.device, factor), r.stats())
    cov, mean = covariance_impl(z, correction, which, fp64, lower_only=True)
    try:
        r = solve(cov, v0, factor, delta, nev, tol, iters, "auto", name="z")
    except ValueError:
        if fp64 or not bool(torch.isfinite(z).all()):
            raise                 # a NaN/inf in z itself
        # finite z whose fp32-accumulated covariance overflowed (entries ~1e20): accumulate in
        # fp64 instead (what the error used to misreport as "z contains NaN or infinity")
        cov, mean = covariance_impl(z, correction, which, True, lower_only=True)
        r = solve(cov, v0, factor, delta, nev, tol, iters, "auto", name="z")
    return (r.values[:nev].clone(), r.vectors[:, :nev].clone(), mean,
            _factor_out(r, z.shape[1], z.device, factor), r.stats())


def _refine_max_steps(d: int) -> int:
    """Exact-covariance steps before giving up on the fp32-accumulated Sigma: as many as cost
    less than what giving up costs (forming Sigma in fp64 and solving afresh); derivation and
    measurements in docs/spectral.md ("covariance_sigma_min")."""
    return max(4, d // 64)


# The solve on Sigma_32 only starts the refinement (Sigma_32's own lambda_min is 1e-5..1e-3 off
# the exact one at condition 1e4..1e6): past this tolerance its steps are wasted
# (docs/spectral.md, "covariance_sigma_min").
_SIGMA32_TOL = 1e-4


def _refinable(z: Tensor, which: str) -> bool:
    return (z.dtype == torch.float32 and z.device.type == "cpu" and which == "cpu"
            and _davidson_kind(z.device) == "cpu" and z.shape[1] > DENSE_BELOW)


def _cov_eig_fp32_certified(z, v0, factor, delta, tol, max_iter, correction):
    """(SolveResult, mean) for lambda_min of the fp64-accurate covariance at the cost of an
    fp32-accumulated one: solve on Sigma_32 to _SIGMA32_TOL, then continue the solver on the
    features' exact covariance from that solve's final Ritz block (fp64 passes over z, nothing
    d x d in fp64; the stopping test then bounds the error on the exact Sigma). None when that
    does not converge in _refine_max_steps(d) steps or Sigma_32's factor does not fit the exact
    Sigma at the answer: the caller then forms Sigma in fp64."""
    cov, mean = covariance_impl(z, correction, "cpu", False, lower_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # a fallback here only means: no certificate
            r = solve(cov, v0, factor, delta, 1, max(tol, _SIGMA32_TOL), max_iter, "auto",
                      name="z")
    except ValueError:  # NaN/inf in Sigma_32: in z (the fp64 path says so) or an fp32 overflow
        return None
    if r.fallback or not r.converged or r.method != "davidson" or r.values.numel() < 2:
        return None
    out = _backend.native()[0].refine_covariance_eig_cpu(
        z, mean, r.vectors, r.factor, float(r.delta), float(correction),
        float(cov.diagonal().max()), float(tol), _refine_max_steps(z.shape[1]))
    if not out["converged"]:
        return None
    refined = dataclasses.replace(r, values=out["values"][:1].clone(),
                                  vectors=out["vectors"][:, :1].clone(),
                                  iterations=r.iterations + int(out["iterations"]),
                                  estimate=float(out["estimate"]))
    return refined, mean


@_cov_eig_op.register_fake
def _(z, v0, factor, delta, nev, tol, max_iter, correction, backend, fp64):
    d = z.shape[1]
    f64 = dict(dtype=torch.float64, device=z.device)
    return (z.new_empty(nev, **f64), z.new_empty(d, nev, **f64), z.new_empty(d, **f64),
            z.new_empty(d, d, dtype=torch.float32),
            z.new_empty(STATS_SIZE, dtype=torch.float64, device="cpu"))


def _cov_eig_setup(ctx, inputs, output):
    z, correction = inputs[0], inputs[7]
    # Only z (the caller's own tensor, no copy), the eigenvectors [d, k] and the mean [d].
    ctx.save_for_backward(z, output[1], output[2])
    ctx.correction = correction


def _cov_eig_backward(ctx, grad_w, grad_v, grad_mean, grad_f, grad_st):
    z, vecs, mean = ctx.saved_tensors
    if grad_w is None:
        return (None,) * 10
    ct = compute_dtype(z.dtype)
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
    eps: Tikhonov term (finite, >= 0; the value of Sigma + eps I): keeps log/reciprocal
    regularisers finite.
    softmin_k > 1: a smooth soft-min over the k smallest eigenvalues,
    -T log(mean_i exp(-lambda_i / T)) with T = softmin_temperature * lambda_1 (> 0, finite; use it
    when the bottom eigenvalues are near-degenerate: lambda_1 alone then has a jumping gradient).
    rank_deficient: B - correction < d makes Sigma singular (lambda_min exactly 0 with
    multiplicity >= d - B + c): "warn" returns exactly eps (zero gradient) with a warning,
    "raise" raises ValueError.
    accumulate: "fp64" (default) gives an fp64-accurate lambda_min, which an ill-conditioned
    Sigma needs for 1e-4 accuracy: for fp32 features on CPU, Sigma is formed with fp32
    accumulation, solved, and the answer refined and certified on the features' exact covariance
    (Sigma formed in fp64, chunk-wise, only if that fails); "fp32" returns the fp32-accumulated
    Sigma's answer: faster and as accurate as fp32 eigvalsh.
    root=True returns sqrt(lambda_min + eps) instead: the smallest singular value of the centred
    features / sqrt(B - correction); its derivative is bounded by 1 / (2 sqrt(eps)) where
    sqrt(lambda) alone has an unbounded one at 0 (so use eps > 0 with root=True).
    backend: the covariance backend (batch_covariance's).
    Returns value (z's dtype), or (value, vector) with return_vector, (+ EigenInfo) with
    return_info."""
    check_tensor("z", z)
    for flag, name in ((root, "root"), (return_vector, "return_vector"),
                       (return_info, "return_info")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_tol(tol, max_iter)
    correction = check_correction(correction, z.shape[0])
    eps = check_real("eps", eps, low=0.0)
    softmin_temperature = check_real("softmin_temperature", softmin_temperature, low=0.0,
                                     low_open=True)
    if (isinstance(softmin_k, bool) or not isinstance(softmin_k, int)
            or not 1 <= softmin_k <= z.shape[1]):
        raise ValueError(f"softmin_k must be an int in [1, d={z.shape[1]}], got {softmin_k!r}")
    if accumulate not in ("fp64", "fp32"):
        raise ValueError(f"accumulate must be 'fp64' or 'fp32', got {accumulate!r}")
    if rank_deficient not in ("warn", "raise"):
        raise ValueError(f"rank_deficient must be 'warn' or 'raise', got {rank_deficient!r}")
    resolve_covariance_backend(backend, z.device)
    B, d = z.shape
    v0 = _check_v0(v0, d, z.device)
    factor, delta = _check_factor(factor, d, z.device)
    if B - correction < d:
        msg = (f"covariance_sigma_min: B - correction = {B - correction:g} < d = {d}: the "
               f"covariance is singular, sigma_min is exactly 0")
        if rank_deficient == "raise":
            raise ValueError(msg)
        warnings.warn(msg + "; returning eps with zero gradient", RuntimeWarning, stacklevel=2)
        check_finite("z", z)
        value = _finish_value((z * 0).sum(), eps, root)  # zero gradient, graph stays connected
        vec = z.new_zeros(d)
        return (value, vec) if return_vector else value
    fp64 = accumulate == "fp64" or z.dtype == torch.float64
    w, v, _, f, st = _cov_eig_op(z, v0, factor, delta, softmin_k, float(tol), max_iter or 0,
                                 correction, backend, fp64)
    value = w[0] if softmin_k == 1 else _soft_min(w, softmin_temperature)
    value = _finish_value(value, eps, root).to(z.dtype)
    check_result_finite("z", z, value, "smallest covariance eigenvalue")
    vector = v[:, 0].to(z.dtype)
    result = (value, vector) if return_vector else (value,)
    if return_info:
        result = result + (SolveResult.info_from_stats(st, f),)
    return result if len(result) > 1 else result[0]


# ---- general matrices: smallest singular value -----------------------------------------------

@torch.library.custom_op("calrft::gram_smallest_eig", mutates_args=())
def _gram_eig_op(w: Tensor, tol: float, scale: float) -> tuple[Tensor, Tensor]:
    """(lambda_min of the Gram matrix of w / scale, its unit eigenvector), in fp64."""
    w64 = w.to(torch.float64) / scale
    gram = w64.T @ w64 if w.shape[0] >= w.shape[1] else w64 @ w64.T
    r = solve(gram, None, None, 0.0, 1, tol, None, "auto", name="w")
    return r.values[:1].clone(), r.vectors[:, 0].contiguous()


@_gram_eig_op.register_fake
def _(w, tol, scale):
    n = min(w.shape)
    return w.new_empty(1, dtype=torch.float64), w.new_empty(n, dtype=torch.float64)


def _gram_eig_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.scale = inputs[2]


def _gram_eig_backward(ctx, grad_val, grad_vec):
    w, v = ctx.saved_tensors
    if grad_val is None:
        return None, None, None
    ct = compute_dtype(w.dtype)
    w_, v_, g = w.to(ct) / ctx.scale, v.to(ct), grad_val.to(ct)[0]
    # lambda = v^T G v with G = Ws^T Ws (or Ws Ws^T), Ws = W / s: dlambda/dW = 2 Ws v v^T / s
    if w.shape[0] >= w.shape[1]:
        dw = 2 * g * torch.outer(w_ @ v_, v_)
    else:
        dw = 2 * g * torch.outer(v_, v_ @ w_)
    return (dw / ctx.scale).to(w.dtype), None, None


_gram_eig_op.register_autograd(_gram_eig_backward, setup_context=_gram_eig_setup)


def smallest_singular_value(w: Tensor, *, eps: float = 0.0, tol: float = 1e-8) -> Tensor:
    """sigma_min of a general matrix w [m, n] = sqrt(lambda_min(Gram) + eps), Gram = w^T w (or
    w w^T, whichever is smaller) formed in fp64 from w scaled exactly by a power of two near
    max |w| (so entries of 1e-200 or 1e200 neither underflow nor overflow in the Gram matrix:
    sigma_min(w) = s sigma_min(w / s)). Differentiable; eps > 0 bounds the derivative of the
    square root at a rank-deficient w (sqrt has an infinite slope at 0)."""
    check_tensor("w", w)
    if min(w.shape) == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    eps = check_real("eps", eps, low=0.0)
    check_tol(tol, None)
    check_finite("w", w)
    scale = power_of_two_scale(w)
    lam, _ = _gram_eig_op(w, float(tol), scale)
    sigma = torch.sqrt(lam[0].clamp_min(0)) * scale   # s sigma_min(w / s), in fp64
    if eps > 0:
        sigma = torch.hypot(sigma, torch.tensor(math.sqrt(eps), dtype=sigma.dtype,
                                                device=sigma.device))
    out = sigma.to(w.dtype)
    check_result_finite("w", w, out, "smallest singular value")
    return out
