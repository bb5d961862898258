// CPU kernels of the spectral ops (Python wrapper: calrft_kernels/spectral.py):
//   covariance_cpu        centred covariance, fused: mean first (fp64), then chunks of rows are
//                         centred into a small buffer and only the lower block-triangle of the
//                         product is formed (a symmetric rank-k update does half the work).
//   smallest_eig_cpu      smallest eigenpairs of a symmetric PSD matrix: block generalized
//                         Davidson, preconditioned by an fp32 Cholesky factor of A + delta I,
//                         with exact fp64 Rayleigh-Ritz and residuals (docs/spectral.md).
//   jacobi_eigh_cpu       the shared small eigensolver of common/spectral_math.h (for tests).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/registry.h"
#include "common/davidson_blocks.h"
#include "common/spectral_math.h"

namespace calrft {
namespace {
namespace sm = spectral;

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// fp64_accumulate: centre and multiply in fp64 whatever the input dtype (chunk by chunk: never a
// B x d fp64 copy). covariance_sigma_min needs it: fp32 accumulation perturbs Sigma by ~1e-7
// ||Sigma||, i.e. the error of fp32 eigvalsh, on lambda_min of an ill-conditioned Sigma.
//
// Pass 1: the mean, summed in fp64. Pass 2: chunks of kChunk rows are centred straight into one
// contiguous buffer per column block (the only copies: chunk x d), then the block-lower triangle
// of the chunk's Gram matrix is accumulated (2 column blocks for d > 256: 3 of 4 block GEMMs).
// Each block accumulator is contiguous (in-place GEMM into a strided view made ATen copy).
std::tuple<at::Tensor, at::Tensor> covariance_cpu(const at::Tensor& z_in, double correction,
                                                  bool fp64_accumulate) {
  TORCH_CHECK(z_in.dim() == 2, "z must be 2-D");
  constexpr int64_t kChunk = 8192;
  const int64_t B = z_in.size(0), d = z_in.size(1);
  const auto ct = fp64_accumulate ? at::kDouble : compute_dtype(z_in.scalar_type());
  // fp32 compute: the first-pass mean is a plain fp32 sum (z.sum(0, fp64) converts every entry:
  // 190 ms vs 24 ms at B = 65536, d = 512) and may be off by ~1e-7 |mean|. The rows are centred
  // on that shift s; the centred chunks' column sums give e = mean - s exactly enough (they are
  // small numbers), and sum (z - mean)(z - mean)^T = sum (z - s)(z - s)^T - B e e^T, in fp64.
  const bool shifted = ct == at::kFloat && z_in.scalar_type() == at::kFloat;
  at::Tensor mean = shifted
      ? z_in.sum(0).to(at::kDouble).div_(double(std::max<int64_t>(B, 1)))
      : z_in.sum(0, /*keepdim=*/false, at::kDouble).div_(double(std::max<int64_t>(B, 1)));
  at::Tensor mean_c = mean.to(ct);
  if (shifted) mean = mean_c.to(at::kDouble);  // the shift actually subtracted
  at::Tensor residual_sum = at::zeros({d}, z_in.options().dtype(at::kDouble));
  const int64_t nblocks = d > 256 ? 2 : 1, cb = (d + nblocks - 1) / nblocks;
  const int64_t rows_max = std::min(kChunk, std::max<int64_t>(B, 1));
  auto opts = z_in.options().dtype(ct);
  std::vector<at::Tensor> buf, acc;  // buf[i]: chunk x block i; acc[i*(i+1)/2 + j]: block (i, j)
  for (int64_t i = 0; i < nblocks; ++i) {
    const int64_t ni = std::min(cb, d - i * cb);
    buf.push_back(at::empty({rows_max, ni}, opts));
    for (int64_t j = 0; j <= i; ++j)
      acc.push_back(at::zeros({ni, std::min(cb, d - j * cb)}, opts));
  }
  for (int64_t r0 = 0; r0 < B; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, B - r0);
    at::Tensor zr = z_in.narrow(0, r0, rows);
    std::vector<at::Tensor> c(nblocks);
    for (int64_t i = 0; i < nblocks; ++i) {
      const int64_t ni = buf[i].size(1);
      c[i] = buf[i].narrow(0, 0, rows);
      at::sub_out(c[i], zr.narrow(1, i * cb, ni).to(ct), mean_c.narrow(0, i * cb, ni));
      if (shifted) residual_sum.narrow(0, i * cb, ni).add_(c[i].sum(0).to(at::kDouble));
    }
    for (int64_t i = 0, k = 0; i < nblocks; ++i)
      for (int64_t j = 0; j <= i; ++j, ++k) acc[k].addmm_(c[i].t(), c[j]);
  }
  at::Tensor out = at::empty({d, d}, opts);
  for (int64_t i = 0, k = 0; i < nblocks; ++i)
    for (int64_t j = 0; j <= i; ++j, ++k) {
      const int64_t ni = acc[k].size(0), nj = acc[k].size(1);
      out.narrow(0, i * cb, ni).narrow(1, j * cb, nj).copy_(acc[k]);
      if (i != j) out.narrow(0, j * cb, nj).narrow(1, i * cb, ni).copy_(acc[k].t());
    }
  if (shifted && B > 0) {
    at::Tensor e = residual_sum / double(B);
    out.sub_((at::outer(e, e) * double(B)).to(ct));
    mean = mean + e;
  }
  out.div_(double(B) - correction);
  return {out, mean};
}

// ---- smallest eigenpairs -------------------------------------------------------------------

struct EigOut {
  at::Tensor values, vectors, factor;
  int64_t iterations = 0;
  bool converged = false;
  double delta = 0, estimate = 0;
  bool refactored = false;
};

// fp32 Cholesky of A + delta I; delta grows 10x per failure (at most 8 tries).
bool preconditioner_factor_impl(const at::Tensor& a, double max_diag, at::Tensor* factor, double* delta) {
  at::Tensor a32 = a.to(at::kFloat);
  double shift = sm::initial_shift(max_diag);
  for (int attempt = 0; attempt < 8; ++attempt, shift *= 10.0) {
    at::Tensor shifted = a32.clone();
    shifted.diagonal().add_(shift);
    auto [l, info] = at::linalg_cholesky_ex(shifted);
    if (info.item<int>() == 0) {
      *factor = l;
      *delta = shift;
      return true;
    }
  }
  return false;
}

using davidson_blocks::precondition;
using davidson_blocks::update_basis;

// Runs the Davidson solve on one thread. Every step is ~15 small BLAS/LAPACK calls (d x 8
// blocks, a 48 x 48 eigh); with 2 threads each forks and joins a team, and on a shared host a
// join waits for a descheduled thread. Measured here (2 cores, load 7, d = 512): a solve took
// 110 ms with 2 threads, 39 ms with 1; the fp32 Cholesky alone 48 ms with 2 threads, 1.8 ms
// with 1. Only a large factorisation (d > kThreadedFactorMinDim) gets the caller's threads back.
constexpr int64_t kThreadedFactorMinDim = 2048;

class SingleThreadScope {
 public:
  SingleThreadScope() : saved_(at::get_num_threads()) { if (saved_ > 1) at::set_num_threads(1); }
  ~SingleThreadScope() { if (saved_ > 1) at::set_num_threads(saved_); }
  int saved() const { return saved_; }
 private:
  int saved_;
};

// The factorisation, with the caller's threads `threads` only when d is large enough to gain.
bool preconditioner_factor(const at::Tensor& a, double max_diag, at::Tensor* factor,
                           double* delta, int threads) {
  const bool threaded = threads > 1 && a.size(0) > kThreadedFactorMinDim;
  if (threaded) at::set_num_threads(threads);
  const bool ok = preconditioner_factor_impl(a, max_diag, factor, delta);
  if (threaded) at::set_num_threads(1);
  return ok;
}

EigOut davidson(const at::Tensor& a, const at::Tensor& v0, at::Tensor factor, double delta,
                int64_t nev, double tol, int64_t max_iter) {
  const int64_t d = a.size(0);
  EigOut out;
  const double max_diag = a.diagonal().max().item<double>();
  const double floor_abs = std::max(max_diag, 1e-300) * 1e-14 * double(d);
  const bool reused = factor.defined();
  SingleThreadScope one_thread;
  if (!factor.defined()) {
    if (!preconditioner_factor(a, max_diag, &factor, &delta, one_thread.saved()))
      return out;  // not converged
  }
  out.factor = factor;
  out.delta = delta;
  const int64_t blk = std::min<int64_t>(d, std::max<int64_t>(nev, 8));
  const int64_t keep = std::min<int64_t>(d, 2 * blk);
  const int64_t mmax = std::min<int64_t>(d, std::max<int64_t>(6 * blk, keep + blk));
  auto opts = a.options();
  at::Tensor V = at::empty({d, mmax}, opts), AV = at::empty({d, mmax}, opts);
  // Start block: v0 (if any) and seeded random columns (deterministic results for a given input).
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0x5eed);
  at::Tensor start = at::randn({d, blk}, gen, opts);
  if (v0.defined()) start.select(1, 0).copy_(v0);
  start = std::get<0>(at::linalg_qr(start));
  int64_t m = blk;
  V.narrow(1, 0, m).copy_(start);
  AV.narrow(1, 0, m).copy_(at::mm(a, start));
  std::vector<double> theta;
  at::Tensor X, AX;
  double first_estimate = INFINITY;
  constexpr int64_t kStaleCheck = 4;
  for (int64_t it = 0;; ++it) {
    at::Tensor Vm = V.narrow(1, 0, m), AVm = AV.narrow(1, 0, m);
    at::Tensor H = at::mm(Vm.t(), AVm);
    H = (H + H.t()) * 0.5;
    auto [th, Y] = at::linalg_eigh(H);
    theta.assign(th.data_ptr<double>(), th.data_ptr<double>() + m);
    const int64_t nb = std::min(blk, m);
    at::Tensor Yb = Y.narrow(1, 0, nb);
    X = at::mm(Vm, Yb);
    AX = at::mm(AVm, Yb);
    at::Tensor R = AX - X * th.narrow(0, 0, nb);
    at::Tensor W = precondition(factor, R);
    at::Tensor rTw = (R * W).sum(0);
    const double* rtw = rTw.data_ptr<double>();
    double worst = 0;
    for (int64_t i = 0; i < std::min(nev, nb); ++i)
      worst = std::max(worst, sm::relative_error_estimate(rtw[i], int(i), theta.data(), int(m),
                                                           tol, delta, floor_abs));
    out.iterations = it;
    out.estimate = worst;
    if (it == 0) first_estimate = worst;
    if (reused && it == kStaleCheck && !(worst <= 1e-3 * first_estimate) && worst > tol) {
      // A reused factor that barely helps is stale (the matrix moved by more than its smallest
      // eigenvalue): build a fresh one and keep the basis built so far.
      if (preconditioner_factor(a, max_diag, &factor, &delta, one_thread.saved())) {
        out.factor = factor;
        out.delta = delta;
        out.refactored = true;
      }
    }
    if (worst <= tol || m == d) { out.converged = (worst <= tol) || m == d; break; }
    if (it >= max_iter) break;
    m = update_basis(a, V, AV, m, Y, W, blk, keep);
  }
  const int64_t k = std::min<int64_t>(nev, X.size(1));
  out.values = at::from_blob(theta.data(), {k}, at::kDouble).clone();
  at::Tensor vecs = X.narrow(1, 0, k).clone();
  vecs = vecs / vecs.norm(2, {0}, true);
  out.vectors = vecs;
  return out;
}

