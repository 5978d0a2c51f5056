// Starting a benchmark under mpirun from the tool itself, so users type one
// command: the tool re-runs itself under mpirun once per process count and
// knows it is a rank from OpenMPI's environment.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "tools/tool_support.h"

namespace te::tools {

inline bool UnderMpi() { return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE"); }

// Runs this executable with argv (minus any --<override_flag>=...) plus
// `extra` under `mpirun -n <processes>`. Root and more ranks than cores are
// allowed; ranks yield when idle. Exits on failure.
inline void RunUnderMpirun(const std::string& mpirun, int processes, const std::string& btl, int argc, char** argv,
                           const std::vector<std::string>& drop_flags, const std::string& extra) {
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) Die("cannot find this executable (/proc/self/exe)");
  exe[n] = 0;
  std::string args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    bool drop = false;
    for (const auto& f : drop_flags) drop |= a.rfind("--" + f + "=", 0) == 0;
    if (!drop) args += " '" + a + "'";
  }
  const std::string cmd = mpirun + " --allow-run-as-root --oversubscribe --bind-to none -n " +
                          std::to_string(processes) + " --mca btl " + btl + " --mca mpi_yield_when_idle 1 '" + exe +
                          "'" + args + " " + extra;
  if (int rc = system(cmd.c_str()); rc != 0) Die("'" + cmd + "' failed (status " + std::to_string(rc) + ")");
}

}  // namespace te::tools
