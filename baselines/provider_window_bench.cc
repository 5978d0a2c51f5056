// provider-window-bench: a second, independent measurement of what a
// libfabric provider sustains for small one-sided writes, used to check
// te-bench's raw loop (nic/fabric/raw_write_loop.cc). It shares no code with
// the engine or with that loop: it opens its own endpoints from default
// hints and runs the loop provider benchmarks run (fabtests' fi_rma_bw):
// post a window of fi_writedata (or fi_inject_writedata up to the provider's
// inject size, with --op=inject), read that window's completions, repeat; the
// target spins on its completion queue counting remote CQ data and answers
// the last write with a zero-byte write of its own.
//
//   provider-window-bench --provider=shm --size=4096 --window=64 --runs=5
//   provider-window-bench --provider=tcp --iface=lo --size=4096
//
// --probe records base/cross_cpu_probe.h's figure around each run (the
// slower of before and after): on a
// virtual machine it moves between runs, and every small-write figure
// between two processes moves with it.
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <gflags/gflags.h>

#include "base/cross_cpu_probe.h"

DEFINE_string(provider, "shm", "libfabric provider: shm or tcp (tcp is pinned to --iface)");
DEFINE_string(iface, "lo", "Interface the tcp provider binds");
DEFINE_uint64(size, 4096, "Bytes per write");
DEFINE_uint64(window, 64, "Writes posted before their completions are read");
DEFINE_uint64(iters, 100000, "Writes per run");
DEFINE_int32(runs, 3, "Runs, each with a fresh pair of processes");
DEFINE_string(op, "writedata", "writedata (always fi_writedata) or inject (fi_inject_writedata up to the inject size)");
DEFINE_bool(probe, false, "Time a cache line passed between CPUs 0 and 1 before and after each run");
DEFINE_bool(json, false, "One JSON object per run");
DEFINE_int32(timeout_s, 60, "Per-run limit");

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Fail(const char* what, long ret) {
  fprintf(stderr, "provider-window-bench: %s: %s (%ld)\n", what, fi_strerror(int(-ret)), ret);
  exit(2);
}

struct Endpoint {
  fi_info* info = nullptr;
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_av* av = nullptr;
  fid_cq* cq = nullptr;
  fid_ep* ep = nullptr;
  fid_mr* mr = nullptr;
  std::vector<char> buf;
  fi_addr_t peer = FI_ADDR_UNSPEC;
};

// What one side tells the other: endpoint name, buffer address and key.
struct Card {
  char name[256];
  size_t name_len;
  uint64_t addr;
  uint64_t key;
};

void Open(Endpoint* e) {
  fi_info* hints = fi_allocinfo();
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
  hints->fabric_attr->prov_name = strdup(FLAGS_provider.c_str());
  if (FLAGS_provider == "shm") {
    // The /dev/shm region is named for this process ("pwb.<pid>"), so that a
    // killed run's region can be told apart and removed (RemoveStaleRegions).
    const std::string name = "fi_shm://pwb." + std::to_string(getpid());
    hints->addr_format = FI_ADDR_STR;
    hints->src_addr = strdup(name.c_str());
    hints->src_addrlen = name.size() + 1;
  }
  if (FLAGS_provider == "tcp") hints->domain_attr->name = strdup(FLAGS_iface.c_str());
  int ret = fi_getinfo(FI_VERSION(1, 14), nullptr, nullptr, 0, hints, &e->info);
  fi_freeinfo(hints);
  if (ret) Fail("fi_getinfo", ret);
  if ((ret = fi_fabric(e->info->fabric_attr, &e->fabric, nullptr))) Fail("fi_fabric", ret);
  if ((ret = fi_domain(e->fabric, e->info, &e->domain, nullptr))) Fail("fi_domain", ret);
  fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_DATA;
  cq_attr.size = 4096;
  if ((ret = fi_cq_open(e->domain, &cq_attr, &e->cq, nullptr))) Fail("fi_cq_open", ret);
  fi_av_attr av_attr{};
  av_attr.type = FI_AV_TABLE;
  if ((ret = fi_av_open(e->domain, &av_attr, &e->av, nullptr))) Fail("fi_av_open", ret);
  if ((ret = fi_endpoint(e->domain, e->info, &e->ep, nullptr))) Fail("fi_endpoint", ret);
  if ((ret = fi_ep_bind(e->ep, &e->cq->fid, FI_TRANSMIT | FI_RECV))) Fail("fi_ep_bind(cq)", ret);
  if ((ret = fi_ep_bind(e->ep, &e->av->fid, 0))) Fail("fi_ep_bind(av)", ret);
  if ((ret = fi_enable(e->ep))) Fail("fi_enable", ret);
  e->buf.assign(std::max<uint64_t>(FLAGS_size, 64) * 2, 1);
  if ((ret = fi_mr_reg(e->domain, e->buf.data(), e->buf.size(), FI_WRITE | FI_REMOTE_WRITE, 0, 0, 0, &e->mr, nullptr)))
    Fail("fi_mr_reg", ret);
  if (e->info->domain_attr->mr_mode & FI_MR_ENDPOINT) {
    if ((ret = fi_mr_bind(e->mr, &e->ep->fid, 0))) Fail("fi_mr_bind", ret);
    if ((ret = fi_mr_enable(e->mr))) Fail("fi_mr_enable", ret);
  }
}

