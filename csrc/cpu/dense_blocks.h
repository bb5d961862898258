// Thin-block dense kernels of the CPU Davidson loop (csrc/cpu/davidson.cpp): a d x d matrix or a
// d x m basis times a thin row-major block (k = 8..32 columns), the transposed product, the
// product with a symmetric matrix stored as its lower triangle, the two triangular solves
// with the fp32 Cholesky factor, and that factorisation itself.
//
// Why not BLAS: on this project's hosts (AMD EPYC, torch's MKL) dgemm and strsm with 8 columns
// are several times slower than these loops, whose product runs near one core's fp64 FMA peak
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes"). MKL does not
// pick its fast paths on AMD, and a thin product needs many independent accumulators to hide
// the FMA latency.
//
// Layout: every matrix is row-major with an explicit leading dimension. Columns are processed in
// chunks of 8 (one 32-byte vector of fp32, two of fp64; GCC vector extensions, so -mavx2 gives
// YMM code and other targets still compile), output rows in tiles of 4 (fp64) or 8 (fp32): 8
// accumulator vectors either way; leftovers take a scalar path.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace calrft::dense {

template <typename T>
struct Chunk;  // 8 columns of T as vectors of 32 bytes
template <>
struct Chunk<double> {
  typedef double vec __attribute__((vector_size(32)));
  // the same vector at the element's alignment: an unaligned load/store (vmovupd), no copy
  typedef double unaligned __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int kVecs = 2, kLanes = 4;
};
template <>
struct Chunk<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int kVecs = 1, kLanes = 8;
};

template <typename T>
inline void load8(typename Chunk<T>::vec* v, const T* p) {
  using U = typename Chunk<T>::unaligned;
  for (int i = 0; i < Chunk<T>::kVecs; ++i)
    v[i] = reinterpret_cast<const U*>(p)[i];
}
template <typename T>
inline void store8(T* p, const typename Chunk<T>::vec* v) {
  using U = typename Chunk<T>::unaligned;
  for (int i = 0; i < Chunk<T>::kVecs; ++i) reinterpret_cast<U*>(p)[i] = v[i];
}

// C[r, 0:8] = beta C + alpha acc (beta == 0 never reads C: C may be uninitialised).
template <typename T>
inline void finish8(T* c, const typename Chunk<T>::vec* acc, T alpha, T beta) {
  using V = typename Chunk<T>::vec;
  constexpr int NV = Chunk<T>::kVecs;
  V out[NV];
  if (beta == T(0)) {
    for (int v = 0; v < NV; ++v) out[v] = acc[v] * alpha;
  } else {
    load8<T>(out, c);
    for (int v = 0; v < NV; ++v) out[v] = out[v] * beta + acc[v] * alpha;
  }
  store8<T>(c, out);
}

// Rows per register tile: 8 accumulator vectors either way (4 rows x 2 vectors of fp64, 8 rows x
// 1 vector of fp32), enough independent FMA chains to hide the FMA latency.
template <typename T>
constexpr int kTileRows = 8 / Chunk<T>::kVecs;

