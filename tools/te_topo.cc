// te-topo: prints which RDMA NICs and cores the engine would use for each GPU.
//
//   te-topo                 # table
//   te-topo --json          # one JSON object
//   te-topo --sysfs=DIR     # read another sysfs tree (fixtures, containers)
#include <gflags/gflags.h>

#include <cstdio>

#include "nic/topology/topology.h"

DEFINE_string(sysfs, "/sys", "sysfs root to read");
DEFINE_bool(json, false, "Print JSON instead of a table");

int main(int argc, char** argv) {
  gflags::SetUsageMessage("te-topo [--json] [--sysfs=/sys]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  auto t = te::nic::DiscoverTopology(FLAGS_sysfs);
  if (!t.ok()) {
    fprintf(stderr, "te-topo: %s\n", t.status().ToString().c_str());
    return 1;
  }
  if (FLAGS_json)
    printf("%s\n", t->ToJson().c_str());
  else
    printf("%s", t->ToTable().c_str());
  return 0;
}
