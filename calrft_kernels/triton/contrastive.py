"""Triton kernels of the fused contrastive statistics (kernels and launchers in one module).

Contract: docs/design.md. With S = scale * q k^T + bias and, optionally, the teacher
T = tscale * tq tk^T, `stats_forward` returns

    row_stats [R, M]:  lse_j S_ij, lse_j T_ij, sum_j softmax_j(T)_ij S_ij
    col_stats [R, N]:  the same over i                    (R = 3 with a teacher, else 1)

and `stats_backward` returns dq_u = dS k and dk_u = dS^T q for the upstream gradients of those
statistics. Neither materialises anything of size M x N.

Forward: one program per block of BLOCK_M rows walks over all column blocks. Each S tile is
computed once (looping over d in BLOCK_D chunks, fp32 accumulation) and reduced twice:
  - into the program's row statistics (online max + rescaled sum-exp; with a teacher also the
    rescaled teacher sum and the softmax(T)-weighted sum of S), kept in registers;
  - into per-tile column partials (tile max, sum-exp relative to it), merged into global
    per-column state. Many row programs touch every column, so the merge must be atomic:
      * no teacher: (max, sum) packed as two fp32 into one int64 word per column, merged with a
        compare-and-swap log-add-exp loop (lock-free; a lane retries only when another program
        changed its word in between). O(N) memory, no assumed max.
      * teacher: five values per column (m0, l0, m1, l1, w1) must change together (w1 and l1
        are both relative to m1), which no 64-bit CAS can hold at fp32 precision. A spin lock per
        column block (an int32 taken with atomic_cas, released with atomic_xchg) guards a plain
        load-merge-store of the block's five vectors. O(N) memory, no assumed max.
    Programs start their column walk at different blocks (pid mod n_blocks), so at any moment
    they mostly merge into different columns and rarely wait on each other.
Backward: same walk; each tile is recomputed once, dS is formed in registers, then per d chunk
dq[rows] += dS k (rows are owned by the program: plain load-add-store, deterministic) and
dk[cols] += dS^T q with fp32 atomic adds. The atomics make dk_u NONDETERMINISTIC in the last bits
(summation order across row programs varies run to run); dq_u and the forward statistics' row
part are deterministic; the column statistics are merged in a run-dependent order as well.
Work: forward 1 product (2 with a teacher), backward 3 (4): 4 units, 6 with a teacher.

float64 is not supported by these kernels (the packed 64-bit merge holds two fp32 values):
the launchers raise TypeError for float64 inputs; dispatch float64 to the CPU or reference path.

Under TRITON_INTERPRET=1 (CPU tensors, tests) autotuning cannot run: the launchers call the
wrapped kernel with one fixed configuration, and bf16 operands are upcast to fp32 first because
the interpreter's bf16 dot is broken.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch_contract import F32, HALF_OR_F32, Launch, Ptr, is_bool, power_of_two

__all__ = ["stats_forward", "stats_backward", "FORWARD_CONFIGS", "BACKWARD_CONFIGS",
           "INTERPRETER_CONFIG", "LAUNCHES"]

# Tile shapes for Hopper (sm_90, 228 KB shared memory, 64K registers per SM). BLOCK_D is the
# reduction chunk over the feature dimension; d = 512 / 768 is walked in 8-24 chunks.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    # Two [BLOCK_M, BLOCK_N] fp32 tiles (S and T) are live with a teacher: fewer elements per
    # thread spill less (sm_90 AOT: 32 B of stack each, against 300-1500 B for the ones above).
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
]
# The interpreter runs programs one after another in numpy: small tiles keep masks exercised.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32}

# Packed column state before any merge: max = -inf (high word), sum = 0 (low word).
_PACKED_EMPTY = int(torch.tensor([0.0, float("-inf")], dtype=torch.float32)
                    .view(torch.int64).item())
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_product(a_ptr, b_ptr, rows, cols, row_ok, col_ok, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """a[rows] @ b[cols]^T for row-major a [*, K], b [*, K]: a [BLOCK_M, BLOCK_N] fp32 tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        k_ok = kk < K
        a = tl.load(a_ptr + rows[:, None] * K + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + cols[None, :] * K + kk[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _pack(m, s):
    """Two fp32 into one int64: max in the high word, sum-exp in the low word."""
    hi = m.to(tl.int32, bitcast=True).to(tl.int64) << 32
    lo = s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return hi | lo


@triton.jit
def _unpack(word):
    m = (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    s = word.to(tl.int32).to(tl.float32, bitcast=True)
    return m, s


@triton.jit
def _merge_columns_packed(packed_ptr, cols, col_ok, m_new, s_new):
    """Log-add-exp (m_new, s_new) into the packed per-column words with a CAS retry loop."""
    ptrs = packed_ptr + tl.where(col_ok, cols, 0)
    seen = tl.load(ptrs, mask=col_ok, other=0)
    pending = col_ok
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        m_old, s_old = _unpack(seen)
        m = tl.maximum(m_old, m_new)
        merged = _pack(m, s_old * tl.exp(m_old - m) + s_new * tl.exp(m_new - m))
        # Settled (and out-of-range) lanes swap 0 for 0: whatever the word holds, it is unchanged.
        expected = tl.where(pending, seen, 0)
        desired = tl.where(pending, merged, 0)
        found = tl.atomic_cas(ptrs, expected, desired, sem="relaxed")
        pending = pending & (found != seen)
        seen = found


@triton.jit
def _merge_columns_locked(stats_ptr, lock_ptr, cols, col_ok, N, cm0, cl0, cm1, cl1, cw1):
    """Merge a column block's five partials (student max/sum, teacher max/sum/weighted sum of S)
    into stats_ptr [5, N] under the block's spin lock."""
    while tl.atomic_cas(lock_ptr, 0, 1, sem="acquire") == 1:
        pass
    tl.debug_barrier()  # every thread reads after the lock is held
    p = stats_ptr + cols
    m0 = tl.load(p, mask=col_ok, other=0.0, volatile=True)
    l0 = tl.load(p + N, mask=col_ok, other=0.0, volatile=True)
    m1 = tl.load(p + 2 * N, mask=col_ok, other=0.0, volatile=True)
    l1 = tl.load(p + 3 * N, mask=col_ok, other=0.0, volatile=True)
    w1 = tl.load(p + 4 * N, mask=col_ok, other=0.0, volatile=True)
    m0_new = tl.maximum(m0, cm0)
    l0 = l0 * tl.exp(m0 - m0_new) + cl0 * tl.exp(cm0 - m0_new)
    m1_new = tl.maximum(m1, cm1)
    a_old = tl.exp(m1 - m1_new)
    a_new = tl.exp(cm1 - m1_new)
    tl.store(p, m0_new, mask=col_ok)
    tl.store(p + N, l0, mask=col_ok)
    tl.store(p + 2 * N, m1_new, mask=col_ok)
    tl.store(p + 3 * N, l1 * a_old + cl1 * a_new, mask=col_ok)
    tl.store(p + 4 * N, w1 * a_old + cw1 * a_new, mask=col_ok)
    tl.debug_barrier()  # every thread's stores precede the release
    tl.atomic_xchg(lock_ptr, 0, sem="release")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _stats_fwd_kernel(q_ptr, k_ptr, tq_ptr, tk_ptr, scale_ptr, bias_ptr, tscale_ptr,
                      row_ptr, col_packed_ptr, col_stats_ptr, col_lock_ptr,
                      M, N, D, DT, M_BUCKET, N_BUCKET,
                      HAS_TEACHER: tl.constexpr, WITH_COLS: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    m0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l0 = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_TEACHER:
        tscale = tl.load(tscale_ptr).to(tl.float32)
        m1 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l1 = tl.zeros((BLOCK_M,), tl.float32)
        w1 = tl.zeros((BLOCK_M,), tl.float32)

    n_blocks = tl.cdiv(N, BLOCK_N)
    first = pid % n_blocks
    for step in range(0, n_blocks):
        block = (first + step) % n_blocks
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = scale * _tile_product(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D,
                                  BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION) + bias
        # Rows: out-of-range columns drop out as -inf (each block has an in-range column, so
        # the running max of every row is finite after the first block).
        s_row = tl.where(col_ok[None, :], s, float("-inf"))
        m0_new = tl.maximum(m0, tl.max(s_row, axis=1))
        l0 = l0 * tl.exp(m0 - m0_new) + tl.sum(tl.exp(s_row - m0_new[:, None]), axis=1)
        m0 = m0_new
        if HAS_TEACHER:
            t = tscale * _tile_product(tq_ptr, tk_ptr, rows, cols, row_ok, col_ok, DT,
                                       BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
            t_row = tl.where(col_ok[None, :], t, float("-inf"))
            m1_new = tl.maximum(m1, tl.max(t_row, axis=1))
            p_row = tl.exp(t_row - m1_new[:, None])
            rescale = tl.exp(m1 - m1_new)
            l1 = l1 * rescale + tl.sum(p_row, axis=1)
            w1 = w1 * rescale + tl.sum(p_row * s, axis=1)
            m1 = m1_new
        if WITH_COLS:
            s_col = tl.where(row_ok[:, None], s, float("-inf"))
            cm0 = tl.where(col_ok, tl.max(s_col, axis=0), 0.0)
            cl0 = tl.sum(tl.exp(s_col - cm0[None, :]), axis=0)
            if HAS_TEACHER:
                t_col = tl.where(row_ok[:, None], t, float("-inf"))
                cm1 = tl.where(col_ok, tl.max(t_col, axis=0), 0.0)
                p_col = tl.exp(t_col - cm1[None, :])
                _merge_columns_locked(col_stats_ptr, col_lock_ptr + block, cols, col_ok, N,
                                      cm0, cl0, cm1, tl.sum(p_col, axis=0),
                                      tl.sum(p_col * s, axis=0))
            else:
                _merge_columns_packed(col_packed_ptr, cols, col_ok, cm0, cl0)

    tl.store(row_ptr + rows, m0 + tl.log(l0), mask=row_ok)
    if HAS_TEACHER:
        tl.store(row_ptr + M + rows, m1 + tl.log(l1), mask=row_ok)
        tl.store(row_ptr + 2 * M + rows, w1 / l1, mask=row_ok)


@triton.jit
def _stats_bwd_kernel(q_ptr, k_ptr, tq_ptr, tk_ptr, scale_ptr, bias_ptr, tscale_ptr,
                      grad_row_ptr, grad_col_ptr, row_ptr, col_ptr, dq_ptr, dk_ptr,
                      M, N, D, DT, M_BUCKET, N_BUCKET,
                      HAS_TEACHER: tl.constexpr, WITH_COLS: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g0 = tl.load(grad_row_ptr + rows, mask=row_ok, other=0.0)
    r0 = tl.load(row_ptr + rows, mask=row_ok, other=0.0)
    if HAS_TEACHER:
        tscale = tl.load(tscale_ptr).to(tl.float32)
        g2 = tl.load(grad_row_ptr + 2 * M + rows, mask=row_ok, other=0.0)
        r1 = tl.load(row_ptr + M + rows, mask=row_ok, other=0.0)

    n_blocks = tl.cdiv(N, BLOCK_N)
    first = pid % n_blocks
    for step in range(0, n_blocks):
        block = (first + step) % n_blocks
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = scale * _tile_product(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D,
                                  BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION) + bias
        ds = g0[:, None] * tl.exp(s - r0[:, None])
        if HAS_TEACHER:
            t = tscale * _tile_product(tq_ptr, tk_ptr, rows, cols, row_ok, col_ok, DT,
                                       BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
            ds += g2[:, None] * tl.exp(t - r1[:, None])
        if WITH_COLS:
            h0 = tl.load(grad_col_ptr + cols, mask=col_ok, other=0.0)
            c0 = tl.load(col_ptr + cols, mask=col_ok, other=0.0)
            ds += h0[None, :] * tl.exp(s - c0[None, :])
            if HAS_TEACHER:
                h2 = tl.load(grad_col_ptr + 2 * N + cols, mask=col_ok, other=0.0)
                c1 = tl.load(col_ptr + N + cols, mask=col_ok, other=0.0)
                ds += h2[None, :] * tl.exp(t - c1[None, :])
        # Out-of-range entries may hold inf * 0 garbage: where() drops them without propagation.
        ds = tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)
        ds_op = ds.to(q_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            k_tile = tl.load(k_ptr + cols[:, None] * D + dd[None, :],
                             mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            dq_ptrs = dq_ptr + rows[:, None] * D + dd[None, :]
            dq_mask = row_ok[:, None] & d_ok[None, :]
            dq_part = tl.dot(ds_op, k_tile, input_precision=INPUT_PRECISION)
            tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq_part, mask=dq_mask)
            q_tile = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=dq_mask, other=0.0)
            dk_part = tl.dot(tl.trans(ds_op), q_tile, input_precision=INPUT_PRECISION)
            tl.atomic_add(dk_ptr + cols[:, None] * D + dd[None, :], dk_part,
                          mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


# The key buckets the batch sizes (next power of two of M and N, passed as the otherwise unused
# M_BUCKET / N_BUCKET arguments): a new batch size in a tuned bucket reuses the tuned
# configuration instead of benchmarking every configuration again (first call <= 1 s).
_autotune_key = ["M_BUCKET", "N_BUCKET", "D", "DT", "HAS_TEACHER", "WITH_COLS",
                 "INPUT_PRECISION"]
# Autotuning runs the kernel several times: restore the merged column state / zero the
# accumulated gradients between trials.
_stats_fwd = triton.autotune(configs=FORWARD_CONFIGS, key=_autotune_key,
                             restore_value=["col_packed_ptr", "col_stats_ptr"])(_stats_fwd_kernel)
_stats_bwd = triton.autotune(configs=BACKWARD_CONFIGS, key=_autotune_key,
                             reset_to_zero=["dq_ptr", "dk_ptr"])(_stats_bwd_kernel)

KERNELS = {"forward": _stats_fwd_kernel, "backward": _stats_bwd_kernel}


# ---- launch contracts (launch_contract.py) -----------------------------------------------------
def _n_stats(a) -> int:
    return 3 if a.HAS_TEACHER else 1


def _same_as_q(a):
    return (a.q_ptr.dtype,)


def _same_as_tq(a):          # the teacher's pair may have its own dtype
    return (a.tq_ptr.dtype,)


def _is_bucket(size: str):
    def rule(a) -> bool:
        n, bucket = getattr(a, size), getattr(a, size + "_BUCKET")
        return power_of_two(bucket, a) and n <= bucket < 2 * max(n, 1)
    return rule


_OPERANDS = {
    "q_ptr": Ptr(lambda a: (a.M, a.D), dtypes=HALF_OR_F32),
    "k_ptr": Ptr(lambda a: (a.N, a.D), dtypes=_same_as_q),
    "tq_ptr": Ptr(lambda a: (a.M, a.DT), dtypes=HALF_OR_F32, when=lambda a: a.HAS_TEACHER),
    "tk_ptr": Ptr(lambda a: (a.N, a.DT), dtypes=_same_as_tq, when=lambda a: a.HAS_TEACHER),
    "scale_ptr": Ptr(lambda a: ()), "bias_ptr": Ptr(lambda a: ()),
    "tscale_ptr": Ptr(lambda a: (), when=lambda a: a.HAS_TEACHER),
    "row_ptr": Ptr(lambda a: (_n_stats(a), a.M)),
}
_RULES = (
    ("M_BUCKET must be the next power of two of M (the autotuning key)", _is_bucket("M")),
    ("N_BUCKET must be the next power of two of N (the autotuning key)", _is_bucket("N")),
    ("DT is 0 without a teacher", lambda a: a.HAS_TEACHER or a.DT == 0),
)
_CONSTEXPRS = {
    "HAS_TEACHER": is_bool, "WITH_COLS": is_bool, "BLOCK_M": power_of_two,
    "BLOCK_N": power_of_two, "BLOCK_D": power_of_two,
    # tf32 products only for fp32 operands; 16-bit operands use their own tensor-core path
    "INPUT_PRECISION": lambda v, a: v == "ieee" or (v == "tf32" and a.q_ptr.dtype in F32),
}
_INTS = ("M", "N", "D", "DT", "M_BUCKET", "N_BUCKET")
_INT32 = ("q_ptr", "k_ptr", "tq_ptr", "tk_ptr")


def _row_blocks(a):
    return (triton.cdiv(a.M, a.BLOCK_M),)


LAUNCHES = {
    "_stats_fwd_kernel": Launch(
        grid=_row_blocks, ints=_INTS, constexprs=_CONSTEXPRS, rules=_RULES,
        int32_offsets=_INT32,
        pointers={
            **_OPERANDS,
            # column state: packed (max, sum) words without a teacher, five planes and one lock
            # per column block with one
            "col_packed_ptr": Ptr(lambda a: (a.N,), dtypes=(torch.int64,),
                                  when=lambda a: a.WITH_COLS and not a.HAS_TEACHER),
            "col_stats_ptr": Ptr(lambda a: (5, a.N), when=lambda a: a.WITH_COLS and a.HAS_TEACHER),
            "col_lock_ptr": Ptr(lambda a: (triton.cdiv(a.N, a.BLOCK_N),), dtypes=(torch.int32,),
                                at_least=True, when=lambda a: a.WITH_COLS and a.HAS_TEACHER)}),
    "_stats_bwd_kernel": Launch(
        grid=_row_blocks, ints=_INTS, constexprs=_CONSTEXPRS, rules=_RULES,
        int32_offsets=_INT32 + ("dq_ptr", "dk_ptr"),
        pointers={
            **_OPERANDS,
            "grad_row_ptr": Ptr(lambda a: (_n_stats(a), a.M)),
            "grad_col_ptr": Ptr(lambda a: (_n_stats(a), a.N), when=lambda a: a.WITH_COLS),
            "col_ptr": Ptr(lambda a: (_n_stats(a), a.N), when=lambda a: a.WITH_COLS),
            "dq_ptr": Ptr(lambda a: (a.M, a.D)), "dk_ptr": Ptr(lambda a: (a.N, a.D))}),
}


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# User input is validated once, by calrft_kernels.contrastive.ContrastiveInputs.validate. The
# launchers below only assert the kernels' own preconditions (what the kernels index and write
# through: 2-D operands of a supported dtype and matching widths, int32 offsets, statistics of
# the right shape), because a Triton kernel that writes through a wrong shape corrupts device
# memory and the launchers are also called directly (benchmarks, tests).
def _require(ok: bool, exc, message: str) -> None:
    if not ok:
        raise exc(message)


def _assert_pair(name_a, a, name_b, b):
    for name, x in ((name_a, a), (name_b, b)):
        _require(isinstance(x, torch.Tensor) and x.dim() == 2, ValueError,
                 f"{name} must be a 2-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
        _require(x.dtype != torch.float64, TypeError,
                 f"{name}: the Triton contrastive kernels do not support float64")
        _require(x.dtype in _SUPPORTED, TypeError,
                 f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    _require(a.dtype == b.dtype, TypeError,
             f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    _require(a.device == b.device, ValueError, f"{name_a} and {name_b} must be on one device")
    _require(a.shape[1] == b.shape[1], ValueError, f"{name_a} and {name_b} need the same feature "
             f"size, got {a.shape[1]} and {b.shape[1]}")
    _require(max(a.numel(), b.numel()) < 2 ** 31, ValueError,
             f"{name_a}/{name_b} too large for the kernels' int32 offsets")


def _prepare(q, k, scale, bias, tq, tk, tscale):
    """Assert the preconditions; return contiguous operands (bf16 upcast under the interpreter),
    0-dim fp32 scalars on the device, and whether there is a teacher."""
    _assert_pair("q", q, "k", k)
    _require(q.shape[0] > 0 and k.shape[0] > 0, ValueError, "q and k need at least one row each")
    has_teacher = tq is not None or tk is not None
    if has_teacher:
        _require(tq is not None and tk is not None and tscale is not None, ValueError,
                 "tq, tk and tscale must be given together")
        _assert_pair("tq", tq, "tk", tk)
        _require(tq.shape[0] == q.shape[0] and tk.shape[0] == k.shape[0] and
                 tq.device == q.device, ValueError, f"teacher rows must match: tq "
                 f"{tuple(tq.shape)} vs q {tuple(q.shape)}, tk {tuple(tk.shape)} vs k "
                 f"{tuple(k.shape)}, on q's device")

    def operand(x):
        if x is None:
            return None
        if _interpreted() and x.dtype == torch.bfloat16:
            x = x.float()  # the interpreter's bf16 dot is broken
        return x.contiguous()

    def scalar(name, x):
        if x is None:
            return None
        x = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        _require(x.numel() == 1, ValueError,
                 f"{name} must be a 0-dim tensor, got shape {tuple(x.shape)}")
        return x.to(device=q.device, dtype=torch.float32).reshape(())

    sc, bi = scalar("scale", scale), scalar("bias", bias)
    return (operand(q), operand(k), sc, bi, operand(tq), operand(tk),
            scalar("tscale", tscale) if has_teacher else sc, has_teacher)


def _bucket(x: int) -> int:
    """Autotuning bucket of a batch size: its next power of two."""
    return 1 << max(0, int(x) - 1).bit_length()


def _input_precision(dtype) -> str:
    if dtype == torch.float32 and not _interpreted() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(autotuned, grid, args, config, **constexprs):
    """Autotuned on a GPU; a fixed configuration under the interpreter (autotuning needs a GPU)
    or when `config` (a triton.Config, e.g. from FORWARD_CONFIGS, for checks) is given."""
    if config is not None:
        autotuned.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                           num_stages=config.num_stages)
    elif _interpreted():
        autotuned.fn[grid](*args, **constexprs, **INTERPRETER_CONFIG)
    else:
        autotuned[grid](*args, **constexprs)


def stats_forward(q, k, scale, bias, tq: Optional[torch.Tensor] = None,
                  tk: Optional[torch.Tensor] = None, tscale=None, with_cols: bool = True, *,
                  config: Optional[triton.Config] = None):
    """(row_stats fp32 [R, M], col_stats fp32 [R, N] or [R, 0]); see the module docstring."""
    q, k, scale, bias, tq, tk, tscale, has_teacher = _prepare(q, k, scale, bias, tq, tk, tscale)
    m, d = q.shape
    n = k.shape[0]
    r = 3 if has_teacher else 1
    dev = q.device
    row_stats = torch.empty(r, m, dtype=torch.float32, device=dev)
    dummy = row_stats
    packed = locked = locks = dummy
    if with_cols and has_teacher:
        empty = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, 0.0], device=dev)
        locked = empty[:, None].repeat(1, n)  # (m0, l0, m1, l1, w1) per column
        locks = torch.zeros(n, dtype=torch.int32, device=dev)  # >= one per column block
    elif with_cols:
        packed = torch.full((n,), _PACKED_EMPTY, dtype=torch.int64, device=dev)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _launch(_stats_fwd, grid,
            (q, k, tq if has_teacher else q, tk if has_teacher else k, scale, bias, tscale,
             row_stats, packed, locked, locks, m, n, d, tq.shape[1] if has_teacher else 0,
             _bucket(m), _bucket(n)),
            config, HAS_TEACHER=has_teacher, WITH_COLS=bool(with_cols),
            INPUT_PRECISION=_input_precision(q.dtype))
    if not with_cols:
        return row_stats, row_stats.new_empty(r, 0)
    if has_teacher:
        col_stats = torch.stack([locked[0] + locked[1].log(), locked[2] + locked[3].log(),
                                 locked[4] / locked[3]])
    else:
        pairs = packed.view(torch.float32).view(n, 2)  # little endian: (sum, max)
        col_stats = (pairs[:, 1] + pairs[:, 0].log()).unsqueeze(0)
    return row_stats, col_stats


def _stats_operand(name, x, shape, dev):
    _require(isinstance(x, torch.Tensor) and tuple(x.shape) == shape, ValueError,
             f"{name} must have shape {shape}, got {getattr(x, 'shape', None)}")
    return x.to(device=dev, dtype=torch.float32).contiguous()


def stats_backward(grad_row, grad_col, q, k, scale, bias, tq=None, tk=None, tscale=None,
                   row_stats=None, col_stats=None, with_cols: bool = True, *,
                   config: Optional[triton.Config] = None):
    """(dq_u fp32 [M, d], dk_u fp32 [N, d]): dS k and dS^T q for upstream gradients
    grad_row [R, M], grad_col [R, N] (rows 1, the teacher log-sum-exps, are ignored)."""
    q, k, scale, bias, tq, tk, tscale, has_teacher = _prepare(q, k, scale, bias, tq, tk, tscale)
    m, d = q.shape
    n = k.shape[0]
    r = 3 if has_teacher else 1
    dev = q.device
    grad_row = _stats_operand("grad_row", grad_row, (r, m), dev)
    row_stats = _stats_operand("row_stats", row_stats, (r, m), dev)
    if with_cols:
        grad_col = _stats_operand("grad_col", grad_col, (r, n), dev)
        col_stats = _stats_operand("col_stats", col_stats, (r, n), dev)
    else:
        grad_col = col_stats = row_stats  # never read
    dq = torch.zeros(m, d, dtype=torch.float32, device=dev)
    dk = torch.zeros(n, d, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _launch(_stats_bwd, grid,
            (q, k, tq if has_teacher else q, tk if has_teacher else k, scale, bias, tscale,
             grad_row, grad_col, row_stats, col_stats, dq, dk,
             m, n, d, tq.shape[1] if has_teacher else 0, _bucket(m), _bucket(n)),
            config, HAS_TEACHER=has_teacher, WITH_COLS=bool(with_cols),
            INPUT_PRECISION=_input_precision(q.dtype))
    return dq, dk
