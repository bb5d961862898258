// CPU kernel of the pairwise sigmoid (SigLIP) loss, gradients formed in the forward pass
// (docs/design.md, "The sigmoid loss").
//
// The loss is a sum of independent pair terms, so dl/dS of a pair is known as soon as S_ij is:
// no row or column normaliser has to be finished first. Each tile of S = scale q k^T (+ bias) is
// computed once with a BLAS product, turned in place into G = dl/dS while it is in cache (the
// loss, distillation and sum G reduced on the way), and consumed at once by dq += G k_tile and
// dk += G^T q_panel. Work: 3 products (1 without gradients), one more for the teacher tile.
// Nothing B x B is stored; the schedule of cpu/tiles.h gives every dq and dk row one writer at a
// time. Sums of each part are kept in double and added in part order (deterministic for a fixed
// thread count).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <array>
#include <optional>
#include <vector>

#include "common/contrastive_math.h"
#include "common/registry.h"
#include "cpu/tiles.h"

namespace calrft {
namespace {

using cpu::check_queries_keys;
using cpu::check_teacher_matrices;
using cpu::exp_log1p_neg_abs;
using cpu::for_each_tile;
using cpu::kMaxPanelRows;
using cpu::kTileCols;
using cpu::plan_schedule;
using cpu::read_scalar;
using cpu::row_sums;
using cpu::Schedule;
using cpu::usable_threads;

// Index of each reduced sum in a part's accumulator (and in the returned `parts`, after [0]).
enum Sum { kLoss = 0, kDistill = 1, kGrad = 2, kSums = 3 };

struct Problem {
  at::Tensor q, k, tq, tk;          // tq, tk undefined without a teacher
  const int64_t *qlab = nullptr, *klab = nullptr;  // null without labels
  double scale = 1, bias = 0, tscale = 1, tbias = 0, weight = 0;
  int64_t offset = 0, M = 0, N = 0, d = 0, panel_rows = kMaxPanelRows;
  bool teacher = false, grads = true;
  int64_t macs_per_product() const { return M * N * (d + (teacher ? tq.size(1) : 0)); }
};

const int64_t* checked_labels(const at::Tensor& t, const char* name, int64_t len) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, " must have shape [", len, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  return t.data_ptr<int64_t>();
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                     const at::Tensor& bias, const std::optional<at::Tensor>& qlabels,
                     const std::optional<at::Tensor>& klabels, int64_t offset,
                     const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                     const std::optional<at::Tensor>& tscale,
                     const std::optional<at::Tensor>& tbias, double distill_weight,
                     bool with_grads, int64_t panel_rows) {
  check_queries_keys(q, k);
  TORCH_CHECK(qlabels.has_value() == klabels.has_value(), "qlabels and klabels go together");
  TORCH_CHECK(tq.has_value() == tk.has_value() && tq.has_value() == tscale.has_value(),
              "tq, tk and tscale go together");
  TORCH_CHECK(panel_rows >= 0, "panel_rows must be >= 0 (0: the default), got ", panel_rows);
  Problem p;
  p.q = q;
  p.k = k;
  p.M = q.size(0);
  p.N = k.size(0);
  p.d = q.size(1);
  p.scale = read_scalar(scale, "scale");
  p.bias = read_scalar(bias, "bias");
  p.offset = offset;
  p.weight = distill_weight;
  p.grads = with_grads;
  p.panel_rows = panel_rows > 0 ? panel_rows : kMaxPanelRows;
  if (qlabels.has_value()) {
    p.qlab = checked_labels(*qlabels, "qlabels", p.M);
    p.klab = checked_labels(*klabels, "klabels", p.N);
  }
  if (tq.has_value()) {
    check_teacher_matrices(*tq, *tk, q, p.M, p.N);
    p.tq = *tq;
    p.tk = *tk;
    p.tscale = read_scalar(*tscale, "tscale");
    p.tbias = tbias.has_value() ? read_scalar(*tbias, "tbias") : 0.0;
    p.teacher = true;
  } else {
    TORCH_CHECK(!tbias.has_value(), "tbias needs tq, tk and tscale");
  }
  return p;
}

// Positive pairs of row i (global index i + offset without labels) among the columns
// [j0, j0 + bn): pos[j] = 1 for a positive, 0 for a negative.
template <typename T>
void positives_row(const Problem& p, int64_t i, int64_t j0, int64_t bn, T* pos) {
  if (p.qlab) {
    const int64_t label = p.qlab[i];
    for (int64_t j = 0; j < bn; ++j) pos[j] = p.klab[j0 + j] == label ? T(1) : T(0);
    return;
  }
  std::fill(pos, pos + bn, T(0));
  const int64_t diag = i + p.offset - j0;
  if (diag >= 0 && diag < bn) pos[diag] = T(1);
}

// One tile: x holds scale q_panel k_tile^T (no bias), t the teacher's tscale tq_panel tk_tile^T
// (or null). Per pair, with S = x + bias, z = +1 for a positive and -1 otherwise:
//   loss    softplus(-z S) = max(S, 0) - [positive] S + log(1 + exp(-|S|))
//   distill BCE(sigmoid(S), q = sigmoid(T + tbias)) = log(1 + exp(-|S|)) + q max(-S, 0)
//                                                     + (1 - q) max(S, 0)
//   G       -z sigmoid(-z S) + weight (sigmoid(S) - q)
// Every term is a sum of non-negative parts or a selected sigmoid: no cancellation, finite for
// any finite S. With kGrads G overwrites x.
template <typename T, bool kTeacher, bool kGrads>
void pair_tile(const Problem& p, T* x, const T* t, int64_t i0, int64_t bm, int64_t j0,
               int64_t bn, double* sums) {
  const T bias = T(p.bias), tbias = T(p.tbias), weight = T(p.weight);
  T pos[kTileCols];
  for (int64_t i = 0; i < bm; ++i) {
    T* xi = x + i * bn;
    const T* ti = kTeacher ? t + i * bn : nullptr;
    positives_row<T>(p, i0 + i, j0, bn, pos);
    auto row = row_sums<T, kSums>(bn, [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      using reg = typename Lanes::reg;
      const reg zero = Lanes::zero(), one = Lanes::set1(T(1));
      const reg s = Lanes::add(Lanes::load(xi + j), Lanes::set1(bias));
      const auto positive = Lanes::ge(Lanes::load(pos + j), Lanes::set1(T(0.5)));
      reg e, l1p;
      exp_log1p_neg_abs<Lanes>(s, e, l1p);
      const reg big = Lanes::div(one, Lanes::add(one, e));  // sigmoid(|S|)
      const reg small = Lanes::mul(e, big);                  // sigmoid(-|S|)
      const auto nonneg = Lanes::ge(s, zero);
      const reg sig = Lanes::select(nonneg, big, small);     // sigmoid(S)
      const reg sig_neg = Lanes::select(nonneg, small, big); // sigmoid(-S)
      const reg relu = Lanes::max(s, zero);
      const reg loss = Lanes::add(Lanes::select(positive, Lanes::sub(relu, s), relu), l1p);
      reg g = Lanes::select(positive, Lanes::neg(sig_neg), sig);
      reg sd = zero;
      if constexpr (kTeacher) {
        const reg tv = Lanes::add(Lanes::load(ti + j), Lanes::set1(tbias));
        const reg et = Lanes::exp(Lanes::neg(Lanes::abs(tv)));
        const reg tbig = Lanes::div(one, Lanes::add(one, et));
        const reg tsmall = Lanes::mul(et, tbig);
        const auto tnonneg = Lanes::ge(tv, zero);
        const reg target = Lanes::select(tnonneg, tbig, tsmall);      // sigmoid(T)
        const reg target_neg = Lanes::select(tnonneg, tsmall, tbig);  // 1 - sigmoid(T)
        sd = Lanes::add(l1p, Lanes::fmadd(target, Lanes::max(Lanes::neg(s), zero),
                                          Lanes::mul(target_neg, relu)));
        g = Lanes::fmadd(Lanes::set1(weight), Lanes::sub(sig, target), g);
      }
      if constexpr (kGrads) Lanes::store(xi + j, g);
      return std::array<reg, kSums>{loss, sd, g};
    });
    for (int c = 0; c < kSums; ++c) sums[c] += double(row[c]);
  }
}

template <typename T, bool kTeacher, bool kGrads>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem& p) {
  const auto opts = p.q.options();
  at::Tensor dq = kGrads ? at::zeros({p.M, p.d}, opts) : at::empty({0, p.d}, opts);
  at::Tensor dk = kGrads ? at::zeros({p.N, p.d}, opts) : at::empty({0, p.d}, opts);
  const int64_t macs = p.macs_per_product() * (kGrads ? 3 : 1);
  const Schedule plan = plan_schedule(p.M, p.N, usable_threads(macs), p.panel_rows);
  std::vector<std::array<double, kSums>> part_sums(plan.parts, std::array<double, kSums>{});

  for_each_tile<T>(plan, p.q, p.k, p.scale, p.tq, p.tk, p.tscale, kGrads ? &dq : nullptr,
                   kGrads ? &dk : nullptr,
                   [&](int64_t part, T* s, const T* t, int64_t i0, int64_t bm, int64_t j0,
                       int64_t bn) {
                     pair_tile<T, kTeacher, kGrads>(p, s, t, i0, bm, j0, bn,
                                                    part_sums[part].data());
                   });

  std::array<double, kSums> total{};
  for (const auto& s : part_sums)
    for (int c = 0; c < kSums; ++c) total[c] += s[c];
  at::Tensor parts = at::empty({4}, opts);
  T* out = parts.data_ptr<T>();
  out[0] = T(total[kLoss] + p.weight * total[kDistill]);
  out[1] = T(total[kLoss]);
  out[2] = T(total[kDistill]);
  out[3] = T(total[kGrad]);
  return {parts, dq, dk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_loss_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& qlabels, const std::optional<at::Tensor>& klabels,
    int64_t offset, const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
    const std::optional<at::Tensor>& tscale, const std::optional<at::Tensor>& tbias,
    double distill_weight, bool with_grads, int64_t panel_rows) {
  // The tile products are ATen ops on views of q and k: keep them out of autograd (the op's
  // autograd lives in Python).
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Problem p = make_problem(q, k, scale, bias, qlabels, klabels, offset, tq, tk, tscale,
                                 tbias, distill_weight, with_grads, panel_rows);
  auto with_flags = [&]<typename T>() {
    if (p.teacher)
      return p.grads ? forward_impl<T, true, true>(p) : forward_impl<T, true, false>(p);
    return p.grads ? forward_impl<T, false, true>(p) : forward_impl<T, false, false>(p);
  };
  if (p.q.scalar_type() == at::kDouble) return with_flags.template operator()<double>();
  return with_flags.template operator()<float>();
}

// Test hook: the kernel's (exp(-|x|), log(1 + exp(-|x|))) (vector lanes for the bulk, scalar
// tail), so the tests can measure its error against float64 directly.
std::tuple<at::Tensor, at::Tensor> sigmoid_log1p_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a float32 or float64 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor e_out = at::empty_like(in), l_out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "sigmoid_log1p_cpu", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* e_dst = e_out.data_ptr<scalar_t>();
    scalar_t* l_dst = l_out.data_ptr<scalar_t>();
    cpu::for_lanes<scalar_t>(in.numel(), [&](auto L, int64_t j) {
      using Lanes = decltype(L);
      typename Lanes::reg e, l;
      exp_log1p_neg_abs<Lanes>(Lanes::load(src + j), e, l);
      Lanes::store(e_dst + j, e);
      Lanes::store(l_dst + j, l);
    });
  });
  return {e_out, l_out};
}

}  // namespace

