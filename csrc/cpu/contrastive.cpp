// CPU kernel of the fused contrastive statistics (docs/design.md, "Kernel contract").
//
// S = scale q k^T + bias is never stored: threads own row panels of q; each panel walks the
// column tiles of k, computes the tile with one BLAS product (single-threaded inside the
// parallel region), and reduces it on the spot into
//   - the panel's row statistics (online max + sum of exp), and
//   - the thread's own column accumulators (online max + sum of exp per column), merged across
//     threads at the end: no shared writes, no atomics, no assumed max.
// The backward recomputes each tile once, turns it into dS in place and emits dq += dS k_tile and
// dk += dS^T q_panel (cpu/tiles.h: for_each_tile on a schedule that gives every dk block one
// writer at a time):
// 1 + 3 products (4 units), 2 + 4 with a teacher tile.
//
// The bias is a constant shift of every logit, so the tiles hold scale q k^T only and the bias
// enters the statistics once at the end (lse(x + b) = lse(x) + b, sum p (x + b) = sum p x + b).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <array>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "common/contrastive_math.h"
#include "common/registry.h"
#include "cpu/tiles.h"

namespace calrft {
namespace {

using cpu::ceil_div;
using cpu::check_queries_keys;
using cpu::check_teacher_matrices;
using cpu::for_each_tile;
using cpu::for_lanes;
using cpu::kMaxPanelRows;
using cpu::kTileCols;
using cpu::Panels;
using cpu::plan_panels;
using cpu::plan_schedule;
using cpu::read_scalar;
using cpu::Schedule;
using cpu::tile_product;
using cpu::tile_view;
using cpu::usable_threads;
using cpu::row_sums;
using cpu::ScalarLanes;
using cpu::WideLanes;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ----------------------------------------------------------------------------------------------
// Inputs

struct Problem {
  at::Tensor q, k, tq, tk;  // tq, tk undefined without a teacher
  double scale = 1, bias = 0, tscale = 1;
  bool teacher = false, with_cols = true;
  int64_t M = 0, N = 0, d = 0, rows = 1;  // rows = R: 1, or 3 with a teacher
  int64_t macs_per_product() const { return M * N * (d + (teacher ? tq.size(1) : 0)); }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                     const at::Tensor& bias, const std::optional<at::Tensor>& tq,
                     const std::optional<at::Tensor>& tk,
                     const std::optional<at::Tensor>& tscale, bool with_cols) {
  check_queries_keys(q, k);
  TORCH_CHECK(tq.has_value() == tk.has_value(), "tq and tk must be given together");
  Problem p;
  p.q = q;
  p.k = k;
  p.scale = read_scalar(scale, "scale");
  p.bias = read_scalar(bias, "bias");
  p.with_cols = with_cols;
  p.M = q.size(0);
  p.N = k.size(0);
  p.d = q.size(1);
  if (tq.has_value()) {
    TORCH_CHECK(tscale.has_value(), "tscale is required with tq and tk");
    check_teacher_matrices(*tq, *tk, q, p.M, p.N);
    p.tq = *tq;
    p.tk = *tk;
    p.tscale = read_scalar(*tscale, "tscale");
    p.teacher = true;
  }
  p.rows = p.teacher ? 3 : 1;
  return p;
}

// Statistics and their gradients: [R, len] of q's dtype (len = 0 allowed only for columns
// without with_cols); returned contiguous.
at::Tensor checked_stats(const at::Tensor& t, const char* name, const Problem& p, int64_t len) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == p.q.scalar_type(), name, " must have dtype ",
              p.q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == p.rows && t.size(1) == len, name, " must have shape [",
              p.rows, ", ", len, "], got ", t.sizes());
  return t.contiguous();
}

// ----------------------------------------------------------------------------------------------
// Tile passes

