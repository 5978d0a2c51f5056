// A receiver engine in a child process, driven over pipes: the multi-process
// integration tests write into it from the parent and ask it what landed.
// The pipes are the test's own control channel, independent of the engine.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <sstream>
#include <string>

#include "base/crc32c.h"
#include "transfer/shared_host_memory.h"
#include "transfer/transfer_engine.h"

namespace te::testing {

// The memory a PeerProcess child registers.
enum class PeerRegion : int {
  kHeap = 0,
  kSharedHost = 1,  // SharedHostMemory: same-host initiators map it
  kGpu = 2,         // device memory, from GpuRegionHooks (tests/gpu)
};

// How a child gets device memory: a GPU test binary installs these, so that
// this header (and every integration test) stays free of CUDA.
struct GpuRegionHooks {
  void* (*allocate)(size_t bytes);                             // zeroed; null on failure
  bool (*read)(void* host, const void* device, size_t bytes);  // device to host
  int device;                                                  // the CUDA ordinal
};

class PeerProcess {
 public:
  // Forks a child with an engine of `options` and a registered region of
  // `bytes`; returns once the child printed its descriptor.
  // The child execs this test binary afresh (ServeIfChild below takes over
  // before main): forking a process that already runs engine threads and
  // using libfabric in the copy is not safe (a lock held by another thread
  // at fork time stays held in the child), and TSan refuses it.
  // `region` says what memory the child registers (PeerRegion). With
  // `netns` the child runs in that network namespace (`ip netns exec`), as
  // on another host's network.
  PeerProcess(const EngineOptions& options, size_t bytes, PeerRegion region = PeerRegion::kHeap,
              const std::string& netns = "") {
    int to_child[2], from_child[2];
    if (pipe(to_child) || pipe(from_child)) abort();
    const std::string spec = options.ProviderName() + " " + std::to_string(options.domains) + " " +
                             std::to_string(options.request_timeout.count()) + " " + std::to_string(bytes) + " " +
                             std::to_string(to_child[0]) + " " + std::to_string(from_child[1]) + " " +
                             (options.fabric.domain.empty() ? "-" : options.fabric.domain) + " " +
                             std::to_string(int(region));
    char self[4096] = {};
    if (readlink("/proc/self/exe", self, sizeof self - 1) <= 0) abort();
    pid_ = fork();
    if (pid_ == 0) {
      close(to_child[1]);
      close(from_child[0]);
      setenv(kChildEnv, spec.c_str(), 1);
      if (!netns.empty()) {
        std::string ns = netns;
        char ip[] = "ip", sub[] = "netns", exec[] = "exec";
        char* argv[] = {ip, sub, exec, ns.data(), self, nullptr};
        execvp("ip", argv);
        _exit(127);
      }
      char name[] = "te-peer-process";
      char* argv[] = {name, nullptr};
      execv(self, argv);
      _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    to_ = fdopen(to_child[1], "w");
    from_ = fdopen(from_child[0], "r");
    descriptor_hex_ = ReadLine();
  }

  ~PeerProcess() {
    if (pid_ > 0) {
      Command("EXIT");
      waitpid(pid_, nullptr, 0);
    }
    if (to_) fclose(to_);
    if (from_) fclose(from_);
  }

  const std::string& descriptor_hex() const { return descriptor_hex_; }

  // CRC-32C of the child's region bytes [offset, offset + len).
  uint32_t Crc(uint64_t offset, uint64_t len) {
    return uint32_t(std::stoul(Command("CRC " + std::to_string(offset) + " " + std::to_string(len))));
  }
  // Waits in the child for `count` arrivals of `imm`; returns "OK" or the error.
  std::string WaitImm(uint32_t imm, uint64_t count, int timeout_ms) {
    return Command("WAIT " + std::to_string(imm) + " " + std::to_string(count) + " " + std::to_string(timeout_ms));
  }

  // Asks the child to wait for `count` arrivals of `imm` and then, at once,
  // take the CRC of [offset, offset + len): the answer ("OK <crc>" or the
  // error) comes from FinishWaitCrc. Between the two the caller writes.
  void StartWaitCrc(uint32_t imm, uint64_t count, int timeout_ms, uint64_t offset, uint64_t len) {
    Send("WAITCRC " + std::to_string(imm) + " " + std::to_string(count) + " " + std::to_string(timeout_ms) + " " +
         std::to_string(offset) + " " + std::to_string(len));
  }
  std::string FinishWaitCrc() { return ReadLine(); }

  // Ends the child's registration of its region (the memory stays).
  std::string Deregister() { return Command("DEREG"); }
  void Kill() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  void Send(const std::string& cmd) {
    fprintf(to_, "%s\n", cmd.c_str());
    fflush(to_);
  }
  std::string Command(const std::string& cmd) {
    Send(cmd);
    return ReadLine();
  }
  std::string ReadLine() {
    char buf[8192];
    if (!fgets(buf, sizeof buf, from_)) return "EOF";
    std::string s(buf);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
  }

 public:
  // In a child started by the constructor: serve, then exit. Runs during
  // static initialization (kServedAsChild), before gtest's main. A child
  // asked for a GPU region waits (returns false) until a GPU test binary
  // installed its hooks and calls this again: static initializers of
  // different files run in no fixed order.
  static bool ServeIfChild() {
    const char* spec = getenv(kChildEnv);
    if (spec == nullptr) return false;
    std::istringstream in(spec);
    EngineOptions o;
    int64_t timeout_ms = 0;
    size_t bytes = 0;
    int fd_in = -1, fd_out = -1;
    std::string iface, provider;
    int region = 0;
    in >> provider >> o.domains >> timeout_ms >> bytes >> fd_in >> fd_out >> iface >> region;
    if (!in || region < 0 || region > int(PeerRegion::kGpu)) _exit(126);
    if (PeerRegion(region) == PeerRegion::kGpu && gpu_hooks == nullptr) return false;
    o.SetProvider(provider);  // with its same-host suffix
    unsetenv(kChildEnv);
    o.request_timeout = std::chrono::milliseconds(timeout_ms);
    if (iface != "-") o.fabric.domain = iface;
    _exit(Serve(o, bytes, PeerRegion(region), fdopen(fd_in, "r"), fdopen(fd_out, "w")));
  }

  // Set (during static initialization) by a binary whose children may own
  // GPU regions; see ServeIfChild.
  static inline const GpuRegionHooks* gpu_hooks = nullptr;

 private:
  static constexpr const char* kChildEnv = "TE_TEST_PEER_PROCESS";

  static int Serve(const EngineOptions& options, size_t bytes, PeerRegion kind, FILE* in, FILE* out) {
    auto engine = TransferEngine::Create(options);
    if (!engine.ok()) {
      fprintf(out, "ERROR %s\n", engine.status().ToString().c_str());
      fflush(out);
      return 1;
    }
    std::vector<uint8_t> heap;
    std::unique_ptr<SharedHostMemory> shared;
    uint8_t* gpu = nullptr;
    if (kind == PeerRegion::kSharedHost) {
      auto m = AllocateSharedHostMemory(bytes);
      if (!m.ok()) return 1;
      shared = std::move(m).value();
    } else if (kind == PeerRegion::kGpu) {
      gpu = static_cast<uint8_t*>(gpu_hooks->allocate(bytes));
      if (gpu == nullptr) return 1;
    } else {
      heap.assign(bytes, 0);
    }
    const std::span<uint8_t> region(shared ? static_cast<uint8_t*>(shared->data()) : gpu ? gpu : heap.data(), bytes);
    auto mr =
        (*engine)->RegisterMemory(region.data(), region.size(), gpu ? Memory::Cuda(gpu_hooks->device) : Memory::Host());
    if (!mr.ok()) {
      fprintf(out, "ERROR %s\n", mr.status().ToString().c_str());
      fflush(out);
      return 1;
    }
    fprintf(out, "%s\n", (*engine)->Describe(**mr).ToHex().c_str());
    fflush(out);
    // CRC-32C of [off, off + len), 0 when outside the region.
    auto crc = [&](uint64_t off, uint64_t len) -> uint32_t {
      if (off > bytes || len > bytes - off) return 0;
      if (!gpu) return Crc32c(region.data() + off, len);
      std::vector<uint8_t> host(len);
      return gpu_hooks->read(host.data(), gpu + off, len) ? Crc32c(host.data(), len) : 0;
    };
    char line[512];
    while (fgets(line, sizeof line, in)) {
      std::istringstream cmd(line);
      std::string op;
      cmd >> op;
      if (op == "CRC") {
        uint64_t off, len;
        cmd >> off >> len;
        fprintf(out, "%u\n", crc(off, len));
      } else if (op == "WAITCRC") {  // the CRC at once when the immediates are in
        uint32_t imm;
        uint64_t count, off, len;
        int ms;
        cmd >> imm >> count >> ms >> off >> len;
        Status s = (*engine)->WaitImm(imm, count, std::chrono::milliseconds(ms));
        if (s.ok())
          fprintf(out, "OK %u\n", crc(off, len));
        else
          fprintf(out, "%s\n", s.ToString().c_str());
      } else if (op == "WAIT") {
        uint32_t imm;
        uint64_t count;
        int ms;
        cmd >> imm >> count >> ms;
        Status s = (*engine)->WaitImm(imm, count, std::chrono::milliseconds(ms));
        fprintf(out, "%s\n", s.ok() ? "OK" : s.ToString().c_str());
      } else if (op == "DEREG") {  // ends the registration; the memory stays
        mr->reset();
        fprintf(out, "OK\n");
      } else if (op == "EXIT") {
        fprintf(out, "BYE\n");
        fflush(out);
        return 0;
      }
      fflush(out);
    }
    return 0;
  }

  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
  std::string descriptor_hex_;
};

// Every test binary that includes this header serves as a peer process when
// started by PeerProcess.
inline const bool kServedAsChild = PeerProcess::ServeIfChild();

}  // namespace te::testing
