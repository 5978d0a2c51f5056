#include "weightsync/weight_registry.h"

#include <algorithm>

namespace te::weightsync {
namespace {

bool ValidName(const std::string& s) { return !s.empty() && s.find_first_of(" :*?[]\n") == std::string::npos; }

// "<digits>" within uint32_t.
bool ParseRank(const std::string& s, uint32_t* out) {
  if (s.empty() || s.size() > 10 || !std::all_of(s.begin(), s.end(), ::isdigit)) return false;
  const uint64_t v = std::stoull(s);
  if (v > UINT32_MAX) return false;
  *out = uint32_t(v);
  return true;
}

}  // namespace

Result<std::unique_ptr<WeightRegistry>> WeightRegistry::Connect(const std::string& address, const std::string& prefix,
                                                                std::chrono::milliseconds timeout) {
  if (!ValidName(prefix))
    return InvalidArgument("weight registry prefix '" + prefix + "' must be non-empty without spaces, ':' or globs");
  TE_ASSIGN_OR_RETURN(auto client, registry::RedisClient::Connect(address, timeout));
  return std::unique_ptr<WeightRegistry>(new WeightRegistry(std::move(client), prefix));
}

Result<std::unique_ptr<registry::RegistryLease>> WeightRegistry::AnnounceReceiver(uint32_t rank,
                                                                                  const std::string& info,
                                                                                  const std::string& location,
                                                                                  std::chrono::milliseconds ttl) {
  if (info.empty() || info.find('\n') != std::string::npos)
    return InvalidArgument("receiver info must be one non-empty line");
  if (location.find('\n') != std::string::npos) return InvalidArgument("receiver location must be one line");
  return registry::RegistryLease::Start(client_.get(), prefix_ + ":receiver:" + std::to_string(rank),
                                        info + "\n" + location, ttl);
}

Result<std::unique_ptr<registry::RegistryLease>> WeightRegistry::AnnounceSource(uint32_t rank,
                                                                                const std::string& address,
                                                                                std::chrono::milliseconds ttl) {
  if (address.empty() || address.find('\n') != std::string::npos)
    return InvalidArgument("source address must be one non-empty line");
  return registry::RegistryLease::Start(client_.get(), prefix_ + ":source:" + std::to_string(rank), address, ttl);
}

Result<std::vector<RegistryMember>> WeightRegistry::List(const std::string& role) {
  const std::string head = prefix_ + ":" + role + ":";
  TE_ASSIGN_OR_RETURN(auto values, client_->ScanValues(head + "*"));
  std::vector<RegistryMember> out;
  for (const auto& [key, value] : values) {
    RegistryMember m;
    if (key.compare(0, head.size(), head) != 0 || !ParseRank(key.substr(head.size()), &m.rank) || value.empty()) {
      ++malformed_;
      continue;
    }
    const size_t nl = value.find('\n');
    m.info = value.substr(0, nl);
    if (nl != std::string::npos) m.location = value.substr(nl + 1);
    out.push_back(std::move(m));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.rank < b.rank; });
  return out;
}

Result<std::vector<RegistryMember>> WeightRegistry::Receivers() { return List("receiver"); }
Result<std::vector<RegistryMember>> WeightRegistry::Sources() { return List("source"); }

Status WeightRegistry::SyncReceivers(WeightPusher* pusher, uint32_t ranks, std::map<uint32_t, std::string>* refused) {
  if (!pusher) return InvalidArgument("SyncReceivers needs a pusher");
  TE_ASSIGN_OR_RETURN(auto members, Receivers());
  std::vector<const RegistryMember*> by_rank(ranks, nullptr);
  for (const auto& m : members)
    if (m.rank < ranks) by_rank[m.rank] = &m;  // a rank beyond the layout is not ours
  for (uint32_t d = 0; d < ranks; ++d) {
    if (by_rank[d]) {
      const Status s = pusher->SetReceiver(d, by_rank[d]->info);
      if (s.ok()) continue;
      if (refused) (*refused)[d] = s.ToString();
    }
    TE_RETURN_IF_ERROR(pusher->SetReceiver(d, ""));
  }
  return Status::Ok();
}

}  // namespace te::weightsync
