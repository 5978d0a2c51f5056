#include "nic/fabric/provider_signals.h"

#include <dlfcn.h>
#include <signal.h>

#include <cstring>

namespace te::nic {

int ReleaseSignalsTakenByProviders() {
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGSEGV, SIGBUS, SIGILL, SIGABRT};
  int released = 0;
  for (int sig : kSignals) {
    struct sigaction now;
    if (sigaction(sig, nullptr, &now) != 0) continue;
    void* handler = (now.sa_flags & SA_SIGINFO) ? reinterpret_cast<void*>(now.sa_sigaction)
                                                : reinterpret_cast<void*>(now.sa_handler);
    if (handler == reinterpret_cast<void*>(SIG_DFL) || handler == reinterpret_cast<void*>(SIG_IGN)) continue;
    Dl_info info;
    if (dladdr(handler, &info) == 0 || info.dli_fname == nullptr) continue;
    if (std::strstr(info.dli_fname, "libinfinipath") == nullptr) continue;
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    if (sigaction(sig, &dfl, nullptr) == 0) ++released;
  }
  return released;
}

}  // namespace te::nic
