// CPU kernels of the covariance family (Python: calrft_kernels/covariance.py):
//   covariance_cpu   centred covariance, fused: chunks of rows are centred on a shift into a
//                    transposed buffer and only a block-triangle of the product is formed, in
//                    place (a SYRK's work: about half a GEMM's); the shift's error is removed
//                    exactly at the end; the result is exactly symmetric (mirrored).
//   chan_merge_cpu   Chan's pairwise comoment merge (CovarianceAccumulator.merge).
// Measurements behind the constants: docs/spectral.md and benchmarks/results/spectral_cpu.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/registry.h"
#include "cpu/dense_blocks.h"
#include "common/spectral_math.h"

namespace calrft {
namespace {
namespace sm = spectral;

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// BLAS GEMM straight from the torch library when it exports it (MKL builds do): the block
// triangle of a Gram matrix is written in place, block by block, into strided parts of the
// output, which ATen's mm would copy through a temporary. Weak symbols: the ATen path in
// gram_block takes over where a build lacks them.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const double* alpha, const double* a, const int* lda,
                       const double* b, const int* ldb, const double* beta, double* c,
                       const int* ldc) __attribute__((weak));

template <typename T>
auto blas_gemm() {
  if constexpr (std::is_same_v<T, float>) return sgemm_; else return dgemm_;
}

// Columns per block of the Gram product: n blocks do (n + 1) / 2n of a full GEMM's work
// (d = 512: 8 blocks, 0.56; d = 1024: 16 blocks, 0.53), and 64-wide GEMMs still run near full
// speed (MKL sgemm, blocks of 32 to 128 columns against the full GEMM)
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
constexpr int64_t kGramBlock = 64;
// Above this many columns the triangle is split in two halves and the square between them is
// one GEMM (gram_upper_blocks): fewer, larger GEMMs; splitting above 64 or 128 columns was
// slower than above 256 (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
constexpr int64_t kGramSplitAbove = 256;

// The fp32 case of centre_transposed below, for a full tile of `rows` (a multiple of 8) rows and
// 8 columns: ct[j, t] = z[t, j] - shift[j] through 8 x 8 register transposes, sums[j] +=
// sum_t (z[t, j] - shift[j]) in fp64, in the same order as the generic loop (the same bits).
// That loop wrote through a tile buffer with a copy per row of it, which showed up as memmove
// time; this one has none and is bound by its passes over memory
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
void centre_transpose_8x8(const float* z, int64_t d, const float* shift, int64_t rows, float* ct,
                          int64_t ld, double* sums) {
  using V = dense::Chunk<float>::vec;
  using U = dense::Chunk<float>::unaligned;
  using D = dense::Chunk<double>::vec;
  using DU = dense::Chunk<double>::unaligned;
  const V s = *reinterpret_cast<const U*>(shift);
  D lo = *reinterpret_cast<const DU*>(sums), hi = *reinterpret_cast<const DU*>(sums + 4);
  for (int64_t t0 = 0; t0 < rows; t0 += 8) {
    V r[8];
    for (int q = 0; q < 8; ++q) {
      r[q] = *reinterpret_cast<const U*>(z + (t0 + q) * d) - s;
      lo += __builtin_convertvector(__builtin_shufflevector(r[q], r[q], 0, 1, 2, 3), D);
      hi += __builtin_convertvector(__builtin_shufflevector(r[q], r[q], 4, 5, 6, 7), D);
    }
    dense::transpose8x8_registers(r);
    for (int c = 0; c < 8; ++c) *reinterpret_cast<U*>(ct + c * ld + t0) = r[c];
  }
  *reinterpret_cast<DU*>(sums) = lo;
  *reinterpret_cast<DU*>(sums + 4) = hi;
}

// ct[j, t] = z[t, j] - shift[j] (t < rows, ct [d, ld] row-major) in 32 x 32 tiles, and sums[j]
// += sum_t ct[j, t] (fp64). The Gram GEMMs below want the chunk transposed: with the
// summed index contiguous in both operands, MKL runs the column blocks faster than on the
// row-major chunk (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes"),
// and the centring pass was needed anyway.
template <typename In, typename T>
void centre_transposed(const In* z, int64_t rows, int64_t d, const T* shift, T* ct, int64_t ld,
                       double* sums) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (d + kTile - 1) / kTile;
  // Each thread takes a contiguous range of column tiles (>= 128 columns) and walks the rows
  // block by block: a column stripe walked down all rows instead touched a new page of z per
  // tile row (TLB misses) (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
  at::parallel_for(0, tiles, /*grain_size=*/4, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kTile, c1 = std::min(d, b1 * kTile);
    std::vector<double> acc(c1 - c0, 0.0);
    T tile[kTile][kTile];
    for (int64_t t0 = 0; t0 < rows; t0 += kTile) {
      const int64_t nt = std::min(kTile, rows - t0);
      for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
        const int64_t nj = std::min(kTile, c1 - j0);
        double* a = acc.data() + (j0 - c0);
        if constexpr (std::is_same_v<In, float> && std::is_same_v<T, float>) {
          if (nt == kTile && nj == kTile) {  // 8 x 8 register tiles, no tile buffer
            for (int64_t jj = 0; jj < kTile; jj += 8)
              centre_transpose_8x8(z + t0 * d + j0 + jj, d, shift + j0 + jj, kTile,
                                   ct + (j0 + jj) * ld + t0, ld, a + jj);
            continue;
          }
        }
        for (int64_t t = 0; t < nt; ++t) {  // a row of the tile: contiguous, vectorised
          const In* zt = z + (t0 + t) * d + j0;
          for (int64_t j = 0; j < nj; ++j) {
            const T v = T(zt[j]) - shift[j0 + j];
            tile[j][t] = v;
            a[j] += double(v);
          }
        }
        for (int64_t j = 0; j < nj; ++j) std::copy(tile[j], tile[j] + nt, ct + (j0 + j) * ld + t0);
      }
    }
    for (int64_t j = c0; j < c1; ++j) sums[j] += acc[j - c0];
  });
}

