"""Training-step time and peak memory of CaRot fine-tuning with the tiny model on this CPU:
our fused CaRotLoss vs a naive open_clip-style CaRot loss (materialised B x B logits, teacher
soft targets), split into student forward/backward, teacher forward and loss.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_train_step.py --batches 256,1024,4096

Timing: both losses run interleaved in one process, medians over --reps steps. Peak memory: each
(loss, batch) runs a few steps in its own subprocess and reports the growth of peak RSS over the
RSS after set-up (CPU tensors are invisible to tracemalloc/CUDA counters), for a whole step and
for the loss alone on random features of the same shapes.

--cached: large-batch training with feature caching (calrft.step, --micro-batch-size): samples/s
and peak memory of whole CaRot steps (student + EMA teacher, AdamW) against the global batch at a
fixed micro-batch, the fused CaRotLoss vs the naive loss (calrft_kernels.reference's
naive_carot_loss plus the same parameter terms) under the same caching. Model: a smaller open_clip
CLIP than calrft-tiny (`bench_model`: 16 px images, patch 8, width 32, one layer a tower, embed
64) so that 16384-row steps take seconds on a CPU; one child process per (loss, batch):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_train_step.py --cached \
        --micro 256 --batches 256,1024,4096,16384 --reps 2"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]
from benchmarks import _common  # noqa: E402
from calrft import ema, models  # noqa: E402
from calrft.ops import CaRotLoss  # noqa: E402


def make_batch(batch, tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = tokenizer([f"a photo of the digit {words[i % 10]}." for i in range(batch)])
    return images, texts


def step(model, teacher, opt, loss_fn, images, texts):
    """One training step; returns seconds of (student fwd+bwd, teacher fwd, loss fwd+bwd, total)."""
    t0 = time.perf_counter()
    img, txt, scale = model(images, texts)
    t1 = time.perf_counter()
    with torch.no_grad():
        t_img, t_txt, t_scale = teacher(images, texts)
    t2 = time.perf_counter()
    # the loss runs on detached leaves so its backward is timed apart from the model's
    li, lt, ls = (x.detach().requires_grad_() for x in (img, txt, scale))
    loss = loss_fn(li, lt, ls, visual_proj=model.visual.proj, text_proj=model.text_projection,
                   teacher_image_features=t_img, teacher_text_features=t_txt, teacher_logit_scale=t_scale)
    loss.backward()
    t3 = time.perf_counter()
    torch.autograd.backward((img, txt, scale), (li.grad, lt.grad, ls.grad))
    opt.step()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return {"student": (t1 - t0) + (t4 - t3), "teacher": t2 - t1, "loss": t3 - t2, "total": t4 - t0}


def setup(batch):
    torch.manual_seed(0)
    model, _, _, tokenizer = models.create(models.TINY)
    teacher = ema.make_teacher(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, texts = make_batch(batch, tokenizer)
    return model, teacher, opt, images, texts


def time_batch(batch, reps):
    model, teacher, opt, images, texts = setup(batch)
    rows = {name: [] for name in LOSSES}
    for name, fn in LOSSES.items():  # warm-up
        step(model, teacher, opt, fn, images, texts)
    for _ in range(reps):
        for name, fn in LOSSES.items():
            rows[name].append(step(model, teacher, opt, fn, images, texts))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}


def reset_peak_rss():
    """Reset the kernel's high-water mark (Linux >= 4.0), so that imports and set-up, whose
    transient peak is above a small step's, do not hide the step's own peak; returns RSS now."""
    _common.reset_peak_rss()
    return _common.proc_status_kib("VmRSS") / 1024


def peak_rss_mib():
    return _common.proc_status_kib("VmHWM") / 1024


def peak_memory_child(kind, name, batch, steps):
    """Growth of peak RSS over the RSS after set-up: a whole training step ("step"), or the loss's
    forward+backward alone on random features of the same shapes ("loss")."""
    if kind == "step":
        model, teacher, opt, images, texts = setup(batch)
        base = reset_peak_rss()
        for _ in range(steps):
            step(model, teacher, opt, LOSSES[name], images, texts)
    else:
        torch.manual_seed(0)
        d = 64
        feats = [F.normalize(torch.randn(batch, d), dim=1) for _ in range(4)]
        img, txt = (f.requires_grad_() for f in feats[:2])
        scale = torch.tensor(4.0, requires_grad=True)
        wv, wt = torch.randn(96, d, requires_grad=True), torch.randn(64, d, requires_grad=True)
        base = reset_peak_rss()
        for _ in range(steps):
            loss = LOSSES[name](img, txt, scale, visual_proj=wv, text_proj=wt, teacher_image_features=feats[2],
                                teacher_text_features=feats[3], teacher_logit_scale=torch.tensor(4.0))
            loss.backward()
    print(json.dumps({"peak_growth_mib": peak_rss_mib() - base}))


def peak_memory(kind, name, batch, steps=2):
    out = subprocess.run([sys.executable, __file__, "--child", f"{kind}:{name}", "--batches", str(batch),
                          "--reps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


# ---- feature-cached steps (--cached) ------------------------------------------------------------

def bench_model(embed_dim=64):
    """The --cached benchmark's CPU model (random init): open_clip CLIP, 16 px / patch 8 / width 32
    / 1 layer vision, context 8 / width 32 / 1 layer text."""
    import open_clip
    return open_clip.CLIP(embed_dim, {"image_size": 16, "patch_size": 8, "width": 32, "head_width": 16,
                                      "layers": 1},
                          {"context_length": 8, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1})


class NaiveCaRot(torch.nn.Module):
    """CaRotLoss's interface over the naive loss (calrft_kernels.reference.naive_carot_loss: B x B
    logits both ways and the teacher's soft targets materialised) plus the same orthogonality and
    cross terms, so the cached step runs either loss unchanged (the softmax family)."""
    family = "softmax"

    def __init__(self, distill_weight=1.5, orth_weight=0.2, cross_weight=0.05):
        super().__init__()
        self.distill_weight, self.orth_weight, self.cross_weight = distill_weight, orth_weight, cross_weight

    def forward(self, img, txt, scale, *, visual_proj, text_proj, teacher_image_features=None,
                teacher_text_features=None, teacher_logit_scale=None, labels=None, logit_bias=None,
                output_dict=False):
        from calrft_kernels.reference import naive_carot_loss
        distill = self.distill_weight if teacher_image_features is not None else 0.0
        if teacher_image_features is None:  # no teacher yet (step 0): contrastive only
            teacher_image_features, teacher_text_features, teacher_logit_scale = img.detach(), txt.detach(), scale
        loss = naive_carot_loss(img, txt, scale, teacher_image_features, teacher_text_features,
                                teacher_logit_scale, distill_weight=distill)
        eye = torch.eye(visual_proj.shape[1], device=visual_proj.device, dtype=visual_proj.dtype)
        oc = torch.linalg.matrix_norm(visual_proj.T @ visual_proj - eye)
        cf = torch.linalg.matrix_norm(visual_proj @ text_proj.T)
        total = loss + self.orth_weight * oc + self.cross_weight * cf
        return {"total": total} if output_dict else total


LOSSES = {"fused": CaRotLoss(), "naive": NaiveCaRot()}


def cached_setup(loss_name, batch, micro, *, model_fn=bench_model, device="cpu", precision="auto",
                 grad_checkpointing=False, seed=0):
    """(stepper, optimizer, batch dict) of a CaRot step with feature caching at `micro` rows."""
    from calrft import step as steps
    torch.manual_seed(seed)
    model = model_fn().to(device)
    if grad_checkpointing:
        models.set_grad_checkpointing(model)
    teacher = ema.make_teacher(model)
    loss = CaRotLoss() if loss_name == "fused" else NaiveCaRot()
    stepper = steps.Stepper("carot", student=model, teacher=teacher, device=device, precision=precision,
                            objective=steps.Objective("carot", loss), micro_batch_size=micro,
                            scaler=steps.make_scaler(precision, device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(seed)
    data_ = {"images": torch.randn(batch, 3, size, size, generator=g).to(device),
             "texts": torch.randint(1, model.vocab_size - 1, (batch, model.context_length), generator=g).to(device),
             "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    model.train()
    return stepper, opt, data_


def cached_step(stepper, opt, batch) -> float:
    """One optimiser step; seconds (the loss is read, which synchronises a GPU)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    terms = stepper.forward_backward(batch, use_teacher=True)
    if stepper.scaler is not None:
        stepper.scaler.step(opt)
        stepper.scaler.update()
    else:
        opt.step()
    float(terms["loss"])
    return time.perf_counter() - t0


