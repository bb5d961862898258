"""Triton passes of the chunked contrastive kernel (calrft_kernels/chunked.py, docs/design.md).

The chunked kernel computes each row chunk's raw product X = q_c k^T (and T = tq_c tk^T) with
cuBLAS into an fp32 [C, N] buffer; these two kernels are the single pass over that buffer:

  chunk_stats  reads X (and T) once; every program owns one [BLOCK_M, BLOCK_N] tile and writes
               its row partials (max, sum-exp; with a teacher also the teacher's max, sum-exp
               and softmax(T)-weighted sum of S) per column tile, and its column partials per
               row tile. The small partial arrays (~5% of the buffer at the shipped 64 x 128
               tile) are merged with log-add-exp in torch (chunked.reduce_partials): no
               atomics, no locks, deterministic.
  chunk_ds     turns the buffer into dS = g0 e^(S - r0) + h0 e^(S - c0) (+ teacher terms),
               times a power-of-two factor, written in the operands' dtype for the backward
               GEMMs (in place when that dtype is fp32).

Elementwise work with fixed tiles: no autotuning, so a new batch size never retunes. Offsets
are int64 (C x N exceeds 2^31 at B = 1M). Under TRITON_INTERPRET=1 (CPU tensors, tests) the
kernels run with INTERPRETER_CONFIG (small tiles keep the masks exercised).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from .launch_contract import HALF_OR_F32, Launch, Ptr, is_bool, power_of_two

__all__ = ["chunk_stats", "chunk_ds", "CONFIGS", "INTERPRETER_CONFIG", "KERNELS", "LAUNCHES"]

# One shipped configuration per kernel (compiled ahead of time for sm_90 in
# tests/test_triton_aot.py).
CONFIGS = {
    "stats": triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=1),
    "ds": triton.Config({"BLOCK_M": 32, "BLOCK_N": 256}, num_warps=8, num_stages=1),
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _logits_tile(x_ptr, scale_ptr, bias_ptr, pm, pn, C, N, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Tile (pm, pn) of the chunk buffer as logits S = scale * x + bias, with its row / column
    indices, their masks, the element offsets and the raw product x (shared by both passes and
    by the sigmoid family's pass, triton/sigmoid_chunked.py)."""
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    s = scale * x + bias
    return rows, cols, row_ok, col_ok, ok, offs, s, x


