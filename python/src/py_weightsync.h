// The weight-update plane's Python classes (py_weightsync.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace tepy {
void BindWeightSync(pybind11::module_& m);
}  // namespace tepy