// Row maxima of x[bm, bn] into row_max; column maxima into col_max (when given, overwritten).
template <typename T>
void tile_maxima(const T* x, int64_t bm, int64_t bn, T* row_max, T* col_max) {
  using V = typename WideLanes<T>::type;
  using S = ScalarLanes<T>;
  if (col_max)
    for_lanes<T>(bn, [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      Lanes::store(col_max + j, Lanes::set1(kNegInf<T>));
    });
  for (int64_t i = 0; i < bm; ++i) {
    const T* xi = x + i * bn;
    T m = kNegInf<T>;
    int64_t j = 0;
    if constexpr (V::width > 1) {
      auto vm = V::set1(kNegInf<T>);
      for (; j + V::width <= bn; j += V::width) {
        auto v = V::load(xi + j);
        vm = V::max(vm, v);
        if (col_max) V::store(col_max + j, V::max(V::load(col_max + j), v));
      }
      m = V::hmax(vm);
    }
    for (; j < bn; ++j) {
      m = S::max(m, xi[j]);
      if (col_max) col_max[j] = S::max(col_max[j], xi[j]);
    }
    row_max[i] = m;
  }
}

// Raises running maxima run_max[n] to max(run_max, tile_max) and rescales the sums that were
// taken relative to the old maxima (sum2 may be null).
template <typename T>
void raise_maxima(int64_t n, T* run_max, const T* tile_max, T* sum1, T* sum2) {
  for_lanes<T>(n, [&](auto L, int64_t j) {
    using Lanes = decltype(L);
    auto old_max = Lanes::load(run_max + j);
    auto new_max = Lanes::max(old_max, Lanes::load(tile_max + j));
    // exp(-inf - finite) = 0: an empty accumulator stays empty.
    auto factor = Lanes::exp(Lanes::sub(old_max, new_max));
    Lanes::store(run_max + j, new_max);
    Lanes::store(sum1 + j, Lanes::mul(Lanes::load(sum1 + j), factor));
    if (sum2) Lanes::store(sum2 + j, Lanes::mul(Lanes::load(sum2 + j), factor));
  });
}

template <typename T>
void add_into(int64_t n, T* acc, const T* part) {
  for_lanes<T>(n, [&](auto L, int64_t j) {
    using Lanes = decltype(L);
    Lanes::store(acc + j, Lanes::add(Lanes::load(acc + j), Lanes::load(part + j)));
  });
}

// Running statistics of a set of rows (or columns): the max and the sums relative to it.
//   max/sum: lse of S; tmax/tsum: lse of T; tdot: sum exp(T - tmax) * S.
template <typename T>
struct Running {
  T *max, *sum, *tmax, *tsum, *tdot;
};

// A flat [5, n] block holding a Running over n entries (teacher parts unused without a teacher).
template <typename T>
Running<T> running_view(T* base, int64_t n) {
  return {base, base + n, base + 2 * n, base + 3 * n, base + 4 * n};
}

template <typename T>
void running_reset(T* base, int64_t n) {
  auto r = running_view(base, n);
  std::fill(r.max, r.max + n, kNegInf<T>);
  std::fill(r.sum, r.sum + n, T(0));
  std::fill(r.tmax, r.tmax + n, kNegInf<T>);
  std::fill(r.tsum, r.tsum + n, T(0));
  std::fill(r.tdot, r.tdot + n, T(0));
}

// Scratch of one thread for the forward pass.
template <typename T>
struct ForwardScratch {
  at::Tensor s_tile, t_tile;        // flat [kMaxPanelRows * kTileCols]
  std::vector<T> tile_rmax, tile_trmax;      // [panel rows]
  std::vector<T> tile_cmax, tile_tcmax;      // [tile cols]
  std::vector<T> part_c, part_tc, part_tdc;  // column sums of this tile [tile cols]
};

