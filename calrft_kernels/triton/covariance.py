"""Centred batch covariance in Triton: Sigma = Zc^T Zc / (B - correction), Zc = Z - mean(Z).

Why two passes: with a feature mean much larger than the spread, the one-pass formula
(Z^T Z - B m m^T) cancels catastrophically in fp32 (kernels.md section 2). So
  1. `_column_sum_kernel` sums the columns of Z over row chunks (one partial per chunk, combined
     in a fixed order: deterministic) -> mean, in fp32 (fp64 for fp64 input);
  2. `_centred_gram_kernel` forms Zc^T Zc tile by tile, subtracting the mean while it loads each
     tile (no centred copy of Z is ever written). Sigma is symmetric, so only the upper-triangular
     tile pairs (i <= j) are computed; each is stored twice (at (i, j) and, transposed, at (j, i)).
The rows are split into chunks as well (split-K): with B = 65536 and d = 512 there are only 10
tile pairs of 128, far fewer than the 132 SMs of an H100/H200, so every (pair, chunk) program
writes its own partial and the partials are summed in a fixed order afterwards.

Operands of the tile product: bf16/fp16 inputs are centred in fp32 and rounded back to their own
16-bit type for the tensor cores (wgmma on Hopper), accumulating in fp32; fp32 inputs use
"tf32x3" (three TF32 products: about fp32 accuracy on tensor cores); fp64 stays fp64 throughout.
The centred values are small (of the order of the spread, not of the mean), so rounding them
costs relative accuracy of the spread, never of the mean.

Under TRITON_INTERPRET=1 (CPU tensors, tests) the autotuner cannot run, so the launcher calls the
wrapped kernel with one fixed configuration, and bf16 operands are upcast to fp32 because the
interpreter's bf16 dot is broken (kernels.md section 3).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .launch_contract import FLOAT, Launch, Ptr, power_of_two

# Autotuned on a GPU, per operand kind; every entry is compiled ahead of time for sm_90 by the
# tests, which also check that it fits Hopper's shared memory without register spills (fp32 as
# tf32x3 keeps hi/lo operand copies and fp64 tiles are twice as wide: they get smaller shapes).
GRAM_CONFIGS = {
    "16bit": [
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ],
    "fp64": [
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ],
}
INTERPRETER_GRAM_CONFIG = {"BLOCK_D": 32, "BLOCK_K": 32}
# Row chunks are a multiple of the largest BLOCK_K, so no config sees a ragged chunk start.
ROW_CHUNK_ALIGN = max(c.kwargs["BLOCK_K"] for cs in GRAM_CONFIGS.values() for c in cs)
# The column-sum pass is memory bound and simple: one fixed shape everywhere.
SUM_BLOCK_ROWS = 64
SUM_BLOCK_COLS = 64
SUM_NUM_WARPS = 4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _column_sum_kernel(z_ptr, partial_ptr, n_rows, n_cols, stride_row, stride_col,
                       rows_per_chunk, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """partial[chunk, c] = sum of z[r, c] over the rows r of this chunk, in partial's dtype."""
    col_block = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, n_rows)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=partial_ptr.dtype.element_ty)
    col_offsets = cols.to(tl.int64)[None, :] * stride_col
    for r0 in range(row_start, row_end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        x = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_row + col_offsets,
                    mask=mask, other=0.0)
        acc += x.to(partial_ptr.dtype.element_ty)
    tl.store(partial_ptr + chunk.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _upper_tile_pair(pair):
    """Linear program id -> tile pair (i, j), i <= j, enumerating (0,0),(0,1),(1,1),(0,2),...

    j is the row of `pair` in the lower-triangular enumeration: j(j+1)/2 <= pair < (j+1)(j+2)/2.
    The fp32 square root can be off by one for large ids; the two fix-ups make it exact.
    """
    j = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pair, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pair, j + 1, j)
    i = pair - j * (j + 1) // 2
    return i, j


@triton.jit
def _load_centred(z_ptr, mean, rows, row_ok, cols, col_ok, stride_row, stride_col,
                  OPERAND: tl.constexpr):
    """[BLOCK_K, BLOCK_D] tile of Z - mean, exactly 0 outside the matrix (a masked row must not
    contribute -mean), centred in mean's precision and then rounded to the operand type."""
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_row
                + cols.to(tl.int64)[None, :] * stride_col, mask=mask, other=0.0)
    centred = tl.where(mask, x.to(mean.dtype) - mean[None, :], 0.0)
    return centred.to(OPERAND)


