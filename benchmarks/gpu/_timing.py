"""Device timing shared by the GPU-suite sections: CUDA events on a GPU, the wall clock on CPU
(the CPU smoke runs of the sections' code paths). CPU-only benchmark helpers are in
benchmarks/_common.py."""
from __future__ import annotations

import statistics
import time


def cuda_median_ms(fn, reps: int = 20, warmup: int = 1) -> float:
    """Median over `reps` calls of fn's GPU time in ms; the warm-up calls absorb compilation and
    autotuning."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def wall_median_ms(fn, device, reps: int = 10, warmup: int = 1) -> float:
    """Median wall-clock ms of fn() including its host work, after `warmup` calls; on a GPU the
    device is synchronised before and after each call."""
    import torch
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def section_device(device):
    """The device a GPU-suite section runs on: `device` when given (tests pass "cpu"), else
    "cuda" when there is one, else None (the section then reports a single UNRUN row)."""
    if device is not None:
        return device
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        return None


def median_ms(fn, device, reps: int = 20, warmup: int = 1) -> float:
    """Median ms of fn(): CUDA events on a GPU (kernel time), the wall clock elsewhere."""
    import torch
    if torch.device(device).type == "cuda":
        return cuda_median_ms(fn, reps=reps, warmup=warmup)
    return wall_median_ms(fn, device, reps=reps, warmup=warmup)
