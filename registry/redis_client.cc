#include "registry/redis_client.h"

#include <hiredis/hiredis.h>

#include <algorithm>

#include "base/stop_and_join.h"

namespace te::registry {
namespace {

timeval ToTimeval(std::chrono::milliseconds ms) {
  return timeval{static_cast<time_t>(ms.count() / 1000), static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

}  // namespace

Result<std::unique_ptr<RedisClient>> RedisClient::Connect(const std::string& address,
                                                          std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0)
    return InvalidArgument("Redis timeout must be positive, got " + std::to_string(timeout.count()) + " ms");
  std::unique_ptr<RedisClient> c(new RedisClient(address, timeout));
  std::lock_guard<std::mutex> lock(c->mu_);
  TE_RETURN_IF_ERROR(c->EnsureConnectedLocked());
  TE_RETURN_IF_ERROR(c->CommandLocked({"PING"}, nullptr));
  return c;
}

RedisClient::~RedisClient() {
  if (ctx_) redisFree(ctx_);
}

Status RedisClient::EnsureConnectedLocked() {
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
    const std::string digits = address_.substr(colon + 1);
    if (!digits.empty() && digits.size() <= 5 && std::all_of(digits.begin(), digits.end(), ::isdigit))
      port = std::stoi(digits);
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

Status RedisClient::Command(const std::vector<std::string>& args, const std::function<Status(void*)>& use) {
  std::lock_guard<std::mutex> lock(mu_);
  return CommandLocked(args, use);
}

Status RedisClient::CommandLocked(const std::vector<std::string>& args, const std::function<Status(void*)>& use) {
  if (args.empty()) return InvalidArgument("empty Redis command");
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

Status RedisClient::Set(const std::string& key, const std::string& value, std::chrono::milliseconds ttl) {
  if (ttl.count() < 0) return InvalidArgument("registry TTL must not be negative, got " + std::to_string(ttl.count()));
  if (ttl.count() == 0) return Command({"SET", key, value}, nullptr);
  return Command({"SET", key, value, "PX", std::to_string(ttl.count())}, nullptr);
}

Status RedisClient::Del(const std::string& key) { return Command({"DEL", key}, nullptr); }

Result<std::vector<std::pair<std::string, std::string>>> RedisClient::ScanValues(const std::string& pattern) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> keys;
  std::string cursor = "0";
  do {
    TE_RETURN_IF_ERROR(CommandLocked({"SCAN", cursor, "MATCH", pattern, "COUNT", "1000"}, [&](void* p) -> Status {
      auto* r = static_cast<redisReply*>(p);
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
          r->element[1]->type != REDIS_REPLY_ARRAY)
        return IoError("unexpected SCAN reply from the Redis registry at " + address_);
      cursor.assign(r->element[0]->str, r->element[0]->len);
      for (size_t i = 0; i < r->element[1]->elements; ++i) {
        const redisReply* k = r->element[1]->element[i];
        if (k->type == REDIS_REPLY_STRING) keys.emplace_back(k->str, k->len);
      }
      return Status::Ok();
    }));
  } while (cursor != "0");
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  std::vector<std::pair<std::string, std::string>> out;
  if (keys.empty()) return out;
  std::vector<std::string> mget = {"MGET"};
  mget.insert(mget.end(), keys.begin(), keys.end());
  TE_RETURN_IF_ERROR(CommandLocked(mget, [&](void* p) -> Status {
    auto* r = static_cast<redisReply*>(p);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != keys.size())
      return IoError("unexpected MGET reply from the Redis registry at " + address_);
    for (size_t i = 0; i < r->elements; ++i) {
      if (r->element[i]->type != REDIS_REPLY_STRING) continue;  // expired between SCAN and MGET
      out.emplace_back(keys[i], std::string(r->element[i]->str, r->element[i]->len));
    }
    return Status::Ok();
  }));
  return out;
}

Result<std::unique_ptr<RegistryLease>> RegistryLease::Start(RedisClient* client, std::string key, std::string value,
                                                            std::chrono::milliseconds ttl) {
  return Start(
      client, std::move(key), [value = std::move(value)] { return value; }, ttl);
}

Result<std::unique_ptr<RegistryLease>> RegistryLease::Start(RedisClient* client, std::string key, ValueFn value,
                                                            std::chrono::milliseconds ttl) {
  if (!client || !value) return InvalidArgument("RegistryLease needs a Redis client and a value");
  if (ttl.count() < 3)
    return InvalidArgument("lease TTL of " + std::to_string(ttl.count()) + " ms is below the minimum of 3 ms");
  TE_RETURN_IF_ERROR(client->Set(key, value(), ttl));
  std::unique_ptr<RegistryLease> l(new RegistryLease(client, std::move(key), std::move(value), ttl));
  RegistryLease* self = l.get();
  l->thread_ = std::thread([self] { self->Run(); });
  return l;
}

RegistryLease::~RegistryLease() { StopAndJoin(mu_, cv_, stop_, thread_); }

void RegistryLease::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, ttl_ / 3, [&] { return stop_; })) {
    // A failed refresh is retried on the next beat; the TTL covers two.
    (void)client_->Set(key_, value_(), ttl_);
  }
}

Status RegistryLease::Refresh() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return InvalidArgument("lease of " + key_ + " was stopped");
  return client_->Set(key_, value_(), ttl_);
}

Status RegistryLease::Stop() {
  StopAndJoin(mu_, cv_, stop_, thread_);
  return client_->Del(key_);
}

}  // namespace te::registry
