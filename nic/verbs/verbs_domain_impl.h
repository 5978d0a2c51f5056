// The native verbs domain's internals, shared by the files that implement
// it (internal to nic/verbs; the interface is verbs_domain.h):
//   verbs_wire.h        the wire address and the connection handshake
//   verbs_device.cc     opening the device: port, GID, MTU, PD, CQ, SRQ, UD QP
//   verbs_qp.cc         RC queue pairs: creation, handshake, INIT/RTR/RTS, retirement
//   verbs_memory.cc     registration (host memory, GPU memory through dmabuf)
//   verbs_domain.cc     posting writes and sends, polling the CQ
#pragma once

#include <arpa/inet.h>
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "nic/verbs/verbs_domain.h"
#include "nic/verbs/verbs_wire.h"

namespace te::nic::verbs_internal {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kUdDepth = 64;               // handshake receives kept posted
constexpr size_t kGrhBytes = 40;                // a UD receive starts with the GRH
constexpr size_t kUdBuffer = kGrhBytes + 1024;  // GRH + handshake
constexpr uint8_t kHopLimit = 64;               // RoCE / global routes

enum class OpKind { kWrite, kSend, kRecv, kUdRecv, kUdSend };

struct OpCtx {
  OpKind kind;
  void* user = nullptr;  // the engine's context
  PeerAddr peer = 0;
  ibv_qp* qp = nullptr;
  int buffer = -1;  // send / receive slot
};

// A registered slab of equal buffers.
struct Slab {
  std::vector<uint8_t> bytes;
  ibv_mr* mr = nullptr;
  size_t size = 0;
  uint8_t* at(int i) { return bytes.data() + size_t(i) * size; }
};

// Path MTU: bytes <-> the verbs enum.
inline std::optional<ibv_mtu> MtuFromBytes(uint32_t bytes) {
  switch (bytes) {
    case 256:
      return IBV_MTU_256;
    case 512:
      return IBV_MTU_512;
    case 1024:
      return IBV_MTU_1024;
    case 2048:
      return IBV_MTU_2048;
    case 4096:
      return IBV_MTU_4096;
    default:
      return std::nullopt;
  }
}
inline uint32_t MtuBytes(ibv_mtu mtu) { return 128u << int(mtu); }

class VerbsDomain final : public Domain {
 public:
  explicit VerbsDomain(const VerbsOptions& o) : options_(o) {}
  ~VerbsDomain() override;

  Status Open();
  const DomainInfo& info() const override { return info_; }
  std::vector<uint8_t> address() const override { return local_.Serialize(); }
  Result<PeerAddr> AddPeer(std::span<const uint8_t> address) override;
  Result<LocalRegistration> Register(void* ptr, size_t length, MemoryKind kind) override;
  Status Deregister(const LocalRegistration& reg) override;
  Status PostWrite(const WriteOp& op) override {
    size_t posted = 0;
    return PostWrites({&op, 1}, &posted);
  }
  Status PostWrites(std::span<const WriteOp> ops, size_t* posted) override;
  Status PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) override;
  int Poll(CompletionHandler& handler, int max) override;

 private:
  enum class State { kNone, kConnecting, kConnected };
  struct Peer {
    WireAddress addr;
    std::vector<uint8_t> raw;
    ibv_ah* ah = nullptr;
    ibv_qp* qp = nullptr;
    State state = State::kNone;
    uint32_t remote_qpn = 0;
    Clock::time_point connect_sent{};
  };

  Result<PeerAddr> AddPeerLocked(std::span<const uint8_t> address);
  Status NewQpLocked(Peer& p);
  Status ConnectQpLocked(Peer& p, uint32_t remote_qpn);
  void RetireQpLocked(Peer& p);
  void SendHandshakeLocked(Peer& p, uint32_t type);
  // Connected: OK. Otherwise starts (or nudges) the handshake: kUnavailable.
  Status ReadyLocked(Peer& p);
  void OnHandshake(const Handshake& h);
  OpCtx* NewCtx(OpKind kind, void* user, PeerAddr peer, ibv_qp* qp, int buffer);
  void FreeCtx(OpCtx* c);
  Status PostReceive(OpKind kind, int buffer);
  void QpOpDone(ibv_qp* qp);

  VerbsOptions options_;
  DomainInfo info_;
  WireAddress local_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_srq* srq_ = nullptr;
  ibv_qp* ud_ = nullptr;
  int access_ = 0;
  int gid_index_ = 0;
  ibv_mtu path_mtu_ = IBV_MTU_1024;  // VerbsOptions::path_mtu, checked against the port
  Slab recv_, send_, ud_recv_, ud_send_;
  std::vector<int> free_send_, free_ud_send_;

  std::mutex mu_;
  std::vector<Peer> peers_;
  std::map<std::string, PeerAddr> by_address_;  // by address bytes
  std::map<ibv_qp*, uint32_t> qp_outstanding_;  // work posted on each QP, retired ones included
  std::vector<ibv_qp*> retired_;                // in error: destroyed once their work is back
  std::vector<std::unique_ptr<OpCtx>> all_ctx_;
  std::vector<OpCtx*> ctx_pool_;       // free ones
  std::vector<ibv_send_wr> chain_wr_;  // scratch of PostWrites
  std::vector<ibv_sge> chain_sge_;
};

}  // namespace te::nic::verbs_internal
