// One registration hook per op family and device; bindings.cpp calls them all.
#pragma once
#include <torch/extension.h>

namespace calrft {
void register_contrastive_cpu(pybind11::module_& m);   // csrc/cpu/contrastive.cpp
void register_sigmoid_cpu(pybind11::module_& m);       // csrc/cpu/sigmoid.cpp
void register_covariance_cpu(pybind11::module_& m);    // csrc/cpu/covariance.cpp
void register_davidson_cpu(pybind11::module_& m);      // csrc/cpu/davidson.cpp
#ifdef CALRFT_WITH_CUDA
void register_davidson_cuda(pybind11::module_& m);     // csrc/cuda/davidson.cu
#endif
}  // namespace calrft
