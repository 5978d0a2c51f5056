// The two waits both MoE dispatchers make on their engine, in either
// progress mode: for a number of immediates of one value, and for their own
// writes to finish. With a kManual engine they drive Progress() themselves
// (nothing else would) and yield the core between empty polls, since ranks
// often share cores with their peers.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "base/status.h"
#include "transfer/transfer_engine.h"

namespace te::moe {

// kTimeout after `timeout`, naming `what` and how many arrived.
Status WaitForImms(TransferEngine* engine, uint32_t imm, uint64_t count, std::chrono::milliseconds timeout,
                   const std::string& what);
// Until `counter` finished `submitted` writes (kTimeout after `timeout`);
// then the first failed write's error, if any.
Status WaitForSends(TransferEngine* engine, CompletionCounter& counter, uint64_t submitted,
                    std::chrono::milliseconds timeout, const std::string& what);

}  // namespace te::moe
