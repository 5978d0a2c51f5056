// KvRegistry: the live prefill and decode instances, kept in Redis so that
// instances can join and leave while requests flow.
//
// An instance's entry is one key, "<prefix>:<role>:<name>", holding its
// capacity, current load, a draining flag and its KvInstanceInfo. Entries are
// written with a TTL and refreshed by `KvRegistration` (a heartbeat): an
// instance that dies without leaving disappears when its TTL runs out; one
// that leaves on purpose first marks itself draining (routers stop picking
// it), finishes its requests, then deletes its entry.
//
// Threads: a KvRegistry is one Redis connection (registry::RedisClient)
// behind a mutex; any thread may call it. Every call has the connection's
// timeout (no call hangs on a dead Redis), and a lost connection is
// re-established on the next call.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "kvcache/kv_messages.h"

#include "registry/redis_client.h"

namespace te::kvcache {

struct RegistryEntry {
  KvInstanceInfo info;
  uint32_t capacity = 0;  // requests it takes at once
  uint32_t load = 0;      // requests it has now
  bool draining = false;  // leaving: pick it for nothing new
};

class KvRegistry {
 public:
  // `address`: "host:port" or "unix:/path/to/socket".
  static Result<std::unique_ptr<KvRegistry>> Connect(
      const std::string& address, const std::string& prefix = "tekv",
      std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

  // Writes (or refreshes) `entry`, expiring after `ttl` unless refreshed.
  Status Put(const RegistryEntry& entry, std::chrono::milliseconds ttl);
  Status Remove(const std::string& role, const std::string& name);
  // Live entries of `role` ("prefill" or "decode"), sorted by name.
  Result<std::vector<RegistryEntry>> List(const std::string& role);

 private:
  friend class KvRegistration;  // holds its entry through a lease on client_
  KvRegistry(std::unique_ptr<registry::RedisClient> client, std::string prefix)
      : client_(std::move(client)), prefix_(std::move(prefix)) {}
  std::string KeyOf(const std::string& role, const std::string& name) const {
    return prefix_ + ":" + role + ":" + name;
  }

  std::unique_ptr<registry::RedisClient> client_;
  std::string prefix_;
};

// Keeps one instance's entry alive (a registry::RegistryLease): written
// every ttl / 3 with the load that `load()` reports, until Leave() or
// destruction. Leave() marks the entry draining, waits until `load()`
// reaches 0 (at most `drain_timeout`), then removes it. The destructor stops heartbeating without removing anything,
// which is what a crash looks like to everyone else.
class KvRegistration {
 public:
  static Result<std::unique_ptr<KvRegistration>> Start(KvRegistry* registry, RegistryEntry entry,
                                                       std::function<uint32_t()> load,
                                                       std::chrono::milliseconds ttl = std::chrono::milliseconds(3000));
  ~KvRegistration();
  Status Leave(std::chrono::milliseconds drain_timeout = std::chrono::milliseconds(30000));

 private:
  KvRegistration(KvRegistry* registry, RegistryEntry entry, std::function<uint32_t()> load)
      : registry_(registry), entry_(std::move(entry)), load_(std::move(load)) {}
  std::string CurrentValue() const;  // the entry with the load now

  KvRegistry* registry_;
  const RegistryEntry entry_;
  const std::function<uint32_t()> load_;
  std::atomic<bool> draining_{false};
  std::unique_ptr<registry::RegistryLease> lease_;
};

}  // namespace te::kvcache
