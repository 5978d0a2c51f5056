// KvRouter: picks a prefill and a decode instance for each request from the
// registry's live entries.
//
// It takes, for each role, the instance with the lowest (load + requests
// this router sent it since its last look) / capacity among those not
// draining, ties broken by rotation. Names in `avoid` (instances that just
// failed a request) are taken only when nothing else is left. It reads the registry at most every `refresh`;
// between reads it counts its own picks, so bursts spread out.
//
// Not thread-safe: one router per dispatching thread (they are cheap).
#pragma once

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "base/status.h"
#include "kvcache/kv_registry.h"

namespace te::kvcache {

struct KvRoute {
  RegistryEntry prefill, decode;
};

class KvRouter {
 public:
  explicit KvRouter(KvRegistry* registry, std::chrono::milliseconds refresh = std::chrono::milliseconds(100))
      : registry_(registry), refresh_(refresh) {}

  Result<KvRoute> Pick(const std::set<std::string>& avoid = {});
  // Forces the next Pick to read the registry.
  void Invalidate() { loaded_ = false; }

 private:
  struct View {
    std::vector<RegistryEntry> entries;
    std::map<std::string, uint32_t> picked;  // since the last read, by name
    size_t rotation = 0;
  };
  Result<RegistryEntry> PickFrom(View& view, const std::string& role, const std::set<std::string>& avoid);

  KvRegistry* registry_;
  std::chrono::milliseconds refresh_;
  bool loaded_ = false;
  std::chrono::steady_clock::time_point loaded_at_;
  View prefill_, decode_;
};

}  // namespace te::kvcache
