// The same-host domain (provider "local"): peers on this host, written at
// memory speed, with no NIC and no CPU spent by the target on the data.
//
// Mechanism. A write is one process_vm_writev(2) from the initiator's
// memory straight into the target's registered memory (cross-memory attach:
// one copy, by the initiator's CPU; in one process, a memcpy). That works
// for any memory the target registers (malloc'd, mmap'd, a framework's
// tensors), which regions backed by shareable memory would not: those need
// the application to allocate through us. It needs the same user and a
// ptrace policy that allows it (Yama ptrace_scope 0, or 1 with the target
// declaring the initiator; containers must not filter the syscall); when it
// is refused, the write fails (kIoError) naming the reason and the ptrace policy, and
// nothing is written.
//
// Each domain owns a mailbox: a memfd that same-host peers map through
// /proc/<pid>/fd/<fd> (which needs the same permission as the write). It
// holds
//  - the table of the target's registrations (base, length, generation),
//    written only by the target. An initiator checks every write against it
//    before writing: a forged or stale key, or a range outside the region,
//    is refused and nothing is written. A writer count per entry makes
//    Deregister wait (bounded) for writes in progress;
//  - a slot per initiator (claimed with a compare-and-swap): a ring of
//    immediates and a ring of control messages, single producer, single
//    consumer, polled by the target's engine like a completion queue. An
//    immediate is pushed only after its data is in place.
// A dead initiator's slot is reclaimed by the next peer that needs one; a
// dead target turns writes into errors (ESRCH) and control messages into
// kNotPosted. Mailbox contents from a peer are treated as hostile: indices
// and lengths are bounds-checked, a bad record is dropped and the peer's
// slot abandoned, never trusted.
//
// Addresses carry the host's boot id: a peer on another host is refused
// (use a NIC provider there).
//
// Memory kinds. Host memory allocated as SharedMemory (shared_memory.h) is
// mapped by initiators and written with memcpy; other host memory through
// process_vm_writev. GPU memory is shared through CUDA IPC (cuda_ipc.h: the
// target exports the allocation, an initiator opens it once and copies on a
// stream of its own, waiting for the copy before the immediate); without a
// CUDA driver it is refused (kUnimplemented). The GPU path is tested on a
// GPU by tests/gpu (run on an H200; CI has no GPU).
#pragma once

#include <cstddef>
#include <memory>

#include "base/status.h"
#include "nic/domain.h"

namespace te::nic {

struct LocalOptions {
  size_t max_message_bytes = 64 * 1024;  // largest control message
};

Result<std::unique_ptr<Domain>> OpenLocalDomain(const LocalOptions& options);

}  // namespace te::nic
