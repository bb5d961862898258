// CPU kernels of the eigen-solver family (Python: calrft_kernels/eigen.py):
//   smallest_eig_cpu      smallest eigenpairs of the symmetric matrix of a lower triangle: block
//                         generalized Davidson, preconditioned by an fp32 Cholesky factor of
//                         A + delta I, with exact fp64 Rayleigh-Ritz and residuals
//                         (docs/spectral.md); its thin products are cpu/dense_blocks.h's; the
//                         stale-factor policy is common/spectral_math.h's (shared with CUDA).
//   refine_covariance_eig_cpu  the same loop on the exact covariance of fp32 features, applied
//                         from the features (covariance_sigma_min's fp64-accurate default).
// Test hooks (submodule _C.testing, calrft_kernels/testing.py): dense_block_cpu,
// jacobi_eigh_cpu, cholesky_cpu, covariance_times_cpu, factor_fits_cpu.
// Measurements behind the constants: docs/spectral.md and benchmarks/results/spectral_cpu.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/registry.h"
#include "common/solve_result.h"
#include "cpu/dense_blocks.h"
#include "common/spectral_math.h"
// The CUDA solver's host-side building blocks are plain ATen: included here only so that the
// test hooks below run them on CPU tensors (their GPU launches cannot run on CI machines).
#include "cuda/davidson_blocks.h"

namespace calrft {
namespace {
namespace sm = spectral;

// ---- smallest eigenpairs -------------------------------------------------------------------

struct EigOut {
  at::Tensor values, vectors, factor;
  int64_t iterations = 0;
  bool converged = false;
  double delta = 0, estimate = 0;
  bool refactored = false;
};

// LAPACK's dsyevd called straight from the torch library when it exports it (MKL builds do):
// at::linalg_eigh copies to and from LAPACK's column-major layout and adds checks, a large
// overhead on a 48 x 48 eigh (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
// A weak symbol: where a build lacks it the ATen call takes over.
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a,
                        const int* lda, double* w, double* work, const int* lwork, int* iwork,
                        const int* liwork, int* info) __attribute__((weak));

// The Davidson iteration runs on one thread: every step is a dozen thin products (d x 8 blocks)
// and a <= 48 x 48 eigh, far too small to split, and with 2 threads each call forks and joins a
// team; on a shared host a join waits for a descheduled thread, which made a whole solve slower
// with 2 threads than with 1 (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
// The factorisation is large enough to gain from the caller's threads on a quiet host, so from
// kThreadedFactorMinDim on it gets them.
constexpr int64_t kThreadedFactorMinDim = 384;

// Block columns of the preconditioner's Cholesky (dense::cholesky_blocked): 64 was the fastest
// of 32 / 64 / 128 at d = 512 and 1024, and faster than MKL's spotrf
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
constexpr int64_t kCholBlock = 64;

// Cholesky of the symmetric row-major fp32 buffer `a` [d, d] in place: the lower triangle
// becomes L (A = L L^T), the strict upper triangle zeros. Returns false if A is not PD.
bool cholesky_lower_inplace(at::Tensor& a, int threads) {
  const int64_t n = a.size(0);
  float* p = a.data_ptr<float>();
  if (!dense::cholesky_blocked(p, n, n, kCholBlock, threads)) return false;
  for (int64_t i = 0; i < n; ++i) std::fill(p + i * n + i + 1, p + (i + 1) * n, 0.f);
  return true;
}

// fp32 Cholesky of A + delta I; delta grows 10x per failure (at most 8 tries). The caller's
// `threads` from kThreadedFactorMinDim on.
bool preconditioner_factor(const at::Tensor& a, double max_diag, at::Tensor* factor,
                           double* delta, int threads) {
  const int64_t d = a.size(0);
  const int used = d >= kThreadedFactorMinDim ? std::max(threads, 1) : 1;
  double shift = sm::initial_shift(max_diag);
  for (int attempt = 0; attempt < 8; ++attempt, shift *= 10.0) {
    at::Tensor shifted = a.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    float* p = shifted.data_ptr<float>();
    for (int64_t i = 0; i < d; ++i) p[i * d + i] = float(double(p[i * d + i]) + shift);
    if (cholesky_lower_inplace(shifted, used)) {
      *factor = shifted;
      *delta = shift;
      return true;
    }
  }
  return false;
}

class SingleThreadScope {
 public:
  SingleThreadScope() : saved_(at::get_num_threads()) { if (saved_ > 1) at::set_num_threads(1); }
  ~SingleThreadScope() { if (saved_ > 1) at::set_num_threads(saved_); }
  int saved() const { return saved_; }
 private:
  int saved_;
};

// The projected eigenproblem (dsyevd, else at::linalg_eigh).
class SmallEigh {
 public:
  explicit SmallEigh(int64_t nmax)
      : a_(nmax * nmax), work_(1 + 6 * nmax + 2 * nmax * nmax), iwork_(3 + 5 * nmax) {}
  // Eigen-decomposition of the leading m x m block of the symmetric H (leading dim ldh):
  // theta ascending, Y [m, m] row-major with the eigenvectors as columns.
  void operator()(const double* h, int64_t ldh, int64_t m, double* theta, double* y) {
    for (int64_t i = 0; i < m; ++i) std::copy(h + i * ldh, h + i * ldh + m, a_.data() + i * m);
    int info = 1;
    if (dsyevd_ != nullptr) {
      const int n = int(m), lwork = int(work_.size()), liwork = int(iwork_.size());
      dsyevd_("V", "L", &n, a_.data(), &n, theta, work_.data(), &lwork, iwork_.data(), &liwork,
              &info);
    }
    if (info == 0) {  // column-major result: a_[i + j m] = component i of vector j
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) y[i * m + j] = a_[i + j * m];
      return;
    }
    for (int64_t i = 0; i < m; ++i) std::copy(h + i * ldh, h + i * ldh + m, a_.data() + i * m);
    auto [w, v] = at::linalg_eigh(at::from_blob(a_.data(), {m, m}, at::kDouble));
    std::copy(w.data_ptr<double>(), w.data_ptr<double>() + m, theta);
    at::Tensor vc = v.contiguous();
    std::copy(vc.data_ptr<double>(), vc.data_ptr<double>() + m * m, y);
  }

