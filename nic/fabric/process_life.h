// Process life marks: whether a process on this host still runs, answered
// with one memory load instead of a system call.
//
// Why: libfabric's shm provider spins forever on the queue lock of a peer
// that died holding it, so the shm domain must not post to a dead peer, and
// it asks before every run of writes. A pidfd poll answers in 0.36 us here,
// more than the rest of a 4 KiB write; a round trip asks twice.
//
// How: each process that opens an shm domain publishes a mark, a robust
// process-shared mutex in /dev/shm/te.<pid>.0.life, locked for the rest of
// the process's life by a thread that does nothing else. When the process
// dies, however it dies, the kernel walks that thread's robust-futex list as
// it exits and clears the owner in the mutex word (FUTEX_OWNER_DIED). A peer
// maps the file read-only and reads the word: no owner, no process. The
// kernel does this before the process's exit is visible to waitpid or a
// pidfd, so the mark is never later than those.
//
// The file is named like the shm regions, so RemoveStaleShmRegions removes
// a dead process's mark with them. A peer whose mark cannot be opened (an
// older build, a full /dev/shm) is asked by pidfd, as before.
//
// Thread safety: all functions may be called from any thread.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include "base/status.h"

namespace te::nic {

// "te.<pid>.0.life", the mark's name in /dev/shm.
std::string ProcessLifeName(pid_t pid);

// Publishes this process's mark in `dir` (once per process, a forked child
// being a new one; later calls return the first call's outcome).
Status PublishProcessLife(const std::string& dir = "/dev/shm");

// A peer process's mark, mapped read-only.
class PeerLife {
 public:
  // Fails (NotFound, IoError, InvalidArgument) when `pid` published no mark
  // in `dir` or the file is not one.
  static Result<std::unique_ptr<PeerLife>> Open(pid_t pid, const std::string& dir = "/dev/shm");
  ~PeerLife();
  PeerLife(const PeerLife&) = delete;
  PeerLife& operator=(const PeerLife&) = delete;

  // False once the process has died (or released its mark).
  bool alive() const;

 private:
  explicit PeerLife(void* map) : map_(map) {}
  void* map_;  // the mark, mapped read-only
};

}  // namespace te::nic
