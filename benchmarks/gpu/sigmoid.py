"""GPU suite section "sigmoid": the public sigmoid (SigLIP) loss on a CUDA device (issue 27).

    run(device=None, quick=False) -> list[dict]   (rows: op, config, check, ms, tflops, note)

1. correctness of the PUBLIC op (calrft_kernels.sigmoid_loss, backend "auto" = "chunked" on
   CUDA) in bf16, fp16 and fp32 against float64:
   - awkward sizes (B = 1, 257, 1031; d = 7, 129, 768) with a bias, labels and a teacher,
     against the materialised float64 reference (calrft_kernels.reference) on the device;
   - B = 65536, d = 768 bf16 (and B = 32768 with a teacher) against the chunked kernel run in
     float64 on the device (exact up to fp64 rounding), plus the largest difference between two
     identical runs;
2. the bf16 torch.mm rate (8192^3, the same probe as the loss section): the denominator of
   "% of the matmul rate", the sigmoid loss counted as 3 units (3 x 2 B^2 d flops);
3. timings at B = 32768, d = 768, bf16, forward+backward with CUDA events (medians): the default
   path, open_clip's SigLipLoss, and the 3-unit bound (three plain bf16 torch.mm of the loss's
   shapes: X Y^T, G Y, G^T X); with a teacher (4 units) for the record;
4. the peak memory above the inputs of one forward+backward at B = 65536, d = 768, bf16.

Goals (issue 27): <= 0.5x open_clip's time and >= 60% of the measured bf16 matmul rate counted
as 3 units at B = 32768, d = 768; extra memory <= 2 GiB at B = 65536. Each goal row says met or
missed.

Imports without a GPU. run(device="cpu", quick=True) runs every code path on CPU tensors at tiny
sizes with a wall-clock timer (tests/test_sigmoid_gpu_suite.py), so that the first GPU run does
not crash. A time budget (CALRFT_SIGMOID_BUDGET_S, default 120 s) skips the remaining timed
cases, reported as skipped. Written for torch 2.11 + triton 3.6 on an H100 / H200.
"""
from __future__ import annotations

import os
import time

from .._common import torch_dtype
from ._timing import section_device
from .loss import Budget, Device, _max_rel, _mem_note, _row, matmul_peak, tflops, units_flops

SCALE, BIAS = 10.0, -10.0          # SigLIP's initial logit scale and bias
AWKWARD = ((1, 7), (257, 129), (1031, 768))
LARGE_CHECKS = ((65536, 768, "bf16", False), (32768, 768, "bf16", True))
TIMED = (32768, 768, "bf16")
MEMORY = (65536, 768, "bf16")
# max |got - ref| / max |ref| of the loss and of each gradient, per input dtype.
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
GOALS = {"vs_open_clip": 0.5, "matmul_fraction": 0.6, "extra_gib": 2.0}


