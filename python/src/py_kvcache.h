// The KV-cache plane's Python classes (py_kvcache.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace tepy {
void BindKvCache(pybind11::module_& m);
}  // namespace tepy
