"""Helpers shared by the benchmark scripts and the GPU-suite sections (one place for each):

- `interleaved`: round-robin wall-clock medians (and minima) of several contenders on CPU;
- `fwd_bwd`: one forward+backward of a loss as a pytest-benchmark callable;
- `spectrum_matrix`, `log_spectrum_features`: the synthetic test problems of the spectral
  benchmarks (a symmetric matrix with a log-spaced spectrum; features whose covariance has one);
- `DTYPE_NAMES`, `torch_dtype`: the short dtype names every table uses;
- `proc_status_kib`, `reset_peak_rss`, `mem_available_bytes`: Linux memory counters for the
  peak-RSS measurements of the CPU benchmarks' child processes.

Device timing (CUDA events, or the wall clock with synchronisation) is in benchmarks/gpu/_timing.py.
torch is imported inside the functions: a benchmark's parent process that only spawns children
imports this module without loading torch.
"""
from __future__ import annotations

import math
import statistics
import time

DTYPE_NAMES = ("fp64", "fp32", "bf16", "fp16")


def torch_dtype(name: str):
    """The torch dtype of a short name in DTYPE_NAMES ("fp64", "fp32", "bf16", "fp16")."""
    import torch
    return {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}[name]


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall-clock ms of each callable in `fns`, run round-robin `repeats` times after one
    warm-up call each (every contender runs once per round, so machine load hits all alike).
    The minima of the same runs are left in `interleaved.minimum` ({name: ms})."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    interleaved.minimum = {k: min(v) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(loss_fn, leaves):
    """A callable for pytest-benchmark: clear the leaves' gradients, run loss_fn() and its
    backward, return the loss (detached)."""
    def run():
        for x in leaves:
            x.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return run


def spectrum_matrix(d: int, kappa: float, seed: int = 0):
    """A d x d symmetric fp64 matrix Q diag(logspace(-log10 kappa, 0)) Q^T (Q a seeded random
    orthogonal matrix): eigenvalues from 1/kappa to 1, condition number kappa."""
    import torch
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    a = (q * torch.logspace(-math.log10(kappa), 0, d, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


def log_spectrum_features(b: int, d: int, kappa: float, mean: float = 50.0, seed: int = 0):
    """b x d fp32 features whose covariance has a log-spaced spectrum of condition number ~kappa,
    offset by a random mean of scale `mean` (the centring must be accurate)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    spread = torch.logspace(-math.log10(kappa) / 2, 0, d, dtype=torch.float64)
    z = (torch.randn(b, d, dtype=torch.float64, generator=g) * spread) @ q.T
    return (z + mean * torch.randn(d, dtype=torch.float64, generator=g)).float()


def proc_status_kib(field: str) -> int:
    """A kB field of /proc/self/status (Linux), e.g. "VmRSS" (resident now) or "VmHWM" (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM := current VmRSS; Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where it is missing)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