// out[r0:r0+nr, c0:c0+nc] (+)= ct[r0:r0+nr] ct[c0:c0+nc]^T: one block of the Gram matrix of
// the transposed chunk ct [d, ld] (rows columns in use) in the row-major out [d, d].
// accumulate=false overwrites.
template <typename T>
void gram_block(const T* ct, int64_t ld, int64_t rows, int64_t d, T* out, bool accumulate,
                int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  if (auto gemm = blas_gemm<T>(); gemm != nullptr) {
    // Column-major reading: ct is A [rows, d] (ld ld), out is out^T (ld d); the block is
    // out^T[c0.., r0..] = A[:, c0..]^T A[:, r0..] (this operand order is MKL's fast one).
    const int m = int(nc), n = int(nr), k = int(rows), lda = int(ld), ldc = int(d);
    const T one = 1, beta = accumulate ? 1 : 0;
    gemm("T", "N", &m, &n, &k, &one, ct + c0 * ld, &lda, ct + r0 * ld, &lda, &beta,
         out + r0 * d + c0, &ldc);
    return;
  }
  const auto dt = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  at::Tensor a = at::from_blob(const_cast<T*>(ct), {d, rows}, {ld, 1}, dt);
  at::Tensor block = at::from_blob(out, {d, d}, dt).narrow(0, r0, nr).narrow(1, c0, nc);
  at::Tensor g = at::mm(a.narrow(0, r0, nr), a.narrow(0, c0, nc).t());
  if (accumulate) block.add_(g); else block.copy_(g);
}

// The UPPER block-triangle of the chunk's Gram matrix on the diagonal block [j0, j0 + n) (a
// SYRK's work; torch's BLAS exports no ssyrk): up to kGramSplitAbove columns as kGramBlock-wide
// block columns (rows j0 .. the block's last row), above that split into two halves whose
// square in between is one GEMM.
template <typename T>
void gram_upper_blocks(const T* ct, int64_t ld, int64_t rows, int64_t d, T* out,
                       bool accumulate, int64_t j0, int64_t n) {
  if (n > kGramSplitAbove) {
    const int64_t h = (n / 2 + kGramBlock - 1) / kGramBlock * kGramBlock;
    gram_upper_blocks(ct, ld, rows, d, out, accumulate, j0, h);
    gram_block(ct, ld, rows, d, out, accumulate, j0, h, j0 + h, n - h);
    gram_upper_blocks(ct, ld, rows, d, out, accumulate, j0 + h, n - h);
    return;
  }
  for (int64_t c0 = j0; c0 < j0 + n; c0 += kGramBlock) {
    const int64_t nc = std::min(kGramBlock, j0 + n - c0);
    gram_block(ct, ld, rows, d, out, accumulate, j0, c0 + nc - j0, c0, nc);
  }
}

