// Index maths of the CUDA centred-covariance kernels (csrc/cuda/covariance.cu).
//
// Kept free of CUDA and torch headers on purpose: tests/test_covariance_gpu_kernels.py compiles
// it with a plain C++ compiler and checks every mapping exhaustively - and emulates the whole
// tiled algorithm with them - on the CPU, since no GPU runs the kernels on development machines.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../common/hd.h"

namespace calrft {
namespace covariance {

// ---- Geometry of the tiled product Zc^T Zc ------------------------------------------------
// A block computes one kTile x kTile output tile; each of its kThreads threads an 8 x 8 micro
// tile, from kStageRows rows of Zc at a time staged in shared memory.
constexpr int kTile = 128;
constexpr int kMicro = 8;
constexpr int kThreadsPerEdge = kTile / kMicro;               // 16
constexpr int kThreads = kThreadsPerEdge * kThreadsPerEdge;   // 256
constexpr int kStageRows = 8;
constexpr int kLoadsPerThread = kTile * kStageRows / kThreads;  // 4 elements per operand
static_assert(kTile * kStageRows % kThreads == 0, "every thread loads the same count");
static_assert(kThreads % kTile == 0, "each thread loads one fixed column (one mean register)");
static_assert(kMicro == 8 && kTile / 2 == 4 * kThreadsPerEdge,
              "micro tile = two groups of 4, at 4t and kTile/2 + 4t");

// ---- Column-sum (mean) pass geometry ------------------------------------------------------
constexpr int kSumCols = 32;  // threadIdx.x: one column each, a warp reads a row segment
constexpr int kSumRows = 8;   // threadIdx.y: rows interleaved by 8

// Grid dimension y is at most 65535 on every CUDA GPU.
constexpr int64_t kMaxChunks = 65535;

CALRFT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
CALRFT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- Upper-triangular tile pairs ----------------------------------------------------------
// Pair ids enumerate (i, j), i <= j, as (0,0), (0,1), (1,1), (0,2), (1,2), (2,2), ...: column
// j of the upper triangle holds ids j(j+1)/2 .. j(j+1)/2 + j. Consecutive blocks share tile j.
struct TilePair {
  int64_t i, j;
};

CALRFT_HD int64_t tile_pair_count(int64_t tiles) { return tiles * (tiles + 1) / 2; }

CALRFT_HD int64_t tile_pair_index(int64_t i, int64_t j) { return j * (j + 1) / 2 + i; }

CALRFT_HD TilePair upper_tile_pair(int64_t pair) {
  // The double square root is a guess that can be off by one when 8 pair + 1 is huge; the
  // integer fix-ups make j exact.
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(pair) + 1.0) - 1.0) * 0.5);
  while (j > 0 && j * (j + 1) / 2 > pair) --j;
  while ((j + 1) * (j + 2) / 2 <= pair) ++j;
  return {pair - j * (j + 1) / 2, j};
}

// ---- Staging: which element of the kStageRows x kTile stage a thread loads ----------------
// The column is the same for every slot (so a thread keeps one mean in a register) and
// consecutive threads read consecutive columns of a row of Z (coalesced for row-major Z).
CALRFT_HD int stage_column(int tid) { return tid % kTile; }
CALRFT_HD int stage_row(int tid, int slot) { return tid / kTile + slot * (kThreads / kTile); }

// ---- Micro tile: the a-th row (or column) of a thread's 8 x 8 outputs ---------------------
// Two groups of four, at 4t and kTile/2 + 4t: the 16 threads of a half-warp then read 16
// consecutive float4 of a staged row - no shared-memory bank conflicts.
CALRFT_HD int micro_offset(int t, int a) { return (a < 4 ? 0 : kTile / 2) + 4 * t + (a & 3); }
CALRFT_HD int micro_row_thread(int tid) { return tid / kThreadsPerEdge; }
CALRFT_HD int micro_col_thread(int tid) { return tid % kThreadsPerEdge; }

// ---- Row chunks (split-K over B) ----------------------------------------------------------
// Few tile pairs (d = 512 gives 10) cannot fill a GPU, so the rows are split into chunks whose
// partial products are summed in a fixed order afterwards (deterministic, no atomics).
struct RowChunks {
  int64_t count, rows;  // number of chunks, rows per chunk (the last one may have fewer)
};

CALRFT_HD RowChunks plan_row_chunks(int64_t n_rows, int64_t work_items, int64_t target_blocks,
                                    int64_t align, int64_t min_rows) {
  int64_t wanted = ceil_div(target_blocks, work_items > 0 ? work_items : 1);
  const int64_t most = n_rows / min_rows;  // keep at least min_rows rows of work per chunk
  if (wanted > most) wanted = most;
  if (wanted > kMaxChunks) wanted = kMaxChunks;
  if (wanted < 1) wanted = 1;
  // Rounding rows up can only lower the count below `wanted`: it stays within the grid limit.
  const int64_t rows = ceil_div(ceil_div(n_rows, wanted), align) * align;
  return {ceil_div(n_rows, rows), rows};  // recounted so that no chunk is empty
}

// The two plans the host code uses (and the CPU emulation replays). Column sums: about 4 blocks
// of kSumCols columns per SM, at least 256 rows each. Tiled product: about 2 blocks per SM (two
// fit at 256 threads and <= 128 registers), at least 64 stages of rows each.
constexpr int64_t kSumBlocksPerSm = 4;
constexpr int64_t kSumMinRows = 256;
constexpr int64_t kGramBlocksPerSm = 2;
constexpr int64_t kGramMinRows = 64 * kStageRows;

CALRFT_HD RowChunks plan_sum_chunks(int64_t n_rows, int64_t col_blocks, int64_t sms) {
  return plan_row_chunks(n_rows, col_blocks, kSumBlocksPerSm * sms, kSumRows, kSumMinRows);
}
CALRFT_HD RowChunks plan_gram_chunks(int64_t n_rows, int64_t pairs, int64_t sms) {
  return plan_row_chunks(n_rows, pairs, kGramBlocksPerSm * sms, kStageRows, kGramMinRows);
}

// ---- Workspace of partial tiles: [chunk][pair][kTile][kTile] -------------------------------
CALRFT_HD int64_t workspace_offset(int64_t chunk, int64_t pairs, int64_t pair, int p, int q) {
  return ((chunk * pairs + pair) * kTile + p) * kTile + q;
}

// Where Sigma[r][c] lives in chunk 0 of the workspace. Both (r, c) and (c, r) read the one
// element of the upper triangle, so Sigma comes out exactly symmetric.
CALRFT_HD int64_t mirrored_source(int64_t r, int64_t c, int64_t pairs) {
  const int64_t lo = r < c ? r : c;
  const int64_t hi = r < c ? c : r;
  return workspace_offset(0, pairs, tile_pair_index(lo / kTile, hi / kTile),
                          static_cast<int>(lo % kTile), static_cast<int>(hi % kTile));
}

}  // namespace covariance
}  // namespace calrft
