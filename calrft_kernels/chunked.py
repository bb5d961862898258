"""The "chunked" kernel of calrft::contrastive_stats: cuBLAS-rate GEMMs on bounded row chunks.

Contract: docs/design.md ("Kernel contract"), the same as the C++ and fused Triton kernels.
For each chunk of C rows of q (docs/design.md, "The chunked backend"):

forward   X = q_c k^T (one GEMM into an fp32 [C, N] buffer; + the teacher's T_c = tq_c tk^T),
          then ONE pass over the buffer gives the chunk's row statistics and its column
          partials (max, sum-exp [, teacher max, sum-exp, softmax(T)-weighted S]), merged into
          the running column state in O(N).
backward  recompute X (and T), turn it into dS with one fused pass, then dq_c = dS k and
          dk += dS^T q_c (two GEMMs).
Work: 1 + 3 products = 4 units; with a teacher 2 + 4 = 6 units (tests count them with
torch.utils.flop_counter). Extra memory: the [C, N] buffer(s), plus O((M + N) d) for the outputs.

The pass over the buffer is a fused Triton kernel on CUDA (calrft_kernels/triton/
contrastive_chunked.py) and the plain-torch functions `chunk_stats_torch` / `chunk_ds_torch`
below on CPU tensors (and for float64), with identical semantics; tests run both on CPU tensors
(Triton under TRITON_INTERPRET=1) and compare them.

Precision: fp32 operands go through torch.mm and so follow torch's matmul precision setting
(torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision). fp16/bf16 operands
(CUDA only; a CPU caller upcasts them) use cuBLAS's half GEMM with fp32 output
(`torch.mm(a, b, out_dtype=torch.float32)`, in torch since 2.8: the H200 has torch 2.11); where
that overload is missing, the operands are upcast to fp32 (exact: every bf16/fp16 value is an
fp32 value; slower). dS is rounded to the operand dtype for the backward GEMMs (as the fused
Triton kernel does); fp16 dS is pre-scaled by a power of two so that O(1/B) gradients do not
underflow fp16's range, and the products are unscaled in fp32.

Memory bound (user setting): `chunk_rows` (argument of contrastive_loss), else
MAX_BUFFER_BYTES below: C = MAX_BUFFER_BYTES // (bytes per buffer row), so the chunk buffers
never exceed it. The default (512 MiB) keeps the whole extra memory of a forward+backward at
B = 65536, d = 768 under ~1.5 GiB (docs/design.md has the arithmetic).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import compute_dtype

__all__ = ["stats_forward", "stats_backward", "chunk_rows_for", "chunk_stats_torch",
           "chunk_ds_torch", "merge_partials", "finalize_partials", "MAX_BUFFER_BYTES", "addmm_acc",
           "mm_acc", "gradient_gemms", "fp16_factor", "use_triton", "device_scalar"]

MAX_BUFFER_BYTES = 512 * 2 ** 20
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Sizing
# ----------------------------------------------------------------------------------------------
def chunk_rows_for(m: int, n: int, dtype: torch.dtype, teacher: bool, chunk_rows: int = 0) -> int:
    """Rows per chunk: `chunk_rows` when given (> 0), else as many as MAX_BUFFER_BYTES holds
    (one fp32/fp64 buffer per product, plus the half gradient buffer: the softmax family's dS,
    the sigmoid family's G), rounded down to a multiple of 128 rows when that many fit; never
    more than m. The one sizing seam of both families' chunked kernels."""
    if chunk_rows > 0:
        return max(1, min(int(chunk_rows), m))
    acc = 8 if dtype == torch.float64 else 4
    per_row = n * (acc * (2 if teacher else 1) + (2 if dtype in _HALF else 0))
    rows = max(1, MAX_BUFFER_BYTES // max(per_row, 1))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(rows, m))


# ----------------------------------------------------------------------------------------------
# GEMMs with an fp32 (or fp64) result
# ----------------------------------------------------------------------------------------------
_OUT_DTYPE_OK: dict = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """Whether torch.mm(half, half, out_dtype=torch.float32) exists here (CUDA, torch >= 2.8)."""
    key = str(device)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


_ADDMM_OUT_DTYPE_OK: dict = {}


def _addmm_out_dtype_correct(device: torch.device) -> bool:
    """Whether torch.addmm(fp32 c, half a, half b, out_dtype=torch.float32) exists here AND gives
    c + a b on a small probe (its fp32-`self` form was fixed only in late 2025, pytorch #167931;
    a wrong or missing overload falls back to a product plus an add)."""
    key = str(device)
    if key not in _ADDMM_OUT_DTYPE_OK:
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            a, b = (torch.randn(8, 16, generator=g).to(device, torch.bfloat16) for _ in range(2))
            c = torch.randn(8, 8, generator=g).to(device)
            got = torch.addmm(c, a, b.T, out_dtype=torch.float32)
            want = c + a.float() @ b.float().T
            ok = got.dtype == torch.float32 and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _ADDMM_OUT_DTYPE_OK[key] = ok
    return _ADDMM_OUT_DTYPE_OK[key]


def addmm_acc(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """c + a @ b for an fp32/fp64 accumulator c: in place for operands of c's dtype; for half
    operands one cuBLAS GEMM with beta = 1 and an fp32 result (no [N, d] fp32 product to add
    afterwards) where the overload is correct here, else the product plus an add."""
    if a.dtype == c.dtype:
        return torch.addmm(c, a, b, out=c)  # in place; aten.addmm (FlopCounterMode counts it)
    if a.is_cuda and _addmm_out_dtype_correct(a.device):
        return torch.addmm(c, a, b, out_dtype=c.dtype)
    return c.add_(mm_acc(a, b))


def gradient_gemms(ds: Tensor, q_c: Tensor, k: Tensor, dq_c: Tensor, dk: Tensor) -> Tensor:
    """The two gradient GEMMs of one chunk, shared by both families' chunked kernels: dq_c =
    ds k (written into the chunk's rows of the fp32/fp64 dq) and dk + ds^T q_c, returned (in
    place where the dtypes allow). ds [C, N] is in the operands' dtype or the accumulator's."""
    if ds.dtype == dq_c.dtype:
        torch.mm(ds, k, out=dq_c)
    else:
        dq_c.copy_(mm_acc(ds, k))
    return addmm_acc(dk, ds.T, q_c)


def mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (fp64 for fp64 operands) result. fp32/fp64: torch.mm, which follows the
    matmul precision setting. Half operands: cuBLAS half GEMM with fp32 output, else upcast."""
    if a.dtype not in _HALF:
        return torch.mm(a, b)
    if _out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


# ----------------------------------------------------------------------------------------------
# Partials: (m0, l0) or (m0, l0, m1, l1, w1) per row / column, merged by log-add-exp
# ----------------------------------------------------------------------------------------------
def _empty_partials(k_rows: int, n: int, dtype, device) -> Tensor:
    part = torch.zeros(k_rows, n, dtype=dtype, device=device)
    part[0] = float("-inf")
    if k_rows == 5:
        part[2] = float("-inf")
    return part


def merge_partials(a: Tensor, b: Tensor) -> Tensor:
    """Log-add-exp merge of two partial states [K, L] (K = 2: max, sum-exp; K = 5: also the
    teacher's max, sum-exp and softmax(T)-weighted sum of S, both relative to the teacher max).
    `a` may hold the empty state (max -inf, sums 0)."""
    out = torch.empty_like(a)
    m = torch.maximum(a[0], b[0])
    out[0] = m
    out[1] = a[1] * torch.exp(a[0] - m).nan_to_num_(0.0) + b[1] * torch.exp(b[0] - m)
    if a.shape[0] == 5:
        mt = torch.maximum(a[2], b[2])
        ea, eb = torch.exp(a[2] - mt).nan_to_num_(0.0), torch.exp(b[2] - mt)
        out[2] = mt
        out[3] = a[3] * ea + b[3] * eb
        out[4] = a[4] * ea + b[4] * eb
    return out


def reduce_partials(part: Tensor) -> Tensor:
    """Merge partials [K, P, L] over P (e.g. one per tile of a chunk) into [K, L]."""
    m = part[0].amax(0)
    out = [m, (part[1] * torch.exp(part[0] - m)).sum(0)]
    if part.shape[0] == 5:
        mt = part[2].amax(0)
        e = torch.exp(part[2] - mt)
        out += [mt, (part[3] * e).sum(0), (part[4] * e).sum(0)]
    return torch.stack(out)


def finalize_partials(part: Tensor) -> Tensor:
    """[K, L] partials -> the statistics [R, L]: lse S, and with a teacher lse T and
    sum softmax(T) S."""
    lse = part[0] + torch.log(part[1])
    if part.shape[0] == 2:
        return lse.unsqueeze(0)
    return torch.stack([lse, part[2] + torch.log(part[3]), part[4] / part[3]])


# ----------------------------------------------------------------------------------------------
# The per-chunk passes in plain torch (CPU tensors, float64, and the Triton kernels' reference)
# ----------------------------------------------------------------------------------------------
def chunk_stats_torch(x: Tensor, t: Optional[Tensor], scale: Tensor, bias: Tensor,
                      tscale: Optional[Tensor], with_cols: bool):
    """One chunk's buffer x = q_c k^T [C, N] (raw product; t likewise for the teacher) ->
    (row partials [K, C], column partials [K, N] or None). x is overwritten with S."""
    s = x.mul_(scale).add_(bias)
    rows, cols = [], []
    m = s.amax(1)
    rows += [m, torch.exp(s - m[:, None]).sum(1)]
    if with_cols:
        cm = s.amax(0)
        cols += [cm, torch.exp(s - cm[None, :]).sum(0)]
    if t is not None:
        tt = t.mul_(tscale)
        m1 = tt.amax(1)
        p = torch.exp(tt - m1[:, None])
        rows += [m1, p.sum(1), (p * s).sum(1)]
        if with_cols:
            c1 = tt.amax(0)
            p = torch.exp(tt - c1[None, :], out=p)
            cols += [c1, p.sum(0), (p * s).sum(0)]
    return torch.stack(rows), (torch.stack(cols) if with_cols else None)


def chunk_ds_torch(x: Tensor, t: Optional[Tensor], scale, bias, tscale, g0, r0, g2, r1,
                   h0, c0, h2, c1, out_dtype: torch.dtype, factor: float = 1.0) -> Tensor:
    """dS of one chunk (docs/design.md), times `factor`, in out_dtype:
    dS = g0 e^(S - r0) + g2 e^(T - r1) + h0 e^(S - c0) + h2 e^(T - c1) (column terms when h0 is
    given; teacher terms when t is given). x (the raw product) is overwritten."""
    s = x.mul_(scale).add_(bias)
    ds = torch.exp(s - r0[:, None]).mul_(g0[:, None])
    if h0 is not None:
        ds += torch.exp(s - c0[None, :]).mul_(h0[None, :])
    if t is not None:
        tt = t.mul_(tscale)
        ds += torch.exp(tt - r1[:, None]).mul_(g2[:, None])
        if h0 is not None:
            ds += torch.exp(tt - c1[None, :]).mul_(h2[None, :])
    if factor != 1.0:
        ds.mul_(factor)
    return ds.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def use_triton(x: Tensor, fused: Optional[bool]) -> bool:
    """The fused Triton pass runs on CUDA tensors with an fp32 buffer; `fused` forces it on or
    off (tests run it on CPU tensors under TRITON_INTERPRET=1)."""
    if fused is not None:
        return fused
    if x.device.type != "cuda" or x.dtype == torch.float64:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton ships with torch on CUDA
        return False
    return True


def device_scalar(x, dtype, device) -> Tensor:
    return torch.as_tensor(x, dtype=dtype, device=device).reshape(())


def fp16_factor(dtype: torch.dtype, m: int, n: int, bound: Optional[float] = None) -> float:
    """Power-of-two pre-scale of a gradient buffer before rounding to fp16 (1 for every other
    dtype), so that its small entries stay in fp16's normal range; the fp32 products are divided
    back exactly. Without `bound` (the softmax family's dS, entries O(1/B), below fp16's
    normal range at large B): 2^ceil(log2 max(m, n)). With `bound`, the largest magnitude an
    entry can have (the sigmoid family's G: |G| < 1 + distill_weight): the largest power of two
    keeping bound x factor <= 2^15, below fp16's largest finite value (65504)."""
    if dtype != torch.float16:
        return 1.0
    if bound is None:
        return float(2 ** math.ceil(math.log2(max(m, n))))
    return float(2 ** (15 - math.ceil(math.log2(max(bound, 1.0)))))


def stats_forward(q: Tensor, k: Tensor, scale, bias, tq: Optional[Tensor] = None,
                  tk: Optional[Tensor] = None, tscale=None, with_cols: bool = True, *,
                  chunk_rows: int = 0, fused: Optional[bool] = None):
    """(row_stats [R, M], col_stats [R, N] or [R, 0]) of the kernel contract, chunk by chunk."""
    assert q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1], "q, k: [M, d], [N, d]"
    m, n = q.shape[0], k.shape[0]
    teacher = tq is not None
    acc = compute_dtype(q.dtype)
    dev = q.device
    scale, bias = device_scalar(scale, acc, dev), device_scalar(bias, acc, dev)
    tscale = device_scalar(tscale, acc, dev) if teacher else None
    c = chunk_rows_for(m, n, q.dtype, teacher, chunk_rows)
    k_rows = 5 if teacher else 2
    row_stats = torch.empty(3 if teacher else 1, m, dtype=acc, device=dev)
    cols = _empty_partials(k_rows, n, acc, dev) if with_cols else None
    triton_pass = use_triton(q, fused) and acc == torch.float32
    if triton_pass:
        from .triton import contrastive_chunked as tcc
    for c0 in range(0, m, c):
        c1 = min(m, c0 + c)
        x = mm_acc(q[c0:c1], k.T)
        t = mm_acc(tq[c0:c1], tk.T) if teacher else None
        if triton_pass:
            row_part, col_part = tcc.chunk_stats(x, t, scale, bias, tscale, with_cols)
        else:
            row_part, col_part = chunk_stats_torch(x, t, scale, bias, tscale, with_cols)
        row_stats[:, c0:c1] = finalize_partials(row_part)
        if with_cols:
            cols = merge_partials(cols, col_part)
        del x, t
    r = row_stats.shape[0]
    col_stats = finalize_partials(cols) if with_cols else row_stats.new_empty(r, 0)
    return row_stats, col_stats.contiguous()


def stats_backward(grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor, scale, bias,
                   tq: Optional[Tensor] = None, tk: Optional[Tensor] = None, tscale=None,
                   row_stats: Optional[Tensor] = None, col_stats: Optional[Tensor] = None,
                   with_cols: bool = True, *, chunk_rows: int = 0, fused: Optional[bool] = None):
    """(dq_u = dS k [M, d], dk_u = dS^T q [N, d]) of the kernel contract, chunk by chunk."""
    m, n = q.shape[0], k.shape[0]
    teacher = tq is not None
    acc = compute_dtype(q.dtype)
    dev = q.device
    r = 3 if teacher else 1
    assert row_stats is not None and tuple(row_stats.shape) == (r, m), "row_stats: [R, M]"
    assert tuple(grad_row.shape) == (r, m), "grad_row: [R, M]"
    if with_cols:
        assert tuple(col_stats.shape) == (r, n) and tuple(grad_col.shape) == (r, n), "[R, N]"
    scale, bias = device_scalar(scale, acc, dev), device_scalar(bias, acc, dev)
    tscale = device_scalar(tscale, acc, dev) if teacher else None
    g, rs = grad_row.to(acc), row_stats.to(acc)
    h, cs = (grad_col.to(acc), col_stats.to(acc)) if with_cols else (None, None)
    c = chunk_rows_for(m, n, q.dtype, teacher, chunk_rows)
    factor = fp16_factor(q.dtype, m, n)
    dq = torch.empty(m, q.shape[1], dtype=acc, device=dev)
    dk = torch.zeros(n, k.shape[1], dtype=acc, device=dev)
    triton_pass = use_triton(q, fused) and acc == torch.float32
    if triton_pass:
        from .triton import contrastive_chunked as tcc
    col_args = (h[0], cs[0], h[2] if teacher else None, cs[1] if teacher else None) \
        if with_cols else (None, None, None, None)
    for c0 in range(0, m, c):
        c1 = min(m, c0 + c)
        x = mm_acc(q[c0:c1], k.T)
        t = mm_acc(tq[c0:c1], tk.T) if teacher else None
        row_args = (g[0, c0:c1], rs[0, c0:c1], g[2, c0:c1] if teacher else None,
                    rs[1, c0:c1] if teacher else None)
        if triton_pass:
            ds = tcc.chunk_ds(x, t, scale, bias, tscale, *row_args, *col_args, q.dtype, factor)
        else:
            ds = chunk_ds_torch(x, t, scale, bias, tscale, *row_args, *col_args, q.dtype, factor)
        del x, t
        dk = gradient_gemms(ds, q[c0:c1], k, dq[c0:c1], dk)
        del ds
    if factor != 1.0:
        dq.div_(factor)
        dk.div_(factor)
    return dq, dk