// Reduces one tile (x = S tile, t = T tile or null) into the panel's rows and, with kCols, into
// the thread's columns [j0, j0 + bn).
template <typename T, bool kTeacher, bool kCols>
void reduce_tile(const T* x, const T* t, int64_t bm, int64_t bn, Running<T> rows,
                 Running<T> cols, ForwardScratch<T>& w) {
  tile_maxima<T>(x, bm, bn, w.tile_rmax.data(), kCols ? w.tile_cmax.data() : nullptr);
  raise_maxima<T>(bm, rows.max, w.tile_rmax.data(), rows.sum, nullptr);
  if constexpr (kTeacher) {
    tile_maxima<T>(t, bm, bn, w.tile_trmax.data(), kCols ? w.tile_tcmax.data() : nullptr);
    raise_maxima<T>(bm, rows.tmax, w.tile_trmax.data(), rows.tsum, rows.tdot);
  }
  if constexpr (kCols) {
    raise_maxima<T>(bn, cols.max, w.tile_cmax.data(), cols.sum, nullptr);
    std::fill(w.part_c.begin(), w.part_c.begin() + bn, T(0));
    if constexpr (kTeacher) {
      raise_maxima<T>(bn, cols.tmax, w.tile_tcmax.data(), cols.tsum, cols.tdot);
      std::fill(w.part_tc.begin(), w.part_tc.begin() + bn, T(0));
      std::fill(w.part_tdc.begin(), w.part_tdc.begin() + bn, T(0));
    }
  }
  T* pc = w.part_c.data();
  T* ptc = w.part_tc.data();
  T* ptdc = w.part_tdc.data();
  constexpr int K = kTeacher ? 3 : 1;
  for (int64_t i = 0; i < bm; ++i) {
    const T* xi = x + i * bn;
    const T* ti = kTeacher ? t + i * bn : nullptr;
    const T rmax = rows.max[i], trmax = kTeacher ? rows.tmax[i] : T(0);
    auto sums = row_sums<T, K>(bn, [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      auto s = Lanes::load(xi + j);
      auto e = Lanes::exp(Lanes::sub(s, Lanes::set1(rmax)));
      if constexpr (kCols) {
        auto ec = Lanes::exp(Lanes::sub(s, Lanes::load(cols.max + j)));
        Lanes::store(pc + j, Lanes::add(Lanes::load(pc + j), ec));
      }
      if constexpr (kTeacher) {
        auto tv = Lanes::load(ti + j);
        auto et = Lanes::exp(Lanes::sub(tv, Lanes::set1(trmax)));
        if constexpr (kCols) {
          auto etc = Lanes::exp(Lanes::sub(tv, Lanes::load(cols.tmax + j)));
          Lanes::store(ptc + j, Lanes::add(Lanes::load(ptc + j), etc));
          Lanes::store(ptdc + j, Lanes::fmadd(etc, s, Lanes::load(ptdc + j)));
        }
        return std::array<typename Lanes::reg, K>{e, et, Lanes::mul(et, s)};
      } else {
        return std::array<typename Lanes::reg, K>{e};
      }
    });
    rows.sum[i] += sums[0];
    if constexpr (kTeacher) {
      rows.tsum[i] += sums[1];
      rows.tdot[i] += sums[2];
    }
  }
  if constexpr (kCols) {
    add_into<T>(bn, cols.sum, pc);
    if constexpr (kTeacher) {
      add_into<T>(bn, cols.tsum, ptc);
      add_into<T>(bn, cols.tdot, ptdc);
    }
  }
}

// stats[., idx] from a Running entry: lse of S (+ bias), lse of T, sum softmax(T) S (+ bias).
template <typename T>
void write_stats(const Running<T>& r, int64_t n, bool teacher, double bias, T* out,
                 int64_t out_stride, int64_t offset) {
  for (int64_t i = 0; i < n; ++i) {
    out[offset + i] = r.max[i] + std::log(r.sum[i]) + T(bias);
    if (teacher) {
      out[out_stride + offset + i] = r.tmax[i] + std::log(r.tsum[i]);
      out[2 * out_stride + offset + i] = r.tdot[i] / r.tsum[i] + T(bias);
    }
  }
}

// Merges the column accumulators of several threads into the first (log-sum-exp merge).
template <typename T>
void merge_columns(std::vector<std::vector<T>>& per_thread, int64_t N, bool teacher) {
  auto into = running_view(per_thread[0].data(), N);
  for (size_t t = 1; t < per_thread.size(); ++t) {
    auto other = running_view(per_thread[t].data(), N);
    for (int64_t j = 0; j < N; ++j) {
      T m = std::max(into.max[j], other.max[j]);
      if (m != kNegInf<T>) {
        into.sum[j] = into.sum[j] * std::exp(into.max[j] - m) + other.sum[j] * std::exp(other.max[j] - m);
        into.max[j] = m;
      }
      if (!teacher) continue;
      T tm = std::max(into.tmax[j], other.tmax[j]);
      if (tm == kNegInf<T>) continue;
      T fa = std::exp(into.tmax[j] - tm), fb = std::exp(other.tmax[j] - tm);
      into.tsum[j] = into.tsum[j] * fa + other.tsum[j] * fb;
      into.tdot[j] = into.tdot[j] * fa + other.tdot[j] * fb;
      into.tmax[j] = tm;
    }
  }
}