void Close(Endpoint* e) {
  fi_close(&e->ep->fid);
  fi_close(&e->mr->fid);
  fi_close(&e->av->fid);
  fi_close(&e->cq->fid);
  fi_close(&e->domain->fid);
  fi_close(&e->fabric->fid);
  fi_freeinfo(e->info);
}

Card MakeCard(Endpoint* e) {
  Card c{};
  c.name_len = sizeof(c.name);
  int ret = fi_getname(&e->ep->fid, c.name, &c.name_len);
  if (ret) Fail("fi_getname", ret);
  c.addr = (e->info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? reinterpret_cast<uint64_t>(e->buf.data()) : 0;
  c.key = fi_mr_key(e->mr);
  return c;
}

void Insert(Endpoint* e, const Card& c) {
  int ret = fi_av_insert(e->av, c.name, 1, &e->peer, 0, nullptr);
  if (ret != 1) Fail("fi_av_insert", ret);
}

// Removes /dev/shm/pwb.<pid>[:...] regions whose process no longer exists
// (a killed run cannot remove its own).
void RemoveStaleRegions() {
  DIR* d = opendir("/dev/shm");
  if (!d) return;
  while (dirent* e = readdir(d)) {
    const char* n = e->d_name;
    if (strncmp(n, "pwb.", 4) != 0) continue;
    char* end = nullptr;
    const long pid = strtol(n + 4, &end, 10);
    if (pid <= 0 || (*end != '\0' && *end != ':')) continue;  // the provider may append ":<n>:<n>"
    if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) unlinkat(dirfd(d), n, 0);
  }
  closedir(d);
}

bool Expired(Clock::time_point deadline) { return Clock::now() > deadline; }

// Reads completions; returns how many were local (transmit) completions and
// adds remote CQ data arrivals to *arrivals.
uint64_t Reap(Endpoint* e, uint64_t* arrivals) {
  fi_cq_data_entry entries[64];
  ssize_t n = fi_cq_read(e->cq, entries, 64);
  if (n == -FI_EAGAIN) return 0;
  if (n < 0) {
    fi_cq_err_entry err{};
    fi_cq_readerr(e->cq, &err, 0);
    Fail("fi_cq_read", err.err ? -long(err.err) : n);
  }
  uint64_t local = 0;
  for (ssize_t i = 0; i < n; ++i) {
    if (entries[i].flags & FI_REMOTE_CQ_DATA)
      ++*arrivals;
    else
      ++local;
  }
  return local;
}

// Posts one write, progressing the endpoint while its queue is full.
// Returns true when it was injected (no completion will follow).
bool PostWrite(Endpoint* e, const Card& peer, size_t len, bool inject, fi_context2* ctx, uint64_t* local_done,
               uint64_t* arrivals, Clock::time_point deadline) {
  for (;;) {
    ssize_t ret =
        inject ? fi_inject_writedata(e->ep, e->buf.data(), len, 7, e->peer, peer.addr, peer.key)
               : fi_writedata(e->ep, e->buf.data(), len, fi_mr_desc(e->mr), 7, e->peer, peer.addr, peer.key, ctx);
    if (ret == 0) return inject;
    if (ret != -FI_EAGAIN) Fail(inject ? "fi_inject_writedata" : "fi_writedata", ret);
    *local_done += Reap(e, arrivals);
    if (Expired(deadline)) Fail("posting (send queue stayed full)", -FI_ETIMEDOUT);
  }
}

int RunTarget(int rd, int wr) {
  Endpoint e;
  Open(&e);
  Card mine = MakeCard(&e), theirs{};
  if (write(wr, &mine, sizeof(mine)) != sizeof(mine) || read(rd, &theirs, sizeof(theirs)) != sizeof(theirs)) return 2;
  Insert(&e, theirs);
  char go = 0;
  if (write(wr, &go, 1) != 1) return 2;
  const auto deadline = Clock::now() + std::chrono::seconds(FLAGS_timeout_s);
  uint64_t arrivals = 0, local = 0;
  while (arrivals < FLAGS_iters) {
    local += Reap(&e, &arrivals);
    if (Expired(deadline)) Fail("waiting for the writes", -FI_ETIMEDOUT);
  }
  fi_context2 ctx{};
  const bool injected = PostWrite(&e, theirs, 0, false, &ctx, &local, &arrivals, deadline);
  while (!injected && local == 0) {
    local += Reap(&e, &arrivals);
    if (Expired(deadline)) Fail("the answer's completion", -FI_ETIMEDOUT);
  }
  // Stay until the initiator has seen the answer, so the endpoint outlives it.
  if (read(rd, &go, 1) != 1) return 2;
  Close(&e);
  return 0;
}

