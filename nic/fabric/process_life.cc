#include "nic/fabric/process_life.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace te::nic {
namespace {

// The mark's layout: a magic number, then the mutex.
struct Mark {
  uint64_t magic;
  pthread_mutex_t mutex;
};
constexpr uint64_t kMagic = 0x7465'6c69'6665'0001;  // "telife", version 1

std::string Errno(const std::string& what) { return what + ": " + strerror(errno); }

// The thread that holds this process's mark until the process ends. It
// never returns: were it to exit, the kernel would mark the owner dead.
// Everything it uses is allocated once and never freed, so nothing is
// destroyed under it at exit.
struct Keeper {
  std::mutex mu;
  std::condition_variable cv;
  Mark* mark = nullptr;
  bool locked = false;
  int error = 0;
};

void Keep(Keeper* k) {
  std::unique_lock<std::mutex> lock(k->mu);
  k->cv.wait(lock, [&] { return k->mark != nullptr; });
  k->error = pthread_mutex_lock(&k->mark->mutex);
  k->locked = true;
  k->cv.notify_all();
  for (;;) k->cv.wait(lock);  // holds the mark for the process's life
}

Status Publish(const std::string& dir) {
  const std::string path = dir + "/" + ProcessLifeName(getpid());
  // A mark left by a dead process with this pid is replaced, not truncated:
  // a peer that still maps the old file keeps reading it as dead.
  unlink(path.c_str());
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return IoError(Errno("creating the process life mark " + path));
  Status st = Status::Ok();
  void* map = MAP_FAILED;
  if (ftruncate(fd, sizeof(Mark)) != 0) {
    st = IoError(Errno("sizing " + path));
  } else if ((map = mmap(nullptr, sizeof(Mark), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
    st = IoError(Errno("mapping " + path));
  }
  close(fd);
  if (!st.ok()) {
    unlink(path.c_str());
    return st;
  }
  auto* mark = static_cast<Mark*>(map);
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&mark->mutex, &attr);
  pthread_mutexattr_destroy(&attr);
  auto* keeper = new Keeper;  // never freed (above)
  std::thread(Keep, keeper).detach();
  std::unique_lock<std::mutex> lock(keeper->mu);
  keeper->mark = mark;
  keeper->cv.notify_all();
  keeper->cv.wait(lock, [&] { return keeper->locked; });
  if (keeper->error != 0) {
    unlink(path.c_str());
    return Internal("locking the process life mark: " + std::string(strerror(keeper->error)));
  }
  // Published last: a reader that sees the magic sees a held mutex.
  __atomic_store_n(&mark->magic, kMagic, __ATOMIC_RELEASE);
  // A process that exits normally removes its mark (peers that mapped it
  // keep the page, and see the owner gone once the keeper exits); a killed
  // one, or a forked child that ends with _exit, leaves it to
  // RemoveStaleShmRegions. The handler is inherited by children forked
  // later, which run it when they exit(): it removes only the mark of the
  // process that runs it, never its parent's (a child that published has
  // its own name and pid here; one that did not removes nothing).
  static char published_path[4096];
  static pid_t published_by = 0;
  if (path.size() < sizeof(published_path)) {
    const bool first = published_by == 0;
    std::memcpy(published_path, path.c_str(), path.size() + 1);
    published_by = getpid();
    if (first)
      std::atexit([] {
        if (published_by == getpid()) unlink(published_path);
      });
  }
  return Status::Ok();
}

}  // namespace

std::string ProcessLifeName(pid_t pid) { return "te." + std::to_string(pid) + ".0.life"; }

Status PublishProcessLife(const std::string& dir) {
  // Per pid: a child forked after its parent published has no mark (and no
  // keeper thread) of its own yet.
  static std::mutex mu;
  static pid_t published_pid = 0;
  static Status published = Status::Ok();
  std::lock_guard<std::mutex> lock(mu);
  if (published_pid != getpid()) {
    published = Publish(dir);
    published_pid = getpid();
  }
  return published;
}

Result<std::unique_ptr<PeerLife>> PeerLife::Open(pid_t pid, const std::string& dir) {
  if (pid <= 0) return InvalidArgument("pid " + std::to_string(pid) + " must be positive");
  const std::string path = dir + "/" + ProcessLifeName(pid);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return NotFound("process " + std::to_string(pid) + " published no life mark");
    return IoError(Errno("opening " + path));
  }
  struct stat st {};
  // Mapping past the end of a shorter file would fault on the first read.
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || size_t(st.st_size) < sizeof(Mark)) {
    close(fd);
    return InvalidArgument(path + " is not a process life mark (" + std::to_string(st.st_size) + " bytes; expected " +
                           std::to_string(sizeof(Mark)) + ")");
  }
  void* map = mmap(nullptr, sizeof(Mark), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return IoError(Errno("mapping " + path));
  std::unique_ptr<PeerLife> life(new PeerLife(map));
  if (__atomic_load_n(&static_cast<const Mark*>(map)->magic, __ATOMIC_ACQUIRE) != kMagic)
    return InvalidArgument(path + " is not a published process life mark");
  return life;
}

PeerLife::~PeerLife() { munmap(map_, sizeof(Mark)); }

bool PeerLife::alive() const {
  // glibc's mutex word holds the owner's thread id; the kernel clears it
  // (leaving FUTEX_OWNER_DIED) when the owner exits.
  const int word = __atomic_load_n(&static_cast<const Mark*>(map_)->mutex.__data.__lock, __ATOMIC_ACQUIRE);
  return (word & FUTEX_TID_MASK) != 0;
}

}  // namespace te::nic
