"""CUDA-event timing shared by the GPU-suite sections."""
from __future__ import annotations


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
