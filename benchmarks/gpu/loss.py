"""GPU suite section "loss": the public contrastive loss on a CUDA device (issue 11's table).

    run(device=None, quick=False) -> list[dict]   (rows: op, config, check, ms, tflops, note)

1. correctness of the PUBLIC op (calrft_kernels.contrastive_loss, default backend) at large B:
   B = 65536, d = 768 bf16 and B = 32768, d = 768 fp32 (and with a teacher), the loss and both
   feature gradients against the chunked kernel run in float64 ON THE DEVICE (backend="chunked",
   float64 features: exact up to fp64 rounding), plus the largest difference between two runs;
2. the bf16 torch.mm rate (8192^3), the denominator of "% of matmul rate" (4 units = 8 B^2 d);
3. the timing table, fwd+bwd with CUDA events (median): for every (B, d, dtype) the default path
   (backend="auto" = "chunked" on CUDA) and open_clip's ClipLoss; every selectable path
   ("chunked", "triton") at the sizes in SELECTABLE_CASES; ratio to open_clip, % of the matmul
   rate, extra memory (peak allocated above the inputs, and per row);
4. the CaRot step with distillation (default path) against reference.naive_carot_loss (open_clip
   logits + teacher soft targets) at B = 32768;
5. first-call latency at a new batch size (after warming up at another), per path;
6. optional (CALRFT_LOSS_CONFIG_CHECKS=1): every shipped fused-Triton configuration against the
   float64 reference (check_configs; the first H200 run checked them all: ok).

A time budget (CALRFT_LOSS_BUDGET_S, default 150 s) skips the remaining timed cases, reported as
skipped, so the whole suite (build included) stays under 5 minutes. fp32 rows are timed with
torch.backends.cuda.matmul.allow_tf32 = True for every contender (the same setting for all: the
loss follows torch's matmul precision like torch.mm), one row also at the default (ieee).

Imports without a GPU. run(device="cpu", quick=True) runs every code path on CPU tensors at tiny
sizes with a wall-clock timer (tests/test_contrastive_gpu_suite.py), so that the first GPU run
does not crash. Written for torch 2.11 + triton 3.6 on an H200: only long-standing APIs.

Environment knobs: CALRFT_LOSS_SIZES="4096,16384" restricts the timed batch sizes,
CALRFT_LOSS_QUICK=1 times only B = 4096 and 16384 and skips the fp32-ieee config checks.
"""
from __future__ import annotations

import os
import time

from .._common import torch_dtype
from ._timing import median_ms, section_device

TIMED_B = (4096, 16384, 32768, 65536)
TIMED_D = (512, 768)
# (B, d, dtype) of the selectable paths' rows (each path's autotuning / first calls cost time).
SELECTABLE_CASES = ((4096, 768, "bf16"), (32768, 768, "bf16"), (32768, 768, "fp32"),
                    (65536, 768, "bf16"))
PATHS = ("chunked", "triton")
CORRECTNESS_CASES = ((65536, 768, "bf16", False), (32768, 768, "fp32", False),
                     (32768, 768, "bf16", True),
                     # the ends of the range: B = 1M (d = 1) and d = 1024
                     (1 << 20, 1, "fp32", False), (8192, 1024, "bf16", True))
CARROT_B, CARROT_D = 32768, 768
FIRST_CALL = (24576, 768, "bf16")  # a new batch size (after 16384 / 32768 were run)
CHECK_SIZES = ((257, 1031, 513), (1000, 999, 64))  # (M, N, d): non-multiples of every tile
CHECK_TEACHER_DT = 96
SCALE = 100.0
# Max |got - ref| / max |ref| of the loss and of each gradient, per input dtype.
TOLERANCE = {"bf16": 2e-2, "fp32": 2e-3, "fp16": 1e-2}


def units_flops(b: int, d: int, units: int = 4) -> float:
    """One unit = one B x B x d product = 2 B^2 d flops."""
    return 2.0 * units * b * b * d


def tflops(flops: float, ms):
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _row(op, config, check, ms=None, flops=None, note=""):
    return {"op": op, "config": config, "check": check, "ms": ms,
            "tflops": tflops(flops, ms) if flops else None, "note": note}


