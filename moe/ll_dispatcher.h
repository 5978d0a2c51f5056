// LowLatencyDispatcher: MoE dispatch/combine for decode (a few tokens per
// rank), with the same semantics and results as EpDispatcher
// (dispatch_types.h; checked against the same reference) but no count
// exchange and a split between sending and receiving so compute overlaps.
//
//   auto d = LowLatencyDispatcher::Create(engine, config).value();
//   d->Connect(infos_of_all_ranks);               // infos[r] = rank r's LocalInfo()
//   for each layer:
//     d->SendDispatch(batch, map);                // posts, returns at once
//     ... other work (e.g. shared experts) ...
//     d->RecvDispatch(&result);                   // result.experts[i]: local expert i's tokens
//     ... run the experts ...
//     d->SendCombine(outputs, result);
//     ... other work ...
//     d->RecvCombine(out);                        // out [T, hidden] bf16
//
// Protocol (seq s, parity b = s & 1): every rank owns, at every other rank,
// one fixed receive slot per parity sized for max_tokens records, and one
// combine slot of max_tokens rows. SendDispatch writes, to every other rank
// (from the next rank up, round, so that no rank is everyone's first
// destination), one block: a header (seq, map fingerprint, record count)
// and the records, with one immediate; a rank with nothing for a
// destination still sends the header (16 bytes, not a record row).
// RecvDispatch waits for exactly ranks - 1 immediates and reads the counts
// from the headers. Combine writes each source's partial rows into its slot
// at that source with one immediate, only to sources that sent tokens; each
// source knows how many to wait for from its own dispatch. Slots are reused
// by parity. Rank p writes parity b of layer l + 2 only after receiving
// every rank's dispatch block of layer l + 1 (everyone sends one to
// everyone), and a rank sends that only after it has finished layer l,
// including reading its parity-b slots. Combine slots follow: a rank writes
// p's combine slot of layer l + 2 only after p's dispatch of l + 2, which p
// sends after reading its combine slot of layer l.
//
// Memory: per rank, 2 x ranks x (max_tokens + 1) records and as many combine
// rows, received, plus one of each sent: sized for the worst case, which is
// what makes the count exchange unnecessary. Meant for max_tokens up to a
// few hundred; prefill-size batches belong to EpDispatcher.
//
// Failure: a silent peer fails the receive with kTimeout after
// config.timeout; a header from another layer or map, or a count beyond
// max_tokens, fails it with an error naming the rank. After any failure the
// dispatcher refuses further calls (kUnavailable).
//
// Threads: one thread calls, in the order above. With a kManual engine the
// Send calls post their writes (one Progress() pass), so they move while the
// caller computes before Recv; the Recv calls drive Progress() and return
// only once this rank's own writes have completed (nothing else would move
// them). Immediates: imm_base + 6 .. 9, so an EpDispatcher with the same
// config can share the engine.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "moe/dispatch_records.h"
#include "moe/dispatch_types.h"
#include "moe/ep_config.h"
#include "moe/expert_map.h"
#include "transfer/transfer_engine.h"

namespace te::moe {

class LowLatencyDispatcher {
 public:
  static Result<std::unique_ptr<LowLatencyDispatcher>> Create(TransferEngine* engine, const EpConfig& config);
  ~LowLatencyDispatcher();

  std::string LocalInfo() const;
  Status Connect(const std::vector<std::string>& infos);

  Status SendDispatch(const TokenBatch& batch, const ExpertMap& map);
  Status RecvDispatch(DispatchResult* out);
  // outputs[i]: local expert i's output [count, hidden] bf16.
  Status SendCombine(const ExpertOutputs& outputs, const DispatchResult& dispatched);
  // out: [tokens, hidden] bf16 for the tokens of the matching SendDispatch.
  Status RecvCombine(uint16_t* out);

  // Send and receive in one call, as EpDispatcher's.
  Status Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out);
  Status Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out);

  const EpConfig& config() const { return config_; }
  size_t buffer_bytes() const;

 private:
  enum class Phase { kIdle, kDispatchSent, kDispatched, kCombineSent };
  struct Layout;
  LowLatencyDispatcher(TransferEngine* engine, const EpConfig& config);
  Status Init();
  Status Expect(Phase phase, const char* call) const;
  Status WaitImms(uint32_t imm, uint64_t count, const char* what);
  Status WaitSends(uint64_t submitted, const char* what);
  void PostNow();
  Status Fail(Status s);

  TransferEngine* engine_;
  EpConfig config_;
  std::unique_ptr<Layout> layout_;
  LocalMr recv_mr_, send_mr_;
  std::vector<RemoteMr> peers_;
  bool connected_ = false;
  Status failed_;
  Phase phase_ = Phase::kIdle;
  uint64_t seq_ = 0;
  uint32_t fingerprint_ = 0;  // of the pending dispatch's map
  CompletionCounter sends_;
  uint64_t submitted_ = 0;
  SendPlan plan_;
  DispatchHandle sent_;              // this rank's side of the pending dispatch (token rows)
  std::vector<uint32_t> map_local_;  // the pending map's local experts of this rank
  std::vector<uint32_t> first_row_;  // row of destination d's first record in the send blocks
  std::vector<uint32_t> firsts_;     // SendCombine: first handle row of each source
};

}  // namespace te::moe