// The one register-tiled product both thin GEMMs below are: C[o, 0:k] = beta C + alpha
// sum_t S(o, t) B[t, 0:k] for o < outs, t < inner, where S(o, t) = s[o * so + t * st] (a strided
// view: A with (lda, 1), or a transposed M with (1, ldm)). Output tiles of kTileRows rows outside,
// column chunks of 8 inside: a tile's rows of S stay in L1/L2 while every chunk of B passes, so S
// streams from memory once whatever k is. C must not overlap S or B.
template <typename T>
void gemm_strided(int64_t outs, int64_t inner, int64_t k, const T* s, int64_t so, int64_t st,
                  const T* B, int64_t ldb, T* C, int64_t ldc, T alpha, T beta) {
  using V = typename Chunk<T>::vec;
  constexpr int NV = Chunk<T>::kVecs, R = kTileRows<T>;
  const int64_t k8 = k - k % 8;
  auto tile = [&](int64_t o0, int rows) {
    for (int64_t c0 = 0; c0 < k8; c0 += 8) {
      V acc[R][NV] = {};
      for (int64_t t = 0; t < inner; ++t) {
        V b[NV];
        load8<T>(b, B + t * ldb + c0);
        const T* src = s + o0 * so + t * st;
        for (int q = 0; q < rows; ++q)
          for (int v = 0; v < NV; ++v) acc[q][v] += b[v] * src[q * so];
      }
      for (int q = 0; q < rows; ++q) finish8<T>(C + (o0 + q) * ldc + c0, acc[q], alpha, beta);
    }
  };
  int64_t o = 0;
  for (; o + R <= outs; o += R) tile(o, R);  // constant trip count: the tile stays in registers
  for (; o < outs; ++o) tile(o, 1);
  for (int64_t o2 = 0; o2 < outs && k8 < k; ++o2)  // leftover columns (k not a multiple of 8)
    for (int64_t c = k8; c < k; ++c) {
      T sum = 0;
      for (int64_t t = 0; t < inner; ++t) sum += s[o2 * so + t * st] * B[t * ldb + c];
      C[o2 * ldc + c] = (beta == T(0) ? T(0) : beta * C[o2 * ldc + c]) + alpha * sum;
    }
}

// C[rows, k] = beta C + alpha A[rows, inner] B[inner, k].
template <typename T>
void gemm_nn(int64_t rows, int64_t inner, int64_t k, const T* A, int64_t lda, const T* B,
             int64_t ldb, T* C, int64_t ldc, T alpha, T beta) {
  gemm_strided<T>(rows, inner, k, A, lda, 1, B, ldb, C, ldc, alpha, beta);
}

// C[cols, k] = beta C + alpha M[rows, cols]^T W[rows, k].
template <typename T>
void gemm_tn(int64_t rows, int64_t cols, int64_t k, const T* M, int64_t ldm, const T* W,
             int64_t ldw, T* C, int64_t ldc, T alpha, T beta) {
  gemm_strided<T>(cols, rows, k, M, 1, ldm, W, ldw, C, ldc, alpha, beta);
}