template <typename T, bool kTeacher, bool kCols>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& p) {
  const auto opts = p.q.options();
  at::Tensor row_stats = at::empty({p.rows, p.M}, opts);
  at::Tensor col_stats = at::empty({p.rows, kCols ? p.N : 0}, opts);
  const Panels panels = plan_panels(p.M, usable_threads(p.macs_per_product()));
  std::mutex done_mutex;
  std::vector<std::vector<T>> thread_cols;  // one [5, N] Running block per thread

  at::parallel_for(0, panels.count, panels.grain(), [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // dispatch state is per thread
    ForwardScratch<T> w;
    w.s_tile = at::empty({kMaxPanelRows * kTileCols}, opts);
    if (kTeacher) w.t_tile = at::empty({kMaxPanelRows * kTileCols}, opts);
    w.tile_rmax.resize(kMaxPanelRows);
    w.tile_trmax.resize(kMaxPanelRows);
    for (auto* v : {&w.tile_cmax, &w.tile_tcmax, &w.part_c, &w.part_tc, &w.part_tdc})
      v->resize(kTileCols);
    std::vector<T> my_cols(kCols ? 5 * p.N : 0);
    if (kCols) running_reset(my_cols.data(), p.N);
    std::vector<T> my_rows(5 * kMaxPanelRows);

    for (int64_t panel = first; panel < last; ++panel) {
      const int64_t i0 = panels.begin(panel), bm = panels.size(panel);
      running_reset(my_rows.data(), bm);
      auto rows = running_view(my_rows.data(), bm);
      at::Tensor q_panel = p.q.narrow(0, i0, bm);
      at::Tensor tq_panel = kTeacher ? p.tq.narrow(0, i0, bm) : at::Tensor();
      for (int64_t j0 = 0; j0 < p.N; j0 += kTileCols) {
        const int64_t bn = std::min(kTileCols, p.N - j0);
        at::Tensor s = tile_view(w.s_tile, bm, bn);
        tile_product(s, q_panel, p.k.narrow(0, j0, bn), p.scale);
        T* t_ptr = nullptr;
        if constexpr (kTeacher) {
          at::Tensor t = tile_view(w.t_tile, bm, bn);
          tile_product(t, tq_panel, p.tk.narrow(0, j0, bn), p.tscale);
          t_ptr = t.data_ptr<T>();
        }
        Running<T> cols{};
        if (kCols) {
          auto all = running_view(my_cols.data(), p.N);
          cols = {all.max + j0, all.sum + j0, all.tmax + j0, all.tsum + j0, all.tdot + j0};
        }
        reduce_tile<T, kTeacher, kCols>(s.data_ptr<T>(), t_ptr, bm, bn, rows, cols, w);
      }
      write_stats(rows, bm, kTeacher, p.bias, row_stats.data_ptr<T>(), p.M, i0);
    }
    if (kCols) {
      std::lock_guard<std::mutex> lock(done_mutex);
      thread_cols.push_back(std::move(my_cols));
    }
  });

  if constexpr (kCols) {
    merge_columns(thread_cols, p.N, kTeacher);
    write_stats(running_view(thread_cols[0].data(), p.N), p.N, kTeacher, p.bias,
                col_stats.data_ptr<T>(), p.N, 0);
  }
  return {row_stats, col_stats};
}

// ----------------------------------------------------------------------------------------------
// Backward

// Per-row or per-column coefficients of dS: the upstream gradients g0 (of lse S) and g2 (of
// sum softmax(T) S), and the shifts lse S - bias, lse T that turn a tile entry into a softmax.
template <typename T>
struct GradTerms {
  const T *g0, *shift, *g2, *tshift;
};