def timed_cases(env=None):
    """(B, d, dtype name) of the default-path table, largest last so a failure loses the least."""
    env = os.environ if env is None else env
    sizes = TIMED_B
    if env.get("CALRFT_LOSS_SIZES"):
        sizes = tuple(int(x) for x in env["CALRFT_LOSS_SIZES"].split(","))
    elif env.get("CALRFT_LOSS_QUICK") == "1":
        sizes = TIMED_B[:2]
    return [(b, d, dt) for b in sizes for d in TIMED_D for dt in ("bf16", "fp32")]


def thin_loss_and_grads(img, txt, scale, bias, stats_forward, stats_backward):
    """The symmetric CLIP loss and its gradients from two kernel launchers (no autograd):
    loss = 0.5 [mean_i (lse_j S_ij - S_ii) + mean_j (lse_i S_ij - S_jj)]. Returns
    (loss, d img, d txt) in fp32; tested on CPU under the interpreter."""
    import torch
    b = img.shape[0]
    rows, cols = stats_forward(img, txt, scale, bias, None, None, None, True)
    diag = scale * (img.float() * txt.float()).sum(1) + bias
    loss = 0.5 * ((rows[0] - diag).mean() + (cols[0] - diag).mean())
    g = torch.full((1, b), 0.5 / b, dtype=torch.float32, device=img.device)
    dq_u, dk_u = stats_backward(g, g, img, txt, scale, bias, None, None, None, rows, cols, True)
    d_img = scale * (dq_u - txt.float() / b)  # each diagonal term has weight 2 * 0.5 / b
    d_txt = scale * (dk_u - img.float() / b)
    return loss, d_img, d_txt


def _max_rel(got, want):
    return float((got.double() - want.double()).abs().max() / (want.double().abs().max() + 1e-30))


# ----------------------------------------------------------------------------------------------
# Inputs and the steps that are timed
# ----------------------------------------------------------------------------------------------
def make_inputs(b, d, dtype_name, device, teacher=False, seed=0):
    """Unit-norm features (as CLIP passes them), scale 100, and a teacher when asked."""
    import torch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch_dtype(dtype_name)

    def unit():
        x = torch.randn(b, d, generator=gen)
        return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)

    out = {"img": unit(), "txt": unit(), "scale": torch.tensor(SCALE, device=device)}
    if teacher:
        out.update(t_img=unit(), t_txt=unit(), t_scale=torch.tensor(SCALE, device=device))
    return out


def loss_step(kind, x, backend=None):
    """A closure running forward+backward of one contender on inputs x (features require grad).
    kind: "calrft" (public op, `backend`), "calrft+distill", "open_clip", "naive_carot"."""
    from calrft_kernels import contrastive_loss
    from calrft_kernels.reference import naive_carot_loss
    img, txt, scale = x["img"], x["txt"], x["scale"]
    kw = {} if backend is None else {"backend": backend}
    if kind == "calrft":
        return lambda: contrastive_loss(img, txt, scale, **kw).backward()
    if kind == "calrft+distill":
        return lambda: contrastive_loss(img, txt, scale, teacher_image_features=x["t_img"],
                                        teacher_text_features=x["t_txt"],
                                        teacher_logit_scale=x["t_scale"], distill_weight=1.0,
                                        **kw).backward()
    if kind == "open_clip":
        from open_clip.loss import ClipLoss
        loss_fn = ClipLoss()
        return lambda: loss_fn(img, txt, scale).backward()
    if kind == "naive_carot":
        return lambda: naive_carot_loss(img, txt, scale, x["t_img"], x["t_txt"], x["t_scale"],
                                        1.0).backward()
    raise ValueError(kind)


class Device:
    """Timing and memory on one device: CUDA events and allocator statistics on a GPU; a wall
    clock and no memory figures on a CPU (the CPU smoke run of the suite's code paths)."""

    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, reps):
        return median_ms(fn, self.device, reps=reps, warmup=1)

    def reset_peak(self):
        import torch
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return None

    def peak_extra_mib(self, base):
        import torch
        if not self.cuda or base is None:
            return None
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def free_bytes(self):
        import torch
        if self.cuda:
            return torch.cuda.mem_get_info()[0]
        return 8 * 2 ** 30

    def release(self):
        import torch
        if self.cuda:
            torch.cuda.empty_cache()


def _clear_grads(x):
    for v in x.values():
        v.grad = None


