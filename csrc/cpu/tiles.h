// Tiling shared by the CPU pair-loss kernels (contrastive.cpp: softmax statistics; sigmoid.cpp:
// the pairwise sigmoid loss): argument checks of what they index, the split of the rows of q into
// panels, the BLAS tile product, and the conflict-free schedule for kernels that accumulate into
// both dq (rows) and dk (columns).
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace calrft::cpu {

// Tile shape: a 256 x 256 fp32 tile (256 KiB, 512 KiB with the teacher tile) stays in the 1-2 MiB
// L2 between the product that writes it and the passes that read it; 256 rows also keep the
// K dimension of dk += dS^T q_panel long enough for BLAS to run near its peak.
constexpr int64_t kMaxPanelRows = 256;
constexpr int64_t kTileCols = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------------------------
// Preconditions of the kernels (native code never indexes through an unchecked shape)

inline double read_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, name, " must be a 0-dim tensor, got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
              t.scalar_type());
  return t.item<double>();
}

// A contiguous 2-D CPU matrix with the dtype of `like` (q).
inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
              like.scalar_type(), " (the dtype of q), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// q [M, d] and k [N, d]: contiguous CPU float32/float64 matrices of one dtype and width, with at
// least one row each.
inline void check_queries_keys(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must be float32 or float64 (the Python layer upcasts half types), got ",
              q.scalar_type());
  check_matrix(q, "q", q);
  check_matrix(k, "k", q);
  TORCH_CHECK(k.size(1) == q.size(1), "k must have q's feature dim ", q.size(1), ", got ",
              k.size(1));
  TORCH_CHECK(q.size(0) > 0 && k.size(0) > 0, "q and k need at least one row, got ", q.size(0),
              " and ", k.size(0));
}

// The teacher's tq [M, dt] and tk [N, dt], with q's dtype.
inline void check_teacher_matrices(const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& q,
                                   int64_t M, int64_t N) {
  check_matrix(tq, "tq", q);
  check_matrix(tk, "tk", q);
  TORCH_CHECK(tq.size(0) == M, "tq must have q's row count ", M, ", got ", tq.size(0));
  TORCH_CHECK(tk.size(0) == N, "tk must have k's row count ", N, ", got ", tk.size(0));
  TORCH_CHECK(tk.size(1) == tq.size(1), "tk must have tq's feature dim ", tq.size(1), ", got ",
              tk.size(1));
}

// ----------------------------------------------------------------------------------------------
// Work split: row panels, as many as needed to give every thread the same number of panels.

struct Panels {
  int64_t count, rows, total, threads;
  // parallel_for grain that gives `threads` chunks (one chunk: runs inline, no thread wake-up).
  int64_t grain() const { return ceil_div(count, threads); }
  int64_t begin(int64_t i) const { return i * rows; }
  int64_t size(int64_t i) const { return std::min(rows, total - i * rows); }
};

// Below this many multiply-adds per call a single thread finishes in well under a millisecond,
// less than waking (or, on a busy machine, waiting for) a second one.
constexpr int64_t kMinParallelMacs = int64_t(1) << 23;

inline int64_t usable_threads(int64_t macs) {
  return macs < kMinParallelMacs ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// Panels of at most max_rows rows (at most kMaxPanelRows: the tile scratch holds that many).
inline Panels plan_panels(int64_t M, int64_t threads, int64_t max_rows = kMaxPanelRows) {
  max_rows = std::clamp<int64_t>(max_rows, 1, kMaxPanelRows);
  int64_t count = ceil_div(M, max_rows);
  count = std::min(M, ceil_div(count, threads) * threads);
  const int64_t rows = ceil_div(M, count);
  return {ceil_div(M, rows), rows, M, threads};
}

// out[bm, bn] = alpha * a[bm, :] b[bn, :]^T (BLAS; single-threaded inside the parallel region).
inline void tile_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::addmm_out(out, out, a, b.t(), /*beta=*/0, /*alpha=*/alpha);
}

// out += a b (BLAS). Written as addmm.out with out as self rather than out.addmm_(a, b): the same
// kernel, but an aten::addmm call that a dispatch-mode FLOP counter sees (tests count the work).
inline void accumulate_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor target = out;
  at::addmm_out(target, out, a, b);
}

// A [rows, cols] matrix view over the front of a flat scratch buffer.
inline at::Tensor tile_view(const at::Tensor& scratch, int64_t rows, int64_t cols) {
  return scratch.narrow(0, 0, rows * cols).view({rows, cols});
}

