// Building blocks of the CUDA block Davidson loop (csrc/cuda/davidson.cu) in ATen ops (cuBLAS /
// cuSOLVER underneath). Host code only. The CPU loop (csrc/cpu/davidson.cpp) runs the same steps
// on the hand-vectorised thin-block kernels of cpu/dense_blocks.h instead: through ATen, MKL was
// several times slower per step on this project's AMD hosts
// (figures: benchmarks/results/spectral_cpu.md, "Kernel design notes"). Both
// loops share the stopping test and the small-matrix math of common/spectral_math.h.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace calrft {
namespace davidson_blocks {

// Orthonormalise W against the columns of V (classical Gram-Schmidt twice), then within itself
// (Householder QR), then once more against V (QR of a nearly dependent block can mix V back in).
inline at::Tensor orthonormal_extension(const at::Tensor& v, const at::Tensor& w_in) {
  at::Tensor w = w_in;
  for (int pass = 0; pass < 2; ++pass) w = w - at::mm(v, at::mm(v.t(), w));
  w = std::get<0>(at::linalg_qr(w));
  w = w - at::mm(v, at::mm(v.t(), w));
  return std::get<0>(at::linalg_qr(w));
}

// (L L^T)^-1 R with two fp32 triangular solves: two cuBLAS trsm calls with no info check, so no
// host synchronisation (at::cholesky_solve would check info).
inline at::Tensor precondition(const at::Tensor& factor, const at::Tensor& r) {
  at::Tensor y = at::linalg_solve_triangular(factor, r.to(at::kFloat), /*upper=*/false);
  return at::linalg_solve_triangular(factor.t(), y, /*upper=*/true).to(at::kDouble);
}

// One basis update of the block Davidson loop. V and AV are [d, mmax] buffers whose first m
// columns hold the basis and its image under A. When `blk` more columns would not fit, restart
// thickly on the `keep` lowest Ritz vectors (the first columns of Y); then extend the basis by
// up to `blk` orthonormalised directions from W and store their images A W. Returns the new m.
inline int64_t update_basis(const at::Tensor& a, at::Tensor& V, at::Tensor& AV, int64_t m,
                            const at::Tensor& Y, const at::Tensor& W, int64_t blk, int64_t keep) {
  if (m + blk > V.size(1)) {
    at::Tensor Yk = Y.narrow(1, 0, keep);
    at::Tensor nv = at::mm(V.narrow(1, 0, m), Yk), nav = at::mm(AV.narrow(1, 0, m), Yk);
    V.narrow(1, 0, keep).copy_(nv);
    AV.narrow(1, 0, keep).copy_(nav);
    m = keep;
  }
  const int64_t add = std::min(blk, V.size(0) - m);
  at::Tensor Wn = orthonormal_extension(V.narrow(1, 0, m), W.narrow(1, 0, add));
  V.narrow(1, m, add).copy_(Wn);
  AV.narrow(1, m, add).copy_(at::mm(a, Wn));
  return m + add;
}

}  // namespace davidson_blocks
}  // namespace calrft
