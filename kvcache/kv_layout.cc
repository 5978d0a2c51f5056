#include "kvcache/kv_layout.h"

#include <sstream>

#include "base/checked_math.h"

namespace te::kvcache {

namespace {}  // namespace

Status KvLayout::Validate() const {
  auto positive = [](const char* name, uint64_t v, uint64_t max) -> Status {
    if (v == 0 || v > max)
      return InvalidArgument(std::string("KvLayout.") + name + " is " + std::to_string(v) + "; valid range [1, " +
                             std::to_string(max) + "]");
    return Status::Ok();
  };
  TE_RETURN_IF_ERROR(positive("layers", layers, 4096));
  TE_RETURN_IF_ERROR(positive("page_tokens", page_tokens, 1 << 16));
  TE_RETURN_IF_ERROR(positive("kv_heads", kv_heads, 1024));
  TE_RETURN_IF_ERROR(positive("head_dim", head_dim, 1 << 16));
  TE_RETURN_IF_ERROR(positive("dtype_bytes", dtype_bytes, 8));
  TE_RETURN_IF_ERROR(positive("tp", tp, 1024));
  TE_RETURN_IF_ERROR(positive("pages", pages, 1u << 30));
  if (mla && kv_heads != 1)
    return InvalidArgument("KvLayout: an MLA cache has one latent per token; kv_heads is " + std::to_string(kv_heads) +
                           ", it must be 1");
  if (!mla && kv_heads % tp != 0)
    return InvalidArgument("KvLayout: kv_heads " + std::to_string(kv_heads) + " does not divide by tp " +
                           std::to_string(tp) + "; every rank must hold the same number of heads");
  // Sizes are products of peer-supplied fields: check the product before
  // any accessor computes it in 64 bits (it could wrap to 0).
  auto region = CheckedProduct(
      "KvLayout region (layers x tensors x pages x page_tokens x local_heads x "
      "head_dim x dtype_bytes)",
      {layers, tensors(), pages, page_tokens, local_heads(), head_dim, dtype_bytes}, kMaxRegionBytes);
  if (!region.ok()) return region.status();
  // Transfers address the region in units of one head (PagedWrite indices
  // are 32-bit), which bounds the region.
  if (region_bytes() / head_bytes() >= (uint64_t(1) << 32))
    return InvalidArgument("KvLayout: region of " + std::to_string(region_bytes()) +
                           " bytes has 2^32 or more heads of " + std::to_string(head_bytes()) +
                           " bytes; use fewer pages");
  return Status::Ok();
}

uint64_t KvLayout::Offset(uint32_t layer, uint32_t tensor, uint32_t page, uint32_t token, uint32_t head) const {
  const uint64_t block = (uint64_t(layer) * tensors() + tensor) * block_bytes();
  const uint64_t in_page = order == KvOrder::kNHD ? (uint64_t(token) * local_heads() + head) * head_bytes()
                                                  : (uint64_t(head) * page_tokens + token) * head_bytes();
  return block + uint64_t(page) * page_bytes() + in_page;
}

std::string KvLayout::Describe() const {
  std::ostringstream o;
  o << layers << "L x " << page_tokens << "tok x ";
  if (mla)
    o << "MLA " << head_dim << "d";
  else
    o << kv_heads << "h x " << head_dim << "d";
  o << " x " << dtype_bytes << "B " << (order == KvOrder::kNHD ? "NHD" : "HND") << " tp" << tp << ", " << pages
    << " pages";
  return o.str();
}

std::string KvLayout::Serialize() const {
  std::ostringstream o;
  o << "kvl1 " << layers << ' ' << page_tokens << ' ' << kv_heads << ' ' << head_dim << ' ' << dtype_bytes << ' '
    << (mla ? 1 : 0) << ' ' << (order == KvOrder::kNHD ? "NHD" : "HND") << ' ' << tp << ' ' << pages;
  return o.str();
}

Result<KvLayout> KvLayout::Parse(const std::string& text) {
  std::istringstream in(text);
  std::string magic, order;
  KvLayout l;
  int mla = 0;
  in >> magic >> l.layers >> l.page_tokens >> l.kv_heads >> l.head_dim >> l.dtype_bytes >> mla >> order >> l.tp >>
      l.pages;
  if (!in || magic != "kvl1" || (order != "NHD" && order != "HND") || (mla != 0 && mla != 1))
    return InvalidArgument("not a serialized KvLayout: '" + text.substr(0, 80) + "'");
  l.mla = mla == 1;
  l.order = order == "NHD" ? KvOrder::kNHD : KvOrder::kHND;
  TE_RETURN_IF_ERROR(l.Validate());
  return l;
}

Result<KvLayout> KvLayout::Preset(const std::string& name) {
  KvLayout l;
  if (name == "llama70b") {
    l.layers = 80;
    l.page_tokens = 16;
    l.kv_heads = 8;
    l.head_dim = 128;
  } else if (name == "deepseek") {
    l.layers = 61;
    l.page_tokens = 64;
    l.kv_heads = 1;
    l.head_dim = 576;
    l.mla = true;
  } else {
    return InvalidArgument("unknown KV preset '" + name + "'; valid: llama70b, deepseek");
  }
  l.dtype_bytes = 2;
  l.pages = 1;
  return l;
}

Status CheckCompatible(const KvLayout& src, const KvLayout& dst) {
  TE_RETURN_IF_ERROR(src.Validate().WithContext("prefill layout"));
  TE_RETURN_IF_ERROR(dst.Validate().WithContext("decode layout"));
  auto same = [](const char* what, uint64_t a, uint64_t b) -> Status {
    if (a != b)
      return InvalidArgument(std::string("prefill and decode caches differ in ") + what + ": " + std::to_string(a) +
                             " vs " + std::to_string(b));
    return Status::Ok();
  };
  TE_RETURN_IF_ERROR(same("layers", src.layers, dst.layers));
  TE_RETURN_IF_ERROR(same("page_tokens", src.page_tokens, dst.page_tokens));
  TE_RETURN_IF_ERROR(same("mla", src.mla, dst.mla));
  TE_RETURN_IF_ERROR(same("kv_heads", src.kv_heads, dst.kv_heads));
  TE_RETURN_IF_ERROR(same("head_dim", src.head_dim, dst.head_dim));
  TE_RETURN_IF_ERROR(same("dtype_bytes", src.dtype_bytes, dst.dtype_bytes));
  return Status::Ok();
}

}  // namespace te::kvcache
