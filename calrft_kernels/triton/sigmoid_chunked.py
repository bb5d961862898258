"""The Triton pass of the sigmoid family's chunked kernel (calrft_kernels/sigmoid_chunked.py,
docs/design.md "The sigmoid loss").

The chunked kernel computes each row chunk's raw product X = q_c k^T (and the teacher's
T = tq_c tk^T) with cuBLAS into an fp32 [C, N] buffer; `chunk_pairs` is the single pass over
it. Every program owns one [BLOCK_M, BLOCK_N] tile and, from one read of X (and T):

  - forms S = scale X + bias and the pair terms l = softplus(-z S), SD = BCE(sigmoid(S),
    sigmoid(T)) and G = dl/dS + w dSD/dS (z = +1 on positive pairs, -1 elsewhere);
  - writes its tile's partial sums (sum l, sum SD, sum G, sum G X) to its own slot of a small
    [4, tiles] array (summed in torch: no atomics, deterministic);
  - with gradients, writes G times a power-of-two factor in the operands' dtype for the two
    gradient GEMMs (over X itself when that dtype is fp32).

Numerics as in the C++ kernel (csrc/cpu/sigmoid.cpp): every term from e = exp(-|S|) and
log(1 + e), sums of non-negative parts, so nothing cancels and any finite S gives finite terms.
log(1 + e) is a short series below 2^-4 (where the tiny terms of well-separated negatives live:
relative error below fp32's rounding, whatever the accuracy of the GPU's log) and
log(v) e / (v - 1), v = 1 + e, above.

Elementwise work with a fixed tile: no autotuning. Offsets are int64 (C x N exceeds 2^31 at
B = 1M). Under TRITON_INTERPRET=1 (CPU tensors, tests) the kernel runs with INTERPRETER_CONFIG.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .contrastive_chunked import _logits_tile, _interpreted
from .launch_contract import HALF_OR_F32, Launch, Ptr, is_bool, power_of_two

__all__ = ["chunk_pairs", "CONFIG", "INTERPRETER_CONFIG", "KERNELS", "LAUNCHES", "PARTS"]

# The shipped configuration (compiled ahead of time for sm_90 in tests/test_triton_aot.py):
# 16 elements per thread; with a teacher and labels 110 registers and no spills (a 32 x 256
# tile needed all 255).
CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1)
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
PARTS = 4  # per tile: sum l, sum SD, sum G, sum G X


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], accurate to fp32 rounding relative to the result."""
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * (0.2 - e * (1.0 / 6.0))))))
    v = 1.0 + e
    # v - 1 >= 2^-4 wherever the second form is taken; the bound keeps the other lanes finite
    return tl.where(e < 0.0625, series, tl.log(v) * (e / tl.maximum(v - 1.0, 0.0625)))


@triton.jit
def _sigmoid_parts(a):
    """(log(1 + e), sigmoid(|a|), sigmoid(-|a|)) with e = exp(-|a|)."""
    e = tl.exp(-tl.abs(a))
    inv = 1.0 / (1.0 + e)
    return _log1p_unit(e), inv, e * inv


