// CUDA path of the block Davidson solver (Python: calrft_kernels/eigen.py, CPU twin:
// csrc/cpu/davidson.cpp). Same algorithm: block generalized Davidson preconditioned by an fp32
// Cholesky factor of A + delta I (cuSOLVER through ATen), exact fp64 Rayleigh-Ritz and residuals,
// and the same stale-factor policy (common/spectral_math.h): a reused factor is checked once at
// the first host read from kStaleCheckIteration on and rebuilt if it does not fit, and a solve
// whose reused factor did not converge or does not fit at the answer is redone with a fresh one.
// (Without the in-loop check a stale warm-start factor ran all max_iter iterations before the
// Python layer redid the solve, issue 12;
// figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").)
//
// GPU specifics:
//  * The projected eigenproblem (m <= 48) is solved ON THE DEVICE by one thread block running the
//    round-robin Jacobi of common/spectral_math.h (one thread per disjoint pair), so the Ritz step
//    needs no cuSOLVER call and no host round trip.
//  * The stopping test (relative_error_estimate, also shared) runs in the same kernel and writes
//    a device flag; the subspace sizes follow a data-independent schedule, so the host enqueues
//    iterations without reading anything back. It polls the flag every kPoll iterations (one
//    small async copy + event wait), never per iteration. Iterations enqueued after convergence
//    leave the frozen result untouched (the kernel returns early once the flag is set).
//  * Preconditioner solves use two triangular solves (cuBLAS trsm through ATen: no info sync).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/registry.h"
#include "common/solve_result.h"
#include "cuda/davidson_blocks.h"
#include "common/spectral_math.h"

