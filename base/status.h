// Status and Result<T>: errors as values at every public API of the engine.
//
// A Status is either OK or a code plus a message that names the bad value and
// what was expected ("dst_offset 4096 + length 8192 exceeds region size 8192").
// No exception crosses a public API of this project.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace te {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // caller passed something malformed or out of range
  kOutOfRange,       // an offset/length outside a region's bounds
  kNotFound,
  kUnavailable,    // transient: resource exhausted, try again
  kTimeout,        // a deadline passed (dead peer, lost notification)
  kCancelled,      // the engine shut down before the work finished
  kIoError,        // the NIC or provider reported a failure
  kUnimplemented,  // the provider or build lacks the capability
  kInternal,       // an invariant of this library broke: a bug
  // A request was withdrawn before any of its operations was posted:
  // nothing of it reached the peer, so it is safe to submit again.
  kNotPosted,
  // A bound on queued work was reached; nothing was accepted. Submit again
  // once earlier requests finish.
  kResourceExhausted,
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OUT_OF_RANGE: dst_offset 4096 + length 8192 exceeds region size 8192"
  std::string ToString() const;

  // Adds context in front of the message, keeping the code.
  Status WithContext(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
inline Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status NotPosted(std::string m) { return {StatusCode::kNotPosted, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    assert(!std::get<Status>(v_).ok() && "Result built from an OK Status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace te

// Returns early from the enclosing function when `expr` is not OK.
#define TE_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::te::Status te_status_ = (expr);        \
    if (!te_status_.ok()) return te_status_; \
  } while (0)

#define TE_CONCAT_INNER(a, b) a##b
#define TE_CONCAT(a, b) TE_CONCAT_INNER(a, b)
// TE_ASSIGN_OR_RETURN(auto x, MakeX()): binds the value or returns the error.
#define TE_ASSIGN_OR_RETURN(lhs, rexpr) TE_ASSIGN_OR_RETURN_IMPL(TE_CONCAT(te_result_, __LINE__), lhs, rexpr)
#define TE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                             \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
