"""GPU suite section "trainer": large-batch CaRot training with feature caching (issue 13).

    run() -> list[dict]   (rows: op, config, check, ms, tflops, note; see benchmarks/gpu_suite.py)

1. check: on the GPU, a feature-cached step (micro-batches, dropout's random state replayed on
   CUDA) leaves the gradients of the plain full-batch step (ViT-B-16, fp32, TF32 off, batch 32 at
   micro-batch 8); and the host synchronisations of one cached step (sync debug mode);
2. whole training steps (student + EMA teacher, CaRotLoss, AdamW) of open_clip ViT-B-16 with
   random init (pretrained=None: no downloads), bf16 autocast, global batch 1024 / 16384 / 65536 at
   micro-batch 512: step time, samples/s, peak CUDA memory; the goals: 65536 under 80 GiB, samples/s
   at 16384 within 10% of 1024;
3. the largest global batch the naive loss (B x B logits, calrft_kernels.reference) reaches: its
   forward + backward on random features, doubling from 8192 until CUDA runs out of memory.
The global batch stays on the host (bf16, uniform noise); each micro-batch is moved when it runs.

Environment: CALRFT_TRAINER_BATCHES="1024,16384" restricts the timed batches (default 1024, 16384,
65536), CALRFT_TRAINER_MODEL overrides the architecture. Imports without a GPU; `rows(...)` runs
on CPU with any model factory (tests/test_trainer_step_bench.py runs it on a tiny model)."""
from __future__ import annotations

import os
import time

MICRO = 512
BATCHES = (1024, 16384, 65536)


def _bench():
    from benchmarks import bench_train_step
    return bench_train_step


def vit_b16(name="ViT-B-16"):
    import open_clip

    def make():
        return open_clip.create_model(os.environ.get("CALRFT_TRAINER_MODEL", name), pretrained=None)
    return make


def _row(config, check, ms=None, note=""):
    return {"op": "train step (carot, feature cache)", "config": config, "check": check, "ms": ms,
            "tflops": None, "note": note}


