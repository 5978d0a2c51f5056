// Opening a device port: the domain's verbs resources (verbs_domain_impl.h).
#include "nic/verbs/verbs_domain_impl.h"

namespace te::nic::verbs_internal {

VerbsDomain::~VerbsDomain() {
  for (auto& p : peers_) {
    if (p.qp) ibv_destroy_qp(p.qp);
    if (p.ah) ibv_destroy_ah(p.ah);
  }
  for (ibv_qp* q : retired_) ibv_destroy_qp(q);
  if (ud_) ibv_destroy_qp(ud_);
  if (srq_) ibv_destroy_srq(srq_);
  if (cq_) ibv_destroy_cq(cq_);
  for (Slab* s : {&recv_, &send_, &ud_recv_, &ud_send_})
    if (s->mr) ibv_dereg_mr(s->mr);
  if (pd_) ibv_dealloc_pd(pd_);
  if (ctx_) ibv_close_device(ctx_);
}

Status VerbsDomain::Open() {
  if (options_.send_depth == 0 || options_.recv_depth == 0 || options_.max_message_bytes == 0)
    return InvalidArgument("verbs-native: send_depth, recv_depth and max_message_bytes must be > 0");
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (!list || n == 0) {
    if (list) ibv_free_device_list(list);
    return Unavailable("verbs-native: no RDMA device on this machine");
  }
  ibv_device* dev = nullptr;
  std::string names;
  for (int i = 0; i < n; ++i) {
    names += std::string(i ? ", " : "") + ibv_get_device_name(list[i]);
    if (options_.device.empty() ? i == 0 : options_.device == ibv_get_device_name(list[i])) dev = list[i];
  }
  if (!dev) {
    ibv_free_device_list(list);
    return NotFound("verbs-native: no RDMA device '" + options_.device + "'; devices: " + names);
  }
  info_.domain_name = ibv_get_device_name(dev);
  ctx_ = ibv_open_device(dev);
  ibv_free_device_list(list);
  const std::string where = "verbs-native " + info_.domain_name + " port " + std::to_string(options_.port);
  if (!ctx_) return IoError(where + ": ibv_open_device failed: " + strerror(errno));

  ibv_port_attr port{};
  if (ibv_query_port(ctx_, uint8_t(options_.port), &port))
    return InvalidArgument(where + ": ibv_query_port failed (no such port?)");
  if (port.state != IBV_PORT_ACTIVE)
    return Unavailable(where + " is not active (state " + std::to_string(port.state) + ")");
  if (options_.path_mtu == 0) {
    path_mtu_ = port.active_mtu;
  } else {
    auto mtu = MtuFromBytes(options_.path_mtu);
    if (!mtu)
      return InvalidArgument(where + ": path_mtu " + std::to_string(options_.path_mtu) +
                             " is not one of 256, 512, 1024, 2048, 4096 (or 0: the port's)");
    if (*mtu > port.active_mtu)
      return InvalidArgument(where + ": path_mtu " + std::to_string(options_.path_mtu) +
                             " exceeds the port's active MTU of " + std::to_string(MtuBytes(port.active_mtu)));
    path_mtu_ = *mtu;
  }
  local_.port = uint8_t(options_.port);
  local_.infiniband = port.link_layer != IBV_LINK_LAYER_ETHERNET;
  local_.lid = port.lid;
  if (!local_.infiniband || options_.gid_index >= 0) {
    int index = options_.gid_index;
    if (index < 0) {  // RoCE v2 by default: IPv4-mapped first, then any v2
      int v2 = -1;
      for (int i = 0; i < port.gid_tbl_len; ++i) {
        ibv_gid_entry e{};
        if (ibv_query_gid_ex(ctx_, uint32_t(options_.port), uint32_t(i), &e, 0)) continue;
        if (e.gid_type != IBV_GID_TYPE_ROCE_V2) continue;
        const bool v4 = e.gid.raw[10] == 0xff && e.gid.raw[11] == 0xff;
        if (v4) {
          index = i;
          break;
        }
        if (v2 < 0) v2 = i;
      }
      if (index < 0) index = v2;
      if (index < 0) return NotFound(where + ": no RoCE v2 GID; set gid_index");
    }
    ibv_gid gid{};
    if (ibv_query_gid(ctx_, uint8_t(options_.port), index, &gid))
      return InvalidArgument(where + ": GID index " + std::to_string(index) + " is not in the port's table of " +
                             std::to_string(port.gid_tbl_len));
    std::memcpy(local_.gid, gid.raw, 16);
    gid_index_ = index;
  }

  pd_ = ibv_alloc_pd(ctx_);
  if (!pd_) return IoError(where + ": ibv_alloc_pd failed");
  access_ = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  if (options_.relaxed_ordering) access_ |= IBV_ACCESS_RELAXED_ORDERING;
  // Every send is signalled and at most send_depth are outstanding (the
  // engine's window), so the CQ cannot overflow.
  const int cqe = int(options_.send_depth + options_.recv_depth + 2 * kUdDepth);
  cq_ = ibv_create_cq(ctx_, cqe, nullptr, nullptr, 0);
  if (!cq_) return IoError(where + ": ibv_create_cq(" + std::to_string(cqe) + ") failed");
  ibv_srq_init_attr sa{};
  sa.attr.max_wr = options_.recv_depth;
  sa.attr.max_sge = 1;
  srq_ = ibv_create_srq(pd_, &sa);
  if (!srq_) return IoError(where + ": ibv_create_srq failed");

  auto make_slab = [&](Slab& s, size_t count, size_t size) -> Status {
    s.size = size;
    s.bytes.assign(count * size, 0);
    s.mr = ibv_reg_mr(pd_, s.bytes.data(), s.bytes.size(), IBV_ACCESS_LOCAL_WRITE);
    return s.mr ? Status::Ok() : IoError(where + ": registering buffers failed");
  };
  TE_RETURN_IF_ERROR(make_slab(recv_, options_.recv_depth, options_.max_message_bytes));
  TE_RETURN_IF_ERROR(make_slab(send_, options_.send_depth, options_.max_message_bytes));
  TE_RETURN_IF_ERROR(make_slab(ud_recv_, kUdDepth, kUdBuffer));
  TE_RETURN_IF_ERROR(make_slab(ud_send_, kUdDepth, kUdBuffer));
  for (int i = int(options_.send_depth); i-- > 0;) free_send_.push_back(i);
  for (int i = int(kUdDepth); i-- > 0;) free_ud_send_.push_back(i);
  for (uint32_t i = 0; i < options_.recv_depth; ++i) TE_RETURN_IF_ERROR(PostReceive(OpKind::kRecv, int(i)));

  ibv_qp_init_attr qa{};
  qa.send_cq = qa.recv_cq = cq_;
  qa.qp_type = IBV_QPT_UD;
  qa.cap.max_send_wr = kUdDepth;
  qa.cap.max_recv_wr = kUdDepth;
  qa.cap.max_send_sge = qa.cap.max_recv_sge = 1;
  ud_ = ibv_create_qp(pd_, &qa);
  if (!ud_) return IoError(where + ": creating the UD queue pair failed");
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = uint8_t(options_.port);
  a.qkey = kQkey;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY))
    return IoError(where + ": UD QP to INIT failed");
  for (uint32_t i = 0; i < kUdDepth; ++i) TE_RETURN_IF_ERROR(PostReceive(OpKind::kUdRecv, int(i)));
  a = {};
  a.qp_state = IBV_QPS_RTR;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE)) return IoError(where + ": UD QP to RTR failed");
  a.qp_state = IBV_QPS_RTS;
  a.sq_psn = 0;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE | IBV_QP_SQ_PSN)) return IoError(where + ": UD QP to RTS failed");
  local_.ud_qpn = ud_->qp_num;

  info_.provider = "verbs-native";
  info_.max_write_bytes = size_t(1) << 30;
  info_.max_message_bytes = options_.max_message_bytes;
  info_.tx_depth = options_.send_depth;
  info_.virtual_addressing = true;
  info_.provider_keys = true;
  info_.local_descriptors = true;
  info_.hmem = false;
  return Status::Ok();
}

}  // namespace te::nic::verbs_internal
