"""GPU-suite section: the eigen-solver family on a lent GPU (UNRUN on development hosts).

Called by benchmarks/gpu_suite.py: run() -> list of rows {op, config, check, ms, tflops, note}.
Every row checks against a float64 CPU reference of the same input:
  1. every public op of the covariance / eigen family on CUDA tensors in fp64, fp32, bf16, fp16
     (issue 12: a TypeError on CUDA tensors went unnoticed because no test called them);
  2. smallest_eigenvalue cold and warm (previous vector + factor, slow drift) for method="davidson"
     and method="lanczos", timed with CUDA events AND the wall clock (host time counts for a
     training step), against fp64/fp32 eigvalsh; goals: cold <= 1 ms at d = 1024, warm <= 0.3 ms;
  3. covariance_sigma_min from features (B = 4d, d = 512 / 1024) against torch.cov + fp32
     eigvalsh; goal <= 0.5x at <= 1e-4 rel err.
Imports without a GPU; run(device="cpu", quick=True) runs every code path on CPU tensors at small
sizes (tests/test_spectral_gpu_suite.py)."""
from __future__ import annotations

import math

import torch

from .._common import DTYPE_NAMES, spectrum_matrix, torch_dtype
from ._timing import median_ms, wall_median_ms

DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}
COLD_GOAL_MS, WARM_GOAL_MS, SIGMA_GOAL = 1.0, 0.3, 0.5


def _matrix(d, kappa, device, seed=0):
    return spectrum_matrix(d, kappa, seed).to(device)


def _features(b, d, device, seed=0, mean=50.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g) * torch.logspace(-2, 0, d) + mean
    return z.to(device)


def _row(op, config, err, ms=None, note="", limit=1e-4, ref="fp64"):
    verdict = "ok" if err is not None and err <= limit else "FAIL"
    check = "n/a" if err is None else f"rel err {err:.1e} vs {ref}: {verdict}"
    return {"op": op, "config": config, "check": check, "ms": ms, "tflops": None, "note": note}


# ---- 1. every public op, every dtype --------------------------------------------------------