@triton.jit
def _chunk_stats_kernel(x_ptr, t_ptr, scale_ptr, bias_ptr, tscale_ptr, row_part_ptr,
                        col_part_ptr, C, N, HAS_TEACHER: tl.constexpr, WITH_COLS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    p_m = tl.num_programs(0)
    p_n = tl.num_programs(1)
    rows, cols, row_ok, col_ok, ok, offs, s, _ = _logits_tile(x_ptr, scale_ptr, bias_ptr, pm, pn,
                                                              C, N, BLOCK_M, BLOCK_N)
    # Row partials of this column tile -> row_part[k, pn, row] (k-major, [K, p_n, C]).
    s_row = tl.where(col_ok[None, :], s, float("-inf"))
    m0 = tl.max(s_row, axis=1)
    l0 = tl.sum(tl.exp(s_row - m0[:, None]), axis=1)
    rp = row_part_ptr + pn.to(tl.int64) * C + rows
    plane_r = p_n.to(tl.int64) * C
    tl.store(rp, m0, mask=row_ok)
    tl.store(rp + plane_r, l0, mask=row_ok)
    if HAS_TEACHER:
        tscale = tl.load(tscale_ptr)
        t = tscale * tl.load(t_ptr + offs, mask=ok, other=0.0)
        t_row = tl.where(col_ok[None, :], t, float("-inf"))
        m1 = tl.max(t_row, axis=1)
        p = tl.exp(t_row - m1[:, None])
        tl.store(rp + 2 * plane_r, m1, mask=row_ok)
        tl.store(rp + 3 * plane_r, tl.sum(p, axis=1), mask=row_ok)
        tl.store(rp + 4 * plane_r, tl.sum(p * s, axis=1), mask=row_ok)
    if WITH_COLS:
        # Column partials of this row tile -> col_part[k, pm, col] ([K, p_m, N]).
        s_col = tl.where(row_ok[:, None], s, float("-inf"))
        cm0 = tl.max(s_col, axis=0)
        cl0 = tl.sum(tl.exp(s_col - cm0[None, :]), axis=0)
        cp = col_part_ptr + pm.to(tl.int64) * N + cols
        plane_c = p_m.to(tl.int64) * N
        tl.store(cp, cm0, mask=col_ok)
        tl.store(cp + plane_c, cl0, mask=col_ok)
        if HAS_TEACHER:
            t_col = tl.where(row_ok[:, None], t, float("-inf"))
            cm1 = tl.max(t_col, axis=0)
            q = tl.exp(t_col - cm1[None, :])
            tl.store(cp + 2 * plane_c, cm1, mask=col_ok)
            tl.store(cp + 3 * plane_c, tl.sum(q, axis=0), mask=col_ok)
            tl.store(cp + 4 * plane_c, tl.sum(q * s, axis=0), mask=col_ok)


@triton.jit
def _chunk_ds_kernel(x_ptr, t_ptr, ds_ptr, scale_ptr, bias_ptr, tscale_ptr, g0_ptr, r0_ptr,
                     g2_ptr, r1_ptr, h0_ptr, c0_ptr, h2_ptr, c1_ptr, factor, C, N,
                     HAS_TEACHER: tl.constexpr, WITH_COLS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows, cols, row_ok, col_ok, ok, offs, s, _ = _logits_tile(x_ptr, scale_ptr, bias_ptr, pm, pn,
                                                              C, N, BLOCK_M, BLOCK_N)
    g0 = tl.load(g0_ptr + rows, mask=row_ok, other=0.0)
    r0 = tl.load(r0_ptr + rows, mask=row_ok, other=0.0)
    ds = g0[:, None] * tl.exp(s - r0[:, None])
    if WITH_COLS:
        h0 = tl.load(h0_ptr + cols, mask=col_ok, other=0.0)
        c0 = tl.load(c0_ptr + cols, mask=col_ok, other=0.0)
        ds += h0[None, :] * tl.exp(s - c0[None, :])
    if HAS_TEACHER:
        tscale = tl.load(tscale_ptr)
        t = tscale * tl.load(t_ptr + offs, mask=ok, other=0.0)
        g2 = tl.load(g2_ptr + rows, mask=row_ok, other=0.0)
        r1 = tl.load(r1_ptr + rows, mask=row_ok, other=0.0)
        ds += g2[:, None] * tl.exp(t - r1[:, None])
        if WITH_COLS:
            h2 = tl.load(h2_ptr + cols, mask=col_ok, other=0.0)
            c1 = tl.load(c1_ptr + cols, mask=col_ok, other=0.0)
            ds += h2[None, :] * tl.exp(t - c1[None, :])
    ds = ds * factor
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)


KERNELS = {"stats": _chunk_stats_kernel, "ds": _chunk_ds_kernel}


# ---- launch contracts (launch_contract.py) -----------------------------------------------------
def _partials(a) -> int:
    return 5 if a.HAS_TEACHER else 2


def _tile_grid(a):
    return (triton.cdiv(a.C, a.BLOCK_M), triton.cdiv(a.N, a.BLOCK_N))


def _teacher(a) -> bool:
    return a.HAS_TEACHER


def _cols(a) -> bool:
    return a.WITH_COLS


_BUFFER = Ptr(lambda a: (a.C, a.N))                      # the fp32 chunk buffer, row-major
_SCALAR = Ptr(lambda a: ())                              # a 0-dim fp32 device scalar
_ROWS = Ptr(lambda a: (a.C,))
_COLS = Ptr(lambda a: (a.N,), when=_cols)
_FLAGS = {"HAS_TEACHER": is_bool, "WITH_COLS": is_bool, "BLOCK_M": power_of_two,
          "BLOCK_N": power_of_two}
LAUNCHES = {
    "_chunk_stats_kernel": Launch(
        grid=_tile_grid, ints=("C", "N"), constexprs=_FLAGS,
        pointers={
            "x_ptr": _BUFFER, "t_ptr": dataclasses.replace(_BUFFER, when=_teacher),
            "scale_ptr": _SCALAR, "bias_ptr": _SCALAR,
            "tscale_ptr": dataclasses.replace(_SCALAR, when=_teacher),
            # row partials [K, column tiles, C]; column partials [K, row tiles, N]
            "row_part_ptr": Ptr(lambda a: (_partials(a), a.grid[1], a.C)),
            "col_part_ptr": Ptr(lambda a: (_partials(a), a.grid[0], a.N), when=_cols)}),
    "_chunk_ds_kernel": Launch(
        grid=_tile_grid, ints=("C", "N"), floats=("factor",), constexprs=_FLAGS,
        pointers={
            "x_ptr": _BUFFER, "t_ptr": dataclasses.replace(_BUFFER, when=_teacher),
            # dS in the operands' dtype (for the backward GEMMs)
            "ds_ptr": dataclasses.replace(_BUFFER, dtypes=HALF_OR_F32),
            "scale_ptr": _SCALAR, "bias_ptr": _SCALAR,
            "tscale_ptr": dataclasses.replace(_SCALAR, when=_teacher),
            "g0_ptr": _ROWS, "r0_ptr": _ROWS,
            "g2_ptr": dataclasses.replace(_ROWS, when=_teacher),
            "r1_ptr": dataclasses.replace(_ROWS, when=_teacher),
            "h0_ptr": _COLS, "c0_ptr": _COLS,
            "h2_ptr": Ptr(lambda a: (a.N,), when=lambda a: a.HAS_TEACHER and a.WITH_COLS),
            "c1_ptr": Ptr(lambda a: (a.N,), when=lambda a: a.HAS_TEACHER and a.WITH_COLS)},
        rules=(("factor must be a power of two (dS is unscaled exactly)",
                lambda a: a.factor > 0 and math.frexp(a.factor)[0] == 0.5),)),
}


def _config(name: str) -> triton.Config:
    return INTERPRETER_CONFIG if _interpreted() else CONFIGS[name]


def _launch(kernel, name, c, n, args, **constexprs):
    cfg = _config(name)
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    grid = (triton.cdiv(c, bm), triton.cdiv(n, bn))
    kernel[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages)
    return grid


def chunk_stats(x, t, scale, bias, tscale, with_cols: bool):
    """Same result as calrft_kernels.chunked.chunk_stats_torch (row partials [K, C], column
    partials [K, N] or None) from one read of the fp32 buffer x [C, N] (and t). x, t are not
    modified here."""
    from ..chunked import reduce_partials
    c, n = x.shape
    teacher = t is not None
    k_rows = 5 if teacher else 2
    cfg = _config("stats")
    p_m = triton.cdiv(c, cfg.kwargs["BLOCK_M"])
    p_n = triton.cdiv(n, cfg.kwargs["BLOCK_N"])
    row_part = torch.empty(k_rows, p_n, c, dtype=torch.float32, device=x.device)
    col_part = (torch.empty(k_rows, p_m, n, dtype=torch.float32, device=x.device)
                if with_cols else row_part)
    _launch(_chunk_stats_kernel, "stats", c, n,
            (x, t if teacher else x, scale, bias, tscale if teacher else scale, row_part,
             col_part, c, n), HAS_TEACHER=teacher, WITH_COLS=bool(with_cols))
    rows = reduce_partials(row_part)
    cols = reduce_partials(col_part) if with_cols else None
    return rows, cols


def chunk_ds(x, t, scale, bias, tscale, g0, r0, g2, r1, h0, c0, h2, c1, out_dtype,
             factor: float = 1.0):
    """Same result as calrft_kernels.chunked.chunk_ds_torch: dS [C, N] in out_dtype (written
    over x when out_dtype is float32)."""
    c, n = x.shape
    teacher = t is not None
    with_cols = h0 is not None
    ds = x if out_dtype == torch.float32 else torch.empty(c, n, dtype=out_dtype, device=x.device)
    dummy = g0
    _launch(_chunk_ds_kernel, "ds", c, n,
            (x, t if teacher else x, ds, scale, bias, tscale if teacher else scale,
             g0.contiguous(), r0.contiguous(),
             g2.contiguous() if teacher else dummy, r1.contiguous() if teacher else dummy,
             h0.contiguous() if with_cols else dummy, c0.contiguous() if with_cols else dummy,
             h2.contiguous() if teacher and with_cols else dummy,
             c1.contiguous() if teacher and with_cols else dummy, float(factor), c, n),
            HAS_TEACHER=teacher, WITH_COLS=with_cols)
    return ds
