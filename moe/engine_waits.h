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

// How long a dispatcher being destroyed waits for its own writes before it
// frees the buffers they read: until the engine has ended every one of them
// (it ends each request within its request_timeout once queued, and again
// once posted), not the dispatcher's shorter timeout, which a slow peer
// outlasts.
std::chrono::milliseconds ShutdownWait(const TransferEngine* engine);

}  // namespace te::moe