@triton.jit
def _centred_gram_kernel(z_ptr, mean_ptr, out_ptr, n_rows, n_cols, stride_row, stride_col,
                         rows_per_chunk, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[chunk] (+ tile pair (i, j) and its mirror) = sum over the chunk's rows of
    (z_r - mean)_I^T (z_r - mean)_J, unscaled, in out's dtype (fp32, or fp64 for fp64)."""
    tile_i, tile_j = _upper_tile_pair(tl.program_id(0))
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    cols_i = tile_i * BLOCK_D + offs
    cols_j = tile_j * BLOCK_D + offs
    ok_i = cols_i < n_cols
    ok_j = cols_j < n_cols
    mean_i = tl.load(mean_ptr + cols_i, mask=ok_i, other=0.0)
    mean_j = tl.load(mean_ptr + cols_j, mask=ok_j, other=0.0)
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, n_rows)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        a = _load_centred(z_ptr, mean_i, rows, row_ok, cols_i, ok_i, stride_row, stride_col,
                          OPERAND)
        b = _load_centred(z_ptr, mean_j, rows, row_ok, cols_j, ok_j, stride_row, stride_col,
                          OPERAND)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    # A diagonal tile takes its lower half from its upper half, so Sigma is exactly symmetric
    # whatever order the tensor cores summed in.
    upper = (tile_i != tile_j) | (offs[:, None] <= offs[None, :])
    acc = tl.where(upper, acc, tl.trans(acc))
    out = out_ptr + chunk.to(tl.int64) * n_cols * n_cols
    mask = ok_i[:, None] & ok_j[None, :]
    tl.store(out + cols_i.to(tl.int64)[:, None] * n_cols + cols_j[None, :], acc, mask=mask)
    tl.store(out + cols_j.to(tl.int64)[:, None] * n_cols + cols_i[None, :], tl.trans(acc),
             mask=ok_j[:, None] & ok_i[None, :])


_centred_gram_autotuned = {
    kind: triton.autotune(configs=configs, key=["n_cols", "rows_per_chunk"])(_centred_gram_kernel)
    for kind, configs in GRAM_CONFIGS.items()}


# ---- launch contracts (launch_contract.py) -----------------------------------------------------
def _acc(a):
    return (accumulate_dtype(a.z_ptr.dtype),)


def _chunks(a) -> int:
    return triton.cdiv(a.n_rows, a.rows_per_chunk)


# The dot's operand type per input dtype: z's own type (bf16 becomes fp32 only in the
# interpreter, whose bf16 dot is broken), never a narrower one; and the precisions tl.dot
# accepts for it.
_OPERANDS = {torch.float64: (tl.float64,), torch.float32: (tl.float32,),
             torch.float16: (tl.float16,), torch.bfloat16: (tl.bfloat16,)}
_PRECISIONS = {tl.float64: ("ieee",), tl.float32: ("ieee", "tf32", "tf32x3"),
               tl.float16: ("ieee",), tl.bfloat16: ("ieee",)}


def _operand_rule(v, a) -> bool:
    allowed = _OPERANDS[a.z_ptr.dtype]
    if a.interpreted and a.z_ptr.dtype == torch.bfloat16:
        allowed = (tl.float32,)
    return v in allowed


_Z = Ptr(lambda a: (a.n_rows, a.n_cols), dtypes=FLOAT,
         strides=lambda a: (a.stride_row, a.stride_col))
_STRIDED = ("n_rows", "n_cols", "stride_row", "stride_col", "rows_per_chunk")
_CHUNK_RULE = ("rows_per_chunk must be >= 1", lambda a: a.rows_per_chunk >= 1)
LAUNCHES = {
    "_column_sum_kernel": Launch(
        grid=lambda a: (triton.cdiv(a.n_cols, a.BLOCK_COLS), _chunks(a)), ints=_STRIDED,
        constexprs={"BLOCK_ROWS": power_of_two, "BLOCK_COLS": power_of_two},
        pointers={"z_ptr": _Z, "partial_ptr": Ptr(lambda a: (a.grid[1], a.n_cols), dtypes=_acc)},
        rules=(_CHUNK_RULE,)),
    "_centred_gram_kernel": Launch(
        grid=lambda a: (_pairs(a.n_cols, a.BLOCK_D), _chunks(a)), ints=_STRIDED,
        constexprs={"OPERAND": _operand_rule,
                    "PRECISION": lambda v, a: v in _PRECISIONS.get(a.OPERAND, ()),
                    "BLOCK_D": power_of_two, "BLOCK_K": power_of_two},
        pointers={"z_ptr": _Z, "mean_ptr": Ptr(lambda a: (a.n_cols,), dtypes=_acc),
                  "out_ptr": Ptr(lambda a: (a.grid[1], a.n_cols, a.n_cols), dtypes=_acc)},
        rules=(_CHUNK_RULE,)),
}