 private:
  std::vector<double> a_, work_;
  std::vector<int> iwork_;
};

// Preconditioned residuals W = (L L^T)^-1 R in fp32 (R, W: [d, k] row-major fp64).
void precondition(const float* L, int64_t d, const double* r, int64_t k, double* w,
                  std::vector<float>& scratch) {
  scratch.resize(d * k);
  for (int64_t i = 0; i < d * k; ++i) scratch[i] = float(r[i]);
  dense::solve_cholesky<float>(L, d, scratch.data(), k);
  for (int64_t i = 0; i < d * k; ++i) w[i] = double(scratch[i]);
}

// `sweeps` applications of (L L^T)^-1 to the columns of W [d, k] (row-major fp64), in fp32 with
// all k columns in one block (each row tile of L is read once for all of them), every column
// rescaled to max |w| = 1 after each sweep (a sweep multiplies by up to 1 / delta).
void sweep_block(const float* L, int64_t d, std::vector<float>& x, int64_t k, int sweeps) {
  std::vector<float> big(k);
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    dense::solve_cholesky<float>(L, d, x.data(), k);
    std::fill(big.begin(), big.end(), 0.f);
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < k; ++c) big[c] = std::max(big[c], std::fabs(x[r * k + c]));
    for (int64_t c = 0; c < k; ++c) big[c] = big[c] > 0 && std::isfinite(big[c]) ? 1.f / big[c] : 0.f;
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < k; ++c) x[r * k + c] *= big[c];
  }
}

// From kThreadedSweepMinDim on, the columns are split into `threads` groups of 8 swept in
// parallel (OpenMP: the solver runs under SingleThreadScope), which cut the sweeps' time on a
// quiet host; the start block's product with the matrix, split the same way, gained nothing
// that showed above this host's noise
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
constexpr int64_t kThreadedSweepMinDim = 384;

void preconditioner_sweeps(const float* L, int64_t d, std::vector<double>& w, int64_t k,
                           int sweeps, int threads) {
  // Parts of whole chunks of 8 columns (a part of another width would send the solves down
  // their scalar paths); k not a multiple of 8 stays in one part.
  const int64_t chunks = k % 8 == 0 ? k / 8 : 1;
  const int64_t wanted = d >= kThreadedSweepMinDim ? std::clamp<int64_t>(threads, 1, chunks) : 1;
  const int64_t cols = k % 8 == 0 ? 8 * ((chunks + wanted - 1) / wanted) : k;
  const int parts = int((k + cols - 1) / cols);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    const int64_t c0 = p * cols, n = std::min(cols, k - c0);
    std::vector<float> x(d * n);
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < n; ++c) x[r * n + c] = float(w[r * k + c0 + c]);
    sweep_block(L, d, x, n, sweeps);
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < n; ++c) w[r * k + c0 + c] = double(x[r * n + c]);
  }
}

// Does T = (L L^T)^-1 act like (A + delta I)^-1 on the lowest Ritz pair (theta, x = column 0 of
// X [d, k])? x^T T x (theta + delta) / x^T x is 1 for an exact factor and an exact eigenpair; a
// factor reused from a matrix that moved by more than ~lambda_min leaves [0.8, 1.25]: the
// stale-factor policy of common/spectral_math.h, which the CUDA solver applies the same way.
bool factor_fits(const float* L, int64_t d, const double* x, int64_t k, double theta,
                 double delta, std::vector<float>& scratch) {
  // x^T (L L^T)^-1 x = |L^-1 x|^2: one triangular solve, not two (x padded to a chunk of 8
  // columns, the solve's vector path).
  scratch.assign(d * 8, 0.f);
  for (int64_t r = 0; r < d; ++r) scratch[r * 8] = float(x[r * k]);
  dense::solve_lower<float>(L, d, scratch.data(), 8);
  double yy = 0, xx = 0;
  for (int64_t r = 0; r < d; ++r) {
    yy += double(scratch[r * 8]) * double(scratch[r * 8]);
    xx += x[r * k] * x[r * k];
  }
  const double ratio = yy * (theta + delta) / std::max(xx, 1e-300);
  return sm::factor_fits_ratio(ratio);
}

// factor_fits on a finished solve's answer (its lowest Ritz pair, with its factor and shift).
bool factor_fits_answer(const EigOut& r) {
  std::vector<float> scratch;
  return factor_fits(r.factor.data_ptr<float>(), r.vectors.size(0), r.vectors.data_ptr<double>(),
                     r.vectors.size(1), r.values[0].item<double>(), r.delta, scratch);
}

// The operator of the Davidson loop: out [d, k] = A w for w [d, k] (row-major, leading dim k).
// A matrix (its lower triangle, symm_lower) or a covariance given by its features.
using ApplyOperator = std::function<void(const double* w, int64_t k, double* out)>;

struct Problem {
  int64_t d;
  ApplyOperator apply;
  double max_diag;                    // max_i A_ii: the shift and the rounding floor
  const at::Tensor* matrix = nullptr; // for (re)factorisation; null: the factor is given, kept
  // Expand the basis by the wanted pairs' corrections only, not the whole block's: for the
  // refinement, whose start block already spans the bottom (covariance_times on 1 column
  // instead of 8). Same step counts there (log spectra, d = 512 / 1024, condition 1e4..1e6:
  // 1 / 2 / 4 and 1 / 2 / 5 steps either way); from a random start the block's are needed.
  bool narrow_expansion = false;
};

