#include "transfer/mr_descriptor.h"

#include <cstring>

#include "base/checked_math.h"
#include "base/crc32c.h"

namespace te {
namespace {

// Layout (little-endian):
//   u32 magic | u8 version | body ... | u32 crc32c(everything before it)
// EngineAddress body: u8 provider_len, provider, u8 n_domains,
//                     n x (u16 len, bytes) [, u8 same_host_domains: version 2]
// MrDescriptor body:  EngineAddress body, u64 length, n x (u64 rkey, u64 base)
constexpr uint32_t kAddressMagic = 0x41455445;     // "ETEA"
constexpr uint32_t kDescriptorMagic = 0x44455445;  // "ETED"
constexpr uint8_t kVersion = 1;                    // no same-host domain
constexpr uint8_t kSameHostVersion = 2;            // adds same_host_domains
constexpr size_t kMaxDomains = 64;
constexpr size_t kMaxAddressBytes = 1024;

class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(v); }
  void U16(uint16_t v) { Raw(&v, 2); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Raw(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  std::vector<uint8_t> Finish() {
    U32(Crc32c(out_.data(), out_.size()));
    return std::move(out_);
  }

 private:
  std::vector<uint8_t> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : b_(b) {}
  bool U8(uint8_t* v) { return Raw(v, 1); }
  bool U16(uint16_t* v) { return Raw(v, 2); }
  bool U32(uint32_t* v) { return Raw(v, 4); }
  bool U64(uint64_t* v) { return Raw(v, 8); }
  bool Raw(void* p, size_t n) {
    if (b_.size() - pos_ < n) return false;
    std::memcpy(p, b_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  size_t remaining() const { return b_.size() - pos_; }
  size_t pos() const { return pos_; }

 private:
  std::span<const uint8_t> b_;
  size_t pos_ = 0;
};

void WriteAddressBody(Writer& w, const EngineAddress& a) {
  w.U8(uint8_t(a.provider.size()));
  w.Raw(a.provider.data(), a.provider.size());
  w.U8(uint8_t(a.domains.size()));
  for (const auto& d : a.domains) {
    w.U16(uint16_t(d.size()));
    w.Raw(d.data(), d.size());
  }
  if (a.same_host_domains) w.U8(a.same_host_domains);
}

uint8_t VersionOf(const EngineAddress& a) { return a.same_host_domains ? kSameHostVersion : kVersion; }

}  // namespace

Status EngineAddress::Validate() const {
  const EngineAddress& a = *this;
  if (a.provider.size() > 255) return InvalidArgument("provider name longer than 255 bytes");
  if (a.domains.empty() || a.domains.size() > kMaxDomains)
    return InvalidArgument("engine address has " + std::to_string(a.domains.size()) + " domains; valid range is 1.." +
                           std::to_string(kMaxDomains));
  for (const auto& d : a.domains)
    if (d.empty() || d.size() > kMaxAddressBytes)
      return InvalidArgument("domain address of " + std::to_string(d.size()) + " bytes; valid range is 1.." +
                             std::to_string(kMaxAddressBytes));
  // At least one NIC domain: a peer on another host must reach the engine.
  if (a.same_host_domains > 1 || a.same_host_domains >= a.domains.size())
    return InvalidArgument("engine address has " + std::to_string(a.same_host_domains) + " same-host domains of " +
                           std::to_string(a.domains.size()) + "; valid is 0, or 1 beside at least one NIC domain");
  return Status::Ok();
}

namespace {

// Checks magic, version and CRC; leaves the reader after the version byte.
Status OpenEnvelope(std::span<const uint8_t> bytes, uint32_t magic, const char* what, Reader* r, uint8_t* version_out) {
  if (bytes.size() < 9)
    return InvalidArgument(std::string(what) + " is " + std::to_string(bytes.size()) +
                           " bytes; truncated (at least 9 expected)");
  uint32_t stored_crc;
  std::memcpy(&stored_crc, bytes.data() + bytes.size() - 4, 4);
  uint32_t got_magic = 0;
  uint8_t version = 0;
  r->U32(&got_magic);
  r->U8(&version);
  if (got_magic != magic) return InvalidArgument(std::string(what) + " has a bad magic number: not a " + what);
  if (version != kVersion && version != kSameHostVersion)
    return InvalidArgument(std::string(what) + " version " + std::to_string(version) +
                           " is not supported (this build reads versions " + std::to_string(kVersion) + " and " +
                           std::to_string(kSameHostVersion) + ")");
  *version_out = version;
  if (Crc32c(bytes.data(), bytes.size() - 4) != stored_crc)
    return InvalidArgument(std::string(what) + " checksum mismatch: corrupted or truncated");
  return Status::Ok();
}

Status ReadAddressBody(Reader& r, uint8_t version, EngineAddress* a, const char* what) {
  auto truncated = [&] { return InvalidArgument(std::string(what) + " truncated"); };
  uint8_t plen;
  if (!r.U8(&plen)) return truncated();
  a->provider.resize(plen);
  if (!r.Raw(a->provider.data(), plen)) return truncated();
  uint8_t n;
  if (!r.U8(&n)) return truncated();
  if (n == 0 || n > kMaxDomains)
    return InvalidArgument(std::string(what) + " names " + std::to_string(n) + " domains; valid range is 1.." +
                           std::to_string(kMaxDomains));
  a->domains.resize(n);
  for (auto& d : a->domains) {
    uint16_t len;
    if (!r.U16(&len)) return truncated();
    if (len == 0 || len > kMaxAddressBytes)
      return InvalidArgument(std::string(what) + " has a domain address of " + std::to_string(len) +
                             " bytes; valid range is 1.." + std::to_string(kMaxAddressBytes));
    d.resize(len);
    if (!r.Raw(d.data(), len)) return truncated();
  }
  if (version == kSameHostVersion) {
    if (!r.U8(&a->same_host_domains)) return truncated();
    // Version 2 exists to carry one; 0 is written as version 1.
    if (a->same_host_domains != 1 || n < 2)
      return InvalidArgument(std::string(what) + " names " + std::to_string(a->same_host_domains) +
                             " same-host domains of " + std::to_string(n) +
                             "; version 2 carries exactly 1 beside at least one NIC domain");
  }
  return Status::Ok();
}

Status ExpectOnlyCrcLeft(const Reader& r, const char* what) {
  if (r.remaining() != 4)
    return InvalidArgument(std::string(what) + " has " + std::to_string(r.remaining() - 4) +
                           " unexpected trailing bytes");
  return Status::Ok();
}

}  // namespace

std::string ToHex(std::span<const uint8_t> bytes) {
  static const char* kDigits = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    s.push_back(kDigits[b >> 4]);
    s.push_back(kDigits[b & 15]);
  }
  return s;
}

Result<std::vector<uint8_t>> FromHex(const std::string& hex) {
  if (hex.size() % 2 != 0) return InvalidArgument("hex string has odd length " + std::to_string(hex.size()));
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return InvalidArgument("hex string has a non-hex character at position " +
                             std::to_string(hi < 0 ? 2 * i : 2 * i + 1));
    out[i] = uint8_t(hi << 4 | lo);
  }
  return out;
}

std::vector<uint8_t> EngineAddress::Serialize() const {
  Writer w;
  w.U32(kAddressMagic);
  w.U8(VersionOf(*this));
  WriteAddressBody(w, *this);
  return w.Finish();
}

std::string EngineAddress::ToHex() const { return te::ToHex(Serialize()); }

Result<EngineAddress> EngineAddress::Deserialize(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  uint8_t version = 0;
  TE_RETURN_IF_ERROR(OpenEnvelope(bytes, kAddressMagic, "engine address", &r, &version));
  EngineAddress a;
  TE_RETURN_IF_ERROR(ReadAddressBody(r, version, &a, "engine address"));
  TE_RETURN_IF_ERROR(ExpectOnlyCrcLeft(r, "engine address"));
  return a;
}

Result<EngineAddress> EngineAddress::FromHex(const std::string& hex) {
  TE_ASSIGN_OR_RETURN(auto bytes, te::FromHex(hex));
  return Deserialize(bytes);
}

std::vector<uint8_t> MrDescriptor::Serialize() const {
  Writer w;
  w.U32(kDescriptorMagic);
  w.U8(VersionOf(owner));
  WriteAddressBody(w, owner);
  w.U64(length);
  for (const auto& k : keys) {
    w.U64(k.rkey);
    w.U64(k.remote_base);
  }
  return w.Finish();
}

std::string MrDescriptor::ToHex() const { return te::ToHex(Serialize()); }

Result<MrDescriptor> MrDescriptor::Deserialize(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  uint8_t version = 0;
  TE_RETURN_IF_ERROR(OpenEnvelope(bytes, kDescriptorMagic, "memory descriptor", &r, &version));
  MrDescriptor d;
  TE_RETURN_IF_ERROR(ReadAddressBody(r, version, &d.owner, "memory descriptor"));
  if (!r.U64(&d.length)) return InvalidArgument("memory descriptor truncated");
  d.keys.resize(d.owner.domains.size());
  for (auto& k : d.keys)
    if (!r.U64(&k.rkey) || !r.U64(&k.remote_base)) return InvalidArgument("memory descriptor truncated in its keys");
  TE_RETURN_IF_ERROR(ExpectOnlyCrcLeft(r, "memory descriptor"));
  TE_RETURN_IF_ERROR(d.Validate());
  return d;
}

Status MrDescriptor::Validate() const {
  TE_RETURN_IF_ERROR(owner.Validate().WithContext("memory descriptor owner"));
  if (keys.size() != owner.domains.size())
    return InvalidArgument("memory descriptor has " + std::to_string(keys.size()) + " keys for " +
                           std::to_string(owner.domains.size()) + " owner domains; one per domain expected");
  if (length == 0) return InvalidArgument("memory descriptor has length 0");
  for (size_t i = 0; i < keys.size(); ++i) {
    uint64_t end;
    if (!CheckedAdd(keys[i].remote_base, length, &end))
      return InvalidArgument("memory descriptor key " + std::to_string(i) + ": base " +
                             std::to_string(keys[i].remote_base) + " + length " + std::to_string(length) +
                             " overflows 64 bits");
  }
  return Status::Ok();
}

Result<MrDescriptor> MrDescriptor::FromHex(const std::string& hex) {
  TE_ASSIGN_OR_RETURN(auto bytes, te::FromHex(hex));
  return Deserialize(bytes);
}

}  // namespace te
