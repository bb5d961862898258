// Building blocks of the block Davidson solver expressed in ATen ops, so one definition serves the
// CPU loop (csrc/cpu/spectral.cpp) and the CUDA loop (csrc/cuda/lanczos.cu): ATen dispatches each
// call to LAPACK/MKL or cuBLAS/cuSOLVER by the tensors' device. Host code only.
#pragma once
#include <ATen/ATen.h>

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

// (L L^T)^-1 R with two fp32 triangular solves: 2.5-3x faster on CPU than at::cholesky_solve,
// which copies the factor into LAPACK's layout on every call; on CUDA it is two cuBLAS trsm
// calls with no info check, so no host synchronisation.
inline at::Tensor precondition(const at::Tensor& factor, const at::Tensor& r) {
  at::Tensor y = at::linalg_solve_triangular(factor, r.to(at::kFloat), /*upper=*/false);
  return at::linalg_solve_triangular(factor.t(), y, /*upper=*/true).to(at::kDouble);
}

}  // namespace davidson_blocks
}  // namespace calrft
