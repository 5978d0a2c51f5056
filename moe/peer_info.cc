#include "moe/peer_info.h"

#include <cctype>
#include <vector>

namespace te::moe {
namespace {

// Fields are separated by any whitespace, as `std::istream >>` reads them.
bool Space(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::vector<std::string_view> Words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && Space(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !Space(s[j])) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

// A peer's value in a message: bounded, since the peer chose its length.
std::string Quote(std::string_view v) {
  constexpr size_t kMax = 32;
  return v.size() <= kMax ? std::string(v) : std::string(v.substr(0, kMax)) + "...";
}

}  // namespace

Result<std::string> MatchPeerInfo(std::string_view info, std::string_view mine, uint32_t r,
                                  std::string_view field_names) {
  const std::vector<std::string_view> ours = Words(mine), theirs = Words(info);
  const std::string who = "info of rank " + std::to_string(r);
  // ours: magic, ranks, rank, ..., hex.
  if (ours.size() < 4) return Internal("this rank's own info has " + std::to_string(ours.size()) + " words");
  if (theirs.empty() || theirs[0] != ours[0])
    return InvalidArgument(who + " does not start with '" + std::string(ours[0]) + "' (another dispatcher's?)");
  if (theirs.size() != ours.size())
    return InvalidArgument(who + " is malformed: " + std::to_string(theirs.size() - 1) + " fields, expected " +
                           std::to_string(ours.size() - 1));
  if (theirs[2] != std::to_string(r))
    return InvalidArgument("infos[" + std::to_string(r) + "] comes from rank " + Quote(theirs[2]));
  const std::vector<std::string_view> names = Words(field_names);
  for (size_t i = 1; i + 1 < ours.size(); ++i) {
    if (i == 2 || theirs[i] == ours[i]) continue;
    const std::string name = i - 1 < names.size() ? std::string(names[i - 1]) : "field " + std::to_string(i);
    return InvalidArgument("rank " + std::to_string(r) + " has another shape: " + name + " " + Quote(theirs[i]) +
                           " there, " + std::string(ours[i]) + " here (fields: " + std::string(field_names) + ")");
  }
  return std::string(theirs.back());
}

}  // namespace te::moe
