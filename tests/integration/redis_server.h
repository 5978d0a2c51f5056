// A private redis-server for a test: started on a unix socket in a fresh
// directory (no TCP port, no persistence), stopped and removed afterwards.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "registry/redis_client.h"
#include "support/wait_until.h"

extern char** environ;

namespace te::testing {

class RedisServer {
 public:
  RedisServer() {
    char dir[] = "/tmp/te-redis-XXXXXX";
    if (!mkdtemp(dir)) return;
    dir_ = dir;
    socket_ = dir_ + "/redis.sock";
    const std::string sock = socket_;
    const char* argv[] = {"redis-server", "--port", "0",     "--unixsocket", sock.c_str(), "--save",  "",
                          "--appendonly", "no",     "--dir", dir_.c_str(),   "--loglevel", "warning", nullptr};
    posix_spawn_file_actions_t quiet;  // its log goes nowhere
    posix_spawn_file_actions_init(&quiet);
    posix_spawn_file_actions_addopen(&quiet, 1, "/dev/null", O_WRONLY, 0);
    const int rc = posix_spawnp(&pid_, "redis-server", &quiet, nullptr, const_cast<char**>(argv), environ);
    posix_spawn_file_actions_destroy(&quiet);
    if (rc != 0) {
      pid_ = -1;
      error_ = "redis-server not found on PATH; scripts/install-deps.sh installs it";
      return;
    }
    if (WaitUntil([&] { return registry::RedisClient::Connect(address()).ok(); }, std::chrono::seconds(20))) return;
    error_ = "redis-server did not answer on " + socket_ + " within 20 s";
  }
  ~RedisServer() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
    }
    if (!dir_.empty()) std::system(("rm -rf " + dir_).c_str());
  }
  // Empty when the server is up.
  const std::string& error() const { return error_; }
  std::string address() const { return "unix:" + socket_; }

 private:
  pid_t pid_ = -1;
  std::string dir_, socket_, error_;
};

}  // namespace te::testing
