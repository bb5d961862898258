"""pytest-benchmark regression tracking of the CPU sigmoid (SigLIP) loss at small sizes.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_sigmoid.py --benchmark-only

Each benchmark first checks that its loss equals open_clip's SigLipLoss (so a fast wrong kernel
cannot pass unnoticed), then times forward+backward. No speed is asserted: compare the reported
medians within one run (fused vs open_clip SigLipLoss). Larger sizes, memory and the ratios
against the goals: benchmarks/bench_sigmoid.py.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
open_clip_loss = pytest.importorskip("open_clip.loss")

from benchmarks._common import fwd_bwd  # noqa: E402
from calrft_kernels import sigmoid_loss  # noqa: E402

D = 128
SIZES = [256, 1024]


def inputs(B):
    gen = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(B, D, generator=gen), dim=1).requires_grad_()
                for _ in range(2))
    return img, txt, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0,
                                                                         requires_grad=True)


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("method", ["fused", "open_clip"])
def test_bench_siglip_loss(benchmark, B, method):
    leaves = inputs(B)
    fused = lambda: sigmoid_loss(*leaves, backend="cpu")  # noqa: E731
    baseline = lambda: open_clip_loss.SigLipLoss()(*leaves)  # noqa: E731
    torch.testing.assert_close(fused(), baseline(), rtol=1e-5, atol=1e-5)
    benchmark.group = f"siglip loss B={B} d={D}"
    benchmark(fwd_bwd(baseline if method == "open_clip" else fused, leaves))
