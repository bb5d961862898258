"""GPU-suite section: smallest eigenvalue / sigma_min on a lent GPU (UNRUN on development hosts).

Called by benchmarks/gpu_suite.py: run() -> list of rows {op, config, check, ms, tflops, note}.
Imports without a GPU; every row checks against a float64 CPU eigvalsh of the same matrix."""
from __future__ import annotations

import math

from ._timing import cuda_median_ms as _time_ms


def _matrix(d, kappa, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    a = (q * torch.logspace(-math.log10(kappa), 0, d, dtype=torch.float64)) @ q.T
    return ((a + a.T) / 2).to(device)


def _row(op, config, err, ms, note="", limit=1e-4):
    verdict = "ok" if err is not None and err <= limit else "FAIL"
    check = "n/a" if err is None else f"rel err {err:.1e} vs fp64 eigvalsh: {verdict}"
    return {"op": op, "config": config, "check": check, "ms": ms, "tflops": None, "note": note}


def run() -> list[dict]:
    import torch
    from calrft_kernels import _backend
    from calrft_kernels.spectral import covariance_sigma_min, smallest_eigenvalue
    if not torch.cuda.is_available():
        return [{"op": "smallest_eigenvalue", "config": "-", "check": "UNRUN: no CUDA device",
                 "ms": None, "tflops": None, "note": ""}]
    rows = []
    dev = torch.device("cuda")
    native = _backend.cuda_native_usable(dev, "smallest_eig_cuda")
    for d, kappa in ((1024, 1e4), (1024, 1e6), (512, 1e4)):
        a = _matrix(d, kappa, dev)
        ref = float(torch.linalg.eigvalsh(a.cpu())[0])
        cfg = f"d={d} kappa={kappa:g}"
        for name, m in (("torch.linalg.eigvalsh fp64", a), ("torch.linalg.eigvalsh fp32", a.float())):
            ms = _time_ms(lambda: torch.linalg.eigvalsh(m))
            err = abs(float(torch.linalg.eigvalsh(m)[0]) - ref) / ref
            rows.append(_row(name, cfg, err, ms, "baseline", limit=1.0))
        out = {}

        def cold():
            out["cold"] = smallest_eigenvalue(a, return_info=True)

        try:
            ms = _time_ms(cold, reps=10)
            val, vec, info = out["cold"]
            rows.append(_row("smallest_eigenvalue cold", cfg, abs(float(val) - ref) / ref, ms,
                             f"{info.method}, {info.iterations} it, native={native[0]}"))
            drift = _matrix(d, kappa, dev, seed=1)
            b = a + 1e-3 * (drift - a) / 2
            ref_b = float(torch.linalg.eigvalsh(b.cpu())[0])

            def warm():
                out["warm"] = smallest_eigenvalue(b, v0=vec, factor=info, return_info=True)

            ms = _time_ms(warm, reps=10)
            val_b, _, info_b = out["warm"]
            rows.append(_row("smallest_eigenvalue warm (v0 + factor)", cfg,
                             abs(float(val_b) - ref_b) / ref_b, ms,
                             f"{info_b.method}, {info_b.iterations} it"))
        except Exception as exc:  # report, keep the suite going
            rows.append(_row("smallest_eigenvalue", cfg, None, None, f"ERROR {exc!r}"[:200]))
    # fused sigma_min from features (B = 4d)
    d = 1024
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(4 * d, d, generator=g) * torch.logspace(-2, 0, d)).to(dev) + 50.0
    ref = float(torch.linalg.eigvalsh(torch.cov(z.double().T).cpu())[0])
    for acc in ("fp64", "fp32"):
        try:
            ms = _time_ms(lambda: covariance_sigma_min(z, accumulate=acc), reps=10)
            err = abs(float(covariance_sigma_min(z, accumulate=acc)) - ref) / ref
            rows.append(_row(f"covariance_sigma_min accumulate={acc}", f"B={4 * d} d={d}", err,
                             ms, "", limit=1e-4 if acc == "fp64" else 1e-2))
        except Exception as exc:
            rows.append(_row("covariance_sigma_min", f"B={4 * d} d={d}", None, None,
                             f"ERROR {exc!r}"[:200]))
    ms = _time_ms(lambda: torch.linalg.eigvalsh(torch.cov(z.T)))
    rows.append(_row("torch.cov + eigvalsh fp32", f"B={4 * d} d={d}",
                     abs(float(torch.linalg.eigvalsh(torch.cov(z.T))[0]) - ref) / ref, ms,
                     "baseline", limit=1.0))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