// The basis of the Davidson loop: V and AV = A V as [d, mmax] row-major buffers whose first m
// columns are in use, and the projected matrix H = V^T A V [mmax, mmax], kept up to date
// column block by column block (never recomputed whole).
struct Basis {
  int64_t d, mmax, m = 0;
  std::vector<double> V, AV, H;
  Basis(int64_t d_, int64_t mmax_)
      : d(d_), mmax(mmax_), V(d_ * mmax_), AV(d_ * mmax_), H(mmax_ * mmax_) {}
};

// Orthonormalise the k columns of W [d, k] (row-major, overwritten) against the basis and among
// themselves: two passes of (classical Gram-Schmidt against V, modified Gram-Schmidt within W;
// the latter on a transposed copy, so every dot product reads contiguous memory). A column that
// keeps less than 1e-8 of its length is in the span already and is dropped, as are columns
// beyond the basis capacity. Appends the survivors to the basis with their images A w and the
// new columns of H; returns how many.
int64_t extend_basis(const ApplyOperator& apply, Basis& b, std::vector<double>& w, int64_t k,
                     std::vector<double>& scratch) {
  const int64_t d = b.d, m = b.m, add_max = std::min(k, b.mmax - m);
  std::vector<double> c(std::max<int64_t>(m, 1) * k);
  scratch.resize(k * d);
  double* wt = scratch.data();  // wt[p * d + r] = w[r, p]
  std::vector<int64_t> kept(k);
  for (int64_t p = 0; p < k; ++p) kept[p] = p;
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 0) {  // unit columns first, so the drop test is relative
      dense::transpose<double>(d, k, w.data(), k, wt);
      for (int64_t p = 0; p < k; ++p) {
        const double n = std::sqrt(dense::dot(wt + p * d, wt + p * d, d));
        const double f = (n > 0 && std::isfinite(n)) ? 1.0 / n : 0.0;
        for (int64_t r = 0; r < d; ++r) wt[p * d + r] *= f;
      }
      dense::transpose<double>(k, d, wt, d, w.data());
    }
    if (m > 0) {  // W -= V (V^T W)
      dense::gemm_tn<double>(d, m, k, b.V.data(), b.mmax, w.data(), k, c.data(), k, 1.0, 0.0);
      dense::gemm_nn<double>(d, m, k, b.V.data(), b.mmax, c.data(), k, w.data(), k, -1.0, 1.0);
    }
    dense::transpose<double>(d, k, w.data(), k, wt);
    std::vector<int64_t> survivors;
    for (int64_t p : kept) {
      double* wp = wt + p * d;
      for (int64_t q : survivors) {
        const double* wq = wt + q * d;
        const double proj = dense::dot(wq, wp, d);
        for (int64_t r = 0; r < d; ++r) wp[r] -= proj * wq[r];
      }
      const double n = std::sqrt(dense::dot(wp, wp, d));
      if (pass == 0 && (!(n > 1e-8) || int64_t(survivors.size()) == add_max)) {
        std::fill(wp, wp + d, 0.0);
        continue;
      }
      for (int64_t r = 0; r < d; ++r) wp[r] /= n;
      survivors.push_back(p);
    }
    kept = survivors;
    dense::transpose<double>(k, d, wt, d, w.data());
  }
  // Survivors first, zero columns after: the products below run on all k (a multiple of 8)
  // columns, so a dropped column never sends them down their scalar paths.
  const int64_t add = int64_t(kept.size());
  for (int64_t i = 0; i < k; ++i) {
    if (i < add) std::copy(wt + kept[i] * d, wt + (kept[i] + 1) * d, wt + i * d);
    else std::fill(wt + i * d, wt + (i + 1) * d, 0.0);
  }
  dense::transpose<double>(k, d, wt, d, w.data());
  std::vector<double> aw(d * k), h((m + add) * k);
  apply(w.data(), k, aw.data());
  for (int64_t r = 0; r < d; ++r)
    for (int64_t i = 0; i < add; ++i) {
      b.V[r * b.mmax + m + i] = w[r * k + i];
      b.AV[r * b.mmax + m + i] = aw[r * k + i];
    }
  // H[0:m+add, m:m+add] = V^T (A V_new); mirrored below the diagonal; the new block symmetrised.
  dense::gemm_tn<double>(d, m + add, k, b.V.data(), b.mmax, aw.data(), k, h.data(), k, 1.0, 0.0);
  for (int64_t i = 0; i < m + add; ++i)
    for (int64_t c = 0; c < add; ++c) b.H[i * b.mmax + m + c] = h[i * k + c];
  for (int64_t i = m; i < m + add; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double v = j < m ? b.H[j * b.mmax + i] : 0.5 * (b.H[j * b.mmax + i] + b.H[i * b.mmax + j]);
      b.H[i * b.mmax + j] = b.H[j * b.mmax + i] = v;
    }
  b.m = m + add;
  return add;
}

// Thick restart: keep the `keep` lowest Ritz vectors V Y[:, :keep] (H becomes diag(theta)).
void restart_basis(Basis& b, const std::vector<double>& y, const std::vector<double>& theta,
                   int64_t keep, std::vector<double>& scratch) {
  const int64_t d = b.d, m = b.m;
  scratch.resize(d * keep);
  for (std::vector<double>* buf : {&b.V, &b.AV}) {
    dense::gemm_nn<double>(d, m, keep, buf->data(), b.mmax, y.data(), m, scratch.data(), keep,
                           1.0, 0.0);
    for (int64_t r = 0; r < d; ++r)
      std::copy(scratch.data() + r * keep, scratch.data() + (r + 1) * keep,
                buf->data() + r * b.mmax);
  }
  std::fill(b.H.begin(), b.H.end(), 0.0);
  for (int64_t i = 0; i < keep; ++i) b.H[i * b.mmax + i] = theta[i];
  b.m = keep;
}