double Initiate(int rd, int wr) {
  Endpoint e;
  Open(&e);
  Card mine = MakeCard(&e), theirs{};
  if (read(rd, &theirs, sizeof(theirs)) != sizeof(theirs) || write(wr, &mine, sizeof(mine)) != sizeof(mine))
    Fail("exchanging addresses", -FI_EIO);
  Insert(&e, theirs);
  char go;
  if (read(rd, &go, 1) != 1) Fail("waiting for the target", -FI_EIO);
  const size_t inject_size = e.info->tx_attr->inject_size;
  const bool inject = FLAGS_op == "inject" && FLAGS_size <= inject_size;
  std::vector<fi_context2> ctx(FLAGS_window);
  const auto deadline = Clock::now() + std::chrono::seconds(FLAGS_timeout_s);
  uint64_t arrivals = 0, local_done = 0, posted = 0, expected_local = 0;
  const auto start = Clock::now();
  while (posted < FLAGS_iters) {
    const uint64_t n = std::min<uint64_t>(FLAGS_window, FLAGS_iters - posted);
    for (uint64_t i = 0; i < n; ++i)
      if (!PostWrite(&e, theirs, FLAGS_size, inject, &ctx[i], &local_done, &arrivals, deadline)) ++expected_local;
    posted += n;
    while (local_done < expected_local) {
      local_done += Reap(&e, &arrivals);
      if (Expired(deadline)) Fail("waiting for the window", -FI_ETIMEDOUT);
    }
  }
  while (arrivals == 0) {
    Reap(&e, &arrivals);
    if (Expired(deadline)) Fail("waiting for the target's answer", -FI_ETIMEDOUT);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (write(wr, &go, 1) != 1) Fail("releasing the target", -FI_EIO);
  Close(&e);
  return seconds;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage("provider-window-bench --provider=shm|tcp --size=4096 --window=64 [--runs=N] [--probe]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (FLAGS_provider != "shm" && FLAGS_provider != "tcp") {
    fprintf(stderr, "--provider=%s: only shm and tcp (pinned to --iface) are run here\n", FLAGS_provider.c_str());
    return 1;
  }
  if (FLAGS_op != "writedata" && FLAGS_op != "inject") {
    fprintf(stderr, "--op=%s: writedata or inject\n", FLAGS_op.c_str());
    return 1;
  }
  if (FLAGS_window == 0 || FLAGS_window > 1024 || FLAGS_iters == 0 || FLAGS_size > (1u << 30)) {
    fprintf(stderr, "--window must be 1..1024, --iters > 0, --size <= 1 GiB\n");
    return 1;
  }
  if (FLAGS_provider == "tcp") setenv("FI_TCP_IFACE", FLAGS_iface.c_str(), 1);
  if (FLAGS_provider == "shm") RemoveStaleRegions();
  if (!FLAGS_json)
    printf("%-8s %8s %7s %9s %10s %9s %12s\n", "provider", "size", "window", "writes", "Mop/s", "GB/s", "xcpu_ns");
  for (int run = 0; run < FLAGS_runs; ++run) {
    const double before = FLAGS_probe ? te::CrossCpuRoundTripNs() : 0;
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent)) return 2;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
      // The target goes with the initiator: killed, it leaves no spinning child.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() == 1) _exit(2);
      close(to_child[1]);
      close(to_parent[0]);
      _exit(RunTarget(to_child[0], to_parent[1]));
    }
    close(to_child[0]);
    close(to_parent[1]);
    const double seconds = Initiate(to_parent[0], to_child[1]);
    close(to_child[1]);
    close(to_parent[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "provider-window-bench: the target process failed (status %d)\n", status);
      return 2;
    }
    // The state can change during a run: the slower probe labels it.
    const double probe = FLAGS_probe ? std::max(before, te::CrossCpuRoundTripNs()) : 0;
    const double mops = FLAGS_iters / seconds / 1e6;
    const double gbs = double(FLAGS_iters) * FLAGS_size / seconds / 1e9;
    if (FLAGS_json)
      printf(
          "{\"provider\":\"%s\",\"size\":%llu,\"window\":%llu,\"writes\":%llu,\"op\":\"%s\",\"mops\":%.4f,"
          "\"gbps\":%.4f,\"xcpu_ns\":%.0f}\n",
          FLAGS_provider.c_str(), (unsigned long long)FLAGS_size, (unsigned long long)FLAGS_window,
          (unsigned long long)FLAGS_iters, FLAGS_op.c_str(), mops, gbs, probe);
    else
      printf("%-8s %8llu %7llu %9llu %10.3f %9.3f %12.0f\n", FLAGS_provider.c_str(), (unsigned long long)FLAGS_size,
             (unsigned long long)FLAGS_window, (unsigned long long)FLAGS_iters, mops, gbs, probe);
    fflush(stdout);
  }
  return 0;
}