// The last pass, from the upper triangle: out[i, j] = (out[j, i] - n e_i e_j) / denom for
// j <= i (e: the offset of the mean from the centring shift); the strict upper
// triangle then becomes the mirror (full) or zeros (the solver reads only the lower one). Block
// by block through a padded tile: read and written by rows, the transposition happens in the
// tile (a column walk of out has a 2^k-byte stride that maps every access to one cache set,
// which made the direct loop slow)
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").
template <typename T>
void finish_from_upper(T* out, int64_t d, const double* e, double n, double denom, bool full) {
  constexpr int64_t kTile = 64, kPad = kTile + 1;
  const double inv = 1.0 / denom;
  std::vector<T> tile(kTile * kPad);
  for (int64_t j0 = 0; j0 < d; j0 += kTile)
    for (int64_t i0 = j0; i0 < d; i0 += kTile) {  // the upper block out[j0.., i0..]
      const int64_t nj = std::min(kTile, d - j0), ni = std::min(kTile, d - i0);
      for (int64_t jj = 0; jj < nj; ++jj) {
        T* row = out + (j0 + jj) * d + i0;
        const double ej = n * e[j0 + jj];
        for (int64_t ii = 0; ii < ni; ++ii) {
          const double v = (double(row[ii]) - ej * e[i0 + ii]) * inv;
          tile[jj * kPad + ii] = T(v);
          if (i0 + ii > j0 + jj) row[ii] = full ? T(v) : T(0);
        }
      }
      for (int64_t ii = 0; ii < ni; ++ii) {
        T* row = out + (i0 + ii) * d + j0;
        for (int64_t jj = 0; jj < std::min(nj, i0 + ii - j0 + 1); ++jj)
          row[jj] = tile[jj * kPad + ii];
      }
    }
}

// fp64_accumulate: centre and multiply in fp64 whatever the input dtype (chunk by chunk: never a
// B x d fp64 copy). covariance_sigma_min needs it: fp32 accumulation perturbs Sigma by ~1e-7
// ||Sigma||, i.e. the error of fp32 eigvalsh, on lambda_min of an ill-conditioned Sigma.
// lower_only: the strict upper triangle is left zero (the solver reads the lower one only).
//
// Chunks of rows are centred on a shift into one transposed buffer (the only copy: chunk x d),
// and the upper block-triangle of each chunk's Gram matrix is added to the output
// (gram_upper_blocks); the last pass corrects the shift, scales, and moves the result to the
// lower triangle (finish_from_upper).
std::tuple<at::Tensor, at::Tensor> covariance_cpu(const at::Tensor& z_arg, double correction,
                                                  bool fp64_accumulate, bool lower_only) {
  TORCH_CHECK(z_arg.dim() == 2 && z_arg.size(1) > 0, "z must be 2-D with at least one column");
  const at::Tensor z_in = z_arg.contiguous();
  // chunks of <= 2^22 entries (16 MB of fp32; rows in [256, 8192]: 4096 at d = 1024)
  constexpr int64_t kChunkEntries = int64_t(1) << 22;
  const int64_t B = z_in.size(0), d = z_in.size(1);
  const auto ct = fp64_accumulate ? at::kDouble : compute_dtype(z_in.scalar_type());
  const int64_t chunk = std::min(std::clamp<int64_t>(kChunkEntries / d, 256, 8192),
                                 std::max<int64_t>(B, 1));
  // The rows are centred on a shift s: the mean of the first chunk (of all of z when it fits
  // one), summed in the compute dtype (z.sum(0, fp64) converts every entry, far slower; and no
  // pass over the rest of z). The centred chunks' column sums, in
  // fp64, give e = mean - s exactly enough (they are small numbers: s is within ~spread /
  // sqrt(chunk) of the mean), and sum (z - mean)(z - mean)^T = sum (z - s)(z - s)^T - B e e^T.
  // (The mean of the first 256 rows alone saved little time but lost accuracy where the later
  // rows' mean drifted: the e e^T term then dominates.
  // (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes").)
  const int64_t first = std::min(chunk, B);
  at::Tensor shift = z_in.narrow(0, 0, first).sum(0, /*keepdim=*/false, ct)
                         .div_(double(std::max<int64_t>(first, 1)));
  at::Tensor residual_sum = at::zeros({d}, z_in.options().dtype(at::kDouble));
  auto opts = z_in.options().dtype(ct);
  at::Tensor buf = at::empty({d, chunk}, opts);  // the centred chunk, transposed
  at::Tensor out = at::empty({d, d}, opts);
  if (B == 0) out.zero_();
  double* sums = residual_sum.data_ptr<double>();
  const auto in_type = z_in.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_type, "covariance_cpu", [&] {
    using In = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "covariance_cpu", [&] {
      const In* pz = z_in.data_ptr<In>();
      scalar_t *pb = buf.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>();
      for (int64_t r0 = 0; r0 < B; r0 += chunk) {
        const int64_t rows = std::min(chunk, B - r0);
        centre_transposed(pz + r0 * d, rows, d, shift.data_ptr<scalar_t>(), pb, chunk, sums);
        gram_upper_blocks(pb, chunk, rows, d, po, r0 > 0, 0, d);
      }
    });
  });
  at::Tensor e = residual_sum / double(std::max<int64_t>(B, 1));
  AT_DISPATCH_FLOATING_TYPES(ct, "covariance_cpu", [&] {
    finish_from_upper(out.data_ptr<scalar_t>(), d, e.data_ptr<double>(), double(B),
                      double(B) - correction, !lower_only);
  });
  return {out, shift.to(at::kDouble) + e};
}


