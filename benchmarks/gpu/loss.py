"""GPU suite section "loss": the Triton contrastive kernels on a CUDA device.

    run() -> list[dict]   (rows: op, config, check, ms, tflops, note; see benchmarks/gpu_suite.py)

1. checks every shipped kernel configuration (forced, no autotuning) against the float64
   reference at a few awkward sizes, fp32 (tf32 and ieee) and bf16, forward statistics and the
   backward's dq_u / dk_u; and whether two identical forward runs agree (atomics: column
   statistics may differ in the last bits);
2. times forward + backward of the loss (4 units = 8 B^2 d flops) with CUDA events, through
   calrft_kernels.contrastive_loss(..., backend="triton") when it exists, else through the
   launchers plus a thin O(B d) composition (`thin_loss_and_grads`), against open_clip's ClipLoss
   (where memory allows) and a measured bf16 torch.mm peak.

Imports without a GPU (torch / triton are imported inside functions). Written for torch 2.11 +
triton 3.6 on an H200: only long-standing APIs.

Environment knobs: CALRFT_LOSS_SIZES="4096,16384" restricts the timed batch sizes,
CALRFT_LOSS_QUICK=1 times only B=4096 and 16384 and skips the fp32-ieee checks.
"""
from __future__ import annotations

import os
import time

from ._timing import cuda_median_ms as _events_ms

TIMED_B = (4096, 16384, 32768, 65536)
TIMED_D = (512, 768)
CHECK_SIZES = ((257, 1031, 513), (1000, 999, 64))  # (M, N, d): non-multiples of every tile
CHECK_TEACHER_DT = 96


def units_flops(b: int, d: int, units: int = 4) -> float:
    """One unit = one B x B x d product = 2 B^2 d flops."""
    return 2.0 * units * b * b * d


def tflops(flops: float, ms):
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _row(op, config, check, ms=None, flops=None, note=""):
    return {"op": op, "config": config, "check": check, "ms": ms,
            "tflops": tflops(flops, ms) if flops else None, "note": note}


def timed_cases(env=None):
    """(B, d, dtype name) of the timed runs, largest last so a failure loses the least."""
    env = os.environ if env is None else env
    sizes = TIMED_B
    if env.get("CALRFT_LOSS_SIZES"):
        sizes = tuple(int(x) for x in env["CALRFT_LOSS_SIZES"].split(","))
    elif env.get("CALRFT_LOSS_QUICK") == "1":
        sizes = TIMED_B[:2]
    return [(b, d, dt) for b in sizes for d in TIMED_D for dt in ("bf16", "fp32")]


def thin_loss_and_grads(img, txt, scale, bias, stats_forward, stats_backward):
    """The symmetric CLIP loss and its gradients from the two launchers (no autograd):
    loss = 0.5 [mean_i (lse_j S_ij - S_ii) + mean_j (lse_i S_ij - S_jj)]. Returns
    (loss, d img, d txt) in fp32. Used for timing when the public op is not available, and
    tested on CPU under the interpreter."""
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


def _public_op():
    try:
        from calrft_kernels import contrastive_loss
        return contrastive_loss
    except ImportError:
        return None


def _max_rel(got, want):
    return float((got.double() - want).abs().max() / (want.abs().max() + 1e-30))


def check_precisions(env=None):
    """(name, dtype, allow_tf32) checked; CALRFT_LOSS_QUICK=1 drops fp32-ieee (fewer compiles)."""
    import torch
    env = os.environ if env is None else env
    all_ = [("fp32-tf32", torch.float32, True), ("fp32-ieee", torch.float32, False),
            ("bf16", torch.bfloat16, True)]
    return [p for p in all_ if not (env.get("CALRFT_LOSS_QUICK") == "1" and p[0] == "fp32-ieee")]


def check_configs(device="cuda"):
    """Every forward / backward config at CHECK_SIZES, fp32 (tf32 and ieee) and bf16, with and
    without a teacher, against the float64 reference on the same rounded inputs."""
    import torch

    from calrft_kernels.reference import contrastive_stats_reference
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
                gq, gk = _reference_grads(ref_args, g_row, g_col)
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


