// The result of a Davidson solve as the Python layer reads it (calrft_kernels/eigen.py builds its
// SolveResult dataclass from these names), shared by the CPU (csrc/cpu/davidson.cpp) and CUDA
// (csrc/cuda/davidson.cu) solvers so both report the same fields. Host code only.
// status: "ok", "nonfinite" (a NaN/inf in the lower triangle: nothing was solved) or
// "no_factor" (no shifted fp32 factorisation exists: the caller uses the dense solver).
#pragma once
#include <torch/extension.h>

namespace calrft {

template <typename Result>
pybind11::dict solve_result(const Result& r, const char* status) {
  pybind11::dict out;
  out["values"] = r.values;
  out["vectors"] = r.vectors;
  out["factor"] = r.factor;
  out["delta"] = r.delta;
  out["iterations"] = r.iterations;
  out["converged"] = r.converged;
  out["estimate"] = r.estimate;
  out["status"] = status;
  return out;
}

}  // namespace calrft