// C[d, k] = S W for the symmetric S whose lower triangle is that of A [d, d] (the upper triangle
// is never read, as in LAPACK's UPLO = 'L'): each entry below the diagonal is read once and
// used twice (C_i += a_ij w_j, C_j += a_ij w_i), so the matrix streams half the bytes of a full
// product. Row tiles of 2 (fp64) / 4 (fp32) keep both the tile's W rows and its sums in registers.
// A may be stored in a narrower type M than the sums (an fp32 matrix, fp64 products and sums:
// exact products of its entries, and half the bytes streamed).
template <typename T, typename M = T>
void symm_lower(int64_t d, const M* A, int64_t lda, const T* W, int64_t ldw, T* C, int64_t ldc,
                int64_t k) {
  using V = typename Chunk<T>::vec;
  constexpr int NV = Chunk<T>::kVecs, R = kTileRows<T> / 2;
  const int64_t k8 = k - k % 8;
  for (int64_t i = 0; i < d; ++i) std::fill(C + i * ldc, C + i * ldc + k, T(0));
  auto diagonal_tile = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = r0; j <= i; ++j) {
        const T a = T(A[i * lda + j]);
        for (int64_t c = c0; c < c1; ++c) {
          C[i * ldc + c] += a * W[j * ldw + c];
          if (j != i) C[j * ldc + c] += a * W[i * ldw + c];
        }
      }
  };
  int64_t r0 = 0;
  for (; r0 + R <= d; r0 += R) {
    const M* a = A + r0 * lda;
    for (int64_t c0 = 0; c0 < k8; c0 += 8) {
      V acc[R][NV] = {}, wr[R][NV];
      for (int q = 0; q < R; ++q) load8<T>(wr[q], W + (r0 + q) * ldw + c0);
      for (int64_t j = 0; j < r0; ++j) {
        V b[NV], o[NV];
        load8<T>(b, W + j * ldw + c0);
        load8<T>(o, C + j * ldc + c0);
        for (int q = 0; q < R; ++q) {
          const T aq = T(a[q * lda + j]);
          for (int v = 0; v < NV; ++v) {
            acc[q][v] += b[v] * aq;
            o[v] += wr[q][v] * aq;
          }
        }
        store8<T>(C + j * ldc + c0, o);
      }
      for (int q = 0; q < R; ++q) {
        V cur[NV];
        load8<T>(cur, C + (r0 + q) * ldc + c0);
        for (int v = 0; v < NV; ++v) cur[v] += acc[q][v];
        store8<T>(C + (r0 + q) * ldc + c0, cur);
      }
    }
    if (k8 > 0) diagonal_tile(r0, r0 + R, 0, k8);
  }
  if (k8 > 0 && r0 < d) {  // the last rows: off-diagonal part row by row, then their tile
    for (int64_t i = r0; i < d; ++i)
      for (int64_t j = 0; j < r0; ++j) {
        const T a = T(A[i * lda + j]);
        for (int64_t c = 0; c < k8; ++c) {
          C[i * ldc + c] += a * W[j * ldw + c];
          C[j * ldc + c] += a * W[i * ldw + c];
        }
      }
    diagonal_tile(r0, d, 0, k8);
  }
  if (k8 < k) {  // leftover columns: plain loops over the lower triangle
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < i; ++j) {
        const T a = T(A[i * lda + j]);
        for (int64_t c = k8; c < k; ++c) {
          C[i * ldc + c] += a * W[j * ldw + c];
          C[j * ldc + c] += a * W[i * ldw + c];
        }
      }
    for (int64_t i = 0; i < d; ++i)
      for (int64_t c = k8; c < k; ++c) C[i * ldc + c] += T(A[i * lda + i]) * W[i * ldw + c];
  }
}

// x . y with 16 independent partial sums (a plain loop is one serial chain of adds).
inline double dot(const double* x, const double* y, int64_t n) {
  using V = Chunk<double>::vec;
  using U = Chunk<double>::unaligned;
  V acc[4] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int v = 0; v < 4; ++v)
      acc[v] += reinterpret_cast<const U*>(x + i)[v] * reinterpret_cast<const U*>(y + i)[v];
  V s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  double out = (s[0] + s[1]) + (s[2] + s[3]);
  for (; i < n; ++i) out += x[i] * y[i];
  return out;
}

// dst[c, r] = src[r, c] for an 8 x 8 fp32 tile, in registers (the unpack / shuffle / lane-swap
// network of an AVX transpose). For the blocked Cholesky's panel transposes: with the scalar
// loop they were a large share of its time on one core; this tile makes the one-thread factor
// faster (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
// r[i] (row i of an 8 x 8 tile) becomes column i, in registers.
inline void transpose8x8_registers(Chunk<float>::vec* r) {
  using V = Chunk<float>::vec;
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + 2 + h], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + 2 + h], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  using V = Chunk<float>::vec;
  using U = Chunk<float>::unaligned;
  V r[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const U*>(src + i * lds);
  transpose8x8_registers(r);
  for (int i = 0; i < 8; ++i) *reinterpret_cast<U*>(dst + i * ldd) = r[i];
}

