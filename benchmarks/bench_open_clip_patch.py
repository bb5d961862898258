"""CPU benchmark of what calrft_kernels.integrations.open_clip.patch() changes for open_clip's
users: the losses `open_clip.create_loss(args)` builds (open_clip_train's loss), unpatched and
patched, on the same features.

Memory (peak extra RSS of one forward+backward, each method in its own subprocess) and time
(round-robin medians in one process) are measured by benchmarks/_loss_bench.py, as for
bench_contrastive.py. Unpatched losses materialise B x B logits and never run above B = 16384 on
this machine (nor where their estimated peak exceeds the memory limit).

Methods (float32 unit features, forward+backward of the sum of the returned terms):
  ClipLoss, SigLipLoss, DistillClipLoss   open_clip.create_loss(args), open_clip's own classes
  <name>+patch                            the same call under patch(): the fused drop-ins
  (args: one process; SigLipLoss with --siglip's scale 10 and bias -10; DistillClipLoss with
  teacher features of the same width and the teacher's scale 1/0.07)

    prlimit --as=$((16<<30)) python benchmarks/bench_open_clip_patch.py --sizes 4096 8192 16384
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, ROOT)
from benchmarks._loss_bench import (LossBench, clearer, patch_table,  # noqa: E402
                                     unit_features)

SIZES = (4096, 8192, 16384)
LOSSES = ("ClipLoss", "SigLipLoss", "DistillClipLoss")
METHODS = tuple(m for name in LOSSES for m in (name, name + "+patch"))
# Peak extra bytes per B^2 of the unpatched losses (for skipping sizes that cannot fit), rounded
# up from this script's measurements at B = 4096 ... 16384 (results/open_clip_patch_cpu.md):
# ClipLoss ~16 (two logits, two log-softmax), SigLipLoss ~20, DistillClipLoss ~45 (student and
# teacher logits, the teacher's softmax, the products).
BYTES_PER_B2 = {"ClipLoss": 4 * 6, "SigLipLoss": 4 * 6, "DistillClipLoss": 4 * 12}


def _args(name: str):
    return argparse.Namespace(distill=name == "DistillClipLoss", model="ViT-B-32",
                              siglip=name == "SigLipLoss", local_loss=False,
                              gather_with_grad=False, rank=0, world_size=1, horovod=False,
                              loss_dist_impl=None, coca_caption_loss_weight=2.0,
                              coca_contrastive_loss_weight=1.0)


def build_loss(method: str):
    """The loss open_clip.create_loss builds for `method`, under the patch for "+patch"."""
    import open_clip
    from calrft_kernels.integrations.open_clip import patch
    name, patched = method.removesuffix("+patch"), method.endswith("+patch")
    if not patched:
        return open_clip.create_loss(_args(name))
    with patch():
        return open_clip.create_loss(_args(name))


def _make_step(method, B, d, seed=0):
    import torch

    features, _ = unit_features(B, d, seed)
    img, txt = features().requires_grad_(), features().requires_grad_()
    name = method.removesuffix("+patch")
    siglip = name == "SigLipLoss"
    scale = torch.tensor(10.0 if siglip else 1 / 0.07, requires_grad=True)
    leaves = [img, txt, scale]
    kwargs = dict(image_features=img, text_features=txt, logit_scale=scale, output_dict=True)
    if siglip:
        kwargs["logit_bias"] = torch.tensor(-10.0, requires_grad=True)
        leaves.append(kwargs["logit_bias"])
    if name == "DistillClipLoss":
        kwargs.update(dist_image_features=features(), dist_text_features=features(),
                      dist_logit_scale=torch.tensor(1 / 0.07))
    loss_fn = build_loss(method)
    assert type(loss_fn).__module__ == ("calrft_kernels.losses" if method.endswith("+patch")
                                        else "open_clip.loss"), type(loss_fn)

    def step():
        sum(loss_fn(**kwargs).values()).backward()

    return step, clearer(*leaves)


BENCH = LossBench(__file__, _make_step, BYTES_PER_B2)


def table(results, sizes):
    return patch_table(results, sizes, LOSSES, "+patch", "loss", "open_clip", "fwd+bwd")


def main(argv=None):
    BENCH.main(argv, __doc__, table, SIZES, METHODS, reps=3, big_reps=1)


if __name__ == "__main__":
    main()
