"""Microbenchmark of two native kernels under the spectral ops (CPU).

    PYTHONPATH=. python benchmarks/bench_spectral_kernels.py [--repeats 15]

- The solver's fp32 Cholesky (csrc/cpu/dense_blocks.h, through the cholesky_cpu test hook, which
  adds a copy) on 1 and 2 threads against torch.linalg.cholesky in fp32 (MKL), with the
  residual ||L L^T - A|| / ||A|| of each.
- The refinement's exact-covariance product Sigma W = Zc^T (Zc W) / (B - 1) from fp32 features
  (covariance_times_cpu hook) for W of 1 column (the one-column path of the refinement's later
  steps) and of 8 (the register-tiled path of its first step), B = 4d.
Medians and minima of interleaved repeats, ms."""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import interleaved, log_spectrum_features  # noqa: E402
from calrft_kernels import testing  # noqa: E402


def residual(l: torch.Tensor, a: torch.Tensor) -> float:
    l64, a64 = l.double(), a.double()
    return float((l64 @ l64.T - a64).norm() / a64.norm())


def bench_cholesky(native, d: int, repeats: int) -> list[tuple]:
    g = torch.randn(d, 2 * d + 3, dtype=torch.float64)
    a = (g @ g.T / d + 1e-3 * torch.eye(d, dtype=torch.float64)).float()
    fns = {"torch.linalg.cholesky fp32 (MKL)": lambda: torch.linalg.cholesky(a),
           "blocked Cholesky, 1 thread": lambda: native.cholesky_cpu(a, 1),
           "blocked Cholesky, 2 threads": lambda: native.cholesky_cpu(a, 2)}
    ms = interleaved(fns, repeats)
    mins = dict(interleaved.minimum)
    res = {"torch.linalg.cholesky fp32 (MKL)": residual(torch.linalg.cholesky(a), a)}
    res["blocked Cholesky, 1 thread"] = res["blocked Cholesky, 2 threads"] = residual(
        native.cholesky_cpu(a, 2)[0], a)
    return [(f"cholesky d={d}", k, ms[k], mins[k], res[k]) for k in fns]


def bench_covariance_product(native, d: int, repeats: int) -> list[tuple]:
    z = log_spectrum_features(4 * d, d, 1e4)
    mean = z.double().mean(0)
    ws = {k: torch.randn(d, k, dtype=torch.float64) for k in (1, 8)}
    fns = {f"Sigma W, {k} column{'s' if k > 1 else ''}":
           (lambda w=w: native.covariance_times_cpu(z, mean, w, 1.0)) for k, w in ws.items()}
    ms = interleaved(fns, repeats)
    mins = dict(interleaved.minimum)
    return [(f"exact covariance product B={4 * d} d={d}", k, ms[k], mins[k], None) for k in fns]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    if not testing.available():
        raise SystemExit("the native extension is not built")
    native = testing.spectral_hooks()
    torch.manual_seed(0)
    rows = []
    for d in (256, 512, 1024):
        rows += bench_cholesky(native, d, args.repeats)
    for d in (512, 1024):
        rows += bench_covariance_product(native, d, args.repeats)
    print(f"threads: {torch.get_num_threads()}\n")
    print("| case | kernel | median ms | min ms | residual |")
    print("|---|---|---|---|---|")
    for case, k, t, tmin, r in rows:
        print(f"| {case} | {k} | {t:.3f} | {tmin:.3f} | {'' if r is None else f'{r:.1e}'} |")


if __name__ == "__main__":
    main()