// Seeded uniform numbers in [-1, 1) (splitmix64) for the start block's random columns:
// at::randn cost a noticeable share of a warm solve
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
void fill_uniform(double* out, int64_t n, uint64_t seed) {
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (seed += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    out[i] = double(z >> 11) * 0x1.0p-52 - 1.0;  // [0, 2^53) * 2^-52 - 1
  }
}

// Before any product with A, kPreSweeps sweeps of the preconditioner alone (fp32 subspace
// iteration with (L L^T)^-1, each far cheaper than a Davidson step) over a start block of 2 blk
// random columns damp the top of the spectrum and save Davidson steps on ill-conditioned
// spectra. A warm start (v0 given) is not swept: for a matrix that moved by 1e-3 lambda_min the
// given vector passes the stopping test at once, and sweeping the random columns that pad its
// block cost more than the rest of the solve; after a drift of ~lambda_min the unswept padding
// costs about one step more (figures: benchmarks/results/spectral_cpu.md,
// "Kernel design notes").
constexpr int kPreSweeps = 8;

EigOut davidson(const Problem& problem, const at::Tensor& v0, at::Tensor factor, double delta,
                int64_t nev, double tol, int64_t max_iter) {
  const int64_t d = problem.d;
  EigOut out;
  const double max_diag = problem.max_diag;
  const double floor_abs = std::max(max_diag, 1e-300) * 1e-14 * double(d);
  const bool reused = factor.defined();
  SingleThreadScope one_thread;
  if (!factor.defined()) {
    if (problem.matrix == nullptr ||
        !preconditioner_factor(*problem.matrix, max_diag, &factor, &delta, one_thread.saved()))
      return out;  // not converged
  }
  out.factor = factor;
  out.delta = delta;
  const int64_t blk = std::min<int64_t>(d, std::max<int64_t>(nev, 8));
  const int64_t keep = std::min<int64_t>(d, 2 * blk);
  const int64_t mmax = std::min<int64_t>(d, std::max<int64_t>(6 * blk, keep + blk));
  const int64_t given = v0.defined() ? v0.size(1) : 0;
  // 2 blk random columns for a cold start; a warm start adds blk - 1 to its vector(s).
  const int64_t start_cols = std::min(mmax, given > 0 ? std::max(blk, given) : 2 * blk);
  Basis basis(d, mmax);
  // Start block: seeded random columns (deterministic results for a given input), swept by
  // the preconditioner for a cold start, or the given vectors (warm start) padded with them.
  std::vector<double> w(d * start_cols);
  fill_uniform(w.data(), d * start_cols, 0x5eed);
  std::vector<double> scratch64;
  std::vector<float> scratch32;
  const float* L = factor.data_ptr<float>();
  if (given == 0) {
    preconditioner_sweeps(L, d, w, start_cols, kPreSweeps, one_thread.saved());
  } else {
    // The given vectors enter unswept: an fp32 factor at condition number 1e6 is ~10% off
    // (A + delta I)^-1 near the bottom, and a sweep would mix a converged vector with its
    // neighbours.
    const at::Tensor v0c = v0.contiguous();
    const double* pv = v0c.data_ptr<double>();
    for (int64_t r = 0; r < d; ++r)
      for (int64_t c = 0; c < std::min(given, start_cols); ++c)
        w[r * start_cols + c] = pv[r * given + c];
  }
  extend_basis(problem.apply, basis, w, start_cols, scratch64);
  SmallEigh eigh(mmax);
  std::vector<double> theta(mmax), y(mmax * mmax), x(d * blk), ax(d * blk), r(d * blk);
  bool checked = false;
  int64_t nb = 0;
  for (int64_t it = 0;; ++it) {
    const int64_t m = basis.m;
    eigh(basis.H.data(), mmax, m, theta.data(), y.data());
    nb = std::min(blk, m);
    // Ritz vectors X = V Y[:, :nb], A X = AV Y[:, :nb]; residuals R = A X - X diag(theta).
    dense::gemm_nn<double>(d, m, nb, basis.V.data(), mmax, y.data(), m, x.data(), nb, 1.0, 0.0);
    dense::gemm_nn<double>(d, m, nb, basis.AV.data(), mmax, y.data(), m, ax.data(), nb, 1.0, 0.0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < nb; ++j) r[i * nb + j] = ax[i * nb + j] - x[i * nb + j] * theta[j];
    w.resize(d * nb);
    precondition(L, d, r.data(), nb, w.data(), scratch32);
    double worst = 0;
    for (int64_t j = 0; j < std::min(nev, nb); ++j) {
      double rtw = 0;
      for (int64_t i = 0; i < d; ++i) rtw += r[i * nb + j] * w[i * nb + j];
      worst = std::max(worst, sm::relative_error_estimate(rtw, int(j), theta.data(), int(m), tol,
                                                           delta, floor_abs));
    }
    out.iterations = it;
    out.estimate = worst;
    const bool check = sm::check_factor_now(reused, problem.matrix != nullptr, checked, it, worst,
                                            tol);
    checked = checked || check;
    if (check && !factor_fits(L, d, x.data(), nb, theta[0], delta, scratch32)) {
      // The reused factor no longer acts like (A + delta I)^-1 near the bottom (the matrix moved
      // by more than about its smallest eigenvalue): build a fresh one, keep the basis.
      if (preconditioner_factor(*problem.matrix, max_diag, &factor, &delta, one_thread.saved())) {
        out.factor = factor;
        out.delta = delta;
        out.refactored = true;
        L = factor.data_ptr<float>();
      }
    }
    if (worst <= tol || m == d) { out.converged = true; break; }
    if (it >= max_iter) break;
    if (m + blk > mmax && keep < m) restart_basis(basis, y, theta, keep, scratch64);
    const int64_t grow = problem.narrow_expansion ? std::min(nev, nb) : nb;
    for (int64_t i = 0; grow < nb && i < d; ++i)  // keep the first `grow` columns of W
      std::copy(w.data() + i * nb, w.data() + i * nb + grow, w.data() + i * grow);
    if (extend_basis(problem.apply, basis, w, grow, scratch64) == 0) break;  // stagnated
  }
  // The whole final block: the caller reads the nev wanted pairs; the next ones serve as a gap
  // estimate and a refinement basis (refine_covariance_eig_cpu).
  out.values = at::tensor(std::vector<double>(theta.begin(), theta.begin() + nb), at::kDouble);
  at::Tensor vecs = at::from_blob(x.data(), {d, nb}, at::kDouble).clone();
  out.vectors = vecs / vecs.norm(2, {0}, true);
  return out;
}

