// The request kinds as Python objects (SingleWrite, PagedWrite, ScatterWrite,
// ImmOnly, Barrier), Engine.submit / expected_imm_count over them, and the
// one-call forms (write, write_paged, write_scatter, write_batch, imm_only,
// barrier) that build and submit one without an intermediate object.
//
// Page and offset lists come in through the buffer protocol (a numpy
// array, or anything numpy.asarray takes): one copy into the request, no
// per-element Python conversion, and values outside 32 (pages) or 64 bits
// (offsets) refused rather than wrapped.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "py_engine.h"

namespace tepy {

// A Handle object for `h`.
pybind11::object WrapHandle(PyEngine& e, std::shared_ptr<HandleState> h);

void BindRequests(pybind11::module_& m, pybind11::class_<PyEngine, std::shared_ptr<PyEngine>>& engine);

}  // namespace tepy
