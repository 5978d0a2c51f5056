#include "kvcache/kv_registry.h"

#include <algorithm>
#include <string_view>
#include <thread>

#include "base/checked_math.h"

namespace te::kvcache {

namespace {
std::string Value(const RegistryEntry& e) {
  return std::to_string(e.capacity) + " " + std::to_string(e.load) + " " + (e.draining ? "1" : "0") + " " +
         e.info.Serialize();
}

// "<capacity> <load> <draining 0|1> <instance info>", written by another
// process: each field strictly (a sign or a number beyond 32 bits is not
// read as some other number), the info by KvInstanceInfo::Parse.
Result<RegistryEntry> ParseValue(const std::string& v) {
  auto bad = [&](const std::string& why) {
    return InvalidArgument("malformed registry entry '" + v.substr(0, 60) + "': " + why);
  };
  std::string_view rest(v);
  auto field = [&]() {
    const size_t space = rest.find(' ');
    const std::string_view f = rest.substr(0, space);
    rest = space == std::string_view::npos ? std::string_view() : rest.substr(space + 1);
    return f;
  };
  const auto capacity = ParseUint64(field()), load = ParseUint64(field());
  const std::string_view draining = field();
  if (!capacity || *capacity > UINT32_MAX) return bad("capacity is not a number in [0, 2^32)");
  if (!load || *load > UINT32_MAX) return bad("load is not a number in [0, 2^32)");
  if (draining != "0" && draining != "1") return bad("draining is not 0 or 1");
  RegistryEntry e;
  e.capacity = uint32_t(*capacity);
  e.load = uint32_t(*load);
  e.draining = draining == "1";
  TE_ASSIGN_OR_RETURN(e.info, KvInstanceInfo::Parse(std::string(rest)));
  return e;
}

Status CheckName(const RegistryEntry& entry) {
  if (entry.info.name.empty() || entry.info.name.find_first_of(" :*") != std::string::npos)
    return InvalidArgument("instance name '" + entry.info.name + "' must be non-empty without spaces, ':' or '*'");
  return Status::Ok();
}
}  // namespace

Result<std::unique_ptr<KvRegistry>> KvRegistry::Connect(const std::string& address, const std::string& prefix,
                                                        std::chrono::milliseconds timeout) {
  if (prefix.empty() || prefix.find_first_of(" :*") != std::string::npos)
    return InvalidArgument("registry prefix '" + prefix + "' must be non-empty without spaces, ':' or '*'");
  TE_ASSIGN_OR_RETURN(auto client, registry::RedisClient::Connect(address, timeout));
  return std::unique_ptr<KvRegistry>(new KvRegistry(std::move(client), prefix));
}

Status KvRegistry::Put(const RegistryEntry& entry, std::chrono::milliseconds ttl) {
  TE_RETURN_IF_ERROR(CheckName(entry));
  if (ttl.count() <= 0)
    return InvalidArgument("registry TTL must be positive, got " + std::to_string(ttl.count()) + " ms");
  return client_->Set(KeyOf(entry.info.role, entry.info.name), Value(entry), ttl);
}

Status KvRegistry::Remove(const std::string& role, const std::string& name) { return client_->Del(KeyOf(role, name)); }

Result<std::vector<RegistryEntry>> KvRegistry::List(const std::string& role) {
  if (role != "prefill" && role != "decode")
    return InvalidArgument("registry role '" + role + "'; valid: prefill, decode");
  TE_ASSIGN_OR_RETURN(auto values, client_->ScanValues(KeyOf(role, "*")));
  std::vector<RegistryEntry> out;
  for (const auto& [key, value] : values) {
    auto e = ParseValue(value);
    if (e.ok()) out.push_back(std::move(e).value());  // a malformed entry is skipped, never trusted
  }
  return out;
}

Result<std::unique_ptr<KvRegistration>> KvRegistration::Start(KvRegistry* registry, RegistryEntry entry,
                                                              std::function<uint32_t()> load,
                                                              std::chrono::milliseconds ttl) {
  if (!registry || !load) return InvalidArgument("KvRegistration needs a registry and a load function");
  TE_RETURN_IF_ERROR(CheckName(entry));
  const std::string key = registry->KeyOf(entry.info.role, entry.info.name);
  std::unique_ptr<KvRegistration> r(new KvRegistration(registry, std::move(entry), std::move(load)));
  KvRegistration* self = r.get();
  TE_ASSIGN_OR_RETURN(r->lease_, registry::RegistryLease::Start(
                                     registry->client_.get(), key, [self] { return self->CurrentValue(); }, ttl));
  return r;
}

KvRegistration::~KvRegistration() = default;  // the lease stops beating and leaves the entry to expire

std::string KvRegistration::CurrentValue() const {
  RegistryEntry e = entry_;
  e.load = load_();
  e.draining = draining_.load();
  return Value(e);
}

Status KvRegistration::Leave(std::chrono::milliseconds drain_timeout) {
  draining_.store(true);
  TE_RETURN_IF_ERROR(lease_->Refresh());
  const auto deadline = std::chrono::steady_clock::now() + drain_timeout;
  while (load_() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const uint32_t left = load_();
  TE_RETURN_IF_ERROR(lease_->Stop());  // stops the beat and removes the entry
  if (left > 0)
    return Timeout("instance '" + entry_.info.name + "' left with " + std::to_string(left) +
                   " requests after draining for " + std::to_string(drain_timeout.count()) + " ms");
  return Status::Ok();
}

}  // namespace te::kvcache
