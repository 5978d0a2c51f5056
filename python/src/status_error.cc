#include "status_error.h"

namespace py = pybind11;

namespace tepy {

namespace {
py::object* error_type = nullptr;  // set once at import; lives as long as the module
}

py::object ErrorObject(const te::Status& status) {
  py::object exc = (*error_type)(py::str(status.ToString()));
  exc.attr("code") = py::cast(status.code());
  exc.attr("message") = py::str(status.message());
  return exc;
}

void RaiseTimeout(const std::string& what) {
  PyErr_SetString(PyExc_TimeoutError, what.c_str());
  throw py::error_already_set();
}

void RegisterStatusError(py::module_& m) {
  py::enum_<te::StatusCode>(m, "StatusCode", py::arithmetic(), "What went wrong, as the engine's te::StatusCode")
      .value("OK", te::StatusCode::kOk)
      .value("INVALID_ARGUMENT", te::StatusCode::kInvalidArgument)
      .value("OUT_OF_RANGE", te::StatusCode::kOutOfRange)
      .value("NOT_FOUND", te::StatusCode::kNotFound)
      .value("UNAVAILABLE", te::StatusCode::kUnavailable)
      .value("TIMEOUT", te::StatusCode::kTimeout)
      .value("CANCELLED", te::StatusCode::kCancelled)
      .value("IO_ERROR", te::StatusCode::kIoError)
      .value("UNIMPLEMENTED", te::StatusCode::kUnimplemented)
      .value("INTERNAL", te::StatusCode::kInternal)
      .value("NOT_POSTED", te::StatusCode::kNotPosted)
      .value("RESOURCE_EXHAUSTED", te::StatusCode::kResourceExhausted);

  // The exception class is made here so that it is a real Python class
  // (subclassable, picklable by name); its attributes are set per instance.
  static py::exception<StatusError> error(m, "TransferError", PyExc_RuntimeError);
  error_type = &error;
  error.doc() =
      "An engine call or a request failed. `code` (StatusCode) says what the peer may have seen "
      "(NOT_POSTED: nothing was posted, safe to retry; TIMEOUT, IO_ERROR, CANCELLED: outcome unknown); "
      "`message` names the bad value and the valid range.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      py::object exc = ErrorObject(e.status);
      PyErr_SetObject(error.ptr(), exc.ptr());
    }
  });
}

}  // namespace tepy