def cached_child(loss_name, batch, micro, reps):
    """CPU: warm up at 8 rows (the ops' first call initialises), reset the RSS high-water mark,
    run 1 + reps steps; median seconds of the timed ones and the peak RSS growth."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stepper, opt, data_ = cached_setup(loss_name, 8, 4)
    cached_step(stepper, opt, data_)
    del stepper, opt, data_
    stepper, opt, data_ = cached_setup(loss_name, batch, micro)
    base = reset_peak_rss()
    times = [cached_step(stepper, opt, data_) for _ in range(1 + reps)][1:]
    step_s = statistics.median(times)
    growth = peak_rss_mib() - base
    # the loss alone (forward + backward on leaves of the step's feature shapes), for its share
    d = stepper.student.text_projection.shape[1]
    feats = [torch.nn.functional.normalize(torch.randn(batch, d), dim=1) for _ in range(4)]
    img, txt = feats[0].requires_grad_(), feats[1].requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    t0 = time.perf_counter()
    stepper.objective(steps.Features(img, txt, scale),
                      teacher=steps.Features(feats[2], feats[3], torch.tensor(14.0)),
                      clip=stepper.clip)["total"].backward()
    loss_s = time.perf_counter() - t0
    print(json.dumps({"step_s": step_s, "samples_per_s": batch / step_s, "loss_s": loss_s,
                      "loss_share": loss_s / step_s, "peak_growth_mib": growth}))


def run_cached(batches, micro, reps, naive_max):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, micro-batch {micro}, reps={reps}")
    print("| global batch | loss | step s | samples/s | loss fwd+bwd s | loss share | peak RSS growth MiB |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for batch in batches:
        for name in ("fused", "naive"):
            if name == "naive" and batch > naive_max:
                print(f"| {batch} | naive | not run (> --naive-max {naive_max}: B x B logits) | | | | |", flush=True)
                continue
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
            out = subprocess.run([sys.executable, __file__, "--child", f"cached:{name}", "--batches", str(batch),
                                  "--micro", str(micro), "--reps", str(reps)], capture_output=True, text=True,
                                 env=env)
            if out.returncode != 0:
                print(f"| {batch} | {name} | FAILED: {out.stderr.strip().splitlines()[-1][:80]} | | | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"batch": batch, "loss": name, "micro": micro, **r})
            print(f"| {batch} | {name} | {r['step_s']:.3f} | {r['samples_per_s']:.0f} | {r['loss_s']:.3f} | "
                  f"{r['loss_share']:.0%} | {r['peak_growth_mib']:.1f} |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--child", default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--memory-only", action="store_true", help="skip the timing")
    ap.add_argument("--cached", action="store_true", help="feature-cached steps against the global batch")
    ap.add_argument("--micro", type=int, default=256, help="--cached: rows per micro-batch")
    ap.add_argument("--naive-max", type=int, default=8192, help="--cached: largest batch for the naive loss")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        kind, name = args.child.split(":")
        if kind == "cached":
            return cached_child(name, batches[0], args.micro, args.reps)
        return peak_memory_child(kind, name, batches[0], args.reps)
    if args.cached:
        rows = run_cached(batches, args.micro, args.reps, args.naive_max)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, reps={args.reps}")
    header = ("| batch | loss | step ms | student fwd+bwd ms | teacher fwd ms | loss fwd+bwd ms | "
              "loss share | step peak RSS growth MiB | loss peak RSS growth MiB |")
    print(header + "\n" + "|---" * 9 + "|")
    rows = []
    for batch in batches:
        reps = max(2, args.reps if batch <= 1024 else args.reps // 2)
        timing = time_batch(batch, reps) if not args.memory_only else {
            name: dict.fromkeys(("student", "teacher", "loss", "total"), float("nan")) for name in LOSSES}
        for name in LOSSES:
            t = timing[name]
            mem, loss_mem = peak_memory("step", name, batch), peak_memory("loss", name, batch)
            row = {"batch": batch, "loss": name, **{k: v * 1e3 for k, v in t.items()},
                   "loss_share": t["loss"] / t["total"], "step_peak_rss_growth_mib": mem,
                   "loss_peak_rss_growth_mib": loss_mem}
            rows.append(row)
            print(f"| {batch} | {name} | {row['total']:.1f} | {row['student']:.1f} | {row['teacher']:.1f} | "
                  f"{row['loss']:.2f} | {row['loss_share']:.1%} | {mem:.1f} | {loss_mem:.1f} |", flush=True)
        f, n = timing["fused"], timing["naive"]
        print(f"|  | naive/fused | {n['total'] / f['total']:.2f}x |  |  | {n['loss'] / f['loss']:.1f}x |  |  |  |",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