// ----------------------------------------------------------------------------------------------
// Schedule without per-thread dk copies: rows are cut into `parts` groups of panels and columns
// into `parts` blocks of tiles. In step s, part t handles row group t against column block
// (t + s) mod parts, so within a step every dq row and every dk row has exactly one writer; the
// steps are separated by the end of each parallel_for. Extra memory: the tile scratch only.
struct Schedule {
  int64_t parts, tiles;
  Panels panels;
  int64_t group_begin(int64_t t) const { return panels.count * t / parts; }
  int64_t block_begin(int64_t c) const { return tiles * c / parts * kTileCols; }
};

inline Schedule plan_schedule(int64_t M, int64_t N, int64_t threads,
                              int64_t max_rows = kMaxPanelRows) {
  const Panels panels = plan_panels(M, threads, max_rows);
  return {std::min(threads, panels.count), ceil_div(N, kTileCols), panels};
}

// Runs part(t, first_panel, last_panel, c0, c1) for every part t and step of the schedule: row
// group t (panels [first, last)) against the columns [c0, c1). Within a step the parts run in
// parallel and write disjoint rows of dq and of dk. Every (row group, column block) pair runs
// exactly once; which thread runs it depends only on the thread count.
template <typename Part>
void run_schedule(const Schedule& plan, int64_t N, Part&& part) {
  for (int64_t step = 0; step < plan.parts; ++step) {
    at::parallel_for(0, plan.parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t c = (t + step) % plan.parts;
        const int64_t c0 = plan.block_begin(c), c1 = std::min(N, plan.block_begin(c + 1));
        if (c0 < c1) part(t, plan.group_begin(t), plan.group_begin(t + 1), c0, c1);
      }
    });
  }
}

// The tile walk of the kernels that turn each tile into a gradient (contrastive backward, sigmoid
// forward): runs `plan`; for every tile of rows [i0, i0 + bm) and columns [j0, j0 + bn) it
// computes s = scale q k^T (and t = tscale tq tk^T when tq is defined; t is null otherwise) into
// the thread's scratch, calls tile_fn(part, s, t, i0, bm, j0, bn), which may overwrite s with
// dS, and then, when dq is given, adds dq[i0:] += dS k_tile and dk[j0:] += dS^T q_panel: 1 (+1)
// products per tile, 3 (+1) with the gradients. Scratch: one or two 256 x 256 tiles per part.
template <typename T, typename TileFn>
void for_each_tile(const Schedule& plan, const at::Tensor& q, const at::Tensor& k, double scale,
                   const at::Tensor& tq, const at::Tensor& tk, double tscale, at::Tensor* dq,
                   at::Tensor* dk, TileFn&& tile_fn) {
  const bool teacher = tq.defined();
  run_schedule(plan, k.size(0), [&](int64_t part, int64_t first, int64_t last, int64_t c0,
                                    int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // dispatch state is per thread
    at::Tensor s_tile = at::empty({kMaxPanelRows * kTileCols}, q.options());
    at::Tensor t_tile = teacher ? at::empty({kMaxPanelRows * kTileCols}, q.options())
                                : at::Tensor();
    for (int64_t panel = first; panel < last; ++panel) {
      const int64_t i0 = plan.panels.begin(panel), bm = plan.panels.size(panel);
      at::Tensor q_panel = q.narrow(0, i0, bm);
      for (int64_t j0 = c0; j0 < c1; j0 += kTileCols) {
        const int64_t bn = std::min(kTileCols, c1 - j0);
        at::Tensor k_tile = k.narrow(0, j0, bn);
        at::Tensor s = tile_view(s_tile, bm, bn);
        tile_product(s, q_panel, k_tile, scale);
        T* t_ptr = nullptr;
        if (teacher) {
          at::Tensor t = tile_view(t_tile, bm, bn);
          tile_product(t, tq.narrow(0, i0, bm), tk.narrow(0, j0, bn), tscale);
          t_ptr = t.data_ptr<T>();
        }
        tile_fn(part, s.data_ptr<T>(), static_cast<const T*>(t_ptr), i0, bm, j0, bn);
        if (dq) {
          accumulate_product(dq->narrow(0, i0, bm), s, k_tile);      // dq += dS k_tile
          accumulate_product(dk->narrow(0, j0, bn), s.t(), q_panel); // dk += dS^T q_panel
        }
      }
    }
  });
}

}  // namespace calrft::cpu