def _timed(dev, kind, x, backend, reps):
    """(median ms, peak extra MiB) of forward+backward; the warm-up call absorbs compilation."""
    step = loss_step(kind, x, backend)
    base = dev.reset_peak()
    ms = dev.median_ms(step, reps)
    extra = dev.peak_extra_mib(base)
    _clear_grads(x)
    return ms, extra


def _mem_note(extra, b):
    if extra is None:
        return "memory: n/a on CPU"
    return f"peak extra {extra:.0f} MiB ({extra * 2 ** 20 / b:.0f} B/row)"


# ----------------------------------------------------------------------------------------------
# 1. correctness of the public op at large B against the device float64 chunked kernel
# ----------------------------------------------------------------------------------------------
def check_public_op(b, d, dtype_name, teacher, device="cuda"):
    """Rows: the default path's loss and feature gradients vs the float64 chunked kernel on the
    same (rounded) inputs on the device; and the difference between two identical runs."""
    import torch

    from calrft_kernels import contrastive_loss
    x = make_inputs(b, d, dtype_name, device, teacher=teacher, seed=b + d)
    extra = {}
    if teacher:
        extra = dict(teacher_image_features=x["t_img"], teacher_text_features=x["t_txt"],
                     teacher_logit_scale=x["t_scale"], distill_weight=1.0)

    def run(img, txt, **kw):
        img = img.detach().clone().requires_grad_()
        txt = txt.detach().clone().requires_grad_()
        teacher_kw = {k: (v.double() if torch.is_tensor(v) and kw.get("backend") == "chunked"
                          else v) for k, v in extra.items()}
        loss = contrastive_loss(img, txt, x["scale"], **teacher_kw, **kw)
        loss.backward()
        return loss.detach(), img.grad, txt.grad

    got = run(x["img"], x["txt"])
    again = run(x["img"], x["txt"])
    want = run(x["img"].double(), x["txt"].double(), backend="chunked")
    errs = [_max_rel(g, w) for g, w in zip(got, want)]
    repeat = max(float((a.double() - b_.double()).abs().max()) for a, b_ in zip(got, again))
    tol = TOLERANCE[dtype_name]
    ok = all(e < tol for e in errs) and all(bool(torch.isfinite(g).all()) for g in got)
    config = f"B={b} d={d} {dtype_name}" + (" teacher" if teacher else "")
    return [_row("contrastive_loss (default) vs fp64 chunked on device", config,
                 f"max rel err loss {errs[0]:.1e}, d img {errs[1]:.1e}, d txt {errs[2]:.1e} "
                 f"(tol {tol:.0e}): {'ok' if ok else 'FAIL'}",
                 note=f"two runs differ by at most {repeat:.1e} (abs)")]


# ----------------------------------------------------------------------------------------------
# 2.-5. timing
# ----------------------------------------------------------------------------------------------
def matmul_peak(n=8192, reps=20, device="cuda"):
    """Median bf16 torch.mm TFLOP/s on n x n x n (the denominator of "% of matmul rate")."""
    import torch
    dev = Device(device)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = dev.median_ms(lambda: torch.mm(a, b), reps)
    return ms, 2.0 * n ** 3 / (ms * 1e-3) / 1e12


class Budget:
    def __init__(self, seconds):
        self.deadline = time.time() + seconds

    def left(self):
        return self.deadline - time.time() > 0


def _fits(dev, b, kind, dtype_name):
    """Materialising contenders hold ~4 (ClipLoss) / ~10 (naive CaRot) B x B buffers."""
    n_buffers = {"open_clip": 4, "naive_carot": 10}.get(kind, 0)
    elt = 2 if dtype_name in ("bf16", "fp16") else 4
    need = n_buffers * b * b * elt
    return need < 0.8 * dev.free_bytes(), need


