#include "moe/routing_trace.h"

#include <cstring>
#include <fstream>

#include "base/crc32c.h"

namespace te::moe {
namespace {
constexpr char kMagic[8] = {'T', 'E', 'M', 'O', 'E', 'T', 'R', '1'};
constexpr size_t kHeader = 8 + 16;

// A 128-bit count for a message: exact up to 2^64, else named as beyond it.
std::string Count(unsigned __int128 n) { return n >> 64 ? std::string("more than 2^64") : std::to_string(uint64_t(n)); }
}  // namespace

Status RoutingTrace::ValidateShape() const {
  if (tokens == 0 || layers == 0 || topk == 0 || experts == 0)
    return InvalidArgument("trace shape " + std::to_string(tokens) + " tokens x " + std::to_string(layers) +
                           " layers x top-" + std::to_string(topk) + " over " + std::to_string(experts) +
                           " experts has a zero");
  if (experts > 32767) return InvalidArgument("experts = " + std::to_string(experts) + "; at most 32767");
  if (topk > experts)
    return InvalidArgument("top-" + std::to_string(topk) + " exceeds " + std::to_string(experts) + " experts");
  const unsigned __int128 ids = (unsigned __int128)tokens * layers * topk;
  if (ids > kMaxTraceIds)
    return InvalidArgument("trace shape " + std::to_string(tokens) + " x " + std::to_string(layers) + " x " +
                           std::to_string(topk) + " holds " + Count(ids) + " ids; at most 2^32");
  return Status::Ok();
}

Status RoutingTrace::Validate() const {
  TE_RETURN_IF_ERROR(ValidateShape());
  // In 128 bits: tokens x layers x topk reaches 2^79, and a product that
  // wrapped to ids.size() would pass with a shape the ids do not fill.
  const unsigned __int128 need = (unsigned __int128)tokens * layers * topk;
  if (need != ids.size())
    return InvalidArgument("trace holds " + std::to_string(ids.size()) + " ids; shape " + std::to_string(tokens) +
                           " x " + std::to_string(layers) + " x " + std::to_string(topk) + " needs " + Count(need));
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < -1 || ids[i] >= int(experts))
      return InvalidArgument("expert id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                             " outside [-1, " + std::to_string(experts) + ")");
  return Status::Ok();
}

std::vector<uint8_t> SerializeTrace(const RoutingTrace& t) {
  std::vector<uint8_t> out(kHeader + t.ids.size() * 2 + 4);
  std::memcpy(out.data(), kMagic, 8);
  const uint32_t dims[4] = {t.tokens, t.layers, t.topk, t.experts};
  std::memcpy(out.data() + 8, dims, 16);
  std::memcpy(out.data() + kHeader, t.ids.data(), t.ids.size() * 2);
  const uint32_t crc = Crc32c(out.data(), out.size() - 4);
  std::memcpy(out.data() + out.size() - 4, &crc, 4);
  return out;
}

Result<RoutingTrace> ParseTrace(const std::vector<uint8_t>& b) {
  if (b.size() < kHeader + 4)
    return InvalidArgument("trace of " + std::to_string(b.size()) + " bytes is truncated (header needs " +
                           std::to_string(kHeader + 4) + ")");
  if (std::memcmp(b.data(), kMagic, 8) != 0) return InvalidArgument("not a routing trace (bad magic)");
  RoutingTrace t;
  uint32_t dims[4];
  std::memcpy(dims, b.data() + 8, 16);
  t.tokens = dims[0];
  t.layers = dims[1];
  t.topk = dims[2];
  t.experts = dims[3];
  const unsigned __int128 n = (unsigned __int128)t.tokens * t.layers * t.topk;
  if (b.size() != kHeader + n * 2 + 4)
    return InvalidArgument("trace file is " + std::to_string(b.size()) + " bytes; its header (" +
                           std::to_string(t.tokens) + " x " + std::to_string(t.layers) + " x " +
                           std::to_string(t.topk) + ") needs " + Count(kHeader + n * 2 + 4));
  uint32_t crc;
  std::memcpy(&crc, b.data() + b.size() - 4, 4);
  if (Crc32c(b.data(), b.size() - 4) != crc) return InvalidArgument("trace checksum mismatch: corrupted");
  if (n == 0)
    return InvalidArgument("trace shape " + std::to_string(t.tokens) + " x " + std::to_string(t.layers) + " x " +
                           std::to_string(t.topk) + " holds no ids");
  t.ids.resize(size_t(n));
  std::memcpy(t.ids.data(), b.data() + kHeader, size_t(n) * 2);
  TE_RETURN_IF_ERROR(t.Validate());
  return t;
}

Status WriteTrace(const RoutingTrace& t, const std::string& path) {
  TE_RETURN_IF_ERROR(t.Validate());
  const auto bytes = SerializeTrace(t);
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  if (!out) return IoError("cannot write trace to '" + path + "'");
  return Status::Ok();
}

Result<RoutingTrace> ReadTrace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open trace '" + path + "'");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
  auto t = ParseTrace(bytes);
  if (!t.ok()) return t.status().WithContext("reading '" + path + "'");
  return t;
}

}  // namespace te::moe