// Returns (values [k] fp64, vectors [d, k] fp64, factor fp32, stats fp64 [iterations, converged,
// delta, estimate]). `factor` may be an empty tensor (then computed, and returned for reuse).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> smallest_eig_cpu(
    const at::Tensor& a_in, const at::Tensor& v0, const at::Tensor& factor, double delta,
    int64_t nev, double tol, int64_t max_iter) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == a_in.size(1), "matrix must be square");
  at::Tensor a = a_in.to(at::kDouble).contiguous();
  at::Tensor f = factor.numel() ? factor.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor v = v0.numel() ? v0.to(at::kDouble).reshape({-1}) : at::Tensor();
  EigOut r = davidson(a, v, f, delta, nev, tol, max_iter);
  at::Tensor stats = at::tensor({double(r.iterations), r.converged ? 1.0 : 0.0, r.delta, r.estimate},
                                at::kDouble);
  if (!r.values.defined()) {  // no factor: caller falls back to the dense solver
    return {at::empty({0}, at::kDouble), at::empty({a.size(0), 0}, at::kDouble),
            at::empty({0, 0}, at::kFloat), stats};
  }
  return {r.values, r.vectors, r.factor, stats};
}

// (A + A^T) / 2 in fp64, one thread, 32 x 32 tiles. The ATen expression (a + a.T) * 0.5 reads
// one operand transposed and split over 2 threads took 20 ms at d = 512 on the loaded host.
at::Tensor symmetrize_cpu(const at::Tensor& a_in) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == a_in.size(1), "matrix must be square");
  at::Tensor a = a_in.to(at::kDouble).contiguous();
  const int64_t n = a.size(0);
  constexpr int64_t kTile = 32;
  at::Tensor out = at::empty_like(a);
  const double* pa = a.data_ptr<double>();
  double* po = out.data_ptr<double>();
  for (int64_t i0 = 0; i0 < n; i0 += kTile)
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile)
      for (int64_t i = i0; i < std::min(n, i0 + kTile); ++i)
        for (int64_t j = j0; j < std::min({n, j0 + kTile, i + 1}); ++j) {
          const double v = 0.5 * (pa[i * n + j] + pa[j * n + i]);
          po[i * n + j] = v;
          po[j * n + i] = v;
        }
  return out;
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cpu(const at::Tensor& a_in) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == a_in.size(1), "matrix must be square");
  const int n = int(a_in.size(0));
  at::Tensor a = a_in.to(at::kDouble).contiguous().clone();
  at::Tensor v = at::empty({n, n}, a.options()), w = at::empty({n}, a.options());
  sm::jacobi_eigh(a.data_ptr<double>(), v.data_ptr<double>(), w.data_ptr<double>(), n);
  return {w, v};
}

