#include "kvcache/kv_router.h"

namespace te::kvcache {

Result<KvRoute> KvRouter::Pick(const std::set<std::string>& avoid) {
  const auto now = std::chrono::steady_clock::now();
  if (!loaded_ || now - loaded_at_ >= refresh_) {
    TE_ASSIGN_OR_RETURN(prefill_.entries, registry_->List("prefill"));
    TE_ASSIGN_OR_RETURN(decode_.entries, registry_->List("decode"));
    prefill_.picked.clear();
    decode_.picked.clear();
    loaded_ = true;
    loaded_at_ = now;
  }
  KvRoute route;
  TE_ASSIGN_OR_RETURN(route.prefill, PickFrom(prefill_, "prefill", avoid));
  TE_ASSIGN_OR_RETURN(route.decode, PickFrom(decode_, "decode", avoid));
  return route;
}

Result<RegistryEntry> KvRouter::PickFrom(View& view, const std::string& role, const std::set<std::string>& avoid) {
  const size_t n = view.entries.size();
  const RegistryEntry* best = nullptr;
  double best_score = 0;
  size_t draining = 0;
  // Avoided instances only when nothing else is left.
  for (int pass = 0; pass < 2 && !best; ++pass) {
    draining = 0;
    for (size_t k = 0; k < n; ++k) {
      const RegistryEntry& e = view.entries[(view.rotation + k) % n];
      if (e.draining) ++draining;
      if (e.draining || e.capacity == 0 || (pass == 0 && avoid.count(e.info.name))) continue;
      const double score = double(e.load + view.picked[e.info.name]) / e.capacity;
      if (!best || score < best_score) {
        best = &e;
        best_score = score;
      }
    }
  }
  if (!best)
    return Unavailable("no " + role + " instance to route to: " + std::to_string(n) + " registered, " +
                       std::to_string(draining) + " draining");
  ++view.picked[best->info.name];
  ++view.rotation;
  return *best;
}

}  // namespace te::kvcache