template <typename T>
GradTerms<T> grad_terms(const at::Tensor& grad, const at::Tensor& shifts, int64_t n) {
  const T* g = grad.data_ptr<T>();
  const T* s = shifts.data_ptr<T>();
  return {g, s, grad.size(0) > 1 ? g + 2 * n : nullptr, shifts.size(0) > 1 ? s + n : nullptr};
}

// dS = g0_i softmax_row(S) + g2_i softmax_row(T) + h0_j softmax_col(S) + h2_j softmax_col(T),
// written over the S tile.
template <typename T, bool kTeacher, bool kCols>
void tile_grad(T* x, const T* t, int64_t bm, int64_t bn, GradTerms<T> rows, GradTerms<T> cols) {
  for (int64_t i = 0; i < bm; ++i) {
    T* xi = x + i * bn;
    const T* ti = kTeacher ? t + i * bn : nullptr;
    const T g0 = rows.g0[i], a = rows.shift[i];
    const T g2 = kTeacher ? rows.g2[i] : T(0), ta = kTeacher ? rows.tshift[i] : T(0);
    for_lanes<T>(bn, [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      auto s = Lanes::load(xi + j);
      auto ds = Lanes::mul(Lanes::set1(g0), Lanes::exp(Lanes::sub(s, Lanes::set1(a))));
      if constexpr (kCols) {
        auto pc = Lanes::exp(Lanes::sub(s, Lanes::load(cols.shift + j)));
        ds = Lanes::fmadd(Lanes::load(cols.g0 + j), pc, ds);
      }
      if constexpr (kTeacher) {
        auto tv = Lanes::load(ti + j);
        ds = Lanes::fmadd(Lanes::set1(g2), Lanes::exp(Lanes::sub(tv, Lanes::set1(ta))), ds);
        if constexpr (kCols) {
          auto ptc = Lanes::exp(Lanes::sub(tv, Lanes::load(cols.tshift + j)));
          ds = Lanes::fmadd(Lanes::load(cols.g2 + j), ptc, ds);
        }
      }
      Lanes::store(xi + j, ds);
    });
  }
}

// Shifts that make exp(tile - shift) a softmax: row 0 loses the bias (tiles hold no bias);
// row 1 (lse T) stays. Row 2 is not a shift.
at::Tensor softmax_shifts(const at::Tensor& stats, double bias, bool teacher) {
  if (stats.size(1) == 0) return stats;
  at::Tensor lse_s = stats.narrow(0, 0, 1) - bias;
  return teacher ? at::cat({lse_s, stats.narrow(0, 1, 1)}, 0) : lse_s;
}

template <typename T, bool kTeacher, bool kCols>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Problem& p, const at::Tensor& grad_row,
                                                 const at::Tensor& grad_col,
                                                 const at::Tensor& row_stats,
                                                 const at::Tensor& col_stats) {
  const auto opts = p.q.options();
  at::Tensor dq = at::zeros({p.M, p.d}, opts);
  at::Tensor dk = at::zeros({p.N, p.d}, opts);
  const at::Tensor row_shift = softmax_shifts(row_stats, p.bias, kTeacher).contiguous();
  const at::Tensor col_shift = softmax_shifts(col_stats, p.bias, kTeacher).contiguous();
  const GradTerms<T> all_rows = grad_terms<T>(grad_row, row_shift, p.M);
  const GradTerms<T> all_cols = kCols ? grad_terms<T>(grad_col, col_shift, p.N) : GradTerms<T>{};
  const Schedule plan = plan_schedule(p.M, p.N, usable_threads(p.macs_per_product() * 3));

  // Each tile turned into dS in place; cpu/tiles.h adds dS k_tile to dq and dS^T q_panel to dk.
  for_each_tile<T>(plan, p.q, p.k, p.scale, p.tq, p.tk, p.tscale, &dq, &dk,
                   [&](int64_t, T* s, const T* t, int64_t i0, int64_t bm, int64_t j0,
                       int64_t bn) {
                     GradTerms<T> rows{all_rows.g0 + i0, all_rows.shift + i0,
                                       kTeacher ? all_rows.g2 + i0 : nullptr,
                                       kTeacher ? all_rows.tshift + i0 : nullptr};
                     GradTerms<T> cols{};
                     if (kCols)
                       cols = {all_cols.g0 + j0, all_cols.shift + j0,
                               kTeacher ? all_cols.g2 + j0 : nullptr,
                               kTeacher ? all_cols.tshift + j0 : nullptr};
                     tile_grad<T, kTeacher, kCols>(s, t, bm, bn, rows, cols);
                   });
  return {dq, dk};
}