// Elementwise Chan merge of two comoment matrices (fp64): used by CovarianceAccumulator.merge.
at::Tensor chan_merge_cpu(const at::Tensor& ma, const at::Tensor& mb, const at::Tensor& dm,
                          double na, double nb) {
  at::Tensor a = ma.to(at::kDouble).contiguous(), b = mb.to(at::kDouble).contiguous();
  at::Tensor diff = dm.to(at::kDouble).contiguous();
  const int64_t d = diff.numel();
  at::Tensor out = at::empty_like(a);
  const double *pa = a.data_ptr<double>(), *pb = b.data_ptr<double>(), *pd = diff.data_ptr<double>();
  double* po = out.data_ptr<double>();
  at::parallel_for(0, d, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t j = 0; j < d; ++j)
        po[i * d + j] = sm::chan_comoment(na, nb, pa[i * d + j], pb[i * d + j], pd[i], pd[j]);
  });
  return out;
}

}  // namespace

void register_spectral_cpu(pybind11::module_& m) {
  m.def("covariance_cpu", &covariance_cpu, "centred covariance (cov, mean fp64)",
        pybind11::arg("z"), pybind11::arg("correction"), pybind11::arg("fp64_accumulate") = false);
  m.def("smallest_eig_cpu", &smallest_eig_cpu,
        "smallest eigenpairs: preconditioned block Davidson (values, vectors, factor, stats)",
        pybind11::arg("matrix"), pybind11::arg("v0"), pybind11::arg("factor"),
        pybind11::arg("delta"), pybind11::arg("nev"), pybind11::arg("tol"),
        pybind11::arg("max_iter"));
  m.def("symmetrize_cpu", &symmetrize_cpu, "(A + A^T) / 2 in fp64, single-threaded");
  m.def("jacobi_eigh_cpu", &jacobi_eigh_cpu, "shared small Jacobi eigensolver (tests)");
  m.def("chan_merge_cpu", &chan_merge_cpu, "Chan comoment merge (fp64)");
}

}  // namespace calrft
