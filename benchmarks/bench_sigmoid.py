"""CPU benchmark of the fused sigmoid (SigLIP) loss against open_clip's SigLipLoss and the work
bound (three plain torch.mm products of the same shapes).

Memory (peak extra RSS of one forward+backward, each method in its own subprocess) and time
(round-robin medians of all methods in one process) are measured by benchmarks/_loss_bench.py,
shared with bench_contrastive.py. Materialising methods (open_clip, 3mm) never run above
B = 16384 on this machine.

Methods (float32, SigLIP's initial scale 10 and bias -10, forward+backward):
  fused          calrft_kernels.sigmoid_loss(..., backend="cpu")   (the C++ kernel, 3 units)
  fused+distill  the same with teacher features, bias and distill_weight=1 (4 units)
  open_clip      open_clip.loss.SigLipLoss()
  3mm            X Y^T, G Y and G^T X with plain torch.mm (G a given [B, B] matrix): the 3-unit
                 work bound of the fused op (the 4-unit bound of fused+distill is 4/3 of it)

    prlimit --as=$((16<<30)) python benchmarks/bench_sigmoid.py --sizes 1024 4096 8192 16384
    prlimit --as=$((16<<30)) python benchmarks/bench_sigmoid.py --sizes 65536 --d 768 \
        --methods fused --big-reps 0                                   # memory at B = 65536
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, ROOT)
from benchmarks._loss_bench import (LossBench, at_size, clearer, get,  # noqa: E402
                                     runs_note, skip_reason, unit_features)

SIZES = (1024, 4096, 8192, 16384)
METHODS = ("3mm", "fused", "open_clip", "fused+distill")
# Peak extra bytes per B^2 of the materialising methods, for skipping sizes that cannot fit:
# open_clip holds the logits, the +-1 label matrix and autograd's buffers (measured ~4.1 B^2
# floats at B = 4096-16384, rounded up); 3mm its G and product.
BYTES_PER_B2 = {"open_clip": 4 * 5, "3mm": 4 * 2}


def _make_step(method, B, d, seed=0):
    import torch

    features, gen = unit_features(B, d, seed)
    img, txt = features().requires_grad_(), features().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)

    if method == "3mm":
        x, y = img.detach(), txt.detach()
        g = torch.randn(B, B, generator=gen) / B

        def step():
            torch.mm(x, y.T)
            torch.mm(g, y)
            torch.mm(g.T, x)
    elif method in ("fused", "fused+distill"):
        from calrft_kernels import sigmoid_loss
        kw = {"backend": "cpu"}
        if method == "fused+distill":
            kw.update(teacher_image_features=features(), teacher_text_features=features(),
                      teacher_logit_scale=10.0, teacher_logit_bias=-10.0, distill_weight=1.0)

        def step():
            sigmoid_loss(img, txt, scale, bias, **kw).backward()
    elif method == "open_clip":
        from open_clip.loss import SigLipLoss
        loss_fn = SigLipLoss()

        def step():
            loss_fn(img, txt, scale, bias).backward()
    else:
        raise ValueError(method)

    return step, clearer(img, txt, scale, bias)


BENCH = LossBench(__file__, _make_step, BYTES_PER_B2)


def table(results, sizes):
    lines = ["| B | d | method | fwd+bwd s | extra peak MiB | vs open_clip | vs work bound |",
             "|---|---|---|---|---|---|---|"]
    for B in sizes:
        oc, bound = get(results, "open_clip", B), get(results, "3mm", B)
        for method, r in at_size(results, B, METHODS):
            if "seconds" not in r:
                lines.append(f"| {B} | | {method} | skipped ({skip_reason(r)}) | | | |")
                continue
            vs_oc = (f"{r['seconds'] / oc['seconds']:.2f}x"
                     if oc and method == "fused" else "")
            vs_bound = ""
            if bound and method in ("fused", "fused+distill"):
                units = 4 if method == "fused+distill" else 3
                vs_bound = f"{r['seconds'] / (bound['seconds'] * units / 3):.2f}x of {units} units"
            lines.append(f"| {B} | {r['d']} | {method} | {r['seconds']:.3f}{runs_note(r)} | "
                         f"{r['extra_mib']:.0f} | {vs_oc} | {vs_bound} |")
    return "\n".join(lines)


def main(argv=None):
    BENCH.main(argv, __doc__, table, SIZES, METHODS, reps=5, big_reps=3)


if __name__ == "__main__":
    main()
