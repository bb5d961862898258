#include "common/registry.h"

namespace calrft {
void register_contrastive_cpu(pybind11::module_& m) {}
}  // namespace calrft
