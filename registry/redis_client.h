// RedisClient: one connection to the Redis server the planes meet through
// (the KV-cache registry, the weight-update rendezvous), with the rules both
// need: every call has the connection's timeout, so no call hangs on a dead
// Redis; a lost connection is re-established on the next call; replies are
// checked before use, since they come from another process.
//
// Threads: one connection behind a mutex; any thread may call.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "base/status.h"

struct redisContext;

namespace te::registry {

class RedisClient {
 public:
  // `address`: "host:port" or "unix:/path/to/socket". Connects and PINGs.
  static Result<std::unique_ptr<RedisClient>> Connect(
      const std::string& address, std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  const std::string& address() const { return address_; }

  // SET key value PX ttl (a TTL of 0 sets without expiry).
  Status Set(const std::string& key, const std::string& value, std::chrono::milliseconds ttl);
  Status Del(const std::string& key);
  // Every live key matching `pattern` (SCAN, which never blocks Redis for
  // long) with its value, sorted by key. Keys that expire between the scan
  // and the read are left out.
  Result<std::vector<std::pair<std::string, std::string>>> ScanValues(const std::string& pattern);

  // Runs one command; a successful reply is handed to `use` (a
  // `redisReply*`; may be null). kUnavailable when Redis cannot be reached,
  // kIoError when it answers with an error.
  Status Command(const std::vector<std::string>& args, const std::function<Status(void* reply)>& use);

 private:
  RedisClient(std::string address, std::chrono::milliseconds timeout)
      : address_(std::move(address)), timeout_(timeout) {}
  Status EnsureConnectedLocked();
  Status CommandLocked(const std::vector<std::string>& args, const std::function<Status(void* reply)>& use);

  const std::string address_;
  const std::chrono::milliseconds timeout_;
  std::mutex mu_;
  redisContext* ctx_ = nullptr;
};

// A key kept alive: written at once, then refreshed every ttl / 3 on a
// thread of its own until Stop() (which deletes the key) or destruction
// (which does not: to everyone else that looks like a crash, and the key
// expires within the TTL). The value is a fixed string, or a function asked
// at every write (an instance's current load, say) on the lease's thread
// or in Refresh().
class RegistryLease {
 public:
  using ValueFn = std::function<std::string()>;
  static Result<std::unique_ptr<RegistryLease>> Start(RedisClient* client, std::string key, std::string value,
                                                      std::chrono::milliseconds ttl);
  static Result<std::unique_ptr<RegistryLease>> Start(RedisClient* client, std::string key, ValueFn value,
                                                      std::chrono::milliseconds ttl);
  ~RegistryLease();
  // Writes the current value now rather than at the next beat.
  Status Refresh();
  Status Stop();

 private:
  RegistryLease(RedisClient* client, std::string key, ValueFn value, std::chrono::milliseconds ttl)
      : client_(client), key_(std::move(key)), value_(std::move(value)), ttl_(ttl) {}
  void Run();

  RedisClient* client_;
  const std::string key_;
  const ValueFn value_;
  const std::chrono::milliseconds ttl_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace te::registry
