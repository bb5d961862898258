"""pytest-benchmark regression tracking of the CPU contrastive loss at small sizes.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_contrastive.py --benchmark-only
    (add --benchmark-autosave / --benchmark-compare to track changes over commits)

Each benchmark first checks that its loss equals the competitor's (so a fast wrong kernel cannot
pass unnoticed), then times forward+backward. No speed is asserted: compare the reported
medians within one run (fused vs open_clip ClipLoss vs the naive CaRot loss).
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
open_clip_loss = pytest.importorskip("open_clip.loss")

from benchmarks._common import fwd_bwd  # noqa: E402
from calrft_kernels import contrastive_loss  # noqa: E402
from calrft_kernels.reference import naive_carot_loss  # noqa: E402

D = 128


def features(B, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=gen), dim=1)


def inputs(B):
    img, txt = features(B, 0).requires_grad_(), features(B, 1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    teacher = dict(teacher_image_features=features(B, 2), teacher_text_features=features(B, 3),
                   teacher_logit_scale=torch.tensor(100.0))
    return img, txt, scale, teacher


def naive_carot(img, txt, scale, teacher, weight=1.0):
    """open_clip logits + teacher soft targets (calrft_kernels.reference.naive_carot_loss)."""
    return naive_carot_loss(img, txt, scale, teacher["teacher_image_features"],
                            teacher["teacher_text_features"], teacher["teacher_logit_scale"],
                            weight)


SIZES = [256, 1024]


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("method", ["fused", "chunked", "open_clip"])
def test_bench_clip_loss(benchmark, B, method):
    img, txt, scale, _ = inputs(B)
    backend = "chunked" if method == "chunked" else "cpu"
    fused = lambda: contrastive_loss(img, txt, scale, backend=backend)  # noqa: E731
    baseline = lambda: open_clip_loss.ClipLoss()(img, txt, scale)  # noqa: E731
    torch.testing.assert_close(fused(), baseline(), rtol=1e-5, atol=1e-5)
    benchmark.group = f"clip loss B={B} d={D}"
    benchmark(fwd_bwd(baseline if method == "open_clip" else fused, (img, txt, scale)))


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("method", ["fused", "naive_carot"])
def test_bench_carot_distillation(benchmark, B, method):
    img, txt, scale, teacher = inputs(B)
    fused = lambda: contrastive_loss(img, txt, scale, distill_weight=1.0, backend="cpu",  # noqa: E731
                                     **teacher)
    baseline = lambda: naive_carot(img, txt, scale, teacher)  # noqa: E731
    torch.testing.assert_close(fused(), baseline(), rtol=1e-5, atol=1e-4)
    benchmark.group = f"contrastive + distillation B={B} d={D}"
    benchmark(fwd_bwd(fused if method == "fused" else baseline, (img, txt, scale)))