// Elementwise Chan merge of two comoment matrices (fp64): used by CovarianceAccumulator.merge.
// Every shape written through is checked first (a corrupt accumulator state used to reach the
// loop below with a smaller buffer: heap corruption).
at::Tensor chan_merge_cpu(const at::Tensor& ma, const at::Tensor& mb, const at::Tensor& dm,
                          double na, double nb) {
  TORCH_CHECK(dm.dim() == 1 && dm.numel() > 0, "chan_merge_cpu: the mean difference must be a "
              "non-empty vector [d], got ", dm.sizes());
  const int64_t d = dm.numel();
  TORCH_CHECK(ma.dim() == 2 && ma.size(0) == d && ma.size(1) == d,
              "chan_merge_cpu: comoment a must be [", d, ", ", d, "], got ", ma.sizes());
  TORCH_CHECK(mb.dim() == 2 && mb.size(0) == d && mb.size(1) == d,
              "chan_merge_cpu: comoment b must be [", d, ", ", d, "], got ", mb.sizes());
  TORCH_CHECK(ma.is_floating_point() && mb.is_floating_point() && dm.is_floating_point(),
              "chan_merge_cpu: floating-point inputs expected");
  TORCH_CHECK(ma.device().is_cpu() && mb.device().is_cpu() && dm.device().is_cpu(),
              "chan_merge_cpu: CPU tensors expected");
  TORCH_CHECK(na >= 0 && nb >= 0 && std::isfinite(na) && std::isfinite(nb),
              "chan_merge_cpu: counts must be finite and >= 0");
  at::Tensor a = ma.to(at::kDouble).contiguous(), b = mb.to(at::kDouble).contiguous();
  at::Tensor diff = dm.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({d, d}, a.options());
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

void register_covariance_cpu(pybind11::module_& m) {
  m.def("covariance_cpu", &covariance_cpu, "centred covariance (cov, mean fp64)",
        pybind11::arg("z"), pybind11::arg("correction"),
        pybind11::arg("fp64_accumulate") = false, pybind11::arg("lower_only") = false);
  m.def("chan_merge_cpu", &chan_merge_cpu, "Chan comoment merge (fp64)", pybind11::arg("ma"),
        pybind11::arg("mb"), pybind11::arg("dm"), pybind11::arg("na"), pybind11::arg("nb"));
}

}  // namespace calrft
