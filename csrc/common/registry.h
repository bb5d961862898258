// One registration hook per op family and device; bindings.cpp calls them all.
#pragma once
#include <torch/extension.h>

namespace calrft {
void register_contrastive_cpu(pybind11::module_& m);   // csrc/cpu/contrastive.cpp
void register_spectral_cpu(pybind11::module_& m);      // csrc/cpu/spectral.cpp
#ifdef CALRFT_WITH_CUDA
void register_covariance_cuda(pybind11::module_& m);   // csrc/cuda/covariance.cu
void register_lanczos_cuda(pybind11::module_& m);      // csrc/cuda/lanczos.cu
#endif
}  // namespace calrft
