#include "common/registry.h"

namespace calrft {
void register_spectral_cpu(pybind11::module_& m) {}
}  // namespace calrft