def config_kind(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")


def operand_and_precision(dtype: torch.dtype, interpreted: bool):
    """(operand dtype of tl.dot, input_precision) for an input dtype (see the module doc)."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32x3"
    if dtype == torch.bfloat16:
        return (tl.float32, "ieee") if interpreted else (tl.bfloat16, "ieee")
    return tl.float16, "ieee"


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: no reason to split


def plan_row_chunks(n_rows: int, work_items: int, target_programs: int, align: int,
                    min_rows: int) -> tuple[int, int]:
    """(chunks, rows_per_chunk): enough chunks that work_items * chunks reaches target_programs,
    each chunk at least min_rows rows and a multiple of `align`, and none empty."""
    wanted = max(1, math.ceil(target_programs / max(1, work_items)))
    wanted = min(wanted, max(1, n_rows // min_rows))
    rows_per_chunk = math.ceil(math.ceil(n_rows / wanted) / align) * align
    return math.ceil(n_rows / rows_per_chunk), rows_per_chunk


def _check_inputs(z, correction):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [B, d], got shape {tuple(z.shape)}")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"z must have at least one row and one column, got {tuple(z.shape)}")
    if isinstance(correction, bool) or not isinstance(correction, (int, float)):
        raise TypeError(f"correction must be a number (int or float), got "
                        f"{type(correction).__name__}")
    if not math.isfinite(correction) or correction < 0 or z.shape[0] - correction <= 0:
        raise ValueError(f"correction must satisfy 0 <= correction < B = {z.shape[0]}, "
                         f"got {correction}")
    interpreted = _interpreted()
    if not (z.device.type == "cuda" or (z.device.type == "cpu" and interpreted)):
        raise ValueError(f"z must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), "
                         f"got a {z.device.type} tensor")
    return interpreted


def column_mean(z: torch.Tensor, interpreted: bool) -> torch.Tensor:
    """Mean of the columns of z [B, d], in fp32 (fp64 for fp64), by chunked partial sums."""
    n_rows, n_cols = z.shape
    col_blocks = triton.cdiv(n_cols, SUM_BLOCK_COLS)
    chunks, rows_per_chunk = plan_row_chunks(
        n_rows, col_blocks, 2 * _target_programs(z.device), SUM_BLOCK_ROWS, 4 * SUM_BLOCK_ROWS)
    partial = torch.empty(chunks, n_cols, dtype=accumulate_dtype(z.dtype), device=z.device)
    _column_sum_kernel[(col_blocks, chunks)](z, partial, n_rows, n_cols, z.stride(0), z.stride(1),
                                             rows_per_chunk, BLOCK_ROWS=SUM_BLOCK_ROWS,
                                             BLOCK_COLS=SUM_BLOCK_COLS, num_warps=SUM_NUM_WARPS)
    return partial.sum(0).div_(n_rows)


def covariance_triton(z: torch.Tensor, correction: float = 1, *, row_chunks: int | None = None):
    """(Sigma [d, d], mean [d]) of the rows of z [B, d]; both fp32 (fp64 for fp64 input).

    row_chunks forces the number of row chunks (split-K) - for tests of the chunked path;
    by default it is chosen so that the GPU has about two programs per SM."""
    interpreted = _check_inputs(z, correction)
    n_rows, n_cols = z.shape
    mean = column_mean(z, interpreted)
    if row_chunks is None:
        largest_tile = max(c.kwargs["BLOCK_D"] for c in GRAM_CONFIGS[config_kind(z.dtype)])
        pairs_at_largest_tile = _pairs(n_cols, largest_tile)
        chunks, rows_per_chunk = plan_row_chunks(
            n_rows, pairs_at_largest_tile, _target_programs(z.device), ROW_CHUNK_ALIGN,
            8 * ROW_CHUNK_ALIGN)
    else:
        if isinstance(row_chunks, bool) or not isinstance(row_chunks, int) or row_chunks < 1:
            raise ValueError(f"row_chunks must be a positive int, got {row_chunks!r}")
        rows_per_chunk = math.ceil(n_rows / row_chunks)
        chunks = math.ceil(n_rows / rows_per_chunk)
    partial = torch.empty(chunks, n_cols, n_cols, dtype=mean.dtype, device=z.device)
    operand, precision = operand_and_precision(z.dtype, interpreted)
    args = (z, mean, partial, n_rows, n_cols, z.stride(0), z.stride(1), rows_per_chunk, operand,
            precision)
    if interpreted:
        grid = (_pairs(n_cols, INTERPRETER_GRAM_CONFIG["BLOCK_D"]), chunks)
        _centred_gram_kernel[grid](*args, **INTERPRETER_GRAM_CONFIG)  # the autotuner needs a GPU
    else:
        kernel = _centred_gram_autotuned[config_kind(z.dtype)]
        kernel[lambda meta: (_pairs(n_cols, meta["BLOCK_D"]), chunks)](*args)
    cov = partial[0] if chunks == 1 else partial.sum(0)
    return cov.div_(n_rows - correction), mean


def _pairs(n_cols: int, block_d: int) -> int:
    tiles = triton.cdiv(n_cols, block_d)
    return tiles * (tiles + 1) // 2