// Entries of the lower triangle that are NaN or infinite (the solver reads nothing else).
template <typename M>
int64_t nonfinite_lower(const M* a, int64_t d) {
  int64_t bad = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j <= i; ++j)
      bad += !(std::fabs(a[i * d + j]) <= std::numeric_limits<M>::max());
  return bad;
}

// Smallest eigenpairs of the symmetric matrix whose LOWER triangle is that of `matrix` (the upper
// triangle is not read, as in torch.linalg.eigh). Returns solve_result: values [nb] and vectors
// [d, nb] fp64 (the final Ritz block, nb >= k), factor fp32; `factor` may be an empty tensor
// (then computed, and returned for reuse).
pybind11::dict smallest_eig_cpu(
    const at::Tensor& a_in, const at::Tensor& v0, const at::Tensor& factor, double delta,
    int64_t nev, double tol, int64_t max_iter) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == a_in.size(1), "matrix must be square");
  // An fp32 matrix is read as it is (its entries are exact in fp64; the products and sums are
  // fp64 either way): no fp64 copy, and every product streams half the bytes.
  const bool single = a_in.scalar_type() == at::kFloat;
  at::Tensor a = single ? a_in.contiguous() : a_in.to(at::kDouble).contiguous();
  const int64_t d = a.size(0);
  auto nothing = [&](const char* status) {
    EigOut none;
    none.values = at::empty({0}, at::kDouble);
    none.vectors = at::empty({d, 0}, at::kDouble);
    none.factor = at::empty({0, 0}, at::kFloat);
    none.estimate = double(INFINITY);
    return solve_result(none, status);
  };
  const int64_t bad = single ? nonfinite_lower(a.data_ptr<float>(), d)
                             : nonfinite_lower(a.data_ptr<double>(), d);
  if (bad > 0) return nothing("nonfinite");
  // Every shape the solver writes through is checked here (the Python layer validates too).
  TORCH_CHECK(factor.numel() == 0 || (factor.dim() == 2 && factor.size(0) == d &&
                                      factor.size(1) == d),
              "factor must be empty or [", d, ", ", d, "], got ", factor.sizes());
  TORCH_CHECK(v0.numel() % std::max<int64_t>(d, 1) == 0, "v0 must hold whole columns of ", d,
              " entries, got ", v0.numel());
  TORCH_CHECK(nev >= 1 && nev <= d, "nev must be in [1, ", d, "], got ", nev);
  TORCH_CHECK(max_iter >= 0, "max_iter must be >= 0");
  at::Tensor f = factor.numel() ? factor.to(at::kFloat).contiguous() : at::Tensor();
  // v0: [d] (a warm-start vector) or [d, s] (a warm-start block, e.g. previous Ritz vectors)
  at::Tensor v = v0.numel() ? v0.to(at::kDouble).reshape({d, -1}).contiguous() : at::Tensor();
  auto symm = [d](const auto* pa) -> ApplyOperator {
    return [=](const double* w, int64_t k, double* out) {
      dense::symm_lower<double>(d, pa, d, w, k, out, k, k);
    };
  };
  const ApplyOperator apply = single ? symm(a.data_ptr<float>()) : symm(a.data_ptr<double>());
  const Problem problem{d, apply, a.diagonal().max().item<double>(), &a};
  EigOut r = davidson(problem, v, f, delta, nev, tol, max_iter);
  if (r.values.defined() &&
      sm::resolve_with_fresh_factor(f.defined(), r.refactored, r.converged,
                                    !r.converged || factor_fits_answer(r)))
    r = davidson(problem, r.vectors.narrow(1, 0, 1).contiguous(), at::Tensor(), 0.0, nev, tol,
                 max_iter);
  if (!r.values.defined()) return nothing("no_factor");
  return solve_result(r, "ok");
}

