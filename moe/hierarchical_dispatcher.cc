#include "moe/hierarchical_dispatcher.h"

#include <cstring>

#include "moe/dispatch_records.h"

namespace te::moe {
namespace {

constexpr const char* kMagic = "temoeh1";
constexpr const char* kSeparator = " | ";

// The fixed map of a step's virtual experts: (rank, expert) = rank * E + e,
// held by `rank`, so its local index there is e.
Result<ExpertMap> VirtualMap(uint32_t ranks, uint32_t experts) {
  std::vector<uint32_t> rank_of(size_t(ranks) * experts);
  for (size_t v = 0; v < rank_of.size(); ++v) rank_of[v] = uint32_t(v / experts);
  return ExpertMap::FromRanks(std::move(rank_of), ranks);
}

std::vector<std::string> SplitInfo(const std::string& info) {
  std::vector<std::string> parts;
  size_t at = 0;
  for (;;) {
    const size_t next = info.find(kSeparator, at);
    parts.push_back(info.substr(at, next == std::string::npos ? std::string::npos : next - at));
    if (next == std::string::npos) return parts;
    at = next + std::strlen(kSeparator);
  }
}

}  // namespace

HierarchicalDispatcher::HierarchicalDispatcher(const EpConfig& config, uint32_t nodes)
    : config_(config),
      nodes_(nodes),
      per_node_(config.ranks / nodes),
      node_(config.rank / per_node_),
      local_(config.rank % per_node_) {}

HierarchicalDispatcher::~HierarchicalDispatcher() = default;

Result<std::unique_ptr<HierarchicalDispatcher>> HierarchicalDispatcher::Create(TransferEngine* engine,
                                                                               const EpConfig& config, uint32_t nodes) {
  if (!engine) return InvalidArgument("HierarchicalDispatcher needs an engine");
  TE_RETURN_IF_ERROR(config.Validate());
  if (nodes == 0 || config.ranks % nodes)
    return InvalidArgument("nodes " + std::to_string(nodes) + " must divide ranks " + std::to_string(config.ranks));
  if (uint64_t(config.ranks) * config.experts > 65535)
    return InvalidArgument("ranks x experts = " + std::to_string(uint64_t(config.ranks) * config.experts) +
                           " exceeds 65535, the virtual experts the step across nodes can name");
  if (uint64_t(nodes) * config.max_tokens > (1u << 20))
    return InvalidArgument("nodes x max_tokens = " + std::to_string(uint64_t(nodes) * config.max_tokens) +
                           " exceeds 2^20, the rows a relay may receive");
  std::unique_ptr<HierarchicalDispatcher> d(new HierarchicalDispatcher(config, nodes));
  EpConfig across = config;
  across.experts = config.ranks * config.experts;
  EpConfig inside = config;
  inside.ranks = d->per_node_;
  inside.rank = d->local_;
  inside.experts = d->per_node_ * config.experts;
  inside.max_tokens = nodes * config.max_tokens;  // a relay's rows: one source per node
  inside.private_tokens = 0;
  inside.overflow_tokens = EpConfig::kWorstCase;
  inside.imm_base = config.imm_base + kInsideImmOffset;
  TE_ASSIGN_OR_RETURN(d->across_map_, VirtualMap(across.ranks, config.experts));
  TE_ASSIGN_OR_RETURN(d->inside_map_, VirtualMap(inside.ranks, config.experts));
  TE_ASSIGN_OR_RETURN(d->across_, EpDispatcher::Create(engine, across));
  TE_ASSIGN_OR_RETURN(d->inside_, EpDispatcher::Create(engine, inside));
  return d;
}

size_t HierarchicalDispatcher::buffer_bytes() const { return across_->buffer_bytes() + inside_->buffer_bytes(); }

std::string HierarchicalDispatcher::LocalInfo() const {
  return std::string(kMagic) + ' ' + std::to_string(nodes_) + kSeparator + across_->LocalInfo() + kSeparator +
         inside_->LocalInfo();
}

Status HierarchicalDispatcher::Connect(const std::vector<std::string>& infos) {
  const uint32_t R = config_.ranks;
  if (infos.size() != R)
    return InvalidArgument("Connect got " + std::to_string(infos.size()) + " infos for " + std::to_string(R) +
                           " ranks");
  std::vector<std::string> across(R), inside;
  const std::string head = std::string(kMagic) + ' ' + std::to_string(nodes_);
  for (uint32_t r = 0; r < R; ++r) {
    std::vector<std::string> parts = SplitInfo(infos[r]);
    if (parts.size() != 3 || parts[0].rfind(kMagic, 0) != 0)
      return InvalidArgument("info of rank " + std::to_string(r) + " is not a HierarchicalDispatcher's");
    if (parts[0] != head)
      return InvalidArgument("rank " + std::to_string(r) + " has '" + parts[0] + "', this rank '" + head +
                             "' (nodes differ)");
    across[r] = std::move(parts[1]);
    if (r / per_node_ == node_) inside.push_back(std::move(parts[2]));
  }
  TE_RETURN_IF_ERROR(across_->Connect(across).WithContext("across nodes"));
  TE_RETURN_IF_ERROR(inside_->Connect(inside).WithContext("inside node " + std::to_string(node_)));
  calls_.Connected();
  return Status::Ok();
}

Status HierarchicalDispatcher::Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out) {
  TE_RETURN_IF_ERROR(calls_.CanDispatch());
  if (!out) return InvalidArgument("Dispatch needs a result to fill");
  const EpConfig& c = config_;
  const uint32_t K = c.topk, E = c.experts, L = per_node_;
  if (map.ranks() != c.ranks || map.experts() != E)
    return InvalidArgument("expert map of " + std::to_string(map.experts()) + " experts on " +
                           std::to_string(map.ranks()) + " ranks; the group has " + std::to_string(E) + " on " +
                           std::to_string(c.ranks));
  TE_RETURN_IF_ERROR(ValidateBatch(c, map, batch));
  // Reached choices name nodes: the map's must be this group's.
  const bool reached = map.replicated() && map.replica_choice() != ReplicaChoice::kBySource;
  if (reached && map.nodes() != c.ranks / L)
    return InvalidArgument("expert map routes replicas by " + std::string(ReplicaChoiceName(map.replica_choice())) +
                           " over " + std::to_string(map.nodes()) + " nodes; this group has " +
                           std::to_string(c.ranks / L));

  // 1. Across nodes: expert e goes to virtual expert (relay of e's node, e).
  // A token's key (ExpertMap::TokenKey of its row) travels as the record's
  // tag: the relay sees only its node's part of the row, and needs the key
  // to find the rank a token split sends each expert to.
  idx_.resize(size_t(batch.tokens) * K);
  keys_.resize(batch.tokens);
  dest_.resize(K);
  reached_.resize(K + 1);
  for (uint32_t t = 0; t < batch.tokens; ++t) {
    const int32_t* row = batch.topk_idx + size_t(t) * K;
    keys_[t] = uint16_t(ExpertMap::TokenKey(row, K));
    map.Route(row, K, c.rank, keys_[t], dest_.data());
    for (uint32_t k = 0; k < K; ++k) {
      const int32_t e = row[k];
      const uint32_t relay = e < 0 ? 0 : dest_[k] / L * L + local_;
      idx_[size_t(t) * K + k] = e < 0 ? -1 : int32_t(relay * E + uint32_t(e));
    }
  }
  const TokenBatch virtual_batch{batch.tokens, batch.data, batch.scales, idx_.data(), batch.topk_weights};
  const EpConfig& ac = across_->config();
  if (Status s = across_->PrepareDispatch(); !s.ok()) return Fail(s);
  ResetResult(ac, across_map_, &across_result_);
  const TokenLabels labels{nullptr, keys_.data()};
  PackRecords(ac, across_map_, virtual_batch, across_->send_records(), &plan_, &across_result_.handle,
              /*copy_payload=*/true, nullptr, nullptr, &labels);
  records_.clear();
  if (Status s = across_->DispatchPacked(plan_, across_map_, batch.tokens, &across_result_, &records_); !s.ok())
    return Fail(s);

  // 2. Inside the node: every received row to the ranks of its experts. The
  // rows stay in source-rank, source-token order.
  const size_t rows = records_.size(), tb = c.token_bytes(), sc = c.scale_count(), off = RecordPayloadOffset(ac);
  rows_.resize(rows * tb);
  scales_.resize(rows * sc);
  weights_.assign(rows * K, 0.0f);
  idx_.assign(rows * K, -1);
  const DispatchHandle& ah = across_result_.handle;
  for (size_t q = 0; q < rows; ++q) {
    std::memcpy(&rows_[q * tb], records_[q] + off, tb);
    if (sc) std::memcpy(&scales_[q * sc], records_[q] + off + tb, sc * sizeof(float));
    // The ranks of this node the token reaches anyway: its source (if here)
    // and its single-copy experts' ranks, all of which this row names.
    const uint32_t first = ah.row_begin[q], end = std::min(ah.row_begin[q + 1], first + K);
    const uint32_t source =
        end > first ? across_result_.experts[ah.entries[first].local_expert].src_rank[ah.entries[first].position] : 0;
    uint32_t n_reached = 0;
    if (reached) {
      if (source / L == node_) reached_[n_reached++] = source;
      for (uint32_t i = first; i < end; ++i)
        if (const uint32_t e = ah.entries[i].local_expert; map.ranks_of(e).size() == 1)
          reached_[n_reached++] = map.rank_of(e);
    }
    for (uint32_t i = first, k = 0; i < end; ++i, ++k) {
      const RowEntry& entry = ah.entries[i];
      const uint32_t e = entry.local_expert;
      // Where the source's Route sent it: the rule's rank (by source), or
      // with a reached choice the copy RankOnNode names on this node.
      const uint32_t key = RecordTag(records_[q]);
      const uint32_t r = reached && map.ranks_of(e).size() > 1
                             ? map.RankOnNode(e, source, key, node_, reached_.data(), n_reached)
                             : map.RankFor(e, source, key);
      if (r == ExpertMap::kNoRank || r / L != node_)
        return Fail(InvalidArgument("rank " + std::to_string(source) + " sent expert " + std::to_string(e) +
                                    " to node " + std::to_string(node_) + ", where this rank's map has no replica " +
                                    "for it: ranks use different expert maps"));
      idx_[q * K + k] = int32_t((r % L) * E + e);
      weights_[q * K + k] = entry.weight;
    }
  }
  const TokenBatch relayed{uint32_t(rows), rows_.data(), sc ? scales_.data() : nullptr, idx_.data(), weights_.data()};
  if (Status s = inside_->Dispatch(relayed, inside_map_, &inside_result_); !s.ok()) return Fail(s);

  // 3. The caller's view: its map's local experts, sources named by relay.
  out->experts.clear();
  for (uint32_t e : map.local_experts(c.rank)) {
    ExpertTokens x = std::move(inside_result_.experts[e]);
    x.expert = e;
    for (uint32_t& s : x.src_rank) s += node_ * L;
    out->experts.push_back(std::move(x));
  }
  const DispatchHandle& ih = inside_result_.handle;
  DispatchHandle& h = out->handle;
  h = DispatchHandle{};
  h.seq = calls_.Dispatched();
  h.tokens = batch.tokens;
  h.sent_to = ah.sent_to;
  h.recv_from = ah.recv_from;
  for (uint32_t j = 0; j < L; ++j) {
    h.sent_to[node_ * L + j] += ih.sent_to[j];
    h.recv_from[node_ * L + j] += ih.recv_from[j];
  }
  across_sent_ += ah.sent_to_others(c.rank);
  inside_sent_ += ih.sent_to_others(local_);
  return Status::Ok();
}

