"""GPU-suite section: centred batch covariance kernels (CUDA C++ and Triton).

run() checks both kernels against a float64 two-pass reference at a few awkward sizes with a
large feature mean (50x the spread), then times them against torch.cov and the uncentred
torch.mm(z.T, z) (a speed ceiling that does half the kernels' job: no centring, no symmetry) at
B = 65536, d = 512 / 1024, bf16 / fp32. Imports without a GPU; needs one to run.
"""
from __future__ import annotations


import torch

from ._timing import cuda_median_ms

CHECK_SIZES = [(1, 3), (97, 130), (4099, 257), (65536, 512)]
TIMED_SIZES = [(65536, 512), (65536, 1024)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# max |Sigma - ref| / max |ref|. CUDA: fp32 FMA on exactly centred values. Triton: fp32 via
# tf32x3 (about fp32), bf16 via bf16 tensor-core operands (each centred value rounded to 8 bits).
TOLERANCE = {("cuda", "fp32"): 1e-5, ("cuda", "bf16"): 1e-5,
             ("triton", "fp32"): 1e-4, ("triton", "bf16"): 1e-2}


def _features(n_rows, n_cols, dtype, device):
    g = torch.Generator(device=device).manual_seed(n_rows + 7 * n_cols)
    mu = 50.0 * (0.5 + torch.rand(n_cols, generator=g, device=device))
    scale = 0.2 + torch.rand(n_cols, generator=g, device=device)
    return (mu + scale * torch.randn(n_rows, n_cols, generator=g, device=device)).to(dtype)


def _reference(z, correction):
    z64 = z.double()
    zc = z64 - z64.mean(0)
    return zc.T @ zc / (z.shape[0] - correction)


def _kernels():
    """name -> callable(z, correction) -> (Sigma, mean), for the kernels in this build."""
    found, notes = {}, []
    try:
        from calrft_kernels import _C
        if getattr(_C, "with_cuda", False) and hasattr(_C, "covariance_cuda"):
            found["cuda"] = _C.covariance_cuda
        else:
            notes.append("calrft_kernels._C has no covariance_cuda (built without CUDA)")
    except ImportError as exc:
        notes.append(f"calrft_kernels._C not importable: {exc}")
    try:
        from calrft_kernels.triton.covariance import covariance_triton
        found["triton"] = covariance_triton
    except Exception as exc:  # report, don't crash the suite
        notes.append(f"triton covariance not importable: {exc!r}")
    return found, notes


def _row(config, check, ms=None, tflops=None, note=""):
    return {"op": "batch_covariance", "config": config, "check": check, "ms": ms,
            "tflops": tflops, "note": note}


def _check(name, fn, n_rows, n_cols, dtype_name):
    """One accuracy row: max |Sigma - ref| / max |ref| against float64 two-pass."""
    z = _features(n_rows, n_cols, DTYPES[dtype_name], z_device())
    correction = 1 if n_rows > 1 else 0
    cov, mean = fn(z, correction)
    ref = _reference(z, correction)
    scale = ref.abs().max().item()
    err = (cov.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    symmetric = torch.equal(cov, cov.T)
    mean_err = (mean.double() - z.double().mean(0)).abs().max().item()
    ok = err <= TOLERANCE[(name, dtype_name)] and symmetric
    return (f"max rel err {err:.2e} vs fp64 two-pass, mean abs err {mean_err:.1e}, "
            f"{'symmetric' if symmetric else 'NOT symmetric'}: {'ok' if ok else 'FAIL'}")


def z_device():
    return torch.device("cuda")


def _timings(kernels, n_rows, n_cols, dtype_name):
    z = _features(n_rows, n_cols, DTYPES[dtype_name], z_device())
    flops = 2.0 * n_rows * n_cols * n_cols  # the full Z^T Z, for comparability with torch.mm
    candidates = {name: (lambda fn=fn: fn(z, 1)) for name, fn in kernels.items()}
    candidates["torch.cov"] = lambda: torch.cov(z.T)
    candidates["torch.mm(z.T,z) uncentred"] = lambda: torch.mm(z.T, z)
    rows, times = [], {}
    for name, call in candidates.items():
        config = f"{name} B={n_rows} d={n_cols} {dtype_name}"
        try:
            times[name] = cuda_median_ms(call, warmup=3)
            rows.append(_row(config, "timed (median of 20)", times[name],
                             flops / times[name] / 1e9, "tflops = 2 B d^2 / time"))
        except Exception as exc:
            rows.append(_row(config, f"ERROR {exc!r}"[:300]))
    base = times.get("torch.cov")
    for row, name in zip(rows, candidates):
        if base and name in times:
            row["note"] += f"; {base / times[name]:.2f}x the speed of torch.cov"
    return rows


def run() -> list[dict]:
    if not torch.cuda.is_available():
        return [_row("-", "skipped: no CUDA device", note="needs a GPU")]
    kernels, notes = _kernels()
    rows = [_row("-", "missing", note=n) for n in notes]
    for name, fn in kernels.items():  # correctness first; a failing kernel is still timed
        for dtype_name in DTYPES:
            for n_rows, n_cols in CHECK_SIZES:
                config = f"{name} B={n_rows} d={n_cols} {dtype_name} mean=50x spread"
                try:
                    rows.append(_row(config, _check(name, fn, n_rows, n_cols, dtype_name)))
                except Exception as exc:
                    rows.append(_row(config, f"ERROR {exc!r}"[:300]))
    for n_rows, n_cols in TIMED_SIZES:
        for dtype_name in DTYPES:
            rows += _timings(kernels, n_rows, n_cols, dtype_name)
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
