// How an engine Status reaches Python: as transfer_engine.TransferError (a
// RuntimeError) whose `code` is a StatusCode and `message` the engine's text.
//
// Binding code throws StatusError; the translator registered by
// RegisterStatusError turns it into the Python exception. No other C++
// exception is expected to cross the binding; pybind11 maps any that does to
// a RuntimeError rather than abort.
#pragma once

#include <pybind11/pybind11.h>

#include <utility>

#include "base/status.h"

namespace tepy {

struct StatusError {
  te::Status status;
};

[[noreturn]] inline void Throw(te::Status status) { throw StatusError{std::move(status)}; }
inline void Check(const te::Status& status) {
  if (!status.ok()) Throw(status);
}
template <typename T>
T Unwrap(te::Result<T> result) {
  if (!result.ok()) Throw(result.status());
  return std::move(result).value();
}

// Defines StatusCode and TransferError on `m` and installs the translator.
void RegisterStatusError(pybind11::module_& m);

}  // namespace tepy

namespace tepy {
// A TransferError instance for `status` (not raised), for Handle.exception().
pybind11::object ErrorObject(const te::Status& status);
// Raises the builtin TimeoutError: a wait's deadline passed while the work
// is still going (not a failure of the work).
[[noreturn]] void RaiseTimeout(const std::string& what);
}  // namespace tepy