Status HierarchicalDispatcher::Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out) {
  TE_RETURN_IF_ERROR(calls_.CanCombine(dispatched.handle.seq));
  TE_RETURN_IF_ERROR(ValidateOutputs(dispatched, outputs));
  if (!out && dispatched.handle.tokens > 0)
    return InvalidArgument("Combine needs an output for " + std::to_string(dispatched.handle.tokens) + " tokens");
  // Inside the node: rank partials back to the relay, which sums them into
  // node partials, written straight into the staging the step across nodes
  // sends from. Its previous writes from there are over: every rank finished
  // the last combine (which waited for them) before this dispatch's count
  // rows could complete.
  inside_outputs_.assign(config_.experts, nullptr);
  for (size_t i = 0; i < outputs.size(); ++i) inside_outputs_[dispatched.experts[i].expert] = outputs[i];
  if (Status s = inside_->Combine(inside_outputs_, inside_result_, across_->send_partials()); !s.ok()) return Fail(s);
  // Across nodes: node partials back to the source, summed in node order.
  auto rows = across_->CombinePacked(across_result_);
  if (!rows.ok()) return Fail(rows.status());
  SumPartials(across_->config(), across_result_.handle, *rows, out);
  calls_.Combined();
  return Status::Ok();
}

}  // namespace te::moe