// The thin-block kernels of cpu/dense_blocks.h, for tests: op "nn" -> a @ w, "tn" -> a^T @ w,
// "symm" -> S @ w with S the symmetric matrix of a's lower triangle, "precondition" ->
// (a a^T)^-1 w for a lower-triangular a (fp32 solves, as in the solver).
at::Tensor dense_block_cpu(const std::string& op, const at::Tensor& a_in, const at::Tensor& w_in) {
  TORCH_CHECK(a_in.dim() == 2 && w_in.dim() == 2, "a and w must be 2-D");
  at::Tensor w = w_in.to(at::kDouble).contiguous();
  const int64_t k = w.size(1);
  if (op == "precondition") {
    at::Tensor l = a_in.to(at::kFloat).contiguous();
    TORCH_CHECK(l.size(0) == l.size(1) && l.size(0) == w.size(0), "shape mismatch");
    at::Tensor out = at::empty_like(w);
    std::vector<float> scratch;
    precondition(l.data_ptr<float>(), l.size(0), w.data_ptr<double>(), k,
                 out.data_ptr<double>(), scratch);
    return out;
  }
  at::Tensor a = a_in.to(at::kDouble).contiguous();
  const double *pa = a.data_ptr<double>(), *pw = w.data_ptr<double>();
  if (op == "tn") {
    TORCH_CHECK(a.size(0) == w.size(0), "shape mismatch");
    at::Tensor out = at::empty({a.size(1), k}, a.options());
    dense::gemm_tn<double>(a.size(0), a.size(1), k, pa, a.size(1), pw, k,
                           out.data_ptr<double>(), k, 1.0, 0.0);
    return out;
  }
  TORCH_CHECK(a.size(1) == w.size(0), "shape mismatch");
  at::Tensor out = at::empty({a.size(0), k}, a.options());
  if (op == "symm") {
    TORCH_CHECK(a.size(0) == a.size(1), "symm needs a square a");
    dense::symm_lower<double>(a.size(0), pa, a.size(0), pw, k, out.data_ptr<double>(), k, k);
    return out;
  }
  TORCH_CHECK(op == "nn", "op must be nn, tn, symm or precondition");
  dense::gemm_nn<double>(a.size(0), a.size(1), k, pa, a.size(1), pw, k, out.data_ptr<double>(),
                         k, 1.0, 0.0);
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

// The skeleton of the exact-covariance products below: rows of z split into `threads`
// contiguous ranges (OpenMP, not ATen: the solver loop runs under SingleThreadScope), each
// summing into its own partial sums ([d k] for Zc^T U, then [k] for the column sums of U)
// through row_pass(sums, usum, b0, rows) on groups of <= 4 rows; then
// out[j, c] (row-major, leading dim ldo) = (sum_j,c - mean_j usum_c) / (B - correction).
template <typename RowPass>
void covariance_product(int64_t B, int64_t d, int64_t k, const double* mean, double correction,
                        double* out, int64_t ldo, int threads, const RowPass& row_pass) {
  constexpr int R = 4;
  const int parts = int(std::clamp<int64_t>(threads, 1, std::max<int64_t>(B / 256, 1)));
  std::vector<std::vector<double>> sums(parts, std::vector<double>(d * k + k, 0.0));
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    double *acc_out = sums[p].data(), *usum = acc_out + d * k;
    const int64_t end = B * (p + 1) / parts;
    int64_t b = B * p / parts;
    for (; b + R <= end; b += R) row_pass(acc_out, usum, b, R);
    for (; b < end; ++b) row_pass(acc_out, usum, b, 1);
  }
  for (int p = 1; p < parts; ++p)
    for (int64_t i = 0; i < d * k + k; ++i) sums[0][i] += sums[p][i];
  const double scale = 1.0 / (double(B) - correction);
  const double* usum = sums[0].data() + d * k;
  for (int64_t j = 0; j < d; ++j)
    for (int64_t c = 0; c < k; ++c)
      out[j * ldo + c] = (sums[0][j * k + c] - mean[j] * usum[c]) * scale;
}

// One column w [d] of a narrow product, rows [b0, b0 + R): u_q = z_q . w - mean . w, then
// acc += sum_q u_q z_q and usum += sum_q u_q. Vectorised along j (z converted to fp64 four
// entries at a time), so it runs near the speed of one pass over z whatever d is; the R rows stay
// in L1 between the two loops.
template <int R>
void narrow_rows_pass(const float* z, int64_t d, const double* w, double mw, int64_t b0,
                      double* acc, double* usum) {
  using V = dense::Chunk<double>::vec;
  using VU = dense::Chunk<double>::unaligned;
  typedef float F4 __attribute__((vector_size(16), aligned(4), may_alias));
  auto z4 = [&](int q, int64_t j) {  // z[b0 + q, j:j+4] as fp64
    return __builtin_convertvector(*reinterpret_cast<const F4*>(z + (b0 + q) * d + j), V);
  };
  const int64_t d8 = d - d % 8;
  V s[R][2] = {};
  for (int64_t j = 0; j < d8; j += 8) {
    const V w0 = *reinterpret_cast<const VU*>(w + j), w1 = *reinterpret_cast<const VU*>(w + j + 4);
    for (int q = 0; q < R; ++q) {
      s[q][0] += z4(q, j) * w0;
      s[q][1] += z4(q, j + 4) * w1;
    }
  }
  double u[R];
  for (int q = 0; q < R; ++q) {
    const V t = s[q][0] + s[q][1];
    u[q] = (t[0] + t[1]) + (t[2] + t[3]);
    for (int64_t j = d8; j < d; ++j) u[q] += double(z[(b0 + q) * d + j]) * w[j];
    u[q] -= mw;
    *usum += u[q];
  }
  for (int64_t j = 0; j < d8; j += 8) {
    V o0 = *reinterpret_cast<const VU*>(acc + j), o1 = *reinterpret_cast<const VU*>(acc + j + 4);
    for (int q = 0; q < R; ++q) {
      o0 += u[q] * z4(q, j);
      o1 += u[q] * z4(q, j + 4);
    }
    *reinterpret_cast<VU*>(acc + j) = o0;
    *reinterpret_cast<VU*>(acc + j + 4) = o1;
  }
  for (int64_t j = d8; j < d; ++j)
    for (int q = 0; q < R; ++q) acc[j] += u[q] * double(z[(b0 + q) * d + j]);
}

// Below this many columns a product goes column by column (narrow_rows_pass: one pass over z
// each) instead of through the 8-wide register tiles, which would pad W with zero columns: the
// refinement's expansions are one column (davidson's narrow_expansion).
constexpr int64_t kNarrowProductBelow = 4;

