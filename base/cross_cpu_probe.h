// How long one cache line takes to go from CPU 0 to CPU 1 and back.
//
// Every small-message figure between two processes (a write and its
// immediate, a round trip) is mostly cache lines passing between cores. On
// a virtual machine the host may move the virtual CPUs between physical
// cores at any time, and this figure then changes several-fold from one
// second to the next (60 ns against 350 ns on the machine docs/PERFORMANCE.md
// was measured on). Benchmarks record it beside each run so that two runs
// are compared only when the machine was in the same state.
#pragma once

namespace te {

// Nanoseconds per round trip, median of a few short bursts; 0 when the
// process may not run on CPUs 0 and 1 (fewer CPUs, or an affinity mask
// without them). Takes a few milliseconds and spins both CPUs meanwhile.
// Runs on two threads of its own: the caller's CPU and affinity are untouched.
double CrossCpuRoundTripNs();

}  // namespace te