def _reference_grads(ref_args, g_row, g_col):
    import torch

    from calrft_kernels.reference import contrastive_stats_reference
    q = ref_args[0].clone().requires_grad_()
    k = ref_args[1].clone().requires_grad_()
    rows, cols = contrastive_stats_reference(q, k, *ref_args[2:], with_cols=True)
    keep = torch.ones(rows.shape[0], 1, dtype=torch.float64)
    if rows.shape[0] == 3:
        keep[1] = 0.0
    loss = (g_row.double() * keep * rows).sum() + (g_col.double() * keep * cols).sum()
    return torch.autograd.grad(loss, (q, k))


def matmul_peak(n=8192, reps=20):
    """Median bf16 torch.mm TFLOP/s on n x n x n (the denominator of 'fraction of peak')."""
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _events_ms(lambda: torch.mm(a, b), reps)
    return ms, 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def time_losses(peak_tflops, reps=5):
    import torch

    from calrft_kernels.triton import contrastive as tc
    rows = []
    op = _public_op()
    via = "calrft_kernels.contrastive_loss(backend='triton')" if op else "launchers + thin"
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 timed in tf32 (ieee: see the checks)
    try:
        for b, d, dt in timed_cases():
            dtype = torch.bfloat16 if dt == "bf16" else torch.float32
            img = torch.nn.functional.normalize(torch.randn(b, d, device="cuda"), dim=1).to(dtype)
            txt = torch.nn.functional.normalize(torch.randn(b, d, device="cuda"), dim=1).to(dtype)
            scale = torch.tensor(100.0, device="cuda")
            bias = torch.tensor(0.0, device="cuda")
            flops = units_flops(b, d)
            img.requires_grad_(True)
            txt.requires_grad_(True)
            if op is not None:
                def fused():
                    op(img, txt, scale, backend="triton").backward()
            else:
                def fused():
                    thin_loss_and_grads(img.detach(), txt.detach(), scale, bias,
                                        tc.stats_forward, tc.stats_backward)
            config = f"B={b} d={d} {dt}"
            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                start = time.time()
                ms = _events_ms(fused, reps)
                extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                frac = tflops(flops, ms) / peak_tflops
                rows.append(_row("contrastive fwd+bwd (triton)", config, "timed", ms, flops,
                                 f"{frac:.0%} of bf16 mm peak; peak extra {extra:.0f} MiB; "
                                 f"via {via}; first call+reps {time.time() - start:.1f}s"))
            except Exception as exc:  # OOM or a kernel failure: report, keep going
                rows.append(_row("contrastive fwd+bwd (triton)", config, "FAILED", note=repr(exc)[:200]))
            rows.append(_time_clip_loss(img, txt, scale, config, flops, reps))
            img.grad = txt.grad = None
            del img, txt
            torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return rows


def _time_clip_loss(img, txt, scale, config, flops, reps):
    import torch
    try:
        from open_clip.loss import ClipLoss
    except Exception as exc:
        return _row("open_clip ClipLoss fwd+bwd", config, "skipped", note=f"no open_clip: {exc}")
    loss_fn = ClipLoss()
    b = img.shape[0]
    # ClipLoss holds ~4 B x B logit-sized buffers (two products, softmax, grads).
    need = 4 * b * b * img.element_size()
    free, _ = torch.cuda.mem_get_info()
    if need > 0.8 * free:
        return _row("open_clip ClipLoss fwd+bwd", config, "skipped",
                    note=f"needs ~{need / 2 ** 30:.0f} GiB, {free / 2 ** 30:.0f} GiB free")
    try:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = _events_ms(lambda: loss_fn(img, txt, scale).backward(), reps)
        extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return _row("open_clip ClipLoss fwd+bwd", config, "timed", ms, flops,
                    f"tflops counted as 4 units (it does 6); peak extra {extra:.0f} MiB")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return _row("open_clip ClipLoss fwd+bwd", config, "OOM")


def run() -> list[dict]:
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        return [_row("contrastive (triton)", "-", "UNRUN: no CUDA device")]
    rows = check_configs()
    mm_ms, peak = matmul_peak()
    rows.append(_row("bf16 torch.mm 8192^3 (peak)", "bf16", "timed", mm_ms,
                     2.0 * 8192 ** 3, "denominator of the fractions below"))
    rows += time_losses(peak)
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
