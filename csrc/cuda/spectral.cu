#include "common/registry.h"

namespace calrft {
void register_spectral_cuda(pybind11::module_& m) {}
}  // namespace calrft