namespace calrft {
namespace {
namespace sm = spectral;

constexpr int kMaxM = 48;       // largest projected problem (6 blocks of 8)
constexpr int kThreads = 256;
constexpr int kPoll = 4;        // host looks at the convergence flag every kPoll iterations
constexpr int kSweeps = 15;     // Jacobi sweep cap (quadratic convergence: 6-8 suffice from scratch)

// One block: H (m x m, row-major, symmetric) -> ascending theta [m], eigenvectors Y [m x m];
// then the stopping test on rTw [nb] (from the previous iteration's residuals) is NOT done here:
// see ritz_test_kernel. `done` != 0 -> return immediately (result frozen).
__global__ void projected_eigh_kernel(const double* __restrict__ h, int m, double* theta,
                                      double* y, const int* done) {
  if (*done) return;
  __shared__ double a[kMaxM * kMaxM];
  __shared__ double v[kMaxM * kMaxM];
  __shared__ double cs[kMaxM / 2][2];
  __shared__ int pq[kMaxM / 2][2];
  __shared__ double w[kMaxM];
  __shared__ double off2, frob2;  // off-diagonal / total squared norms (early exit)
  const int t = threadIdx.x;
  for (int i = t; i < m * m; i += blockDim.x) {
    const int r = i / m, c = i % m;
    a[i] = 0.5 * (h[r * m + c] + h[c * m + r]);
    v[i] = (r == c) ? 1.0 : 0.0;
  }
  __syncthreads();
  const int ne = sm::jacobi_even(m), slots = ne / 2;
  if (t == 0) frob2 = sm::frob_norm2(a, m);
  for (int sweep = 0; sweep < kSweeps; ++sweep) {
    // H = V^T A V is already nearly diagonal after a thick restart: most calls stop after a few
    // sweeps. Squared off-diagonal norm by a shared-memory atomic sum (m^2 <= 2304 terms).
    if (t == 0) off2 = 0.0;
    __syncthreads();
    double part = 0.0;
    for (int k = t; k < m * m; k += blockDim.x)
      if (k / m != k % m) part += a[k] * a[k];
    atomicAdd(&off2, part);
    __syncthreads();
    if (off2 <= 1e-30 * frob2) break;  // uniform: every thread reads the same shared value
    for (int round = 0; round < ne - 1; ++round) {
      if (t < slots) {
        int p, q;
        sm::jacobi_pair(round, t, ne, &p, &q);
        double c = 1.0, s = 0.0;
        if (q < m) sm::jacobi_rotation(a[p * m + p], a[p * m + q], a[q * m + q], &c, &s);
        pq[t][0] = p; pq[t][1] = q; cs[t][0] = c; cs[t][1] = s;
      }
      __syncthreads();
      // A <- A J and V <- V J: every row, columns (p, q) of each slot (disjoint columns).
      for (int k = t; k < slots * m; k += blockDim.x) {
        const int slot = k / m, i = k % m;
        if (pq[slot][1] >= m || cs[slot][1] == 0.0) continue;
        sm::rotate_row(a, m, i, pq[slot][0], pq[slot][1], cs[slot][0], cs[slot][1]);
        sm::rotate_row(v, m, i, pq[slot][0], pq[slot][1], cs[slot][0], cs[slot][1]);
      }
      __syncthreads();
      // A <- J^T A: rows (p, q) of each slot, every column.
      for (int k = t; k < slots * m; k += blockDim.x) {
        const int slot = k / m, j = k % m;
        if (pq[slot][1] >= m || cs[slot][1] == 0.0) continue;
        sm::rotate_col(a, m, j, pq[slot][0], pq[slot][1], cs[slot][0], cs[slot][1]);
      }
      __syncthreads();
      if (t < slots && pq[t][1] < m && cs[t][1] != 0.0) {
        a[pq[t][0] * m + pq[t][1]] = 0.0;
        a[pq[t][1] * m + pq[t][0]] = 0.0;
      }
      __syncthreads();
    }
  }
  // Sort ascending (m small: one thread), write theta and the permuted eigenvectors.
  if (t == 0) {
    int order[kMaxM];
    for (int i = 0; i < m; ++i) { order[i] = i; w[i] = a[i * m + i]; }
    for (int i = 1; i < m; ++i)
      for (int j = i; j > 0 && w[order[j]] < w[order[j - 1]]; --j) {
        const int o = order[j]; order[j] = order[j - 1]; order[j - 1] = o;
      }
    for (int i = 0; i < m; ++i) theta[i] = w[order[i]];
    for (int i = 0; i < m; ++i) a[i] = double(order[i]);  // reuse a[] to broadcast the order
  }
  __syncthreads();
  for (int k = t; k < m * m; k += blockDim.x) {
    const int r = k / m, c = k % m;
    y[r * m + c] = v[r * m + int(a[c])];
  }
}

// Stopping test for the first nev Ritz pairs; on success freezes (values, X) into the outputs.
__global__ void ritz_test_kernel(const double* theta, int m, const double* rtw, int nev, int nb,
                                 double tol, double delta, double floor_abs, const double* x,
                                 int d, double* values, double* vectors, int* done, double* stats,
                                 int iteration, int last) {
  if (*done) return;
  __shared__ int ok;
  if (threadIdx.x == 0) {
    double worst = 0.0;
    for (int i = 0; i < nev && i < nb; ++i)
      worst = fmax(worst, sm::relative_error_estimate(rtw[i], i, theta, m, tol, delta, floor_abs));
    ok = (worst <= tol) || last;
    stats[0] = iteration;
    stats[1] = worst <= tol ? 1.0 : 0.0;
    stats[3] = worst;
    for (int i = 0; i < nev; ++i) values[i] = theta[i];
  }
  __syncthreads();
  // X is [d, nb] row-major; copy its first nev columns (always: the last iterate is the answer
  // when the loop runs out).
  for (int k = threadIdx.x; k < d * nev; k += blockDim.x) vectors[k] = x[(k / nev) * nb + (k % nev)];
  __syncthreads();  // every thread has read *done above before thread 0 may set it
  if (threadIdx.x == 0 && ok) *done = 1;
}

using davidson_blocks::precondition;
using davidson_blocks::update_basis;

struct Solve {
  at::Tensor values, vectors, factor;
  double delta = 0, estimate = INFINITY;
  int64_t iterations = 0;
  bool converged = false, rebuilt = false, ok = true;
};

// fp32 factor of A + delta I, delta raised 10x on failure (the info read: one sync each).
bool shifted_factor(const at::Tensor& a, double max_diag, at::Tensor* factor, double* delta) {
  double shift = sm::initial_shift(max_diag);
  at::Tensor a32 = a.to(at::kFloat);
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

// The policy's fit test (sm::factor_fits_ratio) on the device: |L^-1 x|^2 (theta + delta) / |x|^2
// for x = column 0 of X [d, k] and theta = theta0 (a 1-element device tensor). One host read.
bool factor_fits(const at::Tensor& factor, const at::Tensor& X, const at::Tensor& theta0,
                 double delta) {
  at::Tensor x = X.select(1, 0).reshape({-1, 1});
  at::Tensor y = at::linalg_solve_triangular(factor, x.to(at::kFloat), /*upper=*/false);
  at::Tensor ratio = y.to(at::kDouble).pow(2).sum() * (theta0.reshape({}) + delta) /
                     x.pow(2).sum().clamp_min(1e-300);
  return sm::factor_fits_ratio(ratio.item<double>());
}

Solve davidson_cuda(const at::Tensor& a, const at::Tensor& v0, const at::Tensor& factor_in,
                    double delta, int64_t nev, double tol, int64_t max_iter, double max_diag) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t d = a.size(0);
  auto opts = a.options();
  const int64_t blk = std::min<int64_t>(d, std::max<int64_t>(nev, 8));
  const int64_t keep = std::min<int64_t>(d, 2 * blk);
  const int64_t mmax = std::min<int64_t>({d, int64_t(kMaxM), std::max<int64_t>(6 * blk, keep + blk)});
  TORCH_CHECK(blk + blk <= mmax || mmax == d, "nev too large for the CUDA solver");
  const double floor_abs = std::max(max_diag, 1e-300) * 1e-14 * double(d);
  Solve out;
  const bool reused = factor_in.numel() > 0;
  at::Tensor factor;
  if (reused) {
    factor = factor_in.to(at::kFloat).contiguous();
  } else if (!shifted_factor(a, max_diag, &factor, &delta)) {
    out.ok = false;
    return out;
  }
  at::Tensor V = at::zeros({d, mmax}, opts), AV = at::zeros({d, mmax}, opts);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0x5eed);
  at::Tensor start = at::randn({d, blk}, gen, opts.device(at::kCPU)).to(a.device());
  if (v0.numel()) start.select(1, 0).copy_(v0.reshape({-1}));
  start = std::get<0>(at::linalg_qr(start));
  int64_t m = blk;
  V.narrow(1, 0, m).copy_(start);
  AV.narrow(1, 0, m).copy_(at::mm(a, start));
  at::Tensor theta = at::zeros({mmax}, opts), Y = at::zeros({mmax * mmax}, opts);
  at::Tensor values = at::zeros({nev}, opts), vectors = at::zeros({d, nev}, opts);
  at::Tensor done = at::zeros({1}, opts.dtype(at::kInt));
  at::Tensor stats = at::zeros({4}, opts);
  at::Tensor done_host = at::zeros({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  bool checked = false;
  for (int64_t it = 0; it <= max_iter; ++it) {
    at::Tensor Vm = V.narrow(1, 0, m), AVm = AV.narrow(1, 0, m);
    at::Tensor H = at::mm(Vm.t(), AVm).contiguous();
    projected_eigh_kernel<<<1, kThreads, 0, stream>>>(H.data_ptr<double>(), int(m),
                                                      theta.data_ptr<double>(),
                                                      Y.data_ptr<double>(), done.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor Ym = Y.narrow(0, 0, m * m).view({m, m});
    const int64_t nb = std::min(blk, m);
    at::Tensor Yb = Ym.narrow(1, 0, nb);
    at::Tensor X = at::mm(Vm, Yb).contiguous(), AX = at::mm(AVm, Yb);
    at::Tensor R = AX - X * theta.narrow(0, 0, nb);
    at::Tensor W = precondition(factor, R);
    at::Tensor rTw = (R * W).sum(0).contiguous();
    const bool last = it == max_iter || m == d;
    // one block: the flag it sets must not be seen by a sibling block that has not copied yet
    ritz_test_kernel<<<1, kThreads, 0, stream>>>(
        theta.data_ptr<double>(), int(m), rTw.data_ptr<double>(), int(nev), int(nb), tol, delta,
        floor_abs, X.data_ptr<double>(), int(d), values.data_ptr<double>(),
        vectors.data_ptr<double>(), done.data_ptr<int>(), stats.data_ptr<double>(), int(it),
        int(last));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (last) break;
    // The only host reads of the loop: every kPoll iterations, and once for the stale check.
    const bool stale_point = reused && !checked && !out.rebuilt &&
                             it >= sm::kStaleCheckIteration;
    if ((it + 1) % kPoll == 0 || stale_point) {
      done_host.copy_(done, /*non_blocking=*/true);
      AT_CUDA_CHECK(cudaStreamSynchronize(stream));
      const bool converged_now = done_host.item<int>() != 0;
      if (converged_now) break;
      if (sm::check_factor_now(reused, true, checked, it, /*estimate=*/INFINITY, tol)) {
        checked = true;
        if (!factor_fits(factor, X, theta.narrow(0, 0, 1), delta) &&
            shifted_factor(a, max_diag, &factor, &delta)) {
          out.rebuilt = true;  // a fresh factor; the basis is kept
        }
      }
    }
    m = update_basis(a, V, AV, m, Ym, W, blk, keep);
  }
  at::Tensor st = stats.cpu();
  out.values = values;
  out.vectors = vectors / vectors.norm(2, {0}, true);
  out.factor = factor;
  out.delta = delta;
  out.iterations = int64_t(st[0].item<double>());
  out.converged = st[1].item<double>() > 0;
  out.estimate = st[3].item<double>();
  return out;
}

// Same signature and result names as smallest_eig_cpu (csrc/cpu/davidson.cpp); the matrix is
// the whole symmetric fp64 matrix (the Python layer checked it is finite).
pybind11::dict smallest_eig_cuda(const at::Tensor& a_in, const at::Tensor& v0,
                                 const at::Tensor& factor_in, double delta, int64_t nev,
                                 double tol, int64_t max_iter) {
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 2 && a_in.size(0) == a_in.size(1),
              "matrix must be a square CUDA tensor");
  const c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor a = a_in.to(at::kDouble).contiguous();
  const int64_t d = a.size(0);
  TORCH_CHECK(factor_in.numel() == 0 || (factor_in.dim() == 2 && factor_in.size(0) == d &&
                                         factor_in.size(1) == d),
              "factor must be empty or [", d, ", ", d, "]");
  TORCH_CHECK(v0.numel() == 0 || v0.numel() == d, "v0 must be empty or hold ", d, " entries");
  TORCH_CHECK(nev >= 1 && nev <= d && max_iter >= 0, "bad nev / max_iter");
  const double max_diag = a.diagonal().max().item<double>();  // one sync at set-up
  Solve r = davidson_cuda(a, v0, factor_in, delta, nev, tol, max_iter, max_diag);
  if (r.ok && sm::resolve_with_fresh_factor(
                  factor_in.numel() > 0, r.rebuilt, r.converged,
                  !r.converged || factor_fits(r.factor, r.vectors, r.values.narrow(0, 0, 1),
                                              r.delta)))
    r = davidson_cuda(a, r.vectors.select(1, 0).contiguous(), at::Tensor(), 0.0, nev, tol,
                      max_iter, max_diag);
  if (!r.ok) {
    r.values = at::empty({0}, a.options());
    r.vectors = at::empty({d, 0}, a.options());
    r.factor = at::empty({0, 0}, a.options().dtype(at::kFloat));
    return solve_result(r, "no_factor");
  }
  return solve_result(r, "ok");
}

}  // namespace

void register_davidson_cuda(pybind11::module_& m) {
  m.def("smallest_eig_cuda", &smallest_eig_cuda,
        "smallest eigenpairs on CUDA: preconditioned block Davidson, device-side Rayleigh-Ritz "
        "-> dict(values, vectors, factor, delta, iterations, converged, estimate, status)",
        pybind11::arg("matrix"), pybind11::arg("v0"), pybind11::arg("factor"),
        pybind11::arg("delta"), pybind11::arg("nev"), pybind11::arg("tol"),
        pybind11::arg("max_iter"));
}

}  // namespace calrft