// Sigma W = Zc^T (Zc W) / (B - c) for the covariance of fp32 features z [B, d] (mean fp64), in
// fp64 sums of exact products, never forming Sigma: two passes over z, O(B d k), `threads` row
// ranges in parallel (covariance_product). Wide: rows of z in groups of 4 and columns of W in
// chunks of 8 (the register tiles of dense_blocks.h): U = Z W for the 4 rows, then out +=
// Z_rows^T U. One product is 4 B d k flops, big enough to split
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
void covariance_times(const float* z, int64_t B, int64_t d, const double* mean, double correction,
                      const double* w, int64_t k, double* out, int threads) {
  if (k < kNarrowProductBelow) {
    std::vector<double> wc(d);
    for (int64_t c = 0; c < k; ++c) {
      double mw = 0;
      for (int64_t j = 0; j < d; ++j) {
        wc[j] = w[j * k + c];
        mw += mean[j] * wc[j];
      }
      covariance_product(B, d, 1, mean, correction, out + c, k, threads,
                         [&](double* acc, double* usum, int64_t b0, int rows) {
                           if (rows == 4) narrow_rows_pass<4>(z, d, wc.data(), mw, b0, acc, usum);
                           else narrow_rows_pass<1>(z, d, wc.data(), mw, b0, acc, usum);
                         });
    }
    return;
  }
  if (k % 8 != 0) {  // pad W with zero columns to a multiple of 8
    const int64_t kp = k + 8 - k % 8;
    std::vector<double> wp(d * kp, 0.0), op(d * kp);
    for (int64_t j = 0; j < d; ++j) std::copy(w + j * k, w + (j + 1) * k, wp.data() + j * kp);
    covariance_times(z, B, d, mean, correction, wp.data(), kp, op.data(), threads);
    for (int64_t j = 0; j < d; ++j) std::copy(op.data() + j * kp, op.data() + j * kp + k, out + j * k);
    return;
  }
  using V = dense::Chunk<double>::vec;
  constexpr int NV = dense::Chunk<double>::kVecs, R = 4;
  std::vector<double> mw(k, 0.0);
  for (int64_t j = 0; j < d; ++j)
    for (int64_t c = 0; c < k; ++c) mw[c] += mean[j] * w[j * k + c];
  auto rows_pass = [&](double* acc_out, double* usum, int64_t b0, int rows) {
    for (int64_t c0 = 0; c0 < k; c0 += 8) {
      V u[R][NV] = {};
      for (int64_t j = 0; j < d; ++j) {
        V wj[NV];
        dense::load8<double>(wj, w + j * k + c0);
        for (int q = 0; q < rows; ++q) {
          const double zq = z[(b0 + q) * d + j];
          for (int v = 0; v < NV; ++v) u[q][v] += wj[v] * zq;
        }
      }
      V m[NV];
      dense::load8<double>(m, mw.data() + c0);
      for (int q = 0; q < rows; ++q) {
        for (int v = 0; v < NV; ++v) u[q][v] -= m[v];
        V acc[NV];
        dense::load8<double>(acc, usum + c0);
        for (int v = 0; v < NV; ++v) acc[v] += u[q][v];
        dense::store8<double>(usum + c0, acc);
      }
      for (int64_t j = 0; j < d; ++j) {
        V o[NV];
        dense::load8<double>(o, acc_out + j * k + c0);
        for (int q = 0; q < rows; ++q) {
          const double zq = z[(b0 + q) * d + j];
          for (int v = 0; v < NV; ++v) o[v] += u[q][v] * zq;
        }
        dense::store8<double>(acc_out + j * k + c0, o);
      }
    }
  };
  covariance_product(B, d, k, mean, correction, out, k, threads, rows_pass);
}

// The solver on the EXACT covariance of fp32 features z, given only through covariance_times:
// it starts from `x` (the final Ritz block of a solve on the covariance formed with fp32
// accumulation, whose fp32 factor preconditions) and stops at once or after a step or two up to
// condition number ~1e5 (4-8 steps at 1e6-1e7): fp32 rounding mostly mixes the nearly
// degenerate bottom eigenvectors, which that block spans.
// Same outputs as smallest_eig_cpu; the factor is never rebuilt (no matrix to build it from):
// if it does not fit the exact covariance at the answer, the answer is reported unconverged.
pybind11::dict refine_covariance_eig_cpu(
    const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& x, const at::Tensor& factor,
    double delta, double correction, double max_diag, double tol, int64_t max_iter) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.scalar_type() == at::kFloat, "z must be 2-D fp32");
  const at::Tensor z = z_in.contiguous(), mean = mean_in.to(at::kDouble).contiguous();
  const int64_t B = z.size(0), d = z.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == d && x.size(1) >= 1, "x must be [", d, ", k]");
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == d && factor.size(1) == d,
              "factor must be [", d, ", ", d, "]");
  TORCH_CHECK(mean.dim() == 1 && mean.numel() == d, "mean must be [", d, "]");
  TORCH_CHECK(max_iter >= 0, "max_iter must be >= 0");
  const float* pz = z.data_ptr<float>();
  const double* pm = mean.data_ptr<double>();
  const int threads = at::get_num_threads();  // (the solver below runs on one ATen thread)
  const Problem problem{d, [=](const double* w, int64_t k, double* out) {
                          covariance_times(pz, B, d, pm, correction, w, k, out, threads);
                        }, max_diag, nullptr, /*narrow_expansion=*/true};
  EigOut r = davidson(problem, x.to(at::kDouble).contiguous(),
                      factor.to(at::kFloat).contiguous(), delta, 1, tol, max_iter);
  // The factor is Sigma_32's: the stopping test's bound holds only while it acts like
  // (Sigma + delta I)^-1 on the answer, which it does on ill-conditioned covariances
  // (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
  if (r.converged) r.converged = factor_fits_answer(r);
  return solve_result(r, "ok");
}

