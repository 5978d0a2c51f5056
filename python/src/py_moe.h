// MoE dispatch and combine from Python: ExpertMap and EpDispatcher over the
// four dispatchers of moe/ (normal, low latency, hierarchical, coherent).
#pragma once

#include <pybind11/pybind11.h>

namespace tepy {

void BindMoe(pybind11::module_& m);

}  // namespace tepy
