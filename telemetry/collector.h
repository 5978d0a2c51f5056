// Collector: owns one registered region holding a key-write store and the
// append lists, publishes where they are (CollectorInfo), and answers queries
// by reading its own memory. It has no receive loop and runs no code per
// report: reporters write with one-sided writes and no immediate.
//
// The region can live in a file (e.g. under /dev/shm) so that another
// process maps it and queries without the collector doing anything at all.
//
// Threads: Query and ReadList only read the region (while reporters write
// into it); any thread may call them. The engine outlives the collector,
// which holds a registration of it.
#pragma once

#include <memory>
#include <string>

#include "telemetry/append_list.h"
#include "telemetry/key_write_store.h"
#include "transfer/shared_host_memory.h"
#include "transfer/transfer_engine.h"

namespace te::telemetry {

// Everything a reporter or reader needs: geometry and the region descriptor.
struct CollectorInfo {
  StoreGeometry store;
  ListGeometry lists;
  MrDescriptor region;  // empty (length 0) in a layout-only info

  size_t store_offset() const { return 0; }
  size_t lists_offset() const { return (store.region_bytes() + 63) & ~size_t(63); }
  size_t region_bytes() const { return lists_offset() + lists.region_bytes(); }
  Status Validate() const;

  // One line of text: "tetel1 <slots> <value> <hashes> <seed> <lists> <rings>
  // <records> <record_bytes> <descriptor hex or ->".
  std::string Serialize() const;
  static Result<CollectorInfo> Parse(const std::string& text);
};

class Collector {
 public:
  // Allocates (or maps `region_file`, created and sized) and registers the
  // region with `engine`. `info` gives the geometry; its descriptor is filled.
  // Without a file the region is SharedHostMemory: reporters on this host
  // reached through the same-host domain write it with memcpy (a region
  // file, which other processes open to query, takes process_vm_writev).
  static Result<std::unique_ptr<Collector>> Create(TransferEngine* engine, CollectorInfo info,
                                                   const std::string& region_file = "");
  ~Collector();

  const CollectorInfo& info() const { return info_; }
  Result<QueryResult> Query(std::span<const uint8_t> key) const;
  // Follows ring (list, ring) from *cursor.
  Result<ListRead> ReadList(uint32_t list, uint32_t ring, uint64_t* cursor) const;
  std::span<const uint8_t> region() const { return {base_, size_}; }

 private:
  Collector() = default;
  CollectorInfo info_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  std::unique_ptr<SharedHostMemory> owned_;
  LocalMr mr_;
};

// Maps a collector's region file read-only for queries from another process.
class RegionView {
 public:
  static Result<std::unique_ptr<RegionView>> Open(const std::string& region_file, const CollectorInfo& info);
  ~RegionView();
  Result<QueryResult> Query(std::span<const uint8_t> key) const;
  Result<ListRead> ReadList(uint32_t list, uint32_t ring, uint64_t* cursor) const;

 private:
  RegionView() = default;
  CollectorInfo info_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace te::telemetry
