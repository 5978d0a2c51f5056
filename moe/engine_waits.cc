#include "moe/engine_waits.h"

#include <sched.h>

namespace te::moe {

Status WaitForImms(TransferEngine* engine, uint32_t imm, uint64_t count, std::chrono::milliseconds timeout,
                   const std::string& what) {
  if (count == 0) return Status::Ok();
  if (engine->options().progress == ProgressMode::kThread) {
    Status s = engine->WaitImm(imm, count, timeout);
    return s.ok() ? s : s.WithContext(what);
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!engine->TryConsumeImm(imm, count)) {
    if (engine->Progress()) continue;
    if (std::chrono::steady_clock::now() > deadline)
      return Timeout(what + ": " + std::to_string(engine->ImmAvailable(imm)) + " of " + std::to_string(count) +
                     " arrived in " + std::to_string(timeout.count()) + " ms");
    sched_yield();
  }
  return Status::Ok();
}

Status WaitForSends(TransferEngine* engine, CompletionCounter& counter, uint64_t submitted,
                    std::chrono::milliseconds timeout, const std::string& what) {
  auto late = [&] {
    return Timeout(what + ": " + std::to_string(counter.finished()) + " of " + std::to_string(submitted) +
                   " writes finished");
  };
  if (engine->options().progress == ProgressMode::kThread) {
    if (!counter.WaitFinished(submitted, timeout)) return late();
  } else {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (counter.finished() < submitted) {
      if (engine->Progress()) continue;
      if (std::chrono::steady_clock::now() > deadline) return late();
      sched_yield();
    }
  }
  if (counter.failed() > 0) return counter.first_error().WithContext(what);
  return Status::Ok();
}

std::chrono::milliseconds ShutdownWait(const TransferEngine* engine) {
  return 2 * engine->options().request_timeout + std::chrono::seconds(1);
}

}  // namespace te::moe
