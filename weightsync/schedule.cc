#include "weightsync/schedule.h"

#include <algorithm>
#include <map>
#include <sstream>

namespace te::weightsync {
namespace {

std::vector<uint64_t> Strides(const Box& b) {
  std::vector<uint64_t> s(b.begin.size(), 1);
  for (int d = int(b.begin.size()) - 2; d >= 0; --d) s[d] = s[d + 1] * (b.end[d + 1] - b.begin[d + 1]);
  return s;
}

// Innermost dimension where `inner` does not span `outer` fully; -1 if none.
int InnermostPartial(const Box& inner, const Box& outer) {
  for (int d = int(inner.begin.size()) - 1; d >= 0; --d)
    if (inner.begin[d] != outer.begin[d] || inner.end[d] != outer.end[d]) return d;
  return -1;
}

uint64_t Offset(const Box& shard, const std::vector<uint64_t>& strides, const std::vector<uint64_t>& coord) {
  uint64_t o = 0;
  for (size_t d = 0; d < coord.size(); ++d) o += (coord[d] - shard.begin[d]) * strides[d];
  return o;
}

}  // namespace

Result<Schedule> Schedule::Build(const ShardLayout& sources, const ShardLayout& dst, const ScheduleOptions& options) {
  if (options.max_transfer_bytes < 64) return InvalidArgument("max_transfer_bytes must be >= 64");
  // What moves is the destination's model; the sources hold it as they hold
  // theirs, with the parameters the destination takes as fp8 quantized.
  TE_ASSIGN_OR_RETURN(Fp8Conversion conv, PlanFp8Conversion(sources, dst.model()));
  Schedule s;
  s.wire_source_ = std::move(conv.wire_source);
  s.wire_params_ = std::move(conv.params);
  const ShardLayout& src = s.wire_source_;
  const ModelSpec& model = src.model();
  s.src_ranks_ = src.ranks();
  s.dst_ranks_ = dst.ranks();
  s.by_source_.resize(src.ranks());
  std::vector<uint64_t> load(src.ranks(), 0);
  const uint64_t max_pieces = options.max_pieces;
  uint64_t pieces = 0;

  for (size_t p = 0; p < model.params.size(); ++p) {
    const uint64_t es = DTypeBytes(model.params[p].dtype);
    const uint64_t max_elems = std::max<uint64_t>(1, options.max_transfer_bytes / es);
    const uint32_t src_parts = src.sharding(p).replicated() ? 1 : src.sharding(p).parts;
    for (uint32_t d = 0; d < dst.ranks(); ++d) {
      const Box D = dst.ShardBox(p, d);
      if (D.empty()) continue;
      const auto dstride = Strides(D);
      for (uint32_t part = 0; part < src_parts && part < src.ranks(); ++part) {
        const Box S = src.ShardBox(p, part);
        const Box I = Intersect(D, S);
        if (I.empty()) continue;
        const auto sstride = Strides(S);
        std::vector<uint32_t> owners;
        for (uint32_t r = part; r < src.ranks(); r += src_parts) owners.push_back(r);
        // Segments contiguous on both sides: the innermost partial dimension
        // of either side and everything inside it.
        const int k = std::max(InnermostPartial(I, D), InnermostPartial(I, S));
        uint64_t seg = 1;
        for (int j = std::max(k, 0); j < int(I.begin.size()); ++j) seg *= I.end[j] - I.begin[j];
        std::vector<uint64_t> c = I.begin;  // walks the outer dimensions (< k)

        Transfer cur;
        bool open = false;
        auto flush = [&] {
          if (!open) return;
          uint32_t best = owners[0];
          for (uint32_t r : owners)
            if (load[r] < load[best]) best = r;
          const uint64_t src_base = src.ParamOffset(p, best);
          cur.src_rank = best;
          cur.src_offset += src_base;
          load[best] += cur.length;
          s.by_source_[best].push_back(s.transfers_.size());
          s.transfers_.push_back(cur);
          open = false;
        };
        while (true) {
          const uint64_t so = Offset(S, sstride, c) * es, dof = Offset(D, dstride, c) * es;
          // Cut the segment into pieces of at most max_elems.
          for (uint64_t at = 0; at < seg; at += max_elems) {
            // Layouts come from files and peers: a shape that shards into
            // billions of tiny rows is refused, not walked for hours.
            if (++pieces > max_pieces)
              return InvalidArgument("schedule of parameter '" + model.params[p].name + "' needs more than " +
                                     std::to_string(max_pieces) +
                                     " contiguous pieces; the layouts cut it into rows too small to transfer");
            const uint64_t n = std::min(max_elems, seg - at) * es;
            const uint64_t piece_src = so + at * es, piece_dst = dst.ParamOffset(p, d) + dof + at * es;
            const bool extends =
                open && cur.dst_offset + cur.length == piece_dst && cur.src_piece == n &&
                cur.length + n <= max_elems * es &&
                (cur.length == cur.src_piece ? piece_src > cur.src_offset
                                             : piece_src == cur.src_offset + (cur.length / n) * cur.src_stride);
            if (extends) {
              if (cur.length == cur.src_piece) cur.src_stride = piece_src - cur.src_offset;
              cur.length += n;
            } else {
              flush();
              cur = Transfer{uint32_t(p), 0, d, piece_dst, n, piece_src, n, n};
              open = true;
            }
          }
          // Next outer coordinate (dimensions before k), row-major.
          int j = k - 1;
          for (; j >= 0; --j) {
            if (++c[j] < I.end[j]) break;
            c[j] = I.begin[j];
          }
          if (j < 0) break;
        }
        flush();
      }
    }
  }
  return s;
}

uint64_t Schedule::bytes_from(uint32_t r) const {
  uint64_t b = 0;
  for (size_t i : by_source_.at(r)) b += transfers_[i].length;
  return b;
}

uint64_t Schedule::bytes_to(uint32_t r) const {
  uint64_t b = 0;
  for (const auto& t : transfers_)
    if (t.dst_rank == r) b += t.length;
  return b;
}

uint64_t Schedule::total_bytes() const {
  uint64_t b = 0;
  for (const auto& t : transfers_) b += t.length;
  return b;
}

uint64_t Schedule::count(uint32_t src_rank, uint32_t dst_rank) const {
  uint64_t n = 0;
  for (size_t i : by_source_.at(src_rank)) n += transfers_[i].dst_rank == dst_rank;
  return n;
}

Status Schedule::Verify(const ShardLayout& sources, const ShardLayout& dst) const {
  const ModelSpec& model = dst.model();
  if (ModelToJson(wire_source_.model()) != ModelToJson(model) || sources.ranks() != wire_source_.ranks())
    return InvalidArgument("the layouts given to Verify are not the ones the schedule was built from");
  const ShardLayout& src = wire_source_;
  // Element coordinate of a byte offset inside a shard.
  auto coord_of = [](const Box& b, uint64_t elem) {
    std::vector<uint64_t> c(b.begin.size());
    for (int d = int(b.begin.size()) - 1; d >= 0; --d) {
      const uint64_t ext = b.end[d] - b.begin[d];
      c[d] = b.begin[d] + elem % ext;
      elem /= ext;
    }
    return c;
  };
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> written(dst.ranks());
  for (size_t i = 0; i < transfers_.size(); ++i) {
    const Transfer& t = transfers_[i];
    const std::string at = "transfer " + std::to_string(i);
    if (t.param >= model.params.size() || t.src_rank >= src.ranks() || t.dst_rank >= dst.ranks())
      return Internal(at + " names a parameter or rank out of range");
    const uint64_t es = DTypeBytes(model.params[t.param].dtype);
    if (t.length == 0 || t.src_piece == 0 || t.length % t.src_piece || t.src_piece % es)
      return Internal(at + ": length " + std::to_string(t.length) + " is not whole pieces of " +
                      std::to_string(t.src_piece));
    const Box D = dst.ShardBox(t.param, t.dst_rank), S = src.ShardBox(t.param, t.src_rank);
    const uint64_t dbase = dst.ParamOffset(t.param, t.dst_rank), sbase = src.ParamOffset(t.param, t.src_rank);
    if (t.dst_offset < dbase || t.dst_offset + t.length > dbase + dst.ShardBytes(t.param, t.dst_rank))
      return Internal(at + " writes outside the destination shard of " + model.params[t.param].name);
    written[t.dst_rank].push_back({t.dst_offset, t.dst_offset + t.length});
    const auto dstride = Strides(D), sstride = Strides(S);
    for (uint64_t k = 0; k < t.length / t.src_piece; ++k) {
      const uint64_t src_at = t.src_offset + k * t.src_stride;
      if (src_at < sbase || src_at + t.src_piece > sbase + src.ShardBytes(t.param, t.src_rank))
        return Internal(at + " reads outside the source shard of " + model.params[t.param].name);
      for (uint64_t e : {uint64_t(0), t.src_piece / es - 1}) {
        const auto c = coord_of(D, (t.dst_offset - dbase) / es + k * (t.src_piece / es) + e);
        for (size_t d = 0; d < c.size(); ++d)
          if (c[d] < S.begin[d] || c[d] >= S.end[d])
            return Internal(at + " reads an element the source rank does not hold");
        if (Offset(S, sstride, c) * es + sbase != src_at + e * es)
          return Internal(at + " piece " + std::to_string(k) + " reads the wrong source element");
      }
    }
  }
  for (uint32_t r = 0; r < dst.ranks(); ++r) {
    auto& w = written[r];
    std::sort(w.begin(), w.end());
    size_t i = 0;
    for (size_t p = 0; p < model.params.size(); ++p) {
      uint64_t at = dst.ParamOffset(p, r);
      const uint64_t end = at + dst.ShardBytes(p, r);
      while (at < end) {
        if (i >= w.size() || w[i].first != at)
          return Internal("destination rank " + std::to_string(r) + " byte " + std::to_string(at) + " of '" +
                          model.params[p].name + "' is " +
                          (i < w.size() && w[i].first < at ? "written twice" : "never written"));
        at = w[i++].second;
      }
      if (at != end)
        return Internal("destination rank " + std::to_string(r) + " '" + model.params[p].name +
                        "' written past its end");
    }
    if (i != w.size()) return Internal("destination rank " + std::to_string(r) + " has writes outside its shards");
  }
  return Status::Ok();
}

std::string Schedule::Summary() const {
  std::ostringstream o;
  o << transfers_.size() << " transfers, " << total_bytes() << " bytes\n";
  for (uint32_t r = 0; r < src_ranks_; ++r)
    o << "  source " << r << ": " << by_source_[r].size() << " transfers, " << bytes_from(r) << " bytes\n";
  for (uint32_t r = 0; r < dst_ranks_; ++r) o << "  destination " << r << ": " << bytes_to(r) << " bytes\n";
  return o.str();
}

void Schedule::Print(FILE* out, size_t limit) const {
  fprintf(out, "%-6s %-4s %-4s %14s %12s %14s %10s %10s\n", "param", "src", "dst", "dst_offset", "length", "src_offset",
          "src_piece", "src_stride");
  for (size_t i = 0; i < transfers_.size() && i < limit; ++i) {
    const Transfer& t = transfers_[i];
    fprintf(out, "%-6u %-4u %-4u %14lu %12lu %14lu %10lu %10lu\n", t.param, t.src_rank, t.dst_rank,
            (unsigned long)t.dst_offset, (unsigned long)t.length, (unsigned long)t.src_offset,
            (unsigned long)t.src_piece, (unsigned long)t.src_stride);
  }
  if (transfers_.size() > limit) fprintf(out, "... %zu more\n", transfers_.size() - limit);
}

}  // namespace te::weightsync