def time_losses(peak_tflops, device="cuda", reps=5, cases=None, selectable=SELECTABLE_CASES,
                budget=None):
    """The timing table (default path and open_clip at `cases`, every selectable path at
    `selectable`)."""
    import torch
    dev = Device(device)
    budget = budget or Budget(float(os.environ.get("CALRFT_LOSS_BUDGET_S", "150")))
    cases = timed_cases() if cases is None else cases
    rows = []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32: tf32 for every contender
    try:
        for b, d, dt in cases:
            config = f"B={b} d={d} {dt}"
            if not budget.left():
                rows.append(_row("contrastive fwd+bwd", config, "skipped: time budget"))
                continue
            x = make_inputs(b, d, dt, device)
            for v in (x["img"], x["txt"]):
                v.requires_grad_(True)
            flops = units_flops(b, d)
            oc_ms = None
            fits, need = _fits(dev, b, "open_clip", dt)
            if fits:
                try:
                    oc_ms, oc_extra = _timed(dev, "open_clip", x, None, reps)
                    rows.append(_row("open_clip ClipLoss fwd+bwd", config, "timed", oc_ms, flops,
                                     f"tflops counted as 4 units (it does 6); "
                                     f"{_mem_note(oc_extra, b)}"))
                except torch.cuda.OutOfMemoryError:
                    rows.append(_row("open_clip ClipLoss fwd+bwd", config, "OOM"))
                dev.release()
            else:
                rows.append(_row("open_clip ClipLoss fwd+bwd", config, "skipped",
                                 note=f"needs ~{need / 2 ** 30:.0f} GiB"))
            paths = [("auto", None)]
            paths += [(p, p) for p in PATHS if (b, d, dt) in selectable]
            for label, backend in paths:
                name = f"contrastive fwd+bwd ({label})"
                try:
                    start = time.time()
                    ms, extra = _timed(dev, "calrft", x, backend, reps)
                    ratio = f"{ms / oc_ms:.2f}x open_clip; " if oc_ms else ""
                    frac = tflops(flops, ms) / peak_tflops if peak_tflops else 0.0
                    rows.append(_row(name, config, "timed", ms, flops,
                                     f"{ratio}{frac:.0%} of bf16 mm rate (4 units); "
                                     f"{_mem_note(extra, b)}; first call+reps "
                                     f"{time.time() - start:.1f}s"))
                except Exception as exc:  # OOM or a kernel failure: report, keep going
                    rows.append(_row(name, config, "FAILED", note=repr(exc)[:200]))
                dev.release()
            del x
            dev.release()
        rows += time_ieee_row(dev, peak_tflops, reps, budget)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return rows


