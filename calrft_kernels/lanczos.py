"""Shift-invert Lanczos for the smallest eigenpair of a symmetric PSD matrix (method="lanczos").

The estimate the package was first designed around (kernels.md section 2), kept as a genuine,
independent solver next to the block Davidson one (calrft_kernels/eigen.py): plain PyTorch ops,
so it runs on CPU and CUDA tensors alike.
  * operator: (A + delta I)^-1 through an fp64 Cholesky factor (delta = 1e-7 max_i A_ii, the
    solvers' shared shift, raised 10x while the factorisation fails); shift-invert maps the
    bottom of the spectrum to the well-separated top of the operator's;
  * basis and tridiagonal in fp64, full reorthogonalisation (classical Gram-Schmidt twice);
  * the tridiagonal T_m (tiny) is solved on the host every step; theta = its largest eigenvalue,
    lambda = 1 / theta - delta;
  * stopping test, relative: the Ritz value of the operator is within beta_m |s_m| of an
    eigenvalue of it (s_m the last component of T_m's top eigenvector), so lambda is within
    beta_m |s_m| / theta^2; stop when that is <= tol * lambda (the test beta_m |s_m| <= tol * theta
    of kernels.md when delta << lambda), or <= the rounding floor 1e-14 d max A_ii for a singular A;
  * warm start: v0 is the first Lanczos vector.
One host read (alpha, beta) per step: this is the reference Krylov method, not the GPU fast path
(docs/spectral.md, "CUDA")."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass
class LanczosResult:
    value: float
    vector: Tensor            # [d] fp64, unit
    iterations: int
    converged: bool
    estimate: float           # relative error bound of the eigenvalue at the last step
    delta: float


def initial_shift(max_diag: float) -> float:
    """The shift of both solvers (csrc/common/spectral_math.h initial_shift)."""
    return 1e-7 * max_diag


def shifted_cholesky(a64: Tensor, delta: float, attempts: int = 8):
    """(fp64 Cholesky factor of A + delta I, delta): delta raised 10x per failure; (None, delta)
    when none of `attempts` shifts factors."""
    eye = torch.eye(a64.shape[0], dtype=a64.dtype, device=a64.device)
    for _ in range(attempts):
        factor, info = torch.linalg.cholesky_ex(a64 + delta * eye)
        if int(info) == 0:
            return factor, delta
        delta *= 10.0
    return None, delta


def lanczos_smallest(a: Tensor, *, v0: Optional[Tensor] = None, tol: float = 1e-6,
                     max_iter: int = 100, seed: int = 0x5eed) -> Optional[LanczosResult]:
    """Smallest eigenpair of the symmetric matrix of a's lower triangle (a [d, d], finite).
    None when no shifted factorisation exists (A far from PSD)."""
    d = a.shape[0]
    a64 = a.to(torch.float64)
    a64 = a64.tril() + a64.tril(-1).T
    max_diag = float(a64.diagonal().max())
    scale = max(max_diag, float(a64.abs().max()), 1e-300)
    floor_abs = scale * 1e-14 * d
    factor, delta = shifted_cholesky(a64, initial_shift(max(max_diag, 1e-300)))
    if factor is None:
        return None
    m_max = min(d, max(max_iter, 1))   # Lanczos steps (operator applications)
    basis = torch.zeros(d, m_max, dtype=torch.float64, device=a.device)
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(d, dtype=torch.float64, generator=gen).to(a.device)
    else:
        q = v0.to(device=a.device, dtype=torch.float64).reshape(d).clone()
    q = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta, s_top, estimate, converged = 0.0, None, math.inf, False
    steps = 0
    for j in range(m_max):
        basis[:, j] = q
        w = torch.cholesky_solve(q.reshape(d, 1), factor).reshape(d)
        used = basis[:, :j + 1]
        h = used.T @ w                          # classical Gram-Schmidt, twice
        w = w - used @ h
        h2 = used.T @ w
        w = w - used @ h2
        alpha = float(h[j] + h2[j])
        beta = float(w.norm())
        alphas.append(alpha)
        steps = j + 1
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, s_top = float(evals[-1]), evecs[:, -1]
        residual = beta * abs(float(s_top[-1]))
        lam = 1.0 / theta - delta if theta > 0 else math.inf
        bound = residual / (theta * theta) if theta > 0 else math.inf
        estimate = bound / max(abs(lam), floor_abs)
        if bound <= max(tol * abs(lam), floor_abs) or steps == d or beta <= 1e-14 * theta:
            converged = theta > 0
            break
        betas.append(beta)
        q = w / beta
    vector = basis[:, :steps] @ s_top.to(device=a.device)
    vector = vector / vector.norm()
    # The Rayleigh quotient on A itself: as accurate as the Ritz value, free of the shift.
    value = float(vector @ (a64 @ vector))
    return LanczosResult(value=value, vector=vector, iterations=steps, converged=converged,
                         estimate=estimate, delta=delta)