def dtype_rows(device, d=96) -> list[dict]:
    import calrft_kernels as ck
    from calrft_kernels.reference import covariance_reference
    rows = []
    z64 = _features(4 * d, d, "cpu", seed=3, mean=5.0).double()
    a64 = _matrix(d, 1e3, "cpu", seed=4)
    w64 = torch.randn(2 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w64 = w64 / math.sqrt(2 * d)
    for name, dtype in DTYPES.items():
        loose = dtype in (torch.bfloat16, torch.float16)
        z, a, w = (t.to(device=device, dtype=dtype) for t in (z64, a64, w64))
        zr, ar, wr = z.double().cpu(), a.double().cpu(), w.double().cpu()
        cov_ref = covariance_reference(zr, 1)[0]
        lam_ref = float(torch.linalg.eigvalsh(cov_ref)[0])
        cases = {
            "batch_covariance": (lambda: ck.batch_covariance(z),
                                 lambda out: float((out.double().cpu() - cov_ref).abs().max()
                                                   / cov_ref.abs().max())),
            "CovarianceAccumulator": (
                lambda: ck.CovarianceAccumulator(d, device=device).update(z[:100]).update(
                    z[100:]).covariance(),
                lambda out: float((out.double().cpu() - cov_ref).abs().max() / cov_ref.abs().max())),
            "covariance_sigma_min": (lambda: ck.covariance_sigma_min(z),
                                     lambda out: abs(float(out) - lam_ref) / lam_ref),
            "smallest_singular_value": (
                lambda: ck.smallest_singular_value(w),
                lambda out: abs(float(out) - float(torch.linalg.svdvals(wr)[-1]))
                / float(torch.linalg.svdvals(wr)[-1])),
            "orthogonality_loss": (
                lambda: ck.orthogonality_loss(w),
                lambda out: abs(float(out) - float(torch.linalg.matrix_norm(
                    wr.T @ wr - torch.eye(d, dtype=torch.float64))))
                / float(torch.linalg.matrix_norm(wr.T @ wr - torch.eye(d, dtype=torch.float64)))),
        }
        for method in ("auto", "davidson", "lanczos", "eigh"):
            ref_a = float(torch.linalg.eigvalsh(ar)[0])
            cases[f"smallest_eigenvalue {method}"] = (
                lambda m=method: ck.smallest_eigenvalue(a, method=m)[0],
                lambda out, r=ref_a: abs(float(out) - r) / r)
        for op, (call, error) in cases.items():
            try:
                out = call()
                # the accumulator keeps (and returns) its own dtype, float64 by default
                ok_dtype = out.dtype == (torch.float64 if op == "CovarianceAccumulator" else dtype)
                rows.append(_row(op, f"{device.type} {name} d={d}", error(out),
                                 note="" if ok_dtype else f"WRONG dtype {out.dtype}",
                                 limit=(2e-2 if loose else 1e-4) if ok_dtype else -1.0))
            except Exception as exc:  # report, keep the suite going
                rows.append(_row(op, f"{device.type} {name} d={d}", None,
                                 note=f"ERROR {exc!r}"[:200]))
    return rows


# ---- 2. smallest_eigenvalue cold / warm ------------------------------------------------------

def eigen_rows(device, sizes, reps=10) -> list[dict]:
    from calrft_kernels import smallest_eigenvalue
    rows = []
    for d, kappa in sizes:
        a = _matrix(d, kappa, device)
        ref = float(torch.linalg.eigvalsh(a.cpu())[0])
        cfg = f"d={d} kappa={kappa:g}"
        for name, m in (("torch.linalg.eigvalsh fp64", a), ("torch.linalg.eigvalsh fp32", a.float())):
            ms = median_ms(lambda: torch.linalg.eigvalsh(m), device, reps=reps, warmup=3)
            err = abs(float(torch.linalg.eigvalsh(m)[0]) - ref) / ref
            wall = wall_median_ms(lambda: torch.linalg.eigvalsh(m), device, reps)
            rows.append(_row(name, cfg, err, ms, f"baseline; wall {wall:.3f} ms", limit=1.0))
        # slow drift: the next training step's matrix
        drift = _matrix(d, 1e2, device, seed=1)
        b = a + 1e-3 * ref * drift / float(torch.linalg.matrix_norm(drift.cpu(), 2))
        ref_b = float(torch.linalg.eigvalsh(b.cpu())[0])
        for method in ("davidson", "lanczos"):
            out = {}
            try:
                def cold():
                    out["cold"] = smallest_eigenvalue(a, method=method, return_info=True)
                ms = median_ms(cold, device, reps=reps, warmup=3)
                wall = wall_median_ms(cold, device, reps)
                val, vec, info = out["cold"]
                rows.append(_row(f"smallest_eigenvalue {method} cold", cfg,
                                 abs(float(val) - ref) / ref, ms,
                                 f"{info.iterations} it; wall {wall:.3f} ms; goal <= "
                                 f"{COLD_GOAL_MS} ms: {'met' if max(ms, wall) <= COLD_GOAL_MS else 'NOT met'}"))
                factor = info if method == "davidson" else None

                def warm():
                    out["warm"] = smallest_eigenvalue(b, v0=vec, factor=factor, method=method,
                                                      return_info=True)
                ms = median_ms(warm, device, reps=reps, warmup=3)
                wall = wall_median_ms(warm, device, reps)
                val_b, _, info_b = out["warm"]
                rows.append(_row(f"smallest_eigenvalue {method} warm (v0"
                                 f"{' + factor' if factor else ''}, drift 1e-3 lambda_min)", cfg,
                                 abs(float(val_b) - ref_b) / ref_b, ms,
                                 f"{info_b.iterations} it; wall {wall:.3f} ms; goal <= "
                                 f"{WARM_GOAL_MS} ms: {'met' if max(ms, wall) <= WARM_GOAL_MS else 'NOT met'}"))
            except Exception as exc:  # report, keep the suite going
                rows.append(_row(f"smallest_eigenvalue {method}", cfg, None,
                                 note=f"ERROR {exc!r}"[:200]))
    return rows


# ---- 3. covariance_sigma_min from features ----------------------------------------------------

def sigma_rows(device, dims, reps=10) -> list[dict]:
    from calrft_kernels import covariance_sigma_min
    rows = []
    for d in dims:
        z = _features(4 * d, d, device)
        cfg = f"B={4 * d} d={d}"
        ref = float(torch.linalg.eigvalsh(torch.cov(z.double().T).cpu())[0])
        base = median_ms(lambda: torch.linalg.eigvalsh(torch.cov(z.T)), device, reps=reps, warmup=3)
        rows.append(_row("torch.cov + eigvalsh fp32", cfg,
                         abs(float(torch.linalg.eigvalsh(torch.cov(z.T))[0]) - ref) / ref, base,
                         "baseline", limit=1.0))
        for acc in ("fp64", "fp32"):
            try:
                ms = median_ms(lambda: covariance_sigma_min(z, accumulate=acc), device, reps=reps,
                               warmup=3)
                wall = wall_median_ms(lambda: covariance_sigma_min(z, accumulate=acc), device, reps)
                err = abs(float(covariance_sigma_min(z, accumulate=acc)) - ref) / ref
                ratio = ms / base
                rows.append(_row(f"covariance_sigma_min accumulate={acc}", cfg, err, ms,
                                 f"{ratio:.2f}x baseline (goal <= {SIGMA_GOAL}x: "
                                 f"{'met' if ratio <= SIGMA_GOAL else 'NOT met'}); wall {wall:.3f} ms",
                                 limit=1e-4 if acc == "fp64" else 1e-2))
            except Exception as exc:
                rows.append(_row(f"covariance_sigma_min accumulate={acc}", cfg, None,
                                 note=f"ERROR {exc!r}"[:200]))
    return rows


def run(device=None, quick=False) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not quick:
        return [{"op": "smallest_eigenvalue", "config": "-", "check": "UNRUN: no CUDA device",
                 "ms": None, "tflops": None, "note": ""}]
    if quick:
        return (dtype_rows(device, d=64) + eigen_rows(device, [(96, 1e4)], reps=2)
                + sigma_rows(device, [64], reps=2))
    return (dtype_rows(device)
            + eigen_rows(device, [(1024, 1e4), (1024, 1e6), (512, 1e4)])
            + sigma_rows(device, [512, 1024]))


if __name__ == "__main__":
    for r in run():
        print(r)
