// EpDispatcher: MoE dispatch and combine between the ranks of an
// expert-parallel group, over the transfer engine's WriteImm and ImmCounter
// only (no NVSHMEM, no ordering, so it runs on any provider: tcp, shm, EFA,
// ConnectX). The host path: tokens in host memory, one EpDispatcher per rank
// (process). Semantics and combine arithmetic: dispatch_types.h.
//
//   auto d = EpDispatcher::Create(engine, config).value();
//   std::string mine = d->LocalInfo();          // all-gather these, any way
//   d->Connect(infos_of_all_ranks);             // infos[r] from rank r
//   for each layer:
//     d->Dispatch(batch, map, &result);         // result.experts[i]: tokens of local expert i
//     ... run the experts ...
//     d->Combine(outputs, result.handle, out);  // out [T, hidden] bf16
//
// Protocol, per dispatch (seq s, parity b = s & 1; every rank dispatches
// every layer, possibly with zero tokens):
//  1. Every rank writes its count row (tokens per rank,
//     seq, map fingerprint) into every other rank's count table [b] with
//     one immediate.
//  2. At once, without waiting for anyone's counts, it writes up to
//     private_tokens records into its own private slot at each destination.
//  3. With all count rows in, every rank knows the whole count matrix, so it
//     places what exceeds the private slots into each destination's shared
//     overflow region (prefix over source ranks) and writes it. A dispatch
//     that needs more overflow than configured fails on every rank alike.
//  4. A rank waits for exactly the data immediates the matrix implies, then
//     unpacks records into per-expert lists.
// Combine writes each received token's partial sum back into its source's
// combine region (placed by the same matrix) and waits for the immediates
// from the ranks it sent tokens to. The count exchange orders the layers:
// rank p can write parity b of layer l + 2 only after every rank started
// layer l + 1, that is, after it finished with parity b of layer l. So every
// buffer is allocated once, for max_tokens, and double-buffered by parity:
// layer l + 1's dispatch may start while layer l's combine still drains
// elsewhere.
//
// Failure: a peer that stays silent fails the call with kTimeout after
// config.timeout, naming the phase and how much arrived. After any failure
// the dispatcher refuses further calls (kUnavailable): the group's immediate
// counts are no longer in step, so it must be rebuilt.
//
// Threads: Dispatch and Combine are called by one thread at a time, strictly
// alternating. With a kManual engine they drive its Progress() and return
// only once this rank's own writes have completed, since nothing else would
// move them while the caller computes.
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

class EpDispatcher {
 public:
  // Allocates and registers the buffers (sizes: buffer_bytes()). `engine`
  // must outlive the dispatcher.
  static Result<std::unique_ptr<EpDispatcher>> Create(TransferEngine* engine, const EpConfig& config);
  ~EpDispatcher();

  // What the other ranks need to reach this one (text, one line).
  std::string LocalInfo() const;
  // infos[r] = rank r's LocalInfo(); checks every rank has the same shape.
  Status Connect(const std::vector<std::string>& infos);

  Status Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out);
  // outputs[i]: local expert i's output [count, hidden] bf16; out: [tokens,
  // hidden] bf16 for this rank's tokens of the matching dispatch.
  Status Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out);
  // Ends the pending dispatch without returning anything to the sources, for
  // a caller that sends results elsewhere (CoherentDispatcher). Every rank of
  // the group must end the dispatch the same way.
  Status EndWithoutCombine(const DispatchResult& dispatched);

  // ---- Device-side packing (moe/cuda/cuda_ep_dispatcher.h) ----
  // The same protocol with payloads moved by kernels instead of the host:
  //  1. PrepareDispatch() waits until the send staging is free;
  //  2. the caller fills send_records() as PackRecords lays them out
  //     (headers by PackRecords without payloads, payloads by a kernel) and
  //     the result's handle (ResetResult, PackRecords);
  //  3. DispatchPacked() runs the exchange; payloads stay in the receive
  //     region, `row_records` gives each received row's record (with
  //     copy_payload they are also copied into the experts' rows, as
  //     Dispatch does, for a caller that packed its own headers).
  // CombinePacked() sends partial rows the caller already wrote into
  // send_partials() (received-row order) and returns the rows that came back
  // (indexed by the handle's token_rows); valid until the next Dispatch.
  Status PrepareDispatch();
  Status DispatchPacked(const SendPlan& plan, const ExpertMap& map, uint32_t tokens, DispatchResult* out,
                        std::vector<const uint8_t*>* row_records, bool copy_payload = false);
  Result<const uint16_t*> CombinePacked(const DispatchResult& dispatched);
  uint8_t* send_records() const;
  uint16_t* send_partials() const;
  // The registered host memory (receive, send), e.g. to map it into a GPU.
  struct HostBuffer {
    uint8_t* data;
    size_t bytes;
  };
  std::vector<HostBuffer> host_buffers() const;

  const EpConfig& config() const { return config_; }
  // Registered bytes: receive (both parities) and send.
  size_t buffer_bytes() const;
  // Records that went through the overflow region so far (sent by this rank).
  uint64_t overflow_records_sent() const { return overflow_sent_; }

 private:
  struct Layout;
  EpDispatcher(TransferEngine* engine, const EpConfig& config);
  Status Init();
  Status CheckCallable(bool dispatch) const;
  Status Exchange(const SendPlan& plan, const ExpertMap& map, uint32_t tokens, DispatchResult* out, bool copy_payload,
                  std::vector<const uint8_t*>* row_records);
  Result<const uint16_t*> ReturnPartials(const DispatchHandle& h, const ExpertOutputs* outputs);
  Status WaitImms(uint32_t imm, uint64_t count, const char* what);
  Status WaitSends(CompletionCounter& counter, uint64_t submitted, const char* what);
  Status Fail(Status s);

  TransferEngine* engine_;
  EpConfig config_;
  std::unique_ptr<Layout> layout_;
  LocalMr recv_mr_, send_mr_;
  std::vector<RemoteMr> peers_;  // recv region of each rank (null for self)
  bool connected_ = false;
  Status failed_;     // the first failure; sticky
  uint64_t seq_ = 0;  // dispatches started
  bool combine_pending_ = false;
  CompletionCounter dispatch_sends_, combine_sends_;
  uint64_t dispatch_submitted_ = 0, combine_submitted_ = 0;
  uint64_t overflow_sent_ = 0;
  SendPlan plan_;
  std::vector<uint32_t> overflow_offset_;  // [R]: this rank's overflow start at each destination
};

}  // namespace te::moe
