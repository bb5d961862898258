// Spectral math shared by the CPU (csrc/cpu/covariance.cpp, csrc/cpu/davidson.cpp) and CUDA
// (csrc/cuda/davidson.cu) code: Chan's covariance merge, the stopping test of the Davidson
// iteration, the stale-factor policy, and a small symmetric eigensolver (Jacobi, round-robin
// ordering) for the projected Rayleigh-Ritz problem.
// Everything is header-only, host+device, no allocation, no library calls, so the CPU tests
// exercise exactly the code the GPU kernel runs.
#pragma once
#include <cmath>

#include "hd.h"

namespace calrft::spectral {

// ---- Chan et al. pairwise update ------------------------------------------------------------
// Merge two (count, mean, comoment) summaries. Comoment M = sum (z - mean)(z - mean)^T. Entry
// form so a kernel can do it elementwise: M_ij += Ma_ij + Mb_ij + (dm_i dm_j) na nb / n.
CALRFT_HD double chan_mean(double na, double mean_a, double nb, double mean_b) {
  const double n = na + nb;
  return n > 0 ? mean_a + (mean_b - mean_a) * (nb / n) : 0.0;
}
CALRFT_HD double chan_comoment(double na, double nb, double m_a, double m_b, double dmi,
                               double dmj) {
  const double n = na + nb;
  return n > 0 ? m_a + m_b + dmi * dmj * (na * nb / n) : 0.0;
}

// ---- Stopping test --------------------------------------------------------------------------
// For a Ritz pair (theta, x) of a symmetric PSD A with residual r = A x - theta x and
// preconditioned residual w = T r, T ~ (A + delta I)^-1, the eigenvalue error obeys
//     theta - lambda  <=  (r^T T r) / g,   g = (lambda_next - theta) / (lambda_next + delta),
// for the eigenvalue lambda that theta approximates, lambda_next the next one up. (Split
// sum_i c_i^2 (lambda_i - theta) = 0 and use (lambda_i - theta)^2 / (lambda_i + delta) >= g (lambda_i - theta).)
// lambda_next is estimated by the first Ritz value outside theta's cluster (relative width
// tol/2: mixing inside such a cluster moves theta by less than tol/2). Returns the RELATIVE
// error estimate; infinity when no Ritz value lies outside the cluster (cannot bound yet).
// floor_abs (~ the rounding level of A, e.g. 1e-14 d max A_ii) widens the cluster and bounds the
// reference value from below, so a singular A (lambda = 0, any multiplicity) converges.
CALRFT_HD double relative_error_estimate(double rTw, int index, const double* theta, int m,
                                         double tol, double delta, double floor_abs) {
  const double t = theta[index];
  const double ref = fmax(fabs(t), floor_abs);
  for (int j = index + 1; j < m; ++j) {
    if (theta[j] > t + 0.5 * tol * ref + floor_abs) {
      const double g = (theta[j] - t) / (fmax(theta[j], 0.0) + delta);
      return fmax(rTw, 0.0) / (g * ref);
    }
  }
  return INFINITY;
}

// ---- Stale-factor policy (the one place: both Davidson solvers call these) -------------------
// A factor L reused from a previous matrix only preconditions, so a stale one cannot bias the
// answer, but the stopping test's bound reads r^T (L L^T)^-1 r: it holds only while
// T = (L L^T)^-1 acts like (A + delta I)^-1 near the bottom. The test, on the lowest Ritz pair
// (theta, x): ratio = |L^-1 x|^2 (theta + delta) / |x|^2 is 1 for an exact factor and pair; a
// factor from a matrix that moved by more than ~lambda_min leaves [0.8, 1.25].
CALRFT_HD bool factor_fits_ratio(double ratio) { return ratio >= 0.8 && ratio <= 1.25; }
// In the loop: the first iteration >= kStaleCheckIteration at which a REUSED factor has not yet
// converged is checked once; if it does not fit, a fresh factor is built and the basis kept.
constexpr int kStaleCheckIteration = 4;
CALRFT_HD bool check_factor_now(bool reused, bool can_rebuild, bool checked, long long iteration,
                                double estimate, double tol) {
  return reused && can_rebuild && !checked && iteration >= kStaleCheckIteration && estimate > tol;
}
// After the loop: a reused factor that was never rebuilt and gave an unconverged answer, or does
// not fit at the answer, means solving again with a fresh factor, from the answer.
CALRFT_HD bool resolve_with_fresh_factor(bool reused, bool rebuilt, bool converged, bool fits) {
  return reused && !rebuilt && (!converged || !fits);
}

// ---- Small symmetric eigensolver: cyclic Jacobi with round-robin (parallel) ordering ----------
// In each of the n_even - 1 rounds of a sweep the n_even / 2 pairs are disjoint, so a GPU block
// computes them in parallel (one thread per pair); the CPU loops over them. n_even = n rounded up
// to even; a pair that touches the padding index n is skipped.
CALRFT_HD int jacobi_even(int n) { return n + (n & 1); }

// Pair `slot` of round `round` (circle method: index n_even-1 fixed, the others rotate).
CALRFT_HD void jacobi_pair(int round, int slot, int n_even, int* p, int* q) {
  const int k = n_even - 1;
  int a = (slot == 0) ? k : (round + slot) % k;
  int b = (round + k - slot) % k;
  if (slot == 0) b = round % k;
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Rotation (c, s) that zeroes a_pq of the 2x2 block [[app, apq], [apq, aqq]] (Golub & Van Loan 8.5.2).
CALRFT_HD void jacobi_rotation(double app, double apq, double aqq, double* c, double* s) {
  if (apq == 0.0) { *c = 1.0; *s = 0.0; return; }
  const double tau = (aqq - app) / (2.0 * apq);
  const double t = (tau >= 0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
  *c = 1.0 / sqrt(1.0 + t * t);
  *s = t * *c;
}

// Apply rotation (p, q, c, s) to the columns p, q of row i of a (row-major, leading dim ld):
// a[i,p], a[i,q] <- c a[i,p] - s a[i,q], s a[i,p] + c a[i,q]. Used for A (rows then columns)
// and for the eigenvector matrix.
CALRFT_HD void rotate_row(double* a, int ld, int i, int p, int q, double c, double s) {
  const double x = a[i * ld + p], y = a[i * ld + q];
  a[i * ld + p] = c * x - s * y;
  a[i * ld + q] = s * x + c * y;
}
CALRFT_HD void rotate_col(double* a, int ld, int j, int p, int q, double c, double s) {
  const double x = a[p * ld + j], y = a[q * ld + j];
  a[p * ld + j] = c * x - s * y;
  a[q * ld + j] = s * x + c * y;
}

CALRFT_HD double offdiag_norm2(const double* a, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      if (i != j) s += a[i * n + j] * a[i * n + j];
  return s;
}
CALRFT_HD double frob_norm2(const double* a, int n) {
  double s = 0;
  for (int i = 0; i < n * n; ++i) s += a[i] * a[i];
  return s;
}

// Serial driver (CPU, and tests): a <- diag(w) in place, v <- eigenvectors (columns), both n x n
// row-major; then sorts ascending. The GPU kernel runs the same rounds with one thread per slot.
CALRFT_HD int jacobi_eigh(double* a, double* v, double* w, int n, int max_sweeps = 30) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) v[i * n + j] = (i == j) ? 1.0 : 0.0;
  const int ne = jacobi_even(n);
  const double stop = 1e-30 * frob_norm2(a, n);
  int sweep = 0;
  for (; sweep < max_sweeps && offdiag_norm2(a, n) > stop; ++sweep) {
    for (int round = 0; round < ne - 1; ++round) {
      for (int slot = 0; slot < ne / 2; ++slot) {
        int p, q;
        jacobi_pair(round, slot, ne, &p, &q);
        if (q >= n) continue;
        double c, s;
        jacobi_rotation(a[p * n + p], a[p * n + q], a[q * n + q], &c, &s);
        if (s == 0.0) continue;
        for (int i = 0; i < n; ++i) rotate_row(a, n, i, p, q, c, s);  // A <- A J
        for (int j = 0; j < n; ++j) rotate_col(a, n, j, p, q, c, s);  // A <- J^T A
        for (int i = 0; i < n; ++i) rotate_row(v, n, i, p, q, c, s);  // V <- V J
        a[p * n + q] = a[q * n + p] = 0.0;
      }
    }
  }
  for (int i = 0; i < n; ++i) w[i] = a[i * n + i];
  // insertion sort (n is small), permuting eigenvector columns alongside
  for (int i = 1; i < n; ++i) {
    for (int j = i; j > 0 && w[j] < w[j - 1]; --j) {
      double t = w[j]; w[j] = w[j - 1]; w[j - 1] = t;
      for (int r = 0; r < n; ++r) {
        double u = v[r * n + j]; v[r * n + j] = v[r * n + j - 1]; v[r * n + j - 1] = u;
      }
    }
  }
  return sweep;
}

// Shift used for the low-precision preconditioner factor: a few fp32 ulps of the largest
// diagonal entry (>= ||A|| / d), so a PSD A + delta I factors in fp32; raised 10x on failure.
CALRFT_HD double initial_shift(double max_diag) { return 1e-7 * max_diag; }

}  // namespace calrft::spectral