def time_ieee_row(dev, peak_tflops, reps, budget, b=32768, d=768):
    """fp32 at torch's default matmul precision (allow_tf32 False): both contenders."""
    import torch
    if not dev.cuda:
        b, d = 64, 8
    if not budget.left():
        return [_row("contrastive fwd+bwd fp32 ieee", f"B={b} d={d}", "skipped: time budget")]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    try:
        x = make_inputs(b, d, "fp32", dev.device)
        for v in (x["img"], x["txt"]):
            v.requires_grad_(True)
        flops = units_flops(b, d)
        oc_ms, _ = _timed(dev, "open_clip", x, None, reps)
        ms, extra = _timed(dev, "calrft", x, None, reps)
        rows.append(_row("contrastive fwd+bwd (auto), fp32 allow_tf32=False",
                         f"B={b} d={d} fp32", "timed", ms, flops,
                         f"{ms / oc_ms:.2f}x open_clip at the same setting ({oc_ms:.1f} ms); "
                         f"{_mem_note(extra, b)}"))
    except Exception as exc:
        rows.append(_row("contrastive fwd+bwd fp32 ieee", f"B={b} d={d}", "FAILED",
                         note=repr(exc)[:200]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        dev.release()
    return rows


def time_carot(peak_tflops, device="cuda", reps=5, b=CARROT_B, d=CARROT_D, budget=None):
    """The CaRot step's loss: fused with distillation (default path) vs the naive CaRot loss."""
    dev = Device(device)
    budget = budget or Budget(60)
    config = f"B={b} d={d} bf16 teacher" if dev.cuda else f"B={b} d={d} fp32 teacher"
    if not budget.left():
        return [_row("CaRot loss fwd+bwd", config, "skipped: time budget")]
    x = make_inputs(b, d, "bf16" if dev.cuda else "fp32", device, teacher=True)
    for v in (x["img"], x["txt"]):
        v.requires_grad_(True)
    flops = units_flops(b, d, units=6)
    rows = []
    naive_ms = None
    fits, need = _fits(dev, b, "naive_carot", "bf16")
    if fits:
        naive_ms, naive_extra = _timed(dev, "naive_carot", x, None, reps)
        rows.append(_row("naive CaRot loss fwd+bwd", config, "timed", naive_ms, flops,
                         f"reference.naive_carot_loss; tflops counted as 6 units; "
                         f"{_mem_note(naive_extra, b)}"))
    else:
        rows.append(_row("naive CaRot loss fwd+bwd", config, "skipped",
                         note=f"needs ~{need / 2 ** 30:.0f} GiB"))
    dev.release()
    for label, backend in (("auto", None), ("triton", "triton")):
        try:
            ms, extra = _timed(dev, "calrft+distill", x, backend, reps)
            ratio = f"{ms / naive_ms:.2f}x naive CaRot (goal <= 0.5x); " if naive_ms else ""
            frac = tflops(flops, ms) / peak_tflops if peak_tflops else 0.0
            rows.append(_row(f"contrastive+distill fwd+bwd ({label})", config, "timed", ms,
                             flops, f"{ratio}{frac:.0%} of bf16 mm rate (6 units); "
                             f"{_mem_note(extra, b)}"))
        except Exception as exc:
            rows.append(_row(f"contrastive+distill fwd+bwd ({label})", config, "FAILED",
                             note=repr(exc)[:200]))
        dev.release()
    return rows


def first_call_latency(device="cuda", case=FIRST_CALL):
    """Wall time of the first forward+backward at a batch size not run before (autotuning and
    compilation already done at other sizes), per path."""
    b, d, dt = case
    dev = Device(device)
    rows = []
    for label, backend in (("auto", None), ("chunked", "chunked"), ("triton", "triton")):
        x = make_inputs(b + (0 if dev.cuda else 0), d, dt, device, seed=5)
        for v in (x["img"], x["txt"]):
            v.requires_grad_(True)
        try:
            dev.sync()
            start = time.perf_counter()
            loss_step("calrft", x, backend)()
            dev.sync()
            took = time.perf_counter() - start
            rows.append(_row(f"first call at a new batch size ({label})", f"B={b} d={d} {dt}",
                             f"{took:.2f} s: {'ok' if took <= 1.0 else 'over'} (goal <= 1 s)",
                             took * 1e3))
        except Exception as exc:
            rows.append(_row(f"first call at a new batch size ({label})", f"B={b} d={d} {dt}",
                             "FAILED", note=repr(exc)[:200]))
        dev.release()
    return rows


# ----------------------------------------------------------------------------------------------
# 6. every shipped fused-Triton configuration (optional)
# ----------------------------------------------------------------------------------------------
def check_precisions(env=None):
    """(name, dtype, allow_tf32) checked; CALRFT_LOSS_QUICK=1 drops fp32-ieee (fewer compiles)."""
    import torch
    env = os.environ if env is None else env
    all_ = [("fp32-tf32", torch.float32, True), ("fp32-ieee", torch.float32, False),
            ("bf16", torch.bfloat16, True)]
    return [p for p in all_ if not (env.get("CALRFT_LOSS_QUICK") == "1" and p[0] == "fp32-ieee")]


def check_configs(device="cuda"):
    """Every fused-Triton forward / backward config at CHECK_SIZES, fp32 (tf32 and ieee) and bf16,
    with and without a teacher, against the float64 reference on the same rounded inputs."""
    import torch

    from calrft_kernels.reference import (contrastive_stats_grads_reference,
                                          contrastive_stats_reference)
    from calrft_kernels.triton import contrastive as tc

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for (m, n, d) in CHECK_SIZES:
        for dtype_name, dtype, tf32 in check_precisions():
            for teacher in (False, True):
                q = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
                k = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
                args = [q, k, torch.tensor(30.0), torch.tensor(-2.0)]
                if teacher:
                    args += [torch.nn.functional.normalize(
                        torch.randn(x, CHECK_TEACHER_DT, generator=gen), dim=1) for x in (m, n)]
                    args += [torch.tensor(25.0)]
                else:
                    args += [None, None, None]
                dev_args = [None if a is None else (a.to(dtype) if a.dim() == 2 else a)
                            .to(device) for a in args]
                ref_args = [None if a is None else a.double().cpu() for a in dev_args]
                r = 3 if teacher else 1
                ref_rows, ref_cols = contrastive_stats_reference(*ref_args, with_cols=True)
                g_row = torch.randn(r, m, generator=gen)
                g_col = torch.randn(r, n, generator=gen)
                gq, gk, _, _ = contrastive_stats_grads_reference(
                    *ref_args, grad_row=g_row.double(), grad_col=g_col.double())
                old_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    for ci, cfg in enumerate(tc.FORWARD_CONFIGS):
                        got_rows, got_cols = tc.stats_forward(*dev_args, True, config=cfg)
                        again_rows, again_cols = tc.stats_forward(*dev_args, True, config=cfg)
                        err = max(_max_rel(got_rows.cpu(), ref_rows),
                                  _max_rel(got_cols.cpu(), ref_cols))
                        same = bool(torch.equal(got_rows, again_rows)) and bool(
                            torch.equal(got_cols, again_cols))
                        tol = 1e-5 if dtype_name == "fp32-ieee" else 2e-3
                        rows.append(_row(
                            "triton stats_forward", f"cfg{ci} {dtype_name} teacher={teacher} "
                            f"{m}x{n}x{d}", f"max rel err {err:.1e} vs fp64: "
                            f"{'ok' if err < tol else 'FAIL'}",
                            note=f"repeat bitwise equal: {same}"))
                    good_rows, good_cols = (x.cpu().float().to(device) for x in
                                            (ref_rows, ref_cols))
                    for ci, cfg in enumerate(tc.BACKWARD_CONFIGS):
                        dq, dk = tc.stats_backward(g_row.to(device), g_col.to(device), *dev_args,
                                                   good_rows, good_cols, True, config=cfg)
                        s = float(args[2])
                        err = max(_max_rel(s * dq.cpu(), gq), _max_rel(s * dk.cpu(), gk))
                        tol = 1e-5 if dtype_name == "fp32-ieee" else 2e-2
                        rows.append(_row(
                            "triton stats_backward", f"cfg{ci} {dtype_name} teacher={teacher} "
                            f"{m}x{n}x{d}", f"max rel err {err:.1e} vs fp64: "
                            f"{'ok' if err < tol else 'FAIL'}"))
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return rows


# ----------------------------------------------------------------------------------------------
def run(device=None, quick=False) -> list[dict]:
    """Every part above. device=None: the GPU if there is one, else a single UNRUN row.
    quick=True (with device="cpu"): every code path at tiny sizes (a smoke test)."""
    device = section_device(device)
    if device is None:
        return [_row("contrastive (chunked / triton)", "-", "UNRUN: no CUDA device")]
    start = time.time()
    if quick:
        correctness = ((97, 65, "fp32", False), (130, 3, "fp32", True))
        cases = [(64, 16, "fp32"), (130, 8, "fp32")]
        selectable = ((64, 16, "fp32"),)
        carot, first = (96, 8), (80, 8, "fp32")
        peak_n, reps = 256, 2
    else:
        correctness, cases, selectable = CORRECTNESS_CASES, None, SELECTABLE_CASES
        carot, first, peak_n, reps = (CARROT_B, CARROT_D), FIRST_CALL, 8192, 5
    rows = []
    for b, d, dt, teacher in correctness:
        try:
            rows += check_public_op(b, d, dt, teacher, device=device)
        except Exception as exc:
            rows.append(_row("contrastive_loss vs fp64 chunked", f"B={b} d={d} {dt}", "FAILED",
                             note=repr(exc)[:200]))
        Device(device).release()
    rows.append(_row("correctness checks", "-", f"done in {time.time() - start:.0f}s"))
    mm_ms, peak = matmul_peak(peak_n, reps=reps, device=device)
    rows.append(_row(f"bf16 torch.mm {peak_n}^3 (rate)", "bf16", "timed", mm_ms,
                     2.0 * peak_n ** 3, "denominator of the % figures below"))
    budget = Budget(float(os.environ.get("CALRFT_LOSS_BUDGET_S", "150")))
    rows += time_losses(peak, device=device, reps=reps, cases=cases, selectable=selectable,
                        budget=budget)
    rows += time_carot(peak, device=device, reps=reps, b=carot[0], d=carot[1], budget=budget)
    rows += first_call_latency(device=device, case=first)
    if os.environ.get("CALRFT_LOSS_CONFIG_CHECKS") == "1":
        rows += check_configs(device)
    rows.append(_row("loss section", "-", f"done in {time.time() - start:.0f}s"))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