@triton.jit
def _sigmoid_chunk_kernel(x_ptr, t_ptr, g_ptr, part_ptr, scale_ptr, bias_ptr, tscale_ptr,
                          tbias_ptr, qlabels_ptr, klabels_ptr, row0, C, N, weight, factor,
                          HAS_TEACHER: tl.constexpr, HAS_LABELS: tl.constexpr,
                          WITH_GRADS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows, cols, row_ok, col_ok, ok, offs, s, x = _logits_tile(x_ptr, scale_ptr, bias_ptr, pm, pn,
                                                              C, N, BLOCK_M, BLOCK_N)
    if HAS_LABELS:
        ql = tl.load(qlabels_ptr + rows, mask=row_ok, other=0)
        kl = tl.load(klabels_ptr + cols, mask=col_ok, other=1)
        positive = ql[:, None] == kl[None, :]
    else:
        positive = (rows.to(tl.int64)[:, None] + row0) == cols.to(tl.int64)[None, :]
    l1p, sig_abs, sig_neg_abs = _sigmoid_parts(s)
    nonneg = s >= 0.0
    sig_s = tl.where(nonneg, sig_abs, sig_neg_abs)        # sigmoid(S)
    # l = softplus(-z S) = max(-z S, 0) + log(1 + e); G = -z sigmoid(-z S), each sigmoid
    # taken from its own side (no 1 - sigmoid cancellation)
    loss = tl.where(positive, tl.maximum(-s, 0.0), tl.maximum(s, 0.0)) + l1p
    g = tl.where(positive, -tl.where(nonneg, sig_neg_abs, sig_abs), sig_s)
    sd = tl.zeros_like(s)
    if HAS_TEACHER:
        tscale = tl.load(tscale_ptr)
        tbias = tl.load(tbias_ptr)
        t = tscale * tl.load(t_ptr + offs, mask=ok, other=0.0) + tbias
        _, tsig_abs, tsig_neg_abs = _sigmoid_parts(t)
        target = tl.where(t >= 0.0, tsig_abs, tsig_neg_abs)   # sigmoid(T)
        # SD = log(1 + e) + sigmoid(T) max(-S, 0) + (1 - sigmoid(T)) max(S, 0)
        sd = l1p + target * tl.maximum(-s, 0.0) + (1.0 - target) * tl.maximum(s, 0.0)
        g += weight * (sig_s - target)
    loss = tl.where(ok, loss, 0.0)
    sd = tl.where(ok, sd, 0.0)
    g = tl.where(ok, g, 0.0)
    slot = pm * tl.num_programs(1) + pn
    plane = tl.num_programs(0) * tl.num_programs(1)
    tl.store(part_ptr + slot, tl.sum(tl.sum(loss, axis=1), axis=0))
    tl.store(part_ptr + plane + slot, tl.sum(tl.sum(sd, axis=1), axis=0))
    tl.store(part_ptr + 2 * plane + slot, tl.sum(tl.sum(g, axis=1), axis=0))
    if WITH_GRADS:
        tl.store(part_ptr + 3 * plane + slot, tl.sum(tl.sum(g * x, axis=1), axis=0))
        tl.store(g_ptr + offs, (g * factor).to(g_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(part_ptr + 3 * plane + slot, 0.0)


KERNELS = {"pairs": _sigmoid_chunk_kernel}


# ---- launch contract (launch_contract.py) ------------------------------------------------------
def _tile_grid(a):
    return (triton.cdiv(a.C, a.BLOCK_M), triton.cdiv(a.N, a.BLOCK_N))


_BUFFER = Ptr(lambda a: (a.C, a.N))                      # the fp32 chunk buffer, row-major
_SCALAR = Ptr(lambda a: ())                              # a 0-dim fp32 device scalar
_LABELS = (torch.int64,)
LAUNCHES = {
    "_sigmoid_chunk_kernel": Launch(
        grid=_tile_grid, ints=("row0", "C", "N"), floats=("weight", "factor"),
        constexprs={"HAS_TEACHER": is_bool, "HAS_LABELS": is_bool, "WITH_GRADS": is_bool,
                    "BLOCK_M": power_of_two, "BLOCK_N": power_of_two},
        pointers={
            "x_ptr": _BUFFER,
            "t_ptr": dataclasses.replace(_BUFFER, when=lambda a: a.HAS_TEACHER),
            # G in the operands' dtype (for the gradient GEMMs)
            "g_ptr": dataclasses.replace(_BUFFER, dtypes=HALF_OR_F32,
                                         when=lambda a: a.WITH_GRADS),
            "part_ptr": Ptr(lambda a: (PARTS, a.grid[0] * a.grid[1])),
            "scale_ptr": _SCALAR, "bias_ptr": _SCALAR,
            "tscale_ptr": dataclasses.replace(_SCALAR, when=lambda a: a.HAS_TEACHER),
            "tbias_ptr": dataclasses.replace(_SCALAR, when=lambda a: a.HAS_TEACHER),
            "qlabels_ptr": Ptr(lambda a: (a.C,), dtypes=_LABELS, when=lambda a: a.HAS_LABELS),
            "klabels_ptr": Ptr(lambda a: (a.N,), dtypes=_LABELS, when=lambda a: a.HAS_LABELS)},
        rules=(("factor must be a power of two (G is unscaled exactly)",
                lambda a: a.factor > 0 and math.frexp(a.factor)[0] == 0.5),
               ("weight must be finite and >= 0", lambda a: 0.0 <= a.weight < math.inf))),
}


def _config() -> triton.Config:
    return INTERPRETER_CONFIG if _interpreted() else CONFIG


def chunk_pairs(x, t, scale, bias, tscale, tbias, qlabels, klabels, row0: int, weight: float,
                g_dtype, factor: float = 1.0, with_grads: bool = True):
    """Same result as calrft_kernels.sigmoid_chunked.chunk_pairs_torch: (G [C, N] in g_dtype,
    times `factor`, written over x when g_dtype is float32; None without with_grads, and
    sums [4] = (sum l, sum SD, sum G, sum G X) in float64) from one read of the fp32 buffer x
    [C, N] (and t). qlabels [C] / klabels [N] int64 or both None (then the positives are
    column == row0 + row)."""
    c, n = x.shape
    teacher = t is not None
    labels = qlabels is not None
    cfg = _config()
    grid = (triton.cdiv(c, cfg.kwargs["BLOCK_M"]), triton.cdiv(n, cfg.kwargs["BLOCK_N"]))
    part = torch.empty(PARTS, grid[0] * grid[1], dtype=torch.float32, device=x.device)
    g = None
    if with_grads:
        g = x if g_dtype == torch.float32 else torch.empty(c, n, dtype=g_dtype, device=x.device)
    _sigmoid_chunk_kernel[grid](
        x, t if teacher else x, x if g is None else g, part, scale, bias,
        tscale if teacher else scale, tbias if teacher else bias,
        qlabels if labels else part, klabels if labels else part, int(row0), c, n,
        float(weight), float(factor), HAS_TEACHER=teacher, HAS_LABELS=labels,
        WITH_GRADS=bool(with_grads), **cfg.kwargs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return g, part.sum(1, dtype=torch.float64)
