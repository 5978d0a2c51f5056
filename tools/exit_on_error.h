// What the command-line tools do with an error they cannot go on from:
// print it, naming the step that failed, and exit 1.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "base/status.h"

namespace te::tools {

[[noreturn]] inline void Die(const char* tool, const std::string& what) {
  fprintf(stderr, "%s: %s\n", tool, what.c_str());
  exit(1);
}

// The value, or exit naming `step` and the error.
template <typename T>
T Must(const char* tool, te::Result<T> r, const char* step) {
  if (!r.ok()) Die(tool, std::string(step) + ": " + r.status().ToString());
  return std::move(r).value();
}
inline void Must(const char* tool, const te::Status& s, const char* step) {
  if (!s.ok()) Die(tool, std::string(step) + ": " + s.ToString());
}

}  // namespace te::tools
