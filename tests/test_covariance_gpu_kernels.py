"""GPU kernels of the centred batch covariance, verified without a GPU (kernels.md section 3).

* Triton: the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) and are
  compared with a float64 two-pass reference at awkward sizes; they are also compiled ahead of
  time for sm_90 (every autotune config, every dtype) in a subprocess without the interpreter.
* CUDA C++: the kernels cannot run here. Their index maths lives in csrc/cuda/covariance_tiles.cuh,
  which a small C++ driver (below) compiles with the host compiler to (a) check every mapping
  exhaustively and (b) emulate the whole tiled algorithm - same chunk plans, same staging, same
  micro tiles, same fp32 FMA order, same workspace layout and mirroring - on the CPU, compared with
  the float64 reference. The extension build itself is checked for the covariance_cuda symbol and
  its input checks (which run before any device work, so CPU tensors reach them).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from calrft_kernels.triton.covariance import _upper_tile_pair, covariance_triton

ROOT = Path(__file__).resolve().parents[1]
SIZES_B = (1, 2, 3, 17, 97, 130)
SIZES_D = (1, 2, 3, 33, 65, 130)
# Error bound relative to max |Sigma|: fp32 operands are exact in the interpreter (and the
# emulation is fp32 FMA); fp16 operands round each centred value to 11 bits.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.float64: 1e-13}


def reference_covariance(z: torch.Tensor, correction: int):
    """Two-pass float64: the ground truth."""
    z64 = z.to(torch.float64)
    mean = z64.mean(0)
    centred = z64 - mean
    return centred.T @ centred / (z.shape[0] - correction), mean


def features(n_rows: int, n_cols: int, dtype, mean_over_spread: float = 3.0, generator=None):
    """Rows with a per-feature mean mean_over_spread times larger than the spread (~1)."""
    g = generator or torch.Generator().manual_seed(n_rows * 1000 + n_cols)
    mu = mean_over_spread * (0.5 + torch.rand(n_cols, generator=g))
    scales = 0.2 + torch.rand(n_cols, generator=g)  # anisotropic: a non-trivial spectrum
    return (mu + scales * torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64)).to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both vanish, as for a single row)."""
    err = (actual.to(torch.float64) - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_covariance(cov, mean, z, correction, dtype):
    ref_cov, ref_mean = reference_covariance(z, correction)
    tol = TOLERANCE[dtype]
    assert cov.shape == ref_cov.shape and mean.shape == ref_mean.shape
    assert torch.equal(cov, cov.T), "Sigma must be exactly symmetric"
    cov_err = relative_error(cov, ref_cov)
    assert cov_err <= tol, f"Sigma max rel err {cov_err:.3g} > {tol:g}"
    mean_err = relative_error(mean, ref_mean)
    assert mean_err <= 4 * (1e-13 if dtype == torch.float64 else 1e-6), f"mean rel err {mean_err}"


# ---------------------------------------------------------------- Triton, interpreted on CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_cols", SIZES_D)
@pytest.mark.parametrize("n_rows", SIZES_B)
def test_triton_matches_float64_two_pass(n_rows, n_cols, dtype):
    z = features(n_rows, n_cols, dtype)
    correction = 1 if n_rows > 1 else 0
    cov, mean = covariance_triton(z, correction)
    assert cov.dtype == torch.float32 and mean.dtype == torch.float32
    assert_close_covariance(cov, mean, z, correction, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_rows,n_cols", [(130, 65), (97, 130), (250, 33)])
def test_triton_large_mean_stays_two_pass_accurate(n_rows, n_cols, dtype):
    z = features(n_rows, n_cols, dtype, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, dtype)


def test_large_mean_defeats_the_one_pass_formula():
    """The tolerance above is meaningful: the one-pass fp32 formula misses it by far."""
    z = features(250, 33, torch.float32, mean_over_spread=50.0)
    ref, _ = reference_covariance(z, 1)
    m = z.mean(0)
    one_pass = (z.T @ z - z.shape[0] * torch.outer(m, m)) / (z.shape[0] - 1)
    assert relative_error(one_pass, ref) > 50 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("row_chunks", [2, 3, 7])
def test_triton_row_chunks_sum_to_the_same_covariance(row_chunks):
    z = features(130, 65, torch.float32, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1, row_chunks=row_chunks)
    assert_close_covariance(cov, mean, z, 1, torch.float32)


@pytest.mark.parametrize("correction", [0, 1, 2])
def test_triton_correction(correction):
    z = features(17, 33, torch.float32)
    cov, mean = covariance_triton(z, correction)
    assert_close_covariance(cov, mean, z, correction, torch.float32)


def test_triton_non_contiguous_input():
    base = features(65, 97, torch.float32)  # z = base.T is [97, 65] with strides (1, 97)
    z = base.T
    assert not z.is_contiguous()
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, torch.float32)
    sliced = features(97, 130, torch.float32)[::2, 1::3]  # both strides != natural
    cov, mean = covariance_triton(sliced, 1)
    assert_close_covariance(cov, mean, sliced, 1, torch.float32)


def test_triton_float64_accumulates_in_float64():
    z = features(97, 65, torch.float64, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert cov.dtype == torch.float64 and mean.dtype == torch.float64
    assert_close_covariance(cov, mean, z, 1, torch.float64)


def test_triton_bfloat16_input_is_exact_after_upcast_in_the_interpreter():
    """Under the interpreter bf16 operands are upcast to fp32 (its bf16 dot is broken), so the
    result equals the fp32 result on the upcast values; on a GPU bf16 operands go to wgmma."""
    z = features(97, 65, torch.bfloat16, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, torch.float32)


@triton.jit
def map_pairs(out_i, out_j, BLOCK: tl.constexpr):
    """The kernel's pair -> (i, j) helper, applied to a block of pair ids at once."""
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i, j = _upper_tile_pair(pair)
    tl.store(out_i + pair, i)
    tl.store(out_j + pair, j)


def test_triton_tile_pair_mapping_covers_the_upper_triangle_once():
    tiles = 90
    count = tiles * (tiles + 1) // 2  # 4095 pairs
    block = 1024
    out_i = torch.full((triton.cdiv(count, block) * block,), -1, dtype=torch.int32)
    out_j = torch.full_like(out_i, -1)
    map_pairs[(triton.cdiv(count, block),)](out_i, out_j, BLOCK=block)
    pairs = {(int(i), int(j)) for i, j in zip(out_i[:count], out_j[:count])}
    assert pairs == {(i, j) for j in range(tiles) for i in range(j + 1)}
    # Consecutive ids walk down a column of the triangle (shared tile j: L2 reuse).
    assert [(int(i), int(j)) for i, j in zip(out_i[:6], out_j[:6])] == [
        (0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]


@pytest.mark.parametrize("bad,match,error", [
    (lambda: covariance_triton([[1.0]], 1), "z must be a torch.Tensor", TypeError),
    (lambda: covariance_triton(torch.ones(4, 3, dtype=torch.int32), 1), "z must be float",
     TypeError),
    (lambda: covariance_triton(torch.ones(4), 1), "z must be 2-D", ValueError),
    (lambda: covariance_triton(torch.ones(0, 3), 0), "at least one row", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), 3), "correction", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), -1), "correction", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), 1.0), "correction must be an int", TypeError),
    (lambda: covariance_triton(torch.ones(3, 2), 1, row_chunks=0), "row_chunks", ValueError),
])
def test_triton_rejects_bad_input(bad, match, error):
    with pytest.raises(error, match=match):
        bad()


