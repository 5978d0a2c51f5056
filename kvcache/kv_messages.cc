#include "kvcache/kv_messages.h"

#include <sstream>

#include "base/checked_math.h"

namespace te::kvcache {

namespace {
constexpr const char* kMagic = "tekv1";
const char* KindName(KvMessage::Kind k) {
  switch (k) {
    case KvMessage::Kind::kPull:
      return "PULL";
    case KvMessage::Kind::kCancel:
      return "CANCEL";
    case KvMessage::Kind::kCancelled:
      return "CANCELLED";
    case KvMessage::Kind::kFailed:
      return "FAILED";
    case KvMessage::Kind::kHeartbeat:
      return "HB";
  }
  return "?";
}
}  // namespace

std::vector<uint8_t> KvMessage::Encode() const {
  std::ostringstream o;
  o << kMagic << ' ' << KindName(kind) << ' ' << request << ' ' << rank;
  switch (kind) {
    case Kind::kPull:
      o << ' ' << imm << ' ' << context_offset << ' ' << context_bytes << ' ' << descriptor_hex << ' ' << pages.size()
        << ' ' << source_rank << ' ' << layout.Serialize() << ' ' << source_layout.Serialize();
      break;
    case Kind::kCancelled:
      o << ' ' << delivered;
      break;
    case Kind::kFailed:
      o << ' ' << delivered << ' ' << reason;
      break;
    default:
      break;
  }
  o << '\n';
  std::string head = o.str();
  std::vector<uint8_t> out(head.begin(), head.end());
  if (kind == Kind::kPull) {
    out.reserve(out.size() + pages.size() * 4);
    for (uint32_t p : pages)
      for (int b = 0; b < 4; ++b) out.push_back(uint8_t(p >> (8 * b)));
  }
  return out;
}

Result<KvMessage> KvMessage::Decode(std::span<const uint8_t> data) {
  size_t nl = 0;
  while (nl < data.size() && data[nl] != '\n') ++nl;
  if (nl == data.size())
    return InvalidArgument("KV control message of " + std::to_string(data.size()) + " bytes has no header line");
  std::istringstream in(std::string(data.begin(), data.begin() + nl));
  std::string magic, kind;
  KvMessage m;
  in >> magic >> kind >> m.request >> m.rank;
  if (!in || magic != kMagic) return InvalidArgument("not a KV control message (magic '" + magic + "')");
  if (kind == "PULL") {
    m.kind = Kind::kPull;
    uint64_t n = 0;
    in >> m.imm >> m.context_offset >> m.context_bytes >> m.descriptor_hex >> n >> m.source_rank;
    std::string layouts[2];
    for (auto& l : layouts)
      for (int i = 0; i < 10; ++i) {
        std::string field;
        in >> field;
        l += (i ? " " : "") + field;
      }
    if (!in) return InvalidArgument("KV PULL header is malformed");
    TE_ASSIGN_OR_RETURN(m.layout, KvLayout::Parse(layouts[0]));
    TE_ASSIGN_OR_RETURN(m.source_layout, KvLayout::Parse(layouts[1]));
    // n comes from the peer: n * 4 must not wrap (2^62 pages would pass a
    // wrapped check and then fail the allocation).
    const uint64_t carried = data.size() - nl - 1;
    uint64_t announced = 0;
    if (!CheckedMul(n, 4, &announced) || announced != carried)
      return InvalidArgument("KV PULL announces " + std::to_string(n) + " pages but carries " +
                             std::to_string(carried) + " bytes of them (4 per page)");
    m.pages.resize(n);
    const uint8_t* p = data.data() + nl + 1;
    for (uint64_t i = 0; i < n; ++i)
      m.pages[i] = uint32_t(p[4 * i]) | uint32_t(p[4 * i + 1]) << 8 | uint32_t(p[4 * i + 2]) << 16 |
                   uint32_t(p[4 * i + 3]) << 24;
  } else if (kind == "CANCEL") {
    m.kind = Kind::kCancel;
  } else if (kind == "CANCELLED") {
    m.kind = Kind::kCancelled;
    in >> m.delivered;
    if (!in) return InvalidArgument("KV CANCELLED lacks its delivered count");
  } else if (kind == "FAILED") {
    m.kind = Kind::kFailed;
    in >> m.delivered;
    if (!in) return InvalidArgument("KV FAILED lacks its delivered count");
    std::getline(in >> std::ws, m.reason);
  } else if (kind == "HB") {
    m.kind = Kind::kHeartbeat;
  } else {
    return InvalidArgument("unknown KV control message '" + kind + "'");
  }
  return m;
}

std::string KvInstanceInfo::Serialize() const {
  std::ostringstream o;
  o << "kvi1 " << role << ' ' << name << ' ' << ranks.size();
  for (const auto& a : ranks) o << ' ' << a.ToHex();
  o << ' ' << layout.Serialize();
  return o.str();
}

Result<KvInstanceInfo> KvInstanceInfo::Parse(const std::string& text) {
  std::istringstream in(text);
  std::string magic;
  KvInstanceInfo info;
  size_t n = 0;
  in >> magic >> info.role >> info.name >> n;
  if (!in || magic != "kvi1" || (info.role != "prefill" && info.role != "decode") || n == 0 || n > 1024)
    return InvalidArgument("not a KV instance description: '" + text.substr(0, 80) + "'");
  for (size_t i = 0; i < n; ++i) {
    std::string hex;
    in >> hex;
    TE_ASSIGN_OR_RETURN(EngineAddress a, EngineAddress::FromHex(hex));
    info.ranks.push_back(std::move(a));
  }
  std::string rest;
  std::getline(in, rest);
  TE_ASSIGN_OR_RETURN(info.layout, KvLayout::Parse(rest));
  if (info.layout.tp != n)
    return InvalidArgument("KV instance '" + info.name + "' lists " + std::to_string(n) +
                           " ranks but its layout has tp " + std::to_string(info.layout.tp));
  return info;
}

}  // namespace te::kvcache
