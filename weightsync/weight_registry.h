// WeightRegistry: how the sources and receivers of weight updates find each
// other, through the same Redis registry the KV-cache plane uses
// (registry/redis_client.h), so that they need no shared filesystem.
//
// Keys, one job per prefix (default "tews"):
//   <prefix>:receiver:<rank>  WeightReceiver::Info(), a newline, and where
//                             its weights live (e.g. the /dev/shm file)
//   <prefix>:source:<rank>    the source's engine address (hex), for status
// Each key is held by a RegistryLease: refreshed every ttl / 3; a process
// that dies disappears within the TTL; one that leaves deletes its key.
//
// Membership is elastic: a source reads the receivers before each version
// (SyncReceivers) and pushes that version to exactly those; a receiver that
// registers later gets the next version, one that left is reported missed.
// Values come from other processes: a malformed entry is skipped (and
// counted), never trusted.
//
// Threads: any thread; one Redis connection behind a mutex.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "registry/redis_client.h"
#include "weightsync/weight_pusher.h"

namespace te::weightsync {

struct RegistryMember {
  uint32_t rank = 0;
  std::string info;      // receivers: WeightReceiver::Info(); sources: engine address (hex)
  std::string location;  // receivers: where the weights live; may be empty
};

class WeightRegistry {
 public:
  // `address`: "host:port" or "unix:/path"; `prefix` names the job.
  static Result<std::unique_ptr<WeightRegistry>> Connect(
      const std::string& address, const std::string& prefix = "tews",
      std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

  // Registers receiver `rank` until the lease is stopped (or its holder dies).
  Result<std::unique_ptr<registry::RegistryLease>> AnnounceReceiver(
      uint32_t rank, const std::string& info, const std::string& location,
      std::chrono::milliseconds ttl = std::chrono::milliseconds(3000));
  Result<std::unique_ptr<registry::RegistryLease>> AnnounceSource(
      uint32_t rank, const std::string& address, std::chrono::milliseconds ttl = std::chrono::milliseconds(3000));

  // Live members, sorted by rank; malformed entries are skipped.
  Result<std::vector<RegistryMember>> Receivers();
  Result<std::vector<RegistryMember>> Sources();
  // Entries skipped as malformed since Connect.
  uint64_t malformed() const { return malformed_.load(); }

  // Points `pusher` at the receivers registered now: ranks [0, ranks) that
  // are registered get their info, the others are marked absent. A
  // registered entry the pusher refuses is marked absent and reported in
  // `refused` (rank -> why).
  Status SyncReceivers(WeightPusher* pusher, uint32_t ranks, std::map<uint32_t, std::string>* refused);

 private:
  WeightRegistry(std::unique_ptr<registry::RedisClient> client, std::string prefix)
      : client_(std::move(client)), prefix_(std::move(prefix)) {}
  Result<std::vector<RegistryMember>> List(const std::string& role);

  std::unique_ptr<registry::RedisClient> client_;
  std::string prefix_;
  std::atomic<uint64_t> malformed_{0};
};

}  // namespace te::weightsync