# ------------------------------------------------- Triton, compiled ahead of time for sm_90

AOT_SCRIPT = textwrap.dedent(r"""
    import json, os, re, subprocess, sys, tempfile
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import calrft_kernels.triton.covariance as cov

    TORCH_TO_SIG = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                    torch.float64: "fp64"}
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")

    def resources(cubin):
        # REG / SHARED / STACK of the compiled kernel, read back from the cubin.
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin); f.flush()
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True).stdout
        found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
        return {k.lower(): int(v) for k, v in found.items()}

    def compile_one(fn, signature, constexprs, num_warps, num_stages):
        src = ASTSource(fn, signature, constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = k.asm["ptx"]
        row = {"shared_meta": k.metadata.shared, "wgmma": "wgmma" in ptx,
               "mma_sync": "mma.sync" in ptx}
        row.update(resources(k.asm["cubin"]))
        return row

    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z, acc = "*" + TORCH_TO_SIG[dtype], "*" + TORCH_TO_SIG[cov.accumulate_dtype(dtype)]
        operand, precision = cov.operand_and_precision(dtype, interpreted=False)
        for config in cov.GRAM_CONFIGS[cov.config_kind(dtype)]:
            sig = {"z_ptr": z, "mean_ptr": acc, "out_ptr": acc, "n_rows": "i32", "n_cols": "i32",
                   "stride_row": "i32", "stride_col": "i32", "rows_per_chunk": "i32",
                   "OPERAND": "constexpr", "PRECISION": "constexpr", "BLOCK_D": "constexpr",
                   "BLOCK_K": "constexpr"}
            consts = {"OPERAND": operand, "PRECISION": precision, **config.kwargs}
            row = compile_one(cov._centred_gram_kernel, sig, consts, config.num_warps,
                              config.num_stages)
            row.update(kernel="centred_gram", dtype=str(dtype), precision=precision,
                       config=f"BLOCK_D={config.kwargs['BLOCK_D']} "
                              f"BLOCK_K={config.kwargs['BLOCK_K']} "
                              f"warps={config.num_warps} stages={config.num_stages}")
            rows.append(row)
        sig = {"z_ptr": z, "partial_ptr": acc, "n_rows": "i32", "n_cols": "i32",
               "stride_row": "i32", "stride_col": "i32", "rows_per_chunk": "i32",
               "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr"}
        consts = {"BLOCK_ROWS": cov.SUM_BLOCK_ROWS, "BLOCK_COLS": cov.SUM_BLOCK_COLS}
        row = compile_one(cov._column_sum_kernel, sig, consts, cov.SUM_NUM_WARPS, 1)
        row.update(kernel="column_sum", dtype=str(dtype), precision="-",
                   config=f"BLOCK_ROWS={cov.SUM_BLOCK_ROWS} BLOCK_COLS={cov.SUM_BLOCK_COLS}"
                          f" warps={cov.SUM_NUM_WARPS}")
        rows.append(row)
    print(json.dumps(rows))
""")

