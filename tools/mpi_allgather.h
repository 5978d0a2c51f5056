// All-gather of one string per rank over MPI_COMM_WORLD: how the benches
// exchange engine addresses and descriptors (the engine needs no MPI).
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

namespace te::tools {

// out[r] = rank r's `mine`; every rank gets all of them.
inline std::vector<std::string> AllGatherStrings(const std::string& mine, int ranks) {
  int len = int(mine.size());
  std::vector<int> lens(ranks), displ(ranks);
  MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < ranks; ++r) displ[r] = total, total += lens[r];
  std::string all(total, '\0');
  MPI_Allgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), displ.data(), MPI_CHAR, MPI_COMM_WORLD);
  std::vector<std::string> out;
  for (int r = 0; r < ranks; ++r) out.push_back(all.substr(displ[r], lens[r]));
  return out;
}

}  // namespace te::tools
