// Memory registration: host memory, and GPU memory through dmabuf.
#include "nic/verbs/verbs_domain_impl.h"

namespace te::nic::verbs_internal {

// GPU memory through dmabuf: the CUDA driver exports the range as a dmabuf
// file descriptor and the NIC maps that (no nvidia-peermem module needed).
// libcuda is opened at run time, so nothing links against it and machines
// without a GPU driver run the rest unchanged.
ibv_mr* RegisterDmabuf(ibv_pd* pd, void* ptr, size_t length, int access, std::string* why) {
  using GetHandle = int (*)(void* handle, unsigned long long dptr, size_t size, int type, unsigned long long flags);
  static GetHandle get_handle = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    return lib ? reinterpret_cast<GetHandle>(dlsym(lib, "cuMemGetHandleForAddressRange")) : nullptr;
  }();
  if (!get_handle) {
    *why = "dmabuf: libcuda.so.1 with cuMemGetHandleForAddressRange not found";
    return nullptr;
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint64_t start = reinterpret_cast<uint64_t>(ptr), base = start & ~(page - 1);
  const uint64_t end = (start + length + page - 1) & ~(page - 1);
  int fd = -1;
  constexpr int kDmaBufFd = 1;  // CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD
  if (int rc = get_handle(&fd, base, size_t(end - base), kDmaBufFd, 0); rc != 0 || fd < 0) {
    *why = "dmabuf: cuMemGetHandleForAddressRange failed (CUresult " + std::to_string(uint64_t(rc)) + ")";
    return nullptr;
  }
  ibv_mr* mr = ibv_reg_dmabuf_mr(pd, start - base, length, start, fd, access);
  if (!mr) *why = std::string("dmabuf: ibv_reg_dmabuf_mr failed: ") + strerror(errno);
  close(fd);
  return mr;
}

Result<LocalRegistration> VerbsDomain::Register(void* ptr, size_t length, MemoryKind kind) {
  // CUDA memory: dmabuf first; else plain ibv_reg_mr, which takes device
  // memory where the peer-memory module (nvidia-peermem) is loaded.
  std::string dmabuf_why;
  ibv_mr* mr = nullptr;
  const bool cuda = kind.type == MemoryKind::Type::kCuda;
  if (cuda) mr = RegisterDmabuf(pd_, ptr, length, access_, &dmabuf_why);
  if (!mr) mr = ibv_reg_mr(pd_, ptr, length, access_);
  if (!mr)
    return IoError("verbs-native: registering " + std::to_string(length) + " bytes of " + (cuda ? "CUDA" : "host") +
                   " memory failed: " + (cuda ? dmabuf_why + "; peer memory: " : "") +
                   "ibv_reg_mr: " + strerror(errno));
  LocalRegistration r;
  r.mr = mr;
  r.desc = mr;
  r.rkey = mr->rkey;
  r.remote_base = reinterpret_cast<uint64_t>(ptr);
  return r;
}

Status VerbsDomain::Deregister(const LocalRegistration& reg) {
  if (ibv_dereg_mr(static_cast<ibv_mr*>(reg.mr))) return IoError("verbs-native: ibv_dereg_mr failed");
  return Status::Ok();
}

// Each run of writes to one peer is one chain of work requests, posted with
// one ibv_post_send (one doorbell).

}  // namespace te::nic::verbs_internal
