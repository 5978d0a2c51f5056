#include "telemetry/collector.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>

namespace te::telemetry {

Status CollectorInfo::Validate() const {
  TE_RETURN_IF_ERROR(store.Validate().WithContext("key-write store"));
  TE_RETURN_IF_ERROR(lists.Validate().WithContext("append lists"));
  if (region.length != 0 && region.length < region_bytes())
    return InvalidArgument("collector region is " + std::to_string(region.length) + " bytes; the geometry needs " +
                           std::to_string(region_bytes()));
  return Status::Ok();
}

std::string CollectorInfo::Serialize() const {
  std::ostringstream o;
  o << "tetel1 " << store.slots << " " << store.value_bytes << " " << store.hashes << " " << store.seed << " "
    << lists.lists << " " << lists.rings << " " << lists.ring_records << " " << lists.record_bytes << " "
    << (region.length ? region.ToHex() : "-");
  return o.str();
}

Result<CollectorInfo> CollectorInfo::Parse(const std::string& text) {
  std::istringstream in(text);
  std::string tag, hex;
  CollectorInfo c;
  in >> tag >> c.store.slots >> c.store.value_bytes >> c.store.hashes >> c.store.seed >> c.lists.lists >>
      c.lists.rings >> c.lists.ring_records >> c.lists.record_bytes >> hex;
  if (tag != "tetel1") return InvalidArgument("collector info does not start with 'tetel1'");
  if (!in) return InvalidArgument("collector info is truncated: expected 9 fields after 'tetel1'");
  if (hex != "-") {
    auto d = MrDescriptor::FromHex(hex);
    if (!d.ok()) return d.status().WithContext("collector info descriptor");
    c.region = d.value();
  }
  TE_RETURN_IF_ERROR(c.Validate());
  return c;
}

Result<std::unique_ptr<Collector>> Collector::Create(TransferEngine* engine, CollectorInfo info,
                                                     const std::string& region_file) {
  info.region = MrDescriptor{};
  TE_RETURN_IF_ERROR(info.Validate());
  std::unique_ptr<Collector> c(new Collector());
  c->size_ = info.region_bytes();
  if (region_file.empty()) {
    TE_ASSIGN_OR_RETURN(c->owned_, AllocateSharedHostMemory(c->size_));
    c->base_ = static_cast<uint8_t*>(c->owned_->data());
  } else {
    int fd = open(region_file.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return IoError("cannot create region file '" + region_file + "': " + strerror(errno));
    if (ftruncate(fd, off_t(c->size_)) != 0) {
      close(fd);
      return IoError("cannot size region file '" + region_file + "': " + strerror(errno));
    }
    void* p = mmap(nullptr, c->size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return IoError("cannot map '" + region_file + "': " + strerror(errno));
    c->base_ = static_cast<uint8_t*>(p);
    c->mapped_ = true;
  }
  TE_ASSIGN_OR_RETURN(c->mr_, engine->RegisterMemory(c->base_, c->size_));
  info.region = engine->Describe(*c->mr_);
  c->info_ = info;
  return c;
}

Collector::~Collector() {
  mr_.reset();
  if (mapped_) munmap(base_, size_);
}

Result<QueryResult> Collector::Query(std::span<const uint8_t> key) const {
  return telemetry::Query(info_.store, region().subspan(info_.store_offset()), key);
}

Result<ListRead> Collector::ReadList(uint32_t list, uint32_t ring, uint64_t* cursor) const {
  return ReadRing(info_.lists, region().subspan(info_.lists_offset()), list, ring, cursor);
}

Result<std::unique_ptr<RegionView>> RegionView::Open(const std::string& region_file, const CollectorInfo& info) {
  TE_RETURN_IF_ERROR(info.Validate());
  int fd = open(region_file.c_str(), O_RDONLY);
  if (fd < 0) return NotFound("cannot open region file '" + region_file + "': " + strerror(errno));
  const off_t size = lseek(fd, 0, SEEK_END);
  if (size < off_t(info.region_bytes())) {
    close(fd);
    return InvalidArgument("region file '" + region_file + "' is " + std::to_string(size) +
                           " bytes; the collector info needs " + std::to_string(info.region_bytes()));
  }
  void* p = mmap(nullptr, size_t(size), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return IoError("cannot map '" + region_file + "': " + strerror(errno));
  std::unique_ptr<RegionView> v(new RegionView());
  v->info_ = info;
  v->base_ = static_cast<const uint8_t*>(p);
  v->size_ = size_t(size);
  return v;
}

RegionView::~RegionView() {
  if (base_) munmap(const_cast<uint8_t*>(base_), size_);
}

Result<QueryResult> RegionView::Query(std::span<const uint8_t> key) const {
  return telemetry::Query(info_.store, {base_ + info_.store_offset(), info_.store.region_bytes()}, key);
}

Result<ListRead> RegionView::ReadList(uint32_t list, uint32_t ring, uint64_t* cursor) const {
  return ReadRing(info_.lists, {base_ + info_.lists_offset(), info_.lists.region_bytes()}, list, ring, cursor);
}

}  // namespace te::telemetry
