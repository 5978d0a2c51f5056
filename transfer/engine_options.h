// EngineOptions: how a TransferEngine is set up.
#pragma once

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "nic/backend.h"
#include "nic/fabric/fabric_options.h"
#include "nic/verbs/verbs_options.h"

namespace te {

enum class ProgressMode {
  // A worker thread posts and polls; callbacks run on a callback thread.
  kThread,
  // No threads: the application calls TransferEngine::Progress(), which
  // posts, polls and runs callbacks on the calling thread. For latency-bound
  // loops that already own a core.
  kManual,
};

// Whether peers on this host bypass the NICs (nic/local/local_domain.h).
enum class SameHost {
  // kDirect on hardware NIC providers (verbs, verbs-native, efa), where a
  // same-host transfer would otherwise cross PCIe twice; kNic on software
  // providers (tcp, shm), which are chosen to be exercised or are
  // same-host already.
  kAuto,
  // Open a same-host domain beside the NIC domains: a peer whose address
  // says it is on this host (same boot id, its mailbox reachable: same user,
  // a ptrace policy that allows it, a shared pid namespace) is reached
  // through it, every other peer through the NICs. No change in the
  // caller's code; one request may reach peers of both kinds. A peer that
  // looks local but cannot be reached directly falls back to the NICs (with
  // a warning).
  kDirect,
  // Every peer through the NICs (the opt-out).
  kNic,
};

struct EngineOptions {
  // Which nic::Domain implementation the engine opens (nic/backend.h).
  // kLibfabric uses `fabric`; kVerbs opens libibverbs RC domains with
  // `verbs`, and fabric.domain / domain_names then name devices (mlx5_0).
  // SetProvider() sets both from one name, as the tools' --provider does.
  nic::Backend backend = nic::Backend::kLibfabric;
  // Provider, interface and control-message buffers of every domain.
  nic::FabricOptions fabric;
  nic::VerbsOptions verbs;

  // "tcp", "shm", "efa", "verbs", "verbs-native", "local" or a libfabric provider
  // name: sets `backend` and fabric.provider (nic/backend.h has the table).
  // A suffix sets same_host too: "efa+local" (kDirect: the same-host domain
  // beside the NICs) or "efa+nic" (kNic: every peer through the NICs).
  // Without a suffix same_host is left as it is.
  void SetProvider(const std::string& name) {
    std::string base = name;
    for (auto [suffix, choice] : {std::pair{"+local", SameHost::kDirect}, std::pair{"+nic", SameHost::kNic}}) {
      const std::string s = suffix;
      if (base.size() > s.size() && base.compare(base.size() - s.size(), s.size(), s) == 0) {
        base.resize(base.size() - s.size());
        same_host = choice;
      }
    }
    backend = nic::ParseProviderName(base).backend;
    fabric.provider = backend == nic::Backend::kLibfabric ? base : "";
  }
  // The name SetProvider takes for the current backend, provider and
  // same-host choice.
  std::string ProviderName() const {
    std::string name = backend == nic::Backend::kLibfabric ? fabric.provider : std::string(nic::BackendName(backend));
    if (backend != nic::Backend::kLocal && same_host == SameHost::kDirect) name += "+local";
    if (backend != nic::Backend::kLocal && same_host == SameHost::kNic) name += "+nic";
    return name;
  }
  // Same-host peers: see SameHost. Ignored when the provider is "local".
  // Tools and tests name the path they exercise: a bare --provider there
  // means kNic (tools/tool_support.h).
  SameHost same_host = SameHost::kAuto;
  // Domains (NICs) in the group. With tcp or shm these are independent
  // endpoints; with EFA or ConnectX give one per NIC of the GPU.
  int domains = 1;
  // libfabric domain names, one per domain; empty uses fabric.domain for all.
  std::vector<std::string> domain_names;

  // Serve this GPU: its NICs (nearest PCIe switch, nic/topology/topology.h)
  // become the domains and the worker is pinned to its first core, unless
  // domain_names / worker_cpu say otherwise.
  std::optional<int> gpu;
  std::string sysfs_root = "/sys";

