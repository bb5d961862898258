#include "common/registry.h"

namespace calrft {
void register_lanczos_cuda(pybind11::module_& m) {}
}  // namespace calrft
