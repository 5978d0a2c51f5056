#include "kvcache/kv_registry.h"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <sstream>

#include "base/stop_and_join.h"

namespace te::kvcache {

namespace {
timeval ToTimeval(std::chrono::milliseconds ms) {
  return timeval{static_cast<time_t>(ms.count() / 1000), static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

std::string Value(const RegistryEntry& e) {
  return std::to_string(e.capacity) + " " + std::to_string(e.load) + " " + (e.draining ? "1" : "0") + " " +
         e.info.Serialize();
}

Result<RegistryEntry> ParseValue(const std::string& v) {
  std::istringstream in(v);
  RegistryEntry e;
  int draining = 0;
  in >> e.capacity >> e.load >> draining;
  std::string rest;
  std::getline(in >> std::ws, rest);
  if (!in && rest.empty()) return InvalidArgument("malformed registry entry '" + v.substr(0, 60) + "'");
  e.draining = draining != 0;
  TE_ASSIGN_OR_RETURN(e.info, KvInstanceInfo::Parse(rest));
  return e;
}
}  // namespace

Result<std::unique_ptr<KvRegistry>> KvRegistry::Connect(const std::string& address, const std::string& prefix,
                                                        std::chrono::milliseconds timeout) {
  if (prefix.empty() || prefix.find_first_of(" :*") != std::string::npos)
    return InvalidArgument("registry prefix '" + prefix + "' must be non-empty without spaces, ':' or '*'");
  std::unique_ptr<KvRegistry> r(new KvRegistry(address, prefix, timeout));
  std::lock_guard<std::mutex> lock(r->mu_);
  TE_RETURN_IF_ERROR(r->EnsureConnectedLocked());
  TE_RETURN_IF_ERROR(r->CommandLocked({"PING"}, nullptr));
  return r;
}

KvRegistry::~KvRegistry() {
  if (ctx_) redisFree(ctx_);
}

Status KvRegistry::EnsureConnectedLocked() {
  if (ctx_ && ctx_->err == 0) return Status::Ok();
  if (ctx_) redisFree(ctx_);
  ctx_ = nullptr;
  const timeval tv = ToTimeval(timeout_);
  if (address_.rfind("unix:", 0) == 0) {
    ctx_ = redisConnectUnixWithTimeout(address_.substr(5).c_str(), tv);
  } else {
    const size_t colon = address_.rfind(':');
    if (colon == std::string::npos || colon == 0)
      return InvalidArgument("registry address '" + address_ + "' is neither host:port nor unix:/path");
    int port = 0;
    try {
      port = std::stoi(address_.substr(colon + 1));
    } catch (...) {
    }
    if (port <= 0 || port > 65535)
      return InvalidArgument("registry address '" + address_ + "': port must be in [1, 65535]");
    ctx_ = redisConnectWithTimeout(address_.substr(0, colon).c_str(), port, tv);
  }
  if (!ctx_ || ctx_->err) {
    std::string why = ctx_ ? ctx_->errstr : "out of memory";
    if (ctx_) redisFree(ctx_);
    ctx_ = nullptr;
    return Unavailable("cannot reach the Redis registry at " + address_ + ": " + why);
  }
  redisSetTimeout(ctx_, tv);
  return Status::Ok();
}

Status KvRegistry::CommandLocked(const std::vector<std::string>& args, const std::function<Status(void*)>& use) {
  TE_RETURN_IF_ERROR(EnsureConnectedLocked());
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  for (const auto& a : args) {
    argv.push_back(a.data());
    lens.push_back(a.size());
  }
  auto* reply = static_cast<redisReply*>(redisCommandArgv(ctx_, int(argv.size()), argv.data(), lens.data()));
  if (!reply) {
    std::string why = ctx_->errstr;
    redisFree(ctx_);
    ctx_ = nullptr;  // reconnect next time
    return Unavailable("Redis registry at " + address_ + " failed " + args[0] + ": " + why);
  }
  Status s;
  if (reply->type == REDIS_REPLY_ERROR)
    s = IoError("Redis registry refused " + args[0] + ": " + std::string(reply->str, reply->len));
  else if (use)
    s = use(reply);
  freeReplyObject(reply);
  return s;
}

Status KvRegistry::Put(const RegistryEntry& entry, std::chrono::milliseconds ttl) {
  if (entry.info.name.empty() || entry.info.name.find_first_of(" :*") != std::string::npos)
    return InvalidArgument("instance name '" + entry.info.name + "' must be non-empty without spaces, ':' or '*'");
  if (ttl.count() <= 0)
    return InvalidArgument("registry TTL must be positive, got " + std::to_string(ttl.count()) + " ms");
  std::lock_guard<std::mutex> lock(mu_);
  return CommandLocked(
      {"SET", prefix_ + ":" + entry.info.role + ":" + entry.info.name, Value(entry), "PX", std::to_string(ttl.count())},
      nullptr);
}

Status KvRegistry::Remove(const std::string& role, const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  return CommandLocked({"DEL", prefix_ + ":" + role + ":" + name}, nullptr);
}

Result<std::vector<RegistryEntry>> KvRegistry::List(const std::string& role) {
  if (role != "prefill" && role != "decode")
    return InvalidArgument("registry role '" + role + "'; valid: prefill, decode");
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> keys;
  std::string cursor = "0";
  do {  // SCAN, not KEYS: it never blocks Redis for long
    TE_RETURN_IF_ERROR(
        CommandLocked({"SCAN", cursor, "MATCH", prefix_ + ":" + role + ":*", "COUNT", "1000"}, [&](void* p) -> Status {
          auto* r = static_cast<redisReply*>(p);
          if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
            return IoError("unexpected SCAN reply from the Redis registry");
          cursor.assign(r->element[0]->str, r->element[0]->len);
          for (size_t i = 0; i < r->element[1]->elements; ++i)
            keys.emplace_back(r->element[1]->element[i]->str, r->element[1]->element[i]->len);
          return Status::Ok();
        }));
  } while (cursor != "0");
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  std::vector<RegistryEntry> out;
  if (keys.empty()) return out;
  std::vector<std::string> mget = {"MGET"};
  mget.insert(mget.end(), keys.begin(), keys.end());
  TE_RETURN_IF_ERROR(CommandLocked(mget, [&](void* p) -> Status {
    auto* r = static_cast<redisReply*>(p);
    if (r->type != REDIS_REPLY_ARRAY) return IoError("unexpected MGET reply from the Redis registry");
    for (size_t i = 0; i < r->elements; ++i) {
      if (r->element[i]->type != REDIS_REPLY_STRING) continue;  // expired between SCAN and MGET
      auto e = ParseValue(std::string(r->element[i]->str, r->element[i]->len));
      if (e.ok()) out.push_back(std::move(e).value());
    }
    return Status::Ok();
  }));
  return out;
}

Result<std::unique_ptr<KvRegistration>> KvRegistration::Start(KvRegistry* registry, RegistryEntry entry,
                                                              std::function<uint32_t()> load,
                                                              std::chrono::milliseconds ttl) {
  if (!registry || !load) return InvalidArgument("KvRegistration needs a registry and a load function");
  entry.load = load();
  TE_RETURN_IF_ERROR(registry->Put(entry, ttl));
  std::unique_ptr<KvRegistration> r(new KvRegistration(registry, std::move(entry), std::move(load), ttl));
  KvRegistration* self = r.get();
  r->thread_ = std::thread([self] { self->Run(); });
  return r;
}

KvRegistration::~KvRegistration() { StopAndJoin(mu_, cv_, stop_, thread_); }

void KvRegistration::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, ttl_ / 3, [&] { return stop_; })) {
    entry_.load = load_();
    // A failed refresh is retried on the next beat; the TTL covers two.
    (void)registry_->Put(entry_, ttl_);
  }
}

Status KvRegistration::Leave(std::chrono::milliseconds drain_timeout) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    entry_.draining = true;
    entry_.load = load_();
    TE_RETURN_IF_ERROR(registry_->Put(entry_, ttl_));
  }
  const auto deadline = std::chrono::steady_clock::now() + drain_timeout;
  while (load_() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  StopAndJoin(mu_, cv_, stop_, thread_);
  const uint32_t left = load_();
  TE_RETURN_IF_ERROR(registry_->Remove(entry_.info.role, entry_.info.name));
  if (left > 0)
    return Timeout("instance '" + entry_.info.name + "' left with " + std::to_string(left) +
                   " requests after draining for " + std::to_string(drain_timeout.count()) + " ms");
  return Status::Ok();
}

}  // namespace te::kvcache