void register_sigmoid_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sigmoid_loss_forward_cpu", &sigmoid_loss_forward_cpu,
        "Pairwise sigmoid loss of S = scale q k^T + bias (+ distillation against the teacher's "
        "sigmoid(tscale tq tk^T + tbias)) without storing S; with with_grads also "
        "(dq_u, dk_u) = (G k, G^T q), G = dl/dS. Returns (parts [4]: total, loss, distillation, "
        "sum G; dq_u [M, d] or [0, d]; dk_u [N, d] or [0, d]).",
        py::arg("q"), py::arg("k"), py::arg("scale"), py::arg("bias"), py::arg("qlabels"),
        py::arg("klabels"), py::arg("offset"), py::arg("tq"), py::arg("tk"), py::arg("tscale"),
        py::arg("tbias"), py::arg("distill_weight"), py::arg("with_grads"),
        py::arg("panel_rows"), py::call_guard<py::gil_scoped_release>());
  // Test hooks live in the submodule _C.testing (reached through calrft_kernels/testing.py).
  auto testing = py::hasattr(m, "testing") ? m.attr("testing").cast<py::module_>()
                                           : m.def_submodule("testing", "test-only native hooks");
  testing.def("sigmoid_log1p_cpu", &sigmoid_log1p_cpu,
              "Test hook: the CPU sigmoid kernel's (exp(-|x|), log(1 + exp(-|x|))).",
              py::arg("x"));
}

}  // namespace calrft