def check_row(model_fn, device, batch=32, micro=8, tol=1e-3):
    """Cached vs plain gradients on the device, dropout on (the replay is what is checked)."""
    import torch
    import torch.nn.functional as F
    b = _bench()
    grads = {}
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for m in (None, micro):
            stepper, opt, data_ = b.cached_setup("fused", batch, m, model_fn=model_fn, device=device,
                                                 precision="fp32")
            model = stepper.student
            for block in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks):
                block.register_forward_hook(lambda mod, a, out: F.dropout(out, 0.1, training=mod.training))
            if m is None:  # the full-batch reference draws the micro-batches' masks: same chunks
                stepper.wrapped = _Chunked(model, micro)
            torch.manual_seed(1)
            if device != "cpu":
                torch.cuda.manual_seed(1)
            stepper.forward_backward(data_, use_teacher=True)
            grads[m] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    worst = max(((grads[micro][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                for n, g in grads[None].items())
    ok = worst <= tol
    return _row(f"check: B={batch} micro={micro} fp32 dropout", "ok" if ok else "MISMATCH",
                note=f"max relative gradient difference {worst:.1e} (tol {tol:g})")


class _Chunked:
    """The plain step's forward over the same row chunks, in one graph."""

    def __init__(self, model, micro):
        self.model, self.micro = model, micro

    def __call__(self, images, texts):
        import torch
        outs = [self.model(images[i:i + self.micro], texts[i:i + self.micro])
                for i in range(0, images.shape[0], self.micro)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[-1][2]


def step_row(model_fn, device, batch, micro=MICRO, loss="fused", precision="bf16", steps=2):
    """Median step time of `steps` steps after a warm-up step at one micro-batch."""
    import torch
    b = _bench()
    cuda = str(device).startswith("cuda")
    config = f"B={batch} micro={micro} {loss} {precision}"
    try:
        stepper, opt, data_ = b.cached_setup(loss, micro, micro, model_fn=model_fn, device=device,
                                             precision=precision)
        b.cached_step(stepper, opt, data_)  # warm-up: kernels, autotuning, allocator
        del data_
        g = torch.Generator().manual_seed(0)
        size = stepper.student.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        data_ = {"images": torch.empty(batch, 3, size, size, dtype=dtype).uniform_(-1, 1, generator=g),
                 "texts": torch.randint(1, stepper.student.vocab_size - 1,
                                        (batch, stepper.student.context_length), generator=g),
                 "labels": torch.zeros(batch, dtype=torch.long)}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = [b.cached_step(stepper, opt, data_) for _ in range(steps)]
        ms = sorted(times)[len(times) // 2] * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return _row(config, "ok", ms, f"{batch / (ms / 1e3):.0f} samples/s, peak {peak:.1f} GiB")
    except torch.cuda.OutOfMemoryError:
        return _row(config, "OOM", note="out of CUDA memory")
    finally:
        if cuda:
            torch.cuda.empty_cache()


def sync_row(model_fn, device, batch=64, micro=16, precision="bf16"):
    """Host synchronisations in one cached step (torch.cuda.set_sync_debug_mode("warn") counts the
    synchronising calls): the trainer's own code makes none outside a log step; the ops' input
    checks (finite scalars, orthogonality overflow) may."""
    import warnings

    import torch
    b = _bench()
    if not str(device).startswith("cuda"):
        return _row(f"host syncs: B={batch} micro={micro}", "SKIPPED", note="CUDA only")
    stepper, opt, data_ = b.cached_setup("fused", batch, micro, model_fn=model_fn, device=device,
                                         precision=precision)
    b.cached_step(stepper, opt, data_)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.zero_grad(set_to_none=True)
            stepper.forward_backward(data_, use_teacher=True)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = sorted({str(w.message).splitlines()[0][:60] for w in caught})
    return _row(f"host syncs: B={batch} micro={micro} {precision}", "ok", note=f"{len(caught)} synchronising "
                f"calls in forward_backward + AdamW step; {'; '.join(where)[:200]}")


def naive_reach_row(device, d=512, start=8192, limit=262144):
    """Largest B at which the naive loss's forward + backward fits (doubling), on random features."""
    import torch
    from calrft_kernels.reference import naive_carot_loss
    largest, b = None, start
    while b <= limit:
        try:
            x = [torch.nn.functional.normalize(torch.randn(b, d, device=device), dim=1).bfloat16()
                 for _ in range(4)]
            img, txt = x[0].requires_grad_(), x[1].requires_grad_()
            s = torch.tensor(14.0, device=device)
            naive_carot_loss(img, txt, s, x[2], x[3], s, distill_weight=1.5).backward()
            largest = b
            del x, img, txt
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
        b *= 2
    return _row(f"naive loss reach (d={d}, bf16)", "ok" if largest else "OOM",
                note=f"largest global batch the naive loss fits: {largest} (loss alone, doubling from {start})")


def rows(model_fn, device, batches=BATCHES, micro=MICRO, precision="bf16", steps=2, naive=True,
         check=True):
    out = []
    if check:
        out.append(check_row(model_fn, device))
        out.append(sync_row(model_fn, device))
    for batch in batches:
        out.append(step_row(model_fn, device, batch, micro, precision=precision,
                            steps=1 if batch >= 65536 else steps))
    if naive:
        out.append(naive_reach_row(device))
    return out


def run() -> list[dict]:
    import torch
    if not torch.cuda.is_available():
        return [_row("-", "SKIPPED", note="no CUDA device")]
    start = time.time()
    batches = tuple(int(x) for x in os.environ.get("CALRFT_TRAINER_BATCHES", "").split(",") if x) or BATCHES
    out = rows(vit_b16(), "cuda", batches)
    out[-1]["note"] += f"; section {time.time() - start:.0f} s"
    return out
