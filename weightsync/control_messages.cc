#include "weightsync/control_messages.h"

#include <string_view>
#include <vector>

#include "base/checked_math.h"

namespace te::weightsync {
namespace {

// The line's fields, split on single spaces; empty fields (two spaces, a
// leading or trailing one) are kept, so they fail as numbers or words.
Result<std::vector<std::string_view>> Fields(std::span<const uint8_t> line, const char* what) {
  if (line.size() > kMaxControlLine)
    return InvalidArgument(std::string(what) + " of " + std::to_string(line.size()) + " bytes; at most " +
                           std::to_string(kMaxControlLine));
  const std::string_view text(reinterpret_cast<const char*>(line.data()), line.size());
  std::vector<std::string_view> out;
  size_t at = 0;
  for (;;) {
    const size_t space = text.find(' ', at);
    out.push_back(text.substr(at, space == std::string_view::npos ? std::string_view::npos : space - at));
    if (space == std::string_view::npos) break;
    at = space + 1;
  }
  return out;
}

Result<uint64_t> Number(std::string_view field, const char* name, uint64_t min, uint64_t max) {
  const auto v = ParseUint64(field);
  if (!v || *v < min || *v > max)
    return InvalidArgument(std::string(name) + " '" + std::string(field.substr(0, 24)) + "' is not a number in [" +
                           std::to_string(min) + ", " + std::to_string(max) + "]");
  return *v;
}

constexpr uint64_t kMaxU64 = ~uint64_t(0);

}  // namespace

std::string EncodeBegin(const BeginMessage& m) {
  return "tews1 BEGIN " + std::to_string(m.version) + " " + std::to_string(m.writes) + " " + std::to_string(m.source);
}

Result<BeginMessage> ParseBegin(std::span<const uint8_t> line) {
  TE_ASSIGN_OR_RETURN(auto f, Fields(line, "weight-sync BEGIN"));
  if (f.size() != 5 || f[0] != "tews1" || f[1] != "BEGIN")
    return InvalidArgument("not a weight-sync BEGIN ('tews1 BEGIN <version> <writes> <source>')");
  BeginMessage m;
  TE_ASSIGN_OR_RETURN(m.version, Number(f[2], "version", 1, kMaxU64));
  TE_ASSIGN_OR_RETURN(m.writes, Number(f[3], "writes", 0, kMaxU64));
  TE_ASSIGN_OR_RETURN(const uint64_t source, Number(f[4], "source rank", 0, kMaxWireRank - 1));
  m.source = uint32_t(source);
  return m;
}

std::string EncodeAnswer(const AnswerMessage& m) {
  std::string s = std::string("tews1 ") + (m.ready ? "READY " : "REFUSED ") + std::to_string(m.version) + " " +
                  std::to_string(m.rank);
  if (!m.ready) s += " " + std::to_string(m.published);
  return s;
}

Result<AnswerMessage> ParseAnswer(std::span<const uint8_t> line) {
  TE_ASSIGN_OR_RETURN(auto f, Fields(line, "weight-sync answer"));
  AnswerMessage m;
  if (f.size() == 4 && f[0] == "tews1" && f[1] == "READY") {
    m.ready = true;
  } else if (f.size() == 5 && f[0] == "tews1" && f[1] == "REFUSED") {
    TE_ASSIGN_OR_RETURN(m.published, Number(f[4], "published version", 0, kMaxU64));
  } else {
    return InvalidArgument(
        "not a weight-sync answer ('tews1 READY <version> <rank>' or "
        "'tews1 REFUSED <version> <rank> <published>')");
  }
  TE_ASSIGN_OR_RETURN(m.version, Number(f[2], "version", 1, kMaxU64));
  TE_ASSIGN_OR_RETURN(const uint64_t rank, Number(f[3], "receiver rank", 0, kMaxWireRank - 1));
  m.rank = uint32_t(rank);
  return m;
}

}  // namespace te::weightsync