// The stale-factor policy's fit test for tests: does the fp32 factor L fit (theta, x)?
bool factor_fits_cpu(const at::Tensor& l_in, const at::Tensor& x_in, double theta, double delta) {
  const at::Tensor l = l_in.to(at::kFloat).contiguous();
  const at::Tensor x = x_in.to(at::kDouble).reshape({-1, 1}).contiguous();
  TORCH_CHECK(l.dim() == 2 && l.size(0) == l.size(1) && l.size(0) == x.size(0),
              "factor must be [d, d] and x [d]");
  std::vector<float> scratch;
  return factor_fits(l.data_ptr<float>(), l.size(0), x.data_ptr<double>(), 1, theta, delta,
                     scratch);
}

// The CUDA Davidson loop's ATen building blocks (cuda/davidson_blocks.h) for tests, on any
// device: the orthonormal extension of W against V, the preconditioner application, and one
// basis update (restart + extension) returning (V, AV, m).
at::Tensor davidson_blocks_extension(const at::Tensor& v, const at::Tensor& w) {
  TORCH_CHECK(v.dim() == 2 && w.dim() == 2 && v.size(0) == w.size(0), "v [d, m], w [d, k]");
  return davidson_blocks::orthonormal_extension(v, w);
}
at::Tensor davidson_blocks_precondition(const at::Tensor& factor, const at::Tensor& r) {
  TORCH_CHECK(factor.dim() == 2 && r.dim() == 2 && factor.size(0) == r.size(0) &&
              factor.size(1) == factor.size(0), "factor [d, d], r [d, k]");
  return davidson_blocks::precondition(factor.to(at::kFloat), r.to(at::kDouble));
}
std::tuple<at::Tensor, at::Tensor, int64_t> davidson_blocks_update(
    const at::Tensor& a, const at::Tensor& v_in, const at::Tensor& av_in, int64_t m,
    const at::Tensor& y, const at::Tensor& w, int64_t blk, int64_t keep) {
  TORCH_CHECK(a.dim() == 2 && v_in.dim() == 2 && av_in.sizes() == v_in.sizes() &&
              v_in.size(0) == a.size(0) && m >= 1 && m <= v_in.size(1) && keep <= m &&
              y.dim() == 2 && y.size(0) == m && y.size(1) >= keep && w.dim() == 2 &&
              w.size(0) == a.size(0) && w.size(1) >= blk, "shape mismatch");
  at::Tensor v = v_in.clone(), av = av_in.clone();
  const int64_t out = davidson_blocks::update_basis(a, v, av, m, y, w, blk, keep);
  return {v, av, out};
}

// The preconditioner's Cholesky for tests: (L with zeros above, ok) on `threads` threads.
std::tuple<at::Tensor, bool> cholesky_cpu(const at::Tensor& a_in, int64_t threads) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == a_in.size(1), "a must be square");
  at::Tensor a = a_in.to(at::kFloat).contiguous().clone();
  const bool ok = cholesky_lower_inplace(a, int(threads));
  return {a, ok};
}

// covariance_times for tests: Sigma w for the covariance of fp32 z given its fp64 mean, on the
// caller's threads.
at::Tensor covariance_times_cpu(const at::Tensor& z_in, const at::Tensor& mean_in,
                                const at::Tensor& w_in, double correction) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.scalar_type() == at::kFloat, "z must be 2-D fp32");
  const at::Tensor z = z_in.contiguous(), mean = mean_in.to(at::kDouble).contiguous();
  const at::Tensor w = w_in.to(at::kDouble).contiguous();
  TORCH_CHECK(w.dim() == 2 && w.size(0) == z.size(1) && mean.numel() == z.size(1),
              "shape mismatch");
  at::Tensor out = at::empty_like(w);
  covariance_times(z.data_ptr<float>(), z.size(0), z.size(1), mean.data_ptr<double>(), correction,
                   w.data_ptr<double>(), w.size(1), out.data_ptr<double>(), at::get_num_threads());
  return out;
}

}  // namespace

void register_davidson_cpu(pybind11::module_& m) {
  m.def("smallest_eig_cpu", &smallest_eig_cpu,
        "smallest eigenpairs: preconditioned block Davidson -> dict(values, vectors, factor, "
        "delta, iterations, converged, estimate, status)",
        pybind11::arg("matrix"), pybind11::arg("v0"), pybind11::arg("factor"),
        pybind11::arg("delta"), pybind11::arg("nev"), pybind11::arg("tol"),
        pybind11::arg("max_iter"));
  m.def("refine_covariance_eig_cpu", &refine_covariance_eig_cpu,
        "the Davidson loop on the exact covariance of fp32 features, from a start block",
        pybind11::arg("z"), pybind11::arg("mean"), pybind11::arg("x"), pybind11::arg("factor"),
        pybind11::arg("delta"), pybind11::arg("correction"), pybind11::arg("max_diag"),
        pybind11::arg("tol"), pybind11::arg("max_iter"));
  auto t = m.def_submodule("testing", "test-only native hooks (calrft_kernels/testing.py)");
  t.def("dense_block_cpu", &dense_block_cpu, "thin-block kernels of the Davidson loop");
  t.def("jacobi_eigh_cpu", &jacobi_eigh_cpu, "shared small Jacobi eigensolver");
  t.def("cholesky_cpu", &cholesky_cpu, "the preconditioner's blocked fp32 Cholesky");
  t.def("covariance_times_cpu", &covariance_times_cpu,
        "Sigma w from fp32 features and their mean, never forming Sigma");
  t.def("davidson_blocks_extension", &davidson_blocks_extension,
        "cuda/davidson_blocks.h orthonormal_extension, on any device");
  t.def("davidson_blocks_precondition", &davidson_blocks_precondition,
        "cuda/davidson_blocks.h precondition, on any device");
  t.def("davidson_blocks_update", &davidson_blocks_update,
        "cuda/davidson_blocks.h update_basis -> (V, AV, m), on any device");
  t.def("factor_fits_cpu", &factor_fits_cpu,
        "the stale-factor policy's fit test (common/spectral_math.h) on (factor, x, theta, delta)");
}

}  // namespace calrft