// Transpose a row-major [rows, cols] block (leading dim lds) into row-major [cols, rows]
// (leading dim ldd; rows when not given).
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd = 0) {
  constexpr int64_t kTile = 16;
  if (ldd == 0) ldd = rows;
  if constexpr (std::is_same_v<T, float>) {
    if (rows >= 8 && cols >= 8) {  // 8 x 8 register tiles, then the ragged edges
      const int64_t r8 = rows - rows % 8, c8 = cols - cols % 8;
      for (int64_t r0 = 0; r0 < r8; r0 += 8)
        for (int64_t c0 = 0; c0 < c8; c0 += 8)
          transpose8x8(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = (r < r8 ? c8 : 0); c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
      return;
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Triangular solves with a lower-triangular row-major L [d, d] on X [d, k] (leading dim k), in
// blocks of kTriBlock rows: the off-diagonal part of each block is one thin product above, the
// diagonal part a short serial loop.
constexpr int64_t kTriBlock = 8;

// The diagonal block rows [b0, b1) of a solve, once the rows outside it are subtracted:
// forward (L^-1, top row first) or transposed (L^-T, bottom row first).
template <typename T, bool kTransposed>
void solve_diagonal_block(const T* L, int64_t d, T* X, int64_t k, int64_t b0, int64_t b1) {
  for (int64_t n = 0; n < b1 - b0; ++n) {
    const int64_t i = kTransposed ? b1 - 1 - n : b0 + n;
    T* xi = X + i * k;
    for (int64_t j = kTransposed ? i + 1 : b0; j < (kTransposed ? b1 : i); ++j) {
      const T l = kTransposed ? L[j * d + i] : L[i * d + j];
      const T* xj = X + j * k;
      for (int64_t c = 0; c < k; ++c) xi[c] -= l * xj[c];
    }
    const T inv = T(1) / L[i * d + i];
    for (int64_t c = 0; c < k; ++c) xi[c] *= inv;
  }
}

// X <- L^-1 X (left-looking: each block first subtracts the rows already solved above it).
template <typename T>
void solve_lower(const T* L, int64_t d, T* X, int64_t k) {
  for (int64_t b0 = 0; b0 < d; b0 += kTriBlock) {
    const int64_t b1 = std::min(d, b0 + kTriBlock);
    if (b0 > 0) gemm_nn<T>(b1 - b0, b0, k, L + b0 * d, d, X, k, X + b0 * k, k, T(-1), T(1));
    solve_diagonal_block<T, false>(L, d, X, k, b0, b1);
  }
}

// X <- L^-T X (left-looking from the last block: each block first subtracts the rows already
// solved below it, L[b1:d, b0:b1]^T X[b1:d], one thin product whose every inner step reads
// kTriBlock consecutive entries of a row of L). The right-looking order (a solved block updates
// all rows above it) re-read and rewrote X per block and was slower
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
template <typename T>
void solve_lower_transposed(const T* L, int64_t d, T* X, int64_t k) {
  for (int64_t b1 = d; b1 > 0; b1 -= kTriBlock) {
    const int64_t b0 = std::max<int64_t>(0, b1 - kTriBlock);
    if (b1 < d)
      gemm_tn<T>(d - b1, b1 - b0, k, L + b1 * d + b0, d, X + b1 * k, k, X + b0 * k, k, T(-1), T(1));
    solve_diagonal_block<T, true>(L, d, X, k, b0, b1);
  }
}

// X <- (L L^T)^-1 X: the two solves with a Cholesky factor L.
template <typename T>
void solve_cholesky(const T* L, int64_t d, T* X, int64_t k) {
  solve_lower<T>(L, d, X, k);
  solve_lower_transposed<T>(L, d, X, k);
}

// ---- Cholesky ---------------------------------------------------------------------------------
// The lower Cholesky factor of the solver's fp32 preconditioner, in place, from the kernels above.
// Why not LAPACK: MKL's spotrf on 2 threads runs slower on these hosts than the thin products
// above on one core; this factor is faster than torch.linalg.cholesky and as accurate
// (benchmarks/bench_spectral_kernels.py;
// figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").

// Unblocked, for a diagonal block of <= 8 rows (fp64 sums): false on a pivot that is not a
// positive finite number.
inline bool cholesky_unblocked(float* a, int64_t ld, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = j; i < n; ++i) {
      double s = a[i * ld + j];
      for (int64_t t = 0; t < j; ++t) s -= double(a[i * ld + t]) * double(a[j * ld + t]);
      if (i == j) {
        if (!(s > 0.0) || !(s <= 3.4e38)) return false;
        a[j * ld + j] = float(std::sqrt(s));
      } else {
        a[i * ld + j] = float(s / double(a[j * ld + j]));
      }
    }
  }
  return true;
}

// A = L L^T for the row-major fp32 block a[0:n, 0:n] (leading dim ld): the lower triangle is read
// and overwritten by L; the strict upper triangle is not touched. Left-looking by block columns
// of nb: the block column [c0, c0 + w) first subtracts L[c0:n, 0:c0] L[c0:c0+w, 0:c0]^T (one
// thin product, rows split over `threads`), then its diagonal block is factored (recursively,
// blocks of 8, one thread), then the rows below solve against it (transposed: the forward solve
// above with the rows as its columns, split over `threads`). False if A is not positive
// definite (in fp32). threads > 1 needs OpenMP (the solver's own team, as the sweeps).
//
// The update runs in slices of kCholInner columns of L, each added into A at once: fp32 sums of
// 64 terms, not of up to d. A whole row's sum in one chain (or slices of 256) gave
// ||L L^T - A|| / ||A|| 2.3-3.9e-7 (2.0-2.4e-7), and the Davidson loop one more step at
// condition 1e6, d = 512 (the sweeps' start block is only as good as the factor).
constexpr int64_t kCholInner = 64;

inline bool cholesky_blocked(float* a, int64_t ld, int64_t n, int64_t nb, int threads) {
  if (n <= 8) return cholesky_unblocked(a, ld, n);
  std::vector<float> panel_t(n * nb), diag(nb * nb);
  bool ok = true;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0, nt = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    std::vector<float> y;
    // This thread's part of count, in multiples of 8 (the kernels' vector width): every row
    // then takes the same code path whatever the thread count, so the factor has the same bits.
    auto share = [&](int64_t count, int64_t* lo, int64_t* hi) {
      *lo = count * tid / nt / 8 * 8;
      *hi = tid + 1 == nt ? count : count * (tid + 1) / nt / 8 * 8;
    };
    for (int64_t c0 = 0; c0 < n; c0 += nb) {
      const int64_t w = std::min(nb, n - c0);
      if (c0 > 0) {
        int64_t lo, hi;
        share(c0, &lo, &hi);  // panel_t [c0, w] = L[c0:c0+w, 0:c0]^T, by parts
        if (hi > lo)
          transpose<float>(w, hi - lo, a + c0 * ld + lo, ld, panel_t.data() + lo * w, w);
#pragma omp barrier
        share(n - c0, &lo, &hi);
        // in slices of kCholInner columns of L: a tile's 8 rows of them stay in L1 while the
        // panel's 8 column chunks pass
        for (int64_t t0 = 0; t0 < c0 && hi > lo; t0 += kCholInner)
          gemm_strided<float>(hi - lo, std::min(kCholInner, c0 - t0), w,
                              a + (c0 + lo) * ld + t0, ld, 1, panel_t.data() + t0 * w, w,
                              a + (c0 + lo) * ld + c0, ld, -1.f, 1.f);
#pragma omp barrier
      }
#pragma omp single
      {
        ok = ok && cholesky_blocked(a + c0 * ld + c0, ld, w, 8, 1);
        for (int64_t i = 0; i < w; ++i)
          std::copy(a + (c0 + i) * ld + c0, a + (c0 + i) * ld + c0 + i + 1, diag.data() + i * w);
      }
      if (!ok) break;  // the same value on every thread: set before single's barrier
      // L[r, c0:c0+w] = A[r, c0:c0+w] D^-T for the rows r below: D Y = A_panel^T, Y = L_panel^T.
      int64_t lo, hi;
      share(n - c0 - w, &lo, &hi);
      if (hi > lo) {
        const int64_t m = hi - lo;
        float* rows = a + (c0 + w + lo) * ld + c0;
        y.resize(w * m);
        transpose<float>(m, w, rows, ld, y.data());
        solve_lower<float>(diag.data(), w, y.data(), m);
        transpose<float>(w, m, y.data(), m, rows, ld);
      }
#pragma omp barrier
    }
  }
  return ok;
}

}  // namespace calrft::dense