def make_inputs(b, d, dtype_name, device, teacher=False, labels=False, seed=0):
    """Unit-norm features (as SigLIP passes them), SigLIP's initial scale and bias, and a teacher
    (with its bias) or labels when asked; keyword arguments of sigmoid_loss."""
    import torch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch_dtype(dtype_name)

    def unit():
        x = torch.randn(b, d, generator=gen)
        return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)

    x = {"image_features": unit(), "text_features": unit(),
         "logit_scale": torch.tensor(SCALE, device=device),
         "logit_bias": torch.tensor(BIAS, device=device)}
    if teacher:
        x.update(teacher_image_features=unit(), teacher_text_features=unit(),
                 teacher_logit_scale=torch.tensor(SCALE, device=device),
                 teacher_logit_bias=torch.tensor(BIAS, device=device), distill_weight=1.0)
    if labels:
        x["labels"] = torch.randint(0, max(1, b // 4), (b,), generator=gen).to(device)
    return x


def _features(x):
    return x["image_features"], x["text_features"]


def loss_and_grads(x, dtype=None, **kw):
    """(loss, d image, d text, d scale, d bias) of sigmoid_loss on inputs x, the features (and
    the teacher's) cast to `dtype` when given."""
    import torch

    from calrft_kernels import sigmoid_loss
    args = {k: (v.to(dtype) if dtype is not None and torch.is_tensor(v) and v.dim() == 2 else v)
            for k, v in x.items()}
    leaves = {k: args[k].detach().clone().requires_grad_()
              for k in ("image_features", "text_features", "logit_scale", "logit_bias")}
    loss = sigmoid_loss(**{**args, **leaves}, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return (loss.detach(), *grads)


# ----------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------
def check_awkward(b, d, dtype_name, device):
    """The default path against the materialised float64 reference on the same rounded inputs,
    with a bias, labels and a teacher."""
    import torch

    from calrft_kernels.reference import sigmoid_loss_reference
    x = make_inputs(b, d, dtype_name, device, teacher=True, labels=True, seed=b + d)
    got = loss_and_grads(x)
    want = loss_and_grads(x, torch.float64, backend="reference")
    ref_fn = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in x.items()}
    oracle = float(sigmoid_loss_reference(**ref_fn))
    errs = [_max_rel(g, w) for g, w in zip(got, want)]
    tol = TOLERANCE[dtype_name]
    ok = (all(e < tol for e in errs) and all(bool(torch.isfinite(g).all()) for g in got)
          and abs(float(want[0]) - oracle) <= 1e-9 * abs(oracle))
    return _row("sigmoid_loss (default) vs fp64 reference", f"B={b} d={d} {dtype_name} "
                f"bias labels teacher", _check_text(errs, tol, ok))


def check_large(b, d, dtype_name, teacher, device):
    """The default path against the chunked kernel in float64 on the device; two runs."""
    import torch
    x = make_inputs(b, d, dtype_name, device, teacher=teacher, seed=b + d)
    got = loss_and_grads(x)
    again = loss_and_grads(x)
    want = loss_and_grads(x, torch.float64, backend="chunked")
    errs = [_max_rel(g, w) for g, w in zip(got, want)]
    repeat = max(float((a.double() - b_.double()).abs().max()) for a, b_ in zip(got, again))
    tol = TOLERANCE[dtype_name]
    ok = all(e < tol for e in errs) and all(bool(torch.isfinite(g).all()) for g in got)
    config = f"B={b} d={d} {dtype_name}" + (" teacher" if teacher else "")
    return _row("sigmoid_loss (default) vs fp64 chunked on device", config,
                _check_text(errs, tol, ok), note=f"two runs differ by at most {repeat:.1e} (abs)")


def _check_text(errs, tol, ok):
    names = ("loss", "d img", "d txt", "d scale", "d bias")
    return (", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)) +
            f" max rel err (tol {tol:.0e}): {'ok' if ok else 'FAIL'}")


# ----------------------------------------------------------------------------------------------
# 3. and 4. timing and memory
# ----------------------------------------------------------------------------------------------
def step(kind, x):
    """A closure running forward+backward of one contender on inputs x: "calrft" (the public
    op, default path; with the teacher when x has one), "open_clip" (its SigLipLoss), "3mm" (the
    3-unit bound: X Y^T, G Y, G^T X with plain torch.mm, G a fixed [B, B] matrix)."""
    import torch
    img, txt = _features(x)
    if kind == "calrft":
        from calrft_kernels import sigmoid_loss
        return lambda: sigmoid_loss(**x).backward()
    if kind == "open_clip":
        from open_clip.loss import SigLipLoss
        loss_fn = SigLipLoss()
        return lambda: loss_fn(img, txt, x["logit_scale"], x["logit_bias"]).backward()
    if kind == "3mm":
        a, b = img.detach(), txt.detach()
        g = torch.full((a.shape[0], b.shape[0]), 1e-3, dtype=a.dtype, device=a.device)

        def three():
            torch.mm(a, b.T)
            torch.mm(g, b)
            torch.mm(g.T, a)
        return three
    raise ValueError(kind)


def _timed(dev, kind, x, reps):
    """(median ms, peak extra MiB above what was allocated before)."""
    fn = step(kind, x)
    base = dev.reset_peak()
    ms = dev.median_ms(fn, reps)
    extra = dev.peak_extra_mib(base)
    for v in _features(x) + (x["logit_scale"], x["logit_bias"]):
        v.grad = None
    return ms, extra


def _with_grads(x):
    for k in ("image_features", "text_features", "logit_scale", "logit_bias"):
        x[k].requires_grad_(True)
    return x


def time_sigmoid(peak_tflops, device="cuda", reps=5, case=TIMED, budget=None):
    """Rows: open_clip, the 3-unit bound, the default path (with the two goals), and the default
    path with a teacher (4 units)."""
    import torch
    dev = Device(device)
    b, d, dt = case
    config = f"B={b} d={d} {dt}"
    budget = budget or Budget(float(os.environ.get("CALRFT_SIGMOID_BUDGET_S", "120")))
    flops = units_flops(b, d, units=3)
    rows, ms = [], {}
    x = _with_grads(make_inputs(b, d, dt, device))
    for kind, label in (("open_clip", "open_clip SigLipLoss fwd+bwd"),
                        ("3mm", "3-unit bound: 3 plain torch.mm"),
                        ("calrft", "sigmoid_loss fwd+bwd (auto)")):
        if not budget.left():
            rows.append(_row(label, config, "skipped: time budget"))
            continue
        try:
            ms[kind], extra = _timed(dev, kind, x, reps)
            frac = tflops(flops, ms[kind]) / peak_tflops if peak_tflops else 0.0
            rows.append(_row(label, config, "timed", ms[kind], flops,
                             f"{frac:.0%} of bf16 mm rate (3 units); {_mem_note(extra, b)}"))
        except Exception as exc:  # OOM or a kernel failure: report, keep going
            rows.append(_row(label, config, "FAILED", note=repr(exc)[:200]))
        dev.release()
    if "calrft" in ms and "open_clip" in ms:
        ratio = ms["calrft"] / ms["open_clip"]
        rows.append(_row("goal: sigmoid_loss <= 0.5x open_clip SigLipLoss", config,
                         f"{ratio:.2f}x: {'met' if ratio <= GOALS['vs_open_clip'] else 'missed'}"))
    if "calrft" in ms and peak_tflops:
        frac = tflops(flops, ms["calrft"]) / peak_tflops
        rows.append(_row("goal: sigmoid_loss >= 60% of the bf16 matmul rate (3 units)", config,
                         f"{frac:.0%}: {'met' if frac >= GOALS['matmul_fraction'] else 'missed'}",
                         note=f"the 3 plain mm reach "
                              f"{tflops(flops, ms['3mm']) / peak_tflops:.0%}" if "3mm" in ms
                         else ""))
    if budget.left():
        xt = _with_grads(make_inputs(b, d, dt, device, teacher=True))
        try:
            t_ms, extra = _timed(dev, "calrft", xt, reps)
            flops4 = units_flops(b, d, units=4)
            frac = tflops(flops4, t_ms) / peak_tflops if peak_tflops else 0.0
            rows.append(_row("sigmoid_loss + distill fwd+bwd (auto)", config + " teacher",
                             "timed", t_ms, flops4, f"{frac:.0%} of bf16 mm rate (4 units); "
                                                    f"{_mem_note(extra, b)}"))
        except Exception as exc:
            rows.append(_row("sigmoid_loss + distill fwd+bwd (auto)", config, "FAILED",
                             note=repr(exc)[:200]))
        del xt
        dev.release()
    del x
    dev.release()
    return rows


def measure_memory(device="cuda", case=MEMORY, budget=None):
    """Peak memory above the inputs of one forward+backward of the default path (the goal)."""
    dev = Device(device)
    b, d, dt = case
    config = f"B={b} d={d} {dt}"
    if budget is not None and not budget.left():
        return [_row("sigmoid_loss fwd+bwd peak extra memory", config, "skipped: time budget")]
    x = _with_grads(make_inputs(b, d, dt, device))
    try:
        ms, extra = _timed(dev, "calrft", x, 3)
    except Exception as exc:
        return [_row("sigmoid_loss fwd+bwd peak extra memory", config, "FAILED",
                     note=repr(exc)[:200])]
    finally:
        dev.release()
    if extra is None:
        return [_row("sigmoid_loss fwd+bwd peak extra memory", config, "timed", ms,
                     note=_mem_note(extra, b))]
    gib = extra / 1024
    return [_row("sigmoid_loss fwd+bwd peak extra memory", config,
                 f"{gib:.2f} GiB: {'met' if gib <= GOALS['extra_gib'] else 'missed'} "
                 f"(goal <= 2 GiB)", ms, note=_mem_note(extra, b))]


# ----------------------------------------------------------------------------------------------
def run(device=None, quick=False) -> list[dict]:
    """Every part above. device=None: the GPU if there is one, else a single UNRUN row.
    quick=True (with device="cpu"): every code path at tiny sizes (a smoke test)."""
    device = section_device(device)
    if device is None:
        return [_row("sigmoid_loss (chunked)", "-", "UNRUN: no CUDA device")]
    start = time.time()
    cuda = Device(device).cuda
    if quick:
        awkward, large = ((1, 7), (37, 5)), ((96, 8, "fp32", False), (64, 8, "fp32", True))
        timed, memory, peak_n, reps = (64, 16, "fp32"), (128, 16, "fp32"), 256, 2
        dtypes = ("fp32",)
    else:
        awkward, large, timed, memory, peak_n, reps = AWKWARD, LARGE_CHECKS, TIMED, MEMORY, 8192, 5
        dtypes = ("bf16", "fp16", "fp32") if cuda else ("fp32",)
    rows = []
    for b, d in awkward:
        for dt in dtypes:
            try:
                rows.append(check_awkward(b, d, dt, device))
            except Exception as exc:
                rows.append(_row("sigmoid_loss vs fp64 reference", f"B={b} d={d} {dt}",
                                 "FAILED", note=repr(exc)[:200]))
    for b, d, dt, teacher in large:
        try:
            rows.append(check_large(b, d, dt, teacher, device))
        except Exception as exc:
            rows.append(_row("sigmoid_loss vs fp64 chunked", f"B={b} d={d} {dt}", "FAILED",
                             note=repr(exc)[:200]))
        Device(device).release()
    rows.append(_row("sigmoid correctness checks", "-", f"done in {time.time() - start:.0f}s"))
    mm_ms, peak = matmul_peak(peak_n, reps=reps, device=device)
    rows.append(_row(f"bf16 torch.mm {peak_n}^3 (rate)", "bf16", "timed", mm_ms,
                     2.0 * peak_n ** 3, "denominator of the sigmoid % figures"))
    budget = Budget(float(os.environ.get("CALRFT_SIGMOID_BUDGET_S", "120")))
    rows += time_sigmoid(peak, device=device, reps=reps, case=timed, budget=budget)
    rows += measure_memory(device=device, case=memory, budget=budget)
    rows.append(_row("sigmoid section", "-", f"done in {time.time() - start:.0f}s"))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
