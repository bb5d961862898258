"""GPU-suite section: batch_covariance on CUDA (the centred cuBLAS product, backend="cuda", the
default; and the Triton kernel, backend="triton").

run() checks both through the PUBLIC op against a float64 two-pass reference (a feature mean 50x
the spread, exact symmetry, every dtype), then times them against torch.cov and the uncentred
torch.mm(z.T, z) at B = 65536, d = 512 / 1024, bf16 / fp32 (issue 12's goal: <= 1.3x torch.mm,
exactly symmetric, two-pass accurate). Imports without a GPU; run(device="cpu", quick=True) runs
every code path on CPU tensors at small sizes (tests/test_spectral_gpu_suite.py) so that the first
GPU run does not crash.
"""
from __future__ import annotations

import torch

from .._common import DTYPE_NAMES, torch_dtype
from ._timing import median_ms

CHECK_SIZES = [(1, 3), (97, 130), (4099, 257), (65536, 512)]
TIMED_SIZES = [(65536, 512), (65536, 1024)]
DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}
TIMED_DTYPES = ("bf16", "fp32")
# max |Sigma - ref| / max |ref| of the public op's output (in z's dtype: a 16-bit output is
# rounded once more). "cuda": centred values rounded to z's dtype, fp32 accumulation; "triton":
# fp32 as tf32x3 (about fp32), 16-bit tensor-core operands.
TOLERANCE = {"fp64": 1e-12, "fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}
GOAL_VS_MM = 1.3


def _features(n_rows, n_cols, dtype, device):
    g = torch.Generator().manual_seed(n_rows + 7 * n_cols)
    mu = 50.0 * (0.5 + torch.rand(n_cols, generator=g))
    scale = 0.2 + torch.rand(n_cols, generator=g)
    z = mu + scale * torch.randn(n_rows, n_cols, generator=g)
    return z.to(device=device, dtype=dtype)


def _reference(z, correction):
    from calrft_kernels.reference import covariance_reference
    return covariance_reference(z.double(), correction)[0]


def _row(config, check, ms=None, tflops=None, note=""):
    return {"op": "batch_covariance", "config": config, "check": check, "ms": ms,
            "tflops": tflops, "note": note}


def check_row(backend, n_rows, n_cols, dtype_name, device):
    """One accuracy row of the public op: error vs float64 two-pass, exact symmetry."""
    from calrft_kernels import batch_covariance
    z = _features(n_rows, n_cols, DTYPES[dtype_name], device)
    correction = 1 if n_rows > 1 else 0
    cov = batch_covariance(z, correction, backend=backend)
    ref = _reference(z, correction)
    scale = ref.abs().max().item()
    err = (cov.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    symmetric = torch.equal(cov, cov.T)
    ok = err <= TOLERANCE[dtype_name] and symmetric and cov.dtype == z.dtype
    return _row(f"{backend} B={n_rows} d={n_cols} {dtype_name} mean=50x spread",
                f"max rel err {err:.2e} vs fp64 two-pass, "
                f"{'exactly symmetric' if symmetric else 'NOT symmetric'}: "
                f"{'ok' if ok else 'FAIL'}")


def timing_rows(backends, n_rows, n_cols, dtype_name, device, reps=20):
    from calrft_kernels import batch_covariance
    z = _features(n_rows, n_cols, DTYPES[dtype_name], device)
    flops = 2.0 * n_rows * n_cols * n_cols  # the full Z^T Z, for comparability with torch.mm
    candidates = {b: (lambda b=b: batch_covariance(z, backend=b)) for b in backends}
    candidates["torch.cov"] = lambda: torch.cov(z.T)
    candidates["torch.mm(z.T,z) uncentred"] = lambda: torch.mm(z.T, z)
    rows, times = [], {}
    for name, call in candidates.items():
        config = f"{name} B={n_rows} d={n_cols} {dtype_name}"
        try:
            times[name] = median_ms(call, device, reps=reps, warmup=3)
            rows.append(_row(config, f"timed (median of {reps})", times[name],
                             flops / times[name] / 1e9, "tflops = 2 B d^2 / time"))
        except Exception as exc:
            rows.append(_row(config, f"ERROR {exc!r}"[:300]))
    mm = times.get("torch.mm(z.T,z) uncentred")
    for row, name in zip(rows, candidates):
        if mm and name in times:
            ratio = times[name] / mm
            row["note"] += f"; {ratio:.2f}x torch.mm"
            if name in backends:
                row["note"] += f" (goal <= {GOAL_VS_MM}x: {'met' if ratio <= GOAL_VS_MM else 'NOT met'})"
    return rows


def run(device=None, quick=False) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not quick:
        return [_row("-", "skipped: no CUDA device", note="needs a GPU")]
    backends = ("cuda", "triton") if device.type == "cuda" else ("reference", "cpu")
    check_sizes = CHECK_SIZES if not quick else [(1, 3), (97, 33)]
    rows = []
    for backend in backends:  # correctness first; a failing backend is still timed
        for dtype_name in DTYPES:
            for n_rows, n_cols in check_sizes:
                try:
                    rows.append(check_row(backend, n_rows, n_cols, dtype_name, device))
                except Exception as exc:
                    rows.append(_row(f"{backend} B={n_rows} d={n_cols} {dtype_name}",
                                     f"ERROR {exc!r}"[:300]))
    timed = TIMED_SIZES if not quick else [(256, 32)]
    for n_rows, n_cols in timed:
        for dtype_name in TIMED_DTYPES:
            rows += timing_rows(backends, n_rows, n_cols, dtype_name, device,
                                reps=20 if not quick else 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
