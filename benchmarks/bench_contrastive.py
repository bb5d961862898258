"""CPU benchmark of the fused contrastive loss against open_clip's ClipLoss and a naive CaRot loss.

Memory (peak extra RSS of one forward+backward, each method in its own subprocess) and time
(round-robin medians of all methods in one process) are measured by benchmarks/_loss_bench.py,
shared with bench_sigmoid.py.

Methods (d = 512, float32, logit scale 100):
  fused          calrft_kernels.contrastive_loss(..., backend="cpu")   (the C++ kernel)
  chunked        contrastive_loss(..., backend="chunked")  (GEMM per row chunk + torch passes)
  open_clip      open_clip.loss.ClipLoss()
  fused+distill  contrastive_loss(..., teacher features, distill_weight=1, backend="cpu")
  naive CaRot    calrft_kernels.reference.naive_carot_loss (open_clip logits + teacher soft
                 targets, log_softmax soft CE)
  unit           one B x B x d product and its backward (3 units) -> the bounds
                 4-unit bound = 4/3 x unit time (no teacher), 6-unit bound = 2 x unit time.

    python benchmarks/bench_contrastive.py --sizes 1024 4096 8192
    python benchmarks/bench_contrastive.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, ROOT)
from benchmarks._loss_bench import (LossBench, add_arguments, at_size, clearer,  # noqa: E402
                                     get, runs_note, skip_reason, unit_features, write_md)

SIZES = (1024, 4096, 8192, 16384, 65536)
METHODS = ("unit", "fused", "chunked", "open_clip", "fused+distill", "naive CaRot")
# Peak extra bytes per B^2 of the materialising methods (measured at B = 4096: ClipLoss 4.3 B^2
# floats, the naive CaRot loss 11.3; rounded up), for skipping sizes that cannot fit.
BYTES_PER_B2 = {"open_clip": 4 * 5, "naive CaRot": 4 * 12, "unit": 4 * 3}


# ------------------------------------------------------------------------------------------
# Child side: one method at one size.
# ------------------------------------------------------------------------------------------
def _make_step(method, B, d, seed=0):
    import torch

    features, gen = unit_features(B, d, seed)
    img, txt = features().requires_grad_(), features().requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    t_img, t_txt, t_scale = features(), features(), torch.tensor(100.0)

    if method == "unit":
        grad = torch.randn(B, B, generator=gen) / B

        def step():
            (img @ txt.T).backward(grad)
    elif method in ("fused", "fused+distill", "chunked"):
        from calrft_kernels import contrastive_loss
        kw = {"backend": "chunked" if method == "chunked" else "cpu"}
        if method == "fused+distill":
            kw.update(teacher_image_features=t_img, teacher_text_features=t_txt,
                      teacher_logit_scale=t_scale, distill_weight=1.0)

        def step():
            contrastive_loss(img, txt, scale, **kw).backward()
    elif method == "open_clip":
        from open_clip.loss import ClipLoss
        loss_fn = ClipLoss()

        def step():
            loss_fn(img, txt, scale).backward()
    elif method == "naive CaRot":
        from calrft_kernels.reference import naive_carot_loss

        def step():
            naive_carot_loss(img, txt, scale, t_img, t_txt, t_scale, 1.0).backward()
    else:
        raise ValueError(method)

    return step, clearer(img, txt, scale)


BENCH = LossBench(__file__, _make_step, BYTES_PER_B2)


def unit_seconds(results, B):
    """3-unit time at B: measured, or scaled by (B / B0)^2 from the largest measured B0 < B."""
    r = get(results, "unit", B)
    if r:
        return r["seconds"], False
    done = sorted(x["B"] for x in results if x["method"] == "unit" and "seconds" in x and x["B"] < B)
    if not done:
        return None, False
    b0 = done[-1]
    return get(results, "unit", b0)["seconds"] * (B / b0) ** 2, True


def table(results, sizes):
    lines = ["| B | method | fwd+bwd s | extra peak MiB | vs open_clip | vs naive CaRot | vs bound |",
             "|---|---|---|---|---|---|---|"]
    for B in sizes:
        unit, extrapolated = unit_seconds(results, B)
        oc, naive = get(results, "open_clip", B), get(results, "naive CaRot", B)
        for method, r in at_size(results, B, METHODS):
            if "seconds" not in r:
                lines.append(f"| {B} | {method} | skipped ({skip_reason(r)}) | | | | |")
                continue
            vs_oc = (f"{r['seconds'] / oc['seconds']:.2f}x"
                     if oc and method in ("fused", "chunked") else "")
            vs_naive = (f"{r['seconds'] / naive['seconds']:.2f}x"
                        if naive and method == "fused+distill" else "")
            bound = ""
            if unit and method in ("fused", "chunked", "fused+distill"):
                units = 6 if method == "fused+distill" else 4
                bound = f"{r['seconds'] / (unit * units / 3):.2f}x of {units}-unit"
                bound += " (unit extrapolated)" if extrapolated else ""
            name = method if method != "unit" else "unit (1 product + bwd = 3 units)"
            lines.append(f"| {B} | {name} | {r['seconds']:.3f}{runs_note(r)} | "
                         f"{r['extra_mib']:.0f} | {vs_oc} | {vs_naive} | {bound} |")
    return "\n".join(lines)


def plot(results, sizes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        pts = [(r["B"], r["seconds"], r["extra_mib"]) for r in results
               if r["method"] == method and "seconds" in r]
        if not pts:
            continue
        bs, secs, mib = zip(*pts)
        label = "1 product + bwd (3 units)" if method == "unit" else method
        style = ":" if method == "unit" else "-"
        ax_t.plot(bs, secs, style, marker="o", label=label)
        ax_m.plot(bs, mib, style, marker="o", label=label)
    for ax, ylabel in ((ax_t, "forward+backward time [s]"), (ax_m, "peak extra RSS [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B (d = 512, fp32)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("Contrastive loss on CPU (2 cores): fused kernel vs materialised logits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(ap, SIZES, METHODS, reps=5, big_reps=2, extra_methods=("none",))
    ap.add_argument("--quick", action="store_true", help="sizes 1024 and 4096 only")
    ap.add_argument("--json", default=None, help="also write the raw results here (JSON lines)")
    ap.add_argument("--load", nargs="+", default=[],
                    help="JSON-lines files of earlier runs to table/plot with this one "
                         "(use --sizes with no new measurement: --methods none)")
    ap.add_argument("--png", default=os.path.join(HERE, "contrastive_cpu.png"))
    args = ap.parse_args(argv)
    if BENCH.main_child(args):
        return
    sizes = [1024, 4096] if args.quick else args.sizes
    methods = [m for m in args.methods if m != "none"]
    results = BENCH.measure_args(args, sizes, methods)
    if args.json:
        with open(args.json, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in results))
    for path in args.load:
        with open(path) as f:
            results += [json.loads(line) for line in f if line.strip()]
    sizes = sorted({r["B"] for r in results})
    text = table(results, sizes)
    print(text)
    if args.md:
        write_md(args.md, text, results)
    if args.png:
        plot(results, sizes, args.png)
        print("plot:", args.png)


if __name__ == "__main__":
    main()