HOPPER_MAX_SHARED = 227 * 1024


def aot_compile_all() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernels_compile_for_sm90_every_config_and_dtype():
    rows = aot_compile_all()
    gram = [r for r in rows if r["kernel"] == "centred_gram"]
    assert len(gram) == 4 * 4 and len(rows) == 4 * 5
    for row in rows:
        assert 0 < row["shared_meta"] <= HOPPER_MAX_SHARED, row
        assert row.get("reg", 0) > 0, row
        assert row.get("stack", 0) == 0, f"register spills (stack frame): {row}"
    for row in gram:
        if row["dtype"] == "torch.float64":
            assert row["mma_sync"], row  # DMMA
        else:  # fp16/bf16 operands, and fp32 as tf32x3: Hopper warpgroup MMA
            assert row["wgmma"], row


# ------------------------------------------- CUDA C++: index maths and emulation on the CPU

DRIVER_SOURCE = r"""
#include "cuda/covariance_tiles.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace calrft::covariance;

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { if (failures++ < 20) { \
  std::fprintf(stderr, "FAILED %s: ", #cond); std::fprintf(stderr, __VA_ARGS__); \
  std::fprintf(stderr, "\n"); } } } while (0)

static void check_tile_pairs() {
  for (int64_t tiles = 1; tiles <= 300; ++tiles) {
    const int64_t count = tile_pair_count(tiles);
    std::vector<char> seen(tiles * tiles, 0);
    for (int64_t pair = 0; pair < count; ++pair) {
      const TilePair tp = upper_tile_pair(pair);
      EXPECT(0 <= tp.i && tp.i <= tp.j && tp.j < tiles, "pair %lld -> (%lld, %lld) of %lld",
             (long long)pair, (long long)tp.i, (long long)tp.j, (long long)tiles);
      if (!(0 <= tp.i && tp.i <= tp.j && tp.j < tiles)) continue;
      EXPECT(tile_pair_index(tp.i, tp.j) == pair, "index round trip at %lld", (long long)pair);
      EXPECT(!seen[tp.i * tiles + tp.j], "pair (%lld, %lld) twice", (long long)tp.i,
             (long long)tp.j);
      seen[tp.i * tiles + tp.j] = 1;
    }
  }
  // Far beyond fp64-exact square roots of 8 pair + 1: the fix-ups must still land exactly.
  for (int64_t j : {int64_t(1) << 20, int64_t(46340), int64_t(94906265), int64_t(3037000000)}) {
    for (int64_t i : {int64_t(0), int64_t(1), j / 2, j - 1, j}) {
      const TilePair tp = upper_tile_pair(tile_pair_index(i, j));
      EXPECT(tp.i == i && tp.j == j, "large pair (%lld, %lld)", (long long)i, (long long)j);
    }
  }
}

static void check_staging_and_micro_tiles() {
  std::vector<int> stage_hits(kStageRows * kTile, 0), out_hits(kTile * kTile, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int slot = 0; slot < kLoadsPerThread; ++slot) {
      const int row = stage_row(tid, slot), col = stage_column(tid);
      EXPECT(0 <= row && row < kStageRows && 0 <= col && col < kTile, "stage %d %d", tid, slot);
      stage_hits[row * kTile + col]++;
    }
    if (tid + 1 < kThreads && (tid + 1) % 32 != 0) {  // coalesced: neighbours in a warp
      EXPECT(stage_column(tid + 1) == stage_column(tid) + 1 || stage_column(tid + 1) == 0,
             "stage columns of threads %d, %d", tid, tid + 1);
    }
    const int mr = micro_row_thread(tid), mc = micro_col_thread(tid);
    for (int x = 0; x < kMicro; ++x) {
      for (int y = 0; y < kMicro; ++y) {
        const int p = micro_offset(mr, x), q = micro_offset(mc, y);
        EXPECT(0 <= p && p < kTile && 0 <= q && q < kTile, "micro %d %d %d", tid, x, y);
        out_hits[p * kTile + q]++;
      }
    }
    for (int t = 0; t < kThreadsPerEdge; ++t) {  // the vector accesses: 4 contiguous, aligned
      for (int a = 0; a < kMicro; ++a) {
        EXPECT(micro_offset(t, a) == micro_offset(t, a & 4) + (a & 3), "contiguity %d %d", t, a);
      }
      EXPECT(micro_offset(t, 0) % 4 == 0 && micro_offset(t, 4) % 4 == 0, "alignment %d", t);
    }
  }
  for (int e = 0; e < kStageRows * kTile; ++e) EXPECT(stage_hits[e] == 1, "stage element %d", e);
  for (int e = 0; e < kTile * kTile; ++e) EXPECT(out_hits[e] == 1, "output element %d", e);
}

static void check_row_chunks() {
  const int64_t rows_list[] = {1, 2, 3, 7, 8, 9, 511, 512, 513, 1000, 4097, 65536, 100003,
                               int64_t(1) << 33};
  for (int64_t n_rows : rows_list) {
    for (int64_t items : {1, 3, 10, 36, 1000}) {
      for (int64_t sms : {1, 78, 132}) {
        const RowChunks plans[] = {plan_sum_chunks(n_rows, items, sms),
                                   plan_gram_chunks(n_rows, items, sms)};
        for (const RowChunks& c : plans) {
          EXPECT(c.count >= 1 && c.count <= kMaxChunks && c.rows >= 1, "count %lld",
                 (long long)c.count);
          EXPECT((c.count - 1) * c.rows < n_rows && n_rows <= c.count * c.rows,
                 "coverage rows=%lld count=%lld n=%lld", (long long)c.rows, (long long)c.count,
                 (long long)n_rows);
        }
        EXPECT(plans[1].rows % kStageRows == 0, "gram chunk alignment");
      }
    }
  }
}

// The CUDA algorithm, block by block and thread by thread, with the same helpers and the same
// order of floating-point operations (std::fma = the device fma).
template <typename acc_t>
static void emulate(const float* z, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                    int64_t stride_col, int64_t correction, int64_t sms, acc_t* cov, acc_t* mean) {
  // Pass 1: column sums per chunk, then the mean.
  const int64_t col_blocks = ceil_div(n_cols, kSumCols);
  const RowChunks sums = plan_sum_chunks(n_rows, col_blocks, sms);
  std::vector<acc_t> partial(sums.count * n_cols);
  for (int64_t by = 0; by < sums.count; ++by) {
    for (int64_t bx = 0; bx < col_blocks; ++bx) {
      acc_t group[kSumRows][kSumCols];
      const int64_t row_start = by * sums.rows, row_end = min64(row_start + sums.rows, n_rows);
      for (int ty = 0; ty < kSumRows; ++ty) {
        for (int tx = 0; tx < kSumCols; ++tx) {
          const int64_t col = bx * kSumCols + tx;
          acc_t s = 0;
          if (col < n_cols) {
            for (int64_t r = row_start + ty; r < row_end; r += kSumRows) {
              s += static_cast<acc_t>(z[r * stride_row + col * stride_col]);
            }
          }
          group[ty][tx] = s;
        }
      }
      for (int tx = 0; tx < kSumCols; ++tx) {
        const int64_t col = bx * kSumCols + tx;
        if (col >= n_cols) continue;
        acc_t s = group[0][tx];
        for (int y = 1; y < kSumRows; ++y) s += group[y][tx];
        partial[by * n_cols + col] = s;
      }
    }
  }
  for (int64_t col = 0; col < n_cols; ++col) {
    acc_t s = 0;
    for (int64_t c = 0; c < sums.count; ++c) s += partial[c * n_cols + col];
    mean[col] = s / static_cast<acc_t>(n_rows);
  }
  // Pass 2: upper-triangular tile pairs x row chunks, into the workspace.
  const int64_t pairs = tile_pair_count(ceil_div(n_cols, kTile));
  const RowChunks gram = plan_gram_chunks(n_rows, pairs, sms);
  std::vector<acc_t> workspace(gram.count * pairs * kTile * kTile, acc_t(-12345));
  std::vector<acc_t> acc(kThreads * kMicro * kMicro);
  static acc_t stage[2][kStageRows][kTile];
  for (int64_t by = 0; by < gram.count; ++by) {
    for (int64_t bx = 0; bx < pairs; ++bx) {
      const TilePair tiles = upper_tile_pair(bx);
      const bool diagonal = tiles.i == tiles.j;
      const int b_stage = diagonal ? 0 : 1;
      const int64_t row_start = by * gram.rows, row_end = min64(row_start + gram.rows, n_rows);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t r0 = row_start; r0 < row_end; r0 += kStageRows) {
        for (int tid = 0; tid < kThreads; ++tid) {
          const int col = stage_column(tid);
          const int64_t cols[2] = {tiles.i * kTile + col, tiles.j * kTile + col};
          for (int s = 0; s < (diagonal ? 1 : 2); ++s) {
            const bool ok = cols[s] < n_cols;
            const acc_t m = ok ? mean[cols[s]] : acc_t(0);
            for (int slot = 0; slot < kLoadsPerThread; ++slot) {
              const int64_t r = r0 + stage_row(tid, slot);
              const int64_t at = r * stride_row + cols[s] * stride_col;
              stage[s][stage_row(tid, slot)][col] =
                  (ok && r < row_end) ? static_cast<acc_t>(z[at]) - m : acc_t(0);
            }
          }
        }
        for (int tid = 0; tid < kThreads; ++tid) {
          const int mr = micro_row_thread(tid), mc = micro_col_thread(tid);
          for (int k = 0; k < kStageRows; ++k) {
            for (int x = 0; x < kMicro; ++x) {
              for (int y = 0; y < kMicro; ++y) {
                acc_t& a = acc[(tid * kMicro + x) * kMicro + y];
                a = std::fma(stage[0][k][micro_offset(mr, x)],
                             stage[b_stage][k][micro_offset(mc, y)], a);
              }
            }
          }
        }
      }
      for (int tid = 0; tid < kThreads; ++tid) {
        const int mr = micro_row_thread(tid), mc = micro_col_thread(tid);
        for (int x = 0; x < kMicro; ++x) {
          for (int y = 0; y < kMicro; ++y) {
            workspace[workspace_offset(by, pairs, bx, micro_offset(mr, x), micro_offset(mc, y))] =
                acc[(tid * kMicro + x) * kMicro + y];
          }
        }
      }
    }
  }
  for (size_t e = 0; e < workspace.size(); ++e) {
    EXPECT(workspace[e] != acc_t(-12345), "unwritten %zu", e);
  }
  // Finalise: sum the chunks, scale, mirror.
  const int64_t chunk_stride = pairs * kTile * kTile;
  for (int64_t e = 0; e < n_cols * n_cols; ++e) {
    const int64_t src = mirrored_source(e / n_cols, e % n_cols, pairs);
    acc_t s = 0;
    for (int64_t c = 0; c < gram.count; ++c) s += workspace[c * chunk_stride + src];
    cov[e] = s / static_cast<acc_t>(n_rows - correction);
  }
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "check") {
    check_tile_pairs();
    check_staging_and_micro_tiles();
    check_row_chunks();
    std::printf(failures ? "FAILED %d\n" : "ok\n", failures);
    return failures ? 1 : 0;
  }
  // emulate <in> <out> <float|double>: in = int64 header (rows, cols, stride_row, stride_col,
  // correction, sms, storage_size) + float32 storage; out = float64 cov [cols*cols] + mean [cols].
  if (argc != 5 || std::string(argv[1]) != "emulate") return 2;
  FILE* in = std::fopen(argv[2], "rb");
  int64_t h[7];
  if (!in || std::fread(h, sizeof(int64_t), 7, in) != 7) return 3;
  std::vector<float> storage(h[6]);
  if (std::fread(storage.data(), sizeof(float), h[6], in) != size_t(h[6])) return 3;
  std::fclose(in);
  const int64_t n_cols = h[1];
  std::vector<double> out(n_cols * n_cols + n_cols);
  if (std::string(argv[4]) == "float") {
    std::vector<float> cov(n_cols * n_cols), mean(n_cols);
    emulate<float>(storage.data(), h[0], n_cols, h[2], h[3], h[4], h[5], cov.data(), mean.data());
    std::copy(cov.begin(), cov.end(), out.begin());
    std::copy(mean.begin(), mean.end(), out.begin() + n_cols * n_cols);
  } else {
    std::vector<double> cov(n_cols * n_cols), mean(n_cols);
    emulate<double>(storage.data(), h[0], n_cols, h[2], h[3], h[4], h[5], cov.data(), mean.data());
    std::copy(cov.begin(), cov.end(), out.begin());
    std::copy(mean.begin(), mean.end(), out.begin() + n_cols * n_cols);
  }
  FILE* o = std::fopen(argv[3], "wb");
  std::fwrite(out.data(), sizeof(double), out.size(), o);
  std::fclose(o);
  return failures ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def tile_driver(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail("a C++ compiler (c++/g++) is needed to check csrc/cuda/covariance_tiles.cuh")
    workdir = tmp_path_factory.mktemp("covariance_tiles")
    source = workdir / "driver.cpp"
    source.write_text("#include <algorithm>\n#include <string>\n" + DRIVER_SOURCE)
    binary = workdir / "driver"
    proc = subprocess.run([compiler, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall",
                           "-I", str(ROOT / "csrc"), str(source), "-o", str(binary)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return binary


def test_cuda_tile_maths_is_exhaustively_consistent(tile_driver):
    proc = subprocess.run([str(tile_driver), "check"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def emulate_cuda(driver, z: torch.Tensor, correction: int, sms: int, precision: str, tmp_path):
    """Run the CPU emulation of the CUDA kernels on z (any strides; fp16/bf16 upcast exactly)."""
    z32 = z.to(torch.float32) if z.dtype != torch.float32 else z
    if z32.dtype != z.dtype:  # the upcast copy is contiguous; keep z's strides when we can
        z32 = torch.empty_strided(z.shape, z.stride(), dtype=torch.float32).copy_(z)
    storage_size = z32.untyped_storage().nbytes() // 4
    storage = torch.empty(0, dtype=torch.float32).set_(z32.untyped_storage(), 0, (storage_size,))
    header = struct.pack("<7q", z.shape[0], z.shape[1], z32.stride(0), z32.stride(1), correction,
                         sms, storage_size)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(header + storage.numpy().tobytes())
    proc = subprocess.run([str(driver), "emulate", str(src), str(dst), precision],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.float64)
    d = z.shape[1]
    cov, mean = out[: d * d].view(d, d), out[d * d:]
    dtype = torch.float64 if precision == "double" else torch.float32
    return cov.to(dtype), mean.to(dtype)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (2, 3), (3, 130), (17, 2), (97, 33),
                                           (130, 65), (1100, 130), (600, 257)])
def test_cuda_algorithm_emulated_matches_float64(tile_driver, tmp_path, n_rows, n_cols, sms):
    z = features(n_rows, n_cols, torch.float32, mean_over_spread=50.0)
    correction = 1 if n_rows > 1 else 0
    cov, mean = emulate_cuda(tile_driver, z, correction, sms, "float", tmp_path)
    assert_close_covariance(cov, mean, z, correction, torch.float32)
    cov64, mean64 = emulate_cuda(tile_driver, z, correction, sms, "double", tmp_path)
    assert_close_covariance(cov64, mean64, z, correction, torch.float64)


def test_cuda_algorithm_emulated_non_contiguous_and_half(tile_driver, tmp_path):
    z = features(130, 300, torch.float32, mean_over_spread=50.0)[:, ::2].T  # [150, 130]
    assert not z.is_contiguous()
    cov, mean = emulate_cuda(tile_driver, z, 1, 132, "float", tmp_path)
    assert_close_covariance(cov, mean, z, 1, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):  # converted exactly to fp32 in the load
        zh = features(97, 65, dtype, mean_over_spread=50.0)
        cov, mean = emulate_cuda(tile_driver, zh, 1, 132, "float", tmp_path)
        assert_close_covariance(cov, mean, zh, 1, torch.float32)


# ---------------------------------------------------------------- the CUDA build itself

def _native_module():
    try:
        import calrft_kernels._C as native
    except ImportError as exc:
        pytest.fail(f"calrft_kernels._C is not built: {exc} (see setup.py)")
    if not getattr(native, "with_cuda", False):
        pytest.skip("calrft_kernels._C was built without CUDA (no nvcc or CALRFT_BUILD_CUDA=0), "
                    "so it has no covariance_cuda to check")
    return native


def test_cuda_build_contains_covariance_cuda():
    native = _native_module()
    assert callable(native.covariance_cuda)
    assert "Centred covariance" in native.covariance_cuda.__doc__


@pytest.mark.parametrize("args,error,match", [
    ((torch.ones(5, 3), 1), ValueError, "z must be a CUDA tensor"),
    ((torch.ones(5), 1), ValueError, "z must be 2-D"),
    ((torch.ones(5, 3, dtype=torch.int64), 1), TypeError, "z must be float16"),
    ((torch.ones(0, 3), 0), ValueError, "at least one row"),
    ((torch.ones(5, 3), 5), ValueError, "correction"),
    ((torch.ones(5, 3), -1), ValueError, "correction"),
])
def test_cuda_covariance_rejects_bad_input(args, error, match):
    native = _native_module()
    with pytest.raises(error, match=match):
        native.covariance_cuda(*args)


if __name__ == "__main__" and "--aot-report" in sys.argv:
    # Resource table for benchmarks/results/covariance_gpu.md.
    for r in aot_compile_all():
        print(f"| {r['kernel']} | {r['dtype'].replace('torch.', '')} | {r['config']} | "
              f"{r.get('reg')} | {r['shared_meta']} | {r.get('stack', 0)} | {r.get('local', 0)} | "
              f"{'wgmma' if r['wgmma'] else ('mma.sync' if r['mma_sync'] else 'fma')} |")
