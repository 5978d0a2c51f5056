// WeightsMemory: a receiver's weight memory, shareable with the inference
// engine that reads it (a file in /dev/shm), or in-process SharedHostMemory
// (transfer/shared_host_memory.h), which pushers on this host reached
// through the same-host domain write with memcpy (a colocated trainer).
//
// Layout: [header, 4 KiB][slot 0][slot 1]. Version v is written into slot
// v % 2, so the last complete version stays readable while the next one
// lands (double buffering). Versions start at 1.
//
// Readers never see a mix of versions: Read() takes the published version v,
// lets the caller read slot v % 2, then checks that version v + 2 (the next
// writer of that slot) has not begun; otherwise it retries. The receiver
// raises `begun` before any byte of a version may land.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "base/status.h"
#include "transfer/shared_host_memory.h"

namespace te::weightsync {

struct WeightsHeader {
  char magic[8];  // "TEWSHM1"
  uint64_t slot_bytes;
  std::atomic<uint64_t> published;  // last complete version, 0 = none yet
  std::atomic<uint64_t> begun;      // highest version whose writes may have started
  std::atomic<uint64_t> failed;     // last version that failed here (0 = none)
  std::atomic<uint64_t> updates;    // versions completed by this receiver
};

class WeightsMemory {
 public:
  static constexpr size_t kHeaderBytes = 4096;
  // Creates (truncating) `path`, or SharedHostMemory when path is empty;
  // the pages are populated at once.
  static Result<std::unique_ptr<WeightsMemory>> Create(const std::string& path, uint64_t slot_bytes);
  // Maps an existing file read-write (readers only read).
  static Result<std::unique_ptr<WeightsMemory>> Open(const std::string& path);
  ~WeightsMemory();

  WeightsHeader* header() const { return reinterpret_cast<WeightsHeader*>(base_); }
  uint64_t slot_bytes() const { return header()->slot_bytes; }
  uint8_t* slots() const { return base_ + kHeaderBytes; }  // both slots, 2 x slot_bytes
  uint8_t* slot(uint64_t version) const { return slots() + (version % 2) * slot_bytes(); }
  uint64_t published() const { return header()->published.load(std::memory_order_acquire); }

  // Runs fn(version, slot) on one complete version, retrying if a writer
  // reached that slot meanwhile. kNotFound before the first version;
  // kUnavailable if updates keep overtaking the reader `attempts` times.
  Status Read(const std::function<void(uint64_t version, const uint8_t* slot)>& fn, int attempts = 100) const;

 private:
  WeightsMemory(uint8_t* base, size_t bytes, std::string path) : base_(base), bytes_(bytes), path_(std::move(path)) {}
  uint8_t* base_;
  size_t bytes_;
  std::string path_;
  std::unique_ptr<SharedHostMemory> shared_;  // owns base_ when set; else base_ is our mapping
};

}  // namespace te::weightsync
