#include "nic/fabric/process_life.h"

#include "nic/fabric/fabric_setup.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

namespace te::nic {
namespace {

#if defined(__SANITIZE_THREAD__)
constexpr bool kThreadSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kThreadSanitizer = true;
#else
constexpr bool kThreadSanitizer = false;
#endif
#else
constexpr bool kThreadSanitizer = false;
#endif

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/te-life-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { (void)std::system(("rm -rf " + path).c_str()); }
};

// A child that publishes its mark in `dir`, says so on a pipe and waits to
// be killed.
pid_t SpawnMarkedChild(const std::string& dir) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    const char ok = PublishProcessLife(dir).ok() ? 'y' : 'n';
    (void)!write(fds[1], &ok, 1);
    for (;;) pause();
  }
  close(fds[1]);
  char ok = 'n';
  const bool got = read(fds[0], &ok, 1) == 1;
  close(fds[0]);
  if (!got || ok != 'y') {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

TEST(ProcessLife, AMarkTurnsDeadTheMomentItsProcessIsKilled) {
  TempDir dir;
  const pid_t child = SpawnMarkedChild(dir.path);
  ASSERT_GT(child, 0);
  auto life = PeerLife::Open(child, dir.path);
  ASSERT_TRUE(life.ok()) << life.status().ToString();
  EXPECT_TRUE((*life)->alive());
  ASSERT_EQ(kill(child, SIGKILL), 0);
  ASSERT_EQ(waitpid(child, nullptr, 0), child);
  // No waiting: the kernel marks the owner dead as the process exits,
  // before waitpid can return.
  EXPECT_FALSE((*life)->alive());
}

TEST(ProcessLife, ThisProcessIsAliveAndTheMarkIsNamedForCleanup) {
  // The process publishes once, so its directory lives as long as it does.
  static TempDir dir;
  ASSERT_TRUE(PublishProcessLife(dir.path).ok());
  // Once per process: a second call keeps the first mark.
  ASSERT_TRUE(PublishProcessLife("/nonexistent-dir").ok());
  auto life = PeerLife::Open(getpid(), dir.path);
  ASSERT_TRUE(life.ok()) << life.status().ToString();
  EXPECT_TRUE((*life)->alive());
  // Named like the shm regions ("te.<pid>.<n>..."), so a dead process's
  // mark is removed with them.
  EXPECT_EQ(ProcessLifeName(1234), "te.1234.0.life");
  EXPECT_EQ(ShmOwnerPid(ProcessLifeName(1234)), std::optional<pid_t>(1234));
}

TEST(ProcessLife, AForkedChildThatExitsNormallyLeavesItsParentsMark) {
  // In a process of its own, which publishes its mark in `dir` and forks two
  // children that end with exit() (running the atexit handlers they
  // inherited): one publishes its own mark, the other none. Exit codes say
  // what went wrong.
  // The processes here start mark keepers (threads) after forking from a
  // process with threads, which TSan does not follow; the release and ASan
  // runs cover this single-threaded logic.
  if (kThreadSanitizer) GTEST_SKIP() << "ThreadSanitizer cannot start threads after a multi-threaded fork";
  TempDir dir;
  const pid_t parent = fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    if (!PublishProcessLife(dir.path).ok()) _exit(10);
    const std::string mine = dir.path + "/" + ProcessLifeName(getpid());
    for (const bool publish : {false, true}) {
      const pid_t child = fork();
      if (child < 0) _exit(11);
      if (child == 0) {
        if (publish && !PublishProcessLife(dir.path).ok()) _exit(3);
        std::exit(0);
      }
      int status = 0;
      if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) _exit(12);
      if (access(mine.c_str(), F_OK) != 0) _exit(publish ? 14 : 13);  // a child removed its parent's mark
      if (publish && access((dir.path + "/" + ProcessLifeName(child)).c_str(), F_OK) == 0) _exit(15);
    }
    auto life = PeerLife::Open(getpid(), dir.path);
    _exit(life.ok() && (*life)->alive() ? 0 : 16);
  }
  int status = 0;
  ASSERT_EQ(waitpid(parent, &status, 0), parent);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "13/14: a child's exit removed its parent's mark; 15: a child's own mark "
                                       "stayed after a normal exit";
}

TEST(ProcessLife, FilesThatAreNotMarksAreRefused) {
  TempDir dir;
  EXPECT_EQ(PeerLife::Open(999999, dir.path).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(PeerLife::Open(0, dir.path).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PeerLife::Open(-5, dir.path).status().code(), StatusCode::kInvalidArgument);
  // Too short to map: refused, not a fault on the first read.
  const std::string short_path = dir.path + "/" + ProcessLifeName(424242);
  FILE* f = std::fopen(short_path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fputs("x", f);
  std::fclose(f);
  EXPECT_EQ(PeerLife::Open(424242, dir.path).status().code(), StatusCode::kInvalidArgument);
  // Long enough but without the magic (never published): refused.
  const std::string zero_path = dir.path + "/" + ProcessLifeName(434343);
  const int fd = open(zero_path.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  close(fd);
  EXPECT_EQ(PeerLife::Open(434343, dir.path).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace te::nic
