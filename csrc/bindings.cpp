// Module init of calrft_kernels._C. Each op family registers its own functions (one file each),
// so adding an op never means editing a shared table. The Python package wraps these in
// torch.library custom ops (calrft_kernels/*.py), which own validation, fake kernels and autograd.
#include <torch/extension.h>

#include "common/registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "calrft-kernels native kernels (C++ CPU, and CUDA when built with it)";
  calrft::register_contrastive_cpu(m);
  calrft::register_sigmoid_cpu(m);
  calrft::register_covariance_cpu(m);
  calrft::register_davidson_cpu(m);
#ifdef CALRFT_WITH_CUDA
  calrft::register_davidson_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
