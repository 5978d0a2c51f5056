// Expert placement from Python: fit a placement to recorded routing, count
// the records dispatch and combine would move under it, and hand each layer
// to dispatch as an ExpertMap (moe/placement_solver.h, moe/dispatch_cost.h).
#pragma once

#include <pybind11/pybind11.h>

namespace tepy {

void BindPlacement(pybind11::module_& m);

}  // namespace tepy