  ProgressMode progress = ProgressMode::kThread;
  // Pin the worker thread to this CPU (kThread mode).
  std::optional<int> worker_cpu;

  // The clock of a request, in two parts:
  //  - queued: a request none of whose operations could be posted this long
  //    after Submit (back-pressure, a peer that never accepts) is withdrawn
  //    with kNotPosted: nothing reached the peer, submitting again is safe;
  //  - in flight: a request not finished this long after its first
  //    operation was posted fails with kTimeout: outcome unknown (its data
  //    and immediate may or may not have landed).
  // A dead peer or NIC turns into errors, never a hang.
  std::chrono::milliseconds request_timeout{10000};
  // Operations (writes and messages) accepted but not finished, over all
  // requests. Submit and Send beyond it return kResourceExhausted and accept
  // nothing; each queued operation costs about 300 bytes.
  size_t max_queued_operations = size_t(1) << 18;
  // Distinct immediate values tracked at once (arrivals not yet consumed,
  // expectations, waiters; about 100 bytes each). Peers choose the values:
  // arrivals of a new value beyond this are dropped and counted
  // (EngineStats::imms_dropped) rather than grow the table without bound.
  size_t max_imm_values = size_t(1) << 16;
  // Operations outstanding per domain; 0 means the provider's send queue
  // depth, capped at 1024. Work beyond it waits in order, never dropped.
  size_t max_inflight_per_domain = 0;
  // SingleWrite shards are at least this large (rounded to 4 KiB), so small
  // writes are not cut into pieces that cost more in operations than they
  // gain in parallelism.
  size_t min_shard_bytes = 64 * 1024;
  // Idle worker: spin this long after the last event, then poll every
  // idle_sleep; after idle_deep of silence, every idle_sleep_max. Providers
  // with manual progress (tcp, efa) need the polls, and each poll of tcp
  // costs system calls, so a long-idle engine backs off. A message arriving
  // at a long-idle engine waits up to idle_sleep_max: set it equal to
  // idle_sleep where that first-message latency matters.
  std::chrono::microseconds idle_spin{2000};
  // Busy polling: the worker never yields or sleeps, so a completion or an
  // arriving immediate is seen within one poll. It costs one core at 100%
  // for the engine's whole life, whether or not traffic flows: for hosts
  // that dedicate a core to the worker (pin it with worker_cpu), never on a
  // machine whose cores the application needs.
  bool busy_poll = false;
  // A thread in WaitImm first drives progress itself this long (it takes
  // the worker's role: posts, polls, runs cheap callbacks, while the worker
  // naps), then sleeps on a condition variable while the worker carries on.
  // An arrival microseconds away then costs no thread hand-off and no
  // futex wake-up, and the waiter and the worker do not both spin. 0 sleeps
  // at once.
  std::chrono::microseconds wait_spin{50};
  // Callbacks declared cheap (Completion::on_worker, ExpectImm with
  // ImmDelivery::kOnWorker) run in rounds (those ready at one pass); a round
  // that runs longer than this is counted in EngineStats::slow_worker_callbacks
  // and logged: one of its callbacks blocked and held up every request.
  // Wall time, so a thread preempted on a busy host may be counted too: the
  // default sits above a scheduler time slice.
  std::chrono::microseconds slow_worker_callback{10000};
  std::chrono::microseconds idle_sleep{50};
  std::chrono::microseconds idle_sleep_max{1000};
  std::chrono::milliseconds idle_deep{100};
  // Control messages received before a handler is set are kept up to this
  // many; later ones are dropped with a warning.
  size_t recv_backlog = 1024;
  // Received control messages waiting for the receive handler (the handler
  // is slower than the peers sending) are kept up to this many bytes; later
  // ones are dropped with a warning (EngineStats::messages_dropped).
  size_t max_pending_message_bytes = size_t(256) << 20;
};

}  // namespace te
