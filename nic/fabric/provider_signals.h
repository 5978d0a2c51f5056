// Signal handlers that libfabric's provider libraries take from the process.
//
// Debian's libfabric links the psm providers, whose libinfinipath installs
// handlers for SIGINT, SIGTERM, SIGSEGV, SIGBUS, SIGILL and SIGABRT when the
// library loads (before main, or when a Python module linking libfabric is
// imported); its SIGINT handler exits with status 1. Ctrl-C then no longer
// stops the program with SIGINT, nor raises KeyboardInterrupt in Python.
#pragma once

namespace te::nic {

// Puts back the default action of each of those signals whose handler lives
// in libinfinipath; handlers the application installed are left alone.
// Returns how many were put back. Called before the first provider is
// opened; cheap (a few sigaction calls).
int ReleaseSignalsTakenByProviders();

}  // namespace te::nic