// Calls fn.template operator()<T, kTeacher, kCols>() for the runtime dtype and flags.
template <typename Fn>
auto dispatch(const Problem& p, Fn&& fn) {
  auto with_flags = [&]<typename T>() {
    if (p.teacher)
      return p.with_cols ? fn.template operator()<T, true, true>()
                         : fn.template operator()<T, true, false>();
    return p.with_cols ? fn.template operator()<T, false, true>()
                       : fn.template operator()<T, false, false>();
  };
  if (p.q.scalar_type() == at::kDouble) return with_flags.template operator()<double>();
  return with_flags.template operator()<float>();
}

std::tuple<at::Tensor, at::Tensor> contrastive_stats_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
    const std::optional<at::Tensor>& tscale, bool with_cols) {
  // The tile products are ATen ops on views of q and k: keep them out of autograd (the op's
  // autograd lives in Python), or out= products refuse inputs that require grad.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Problem p = make_problem(q, k, scale, bias, tq, tk, tscale, with_cols);
  return dispatch(p, [&]<typename T, bool kTeacher, bool kCols>() {
    return forward_impl<T, kTeacher, kCols>(p);
  });
}

std::tuple<at::Tensor, at::Tensor> contrastive_stats_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
    const std::optional<at::Tensor>& tscale, const at::Tensor& row_stats,
    const at::Tensor& col_stats, bool with_cols) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // see contrastive_stats_forward_cpu
  const Problem p = make_problem(q, k, scale, bias, tq, tk, tscale, with_cols);
  const int64_t cols = with_cols ? p.N : 0;
  const at::Tensor g_row = checked_stats(grad_row, "grad_row", p, p.M);
  const at::Tensor g_col = checked_stats(grad_col, "grad_col", p, cols);
  const at::Tensor r_stats = checked_stats(row_stats, "row_stats", p, p.M);
  const at::Tensor c_stats = checked_stats(col_stats, "col_stats", p, cols);
  return dispatch(p, [&]<typename T, bool kTeacher, bool kCols>() {
    return backward_impl<T, kTeacher, kCols>(p, g_row, g_col, r_stats, c_stats);
  });
}

// Test hook: the kernel's elementwise exp (vector lanes for the bulk, scalar tail), so the tests
// can measure its error against float64 directly.
at::Tensor contrastive_exp_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a float32 or float64 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "contrastive_exp_cpu", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_lanes<scalar_t>(in.numel(), [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      Lanes::store(dst + j, Lanes::exp(Lanes::load(src + j)));
    });
  });
  return out;
}

}  // namespace

void register_contrastive_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("contrastive_stats_forward_cpu", &contrastive_stats_forward_cpu,
        "Row/column statistics of S = scale q k^T + bias (and of the teacher T = tscale tq tk^T) "
        "without storing S: returns (row_stats [R, M], col_stats [R, N] or [R, 0]).",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("tq"),
        py::arg("tk"), py::arg("tscale"), py::arg("with_cols"),
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_stats_backward_cpu", &contrastive_stats_backward_cpu,
        "Gradients (dq_u, dk_u) = (dS k, dS^T q) of the statistics, S recomputed tile by tile.",
        py::arg("grad_row"), py::arg("grad_col"), py::arg("q"), py::arg("k"), py::arg("scale"),
        py::arg("bias"), py::arg("tq"), py::arg("tk"), py::arg("tscale"), py::arg("row_stats"),
        py::arg("col_stats"), py::arg("with_cols"), py::call_guard<py::gil_scoped_release>());
  // Test hooks live in the submodule _C.testing (reached through calrft_kernels/testing.py).
  auto testing = m.def_submodule("testing", "test-only native hooks (calrft_kernels/testing.py)");
  testing.def("contrastive_exp_cpu", &contrastive_exp_cpu,
              "Test hook: the CPU contrastive kernel's elementwise exp.", py::arg("x"));
}

}  // namespace calrft
