#include "weightsync/model_spec.h"

#include <cctype>
#include <fstream>
#include <set>
#include <sstream>

#include "base/checked_math.h"

namespace te::weightsync {

size_t DTypeBytes(DType d) {
  switch (d) {
    case DType::kBf16:
    case DType::kFp16:
      return 2;
    case DType::kFp32:
      return 4;
    case DType::kFp8:
    case DType::kInt8:
      return 1;
  }
  return 1;
}

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kBf16:
      return "bf16";
    case DType::kFp16:
      return "fp16";
    case DType::kFp32:
      return "fp32";
    case DType::kFp8:
      return "fp8";
    case DType::kInt8:
      return "int8";
  }
  return "?";
}

Result<DType> ParseDType(const std::string& n) {
  for (DType d : {DType::kBf16, DType::kFp16, DType::kFp32, DType::kFp8, DType::kInt8})
    if (n == DTypeName(d)) return d;
  return InvalidArgument("dtype '" + n + "' is not one of bf16, fp16, fp32, fp8, int8");
}

uint64_t ParamSpec::elements() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

uint64_t ModelSpec::bytes() const {
  uint64_t b = 0;
  for (const auto& p : params) b += p.bytes();
  return b;
}

std::string ShapeString(const std::vector<uint64_t>& shape) {
  std::string o = "[";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? ", " : "") + std::to_string(shape[i]);
  return o + "]";
}

Status ModelSpec::Validate() const {
  if (params.empty()) return InvalidArgument("model has no parameters");
  std::set<std::string> names;
  uint64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamSpec& p = params[i];
    if (p.name.empty()) return InvalidArgument("parameter " + std::to_string(i) + " has no name");
    if (!names.insert(p.name).second) return InvalidArgument("parameter name '" + p.name + "' appears twice");
    if (p.shape.empty() || p.shape.size() > 8)
      return InvalidArgument("parameter '" + p.name + "' has " + std::to_string(p.shape.size()) +
                             " dimensions, outside [1, 8]");
    for (size_t d = 0; d < p.shape.size(); ++d)
      if (p.shape[d] == 0 || p.shape[d] > (uint64_t(1) << 40))
        return InvalidArgument("parameter '" + p.name + "' dimension " + std::to_string(d) + " is " +
                               std::to_string(p.shape[d]) + ", outside [1, 2^40]");
    // Shapes come from files: elements x dtype must not wrap, and neither
    // may the model's total (a 1T-parameter fp32 model is 4 TiB).
    uint64_t bytes = DTypeBytes(p.dtype);
    for (uint64_t dim : p.shape)
      if (!CheckedMul(bytes, dim, &bytes) || bytes > kMaxModelBytes)
        return InvalidArgument("parameter '" + p.name + "' holds more than " + std::to_string(kMaxModelBytes) +
                               " bytes (or its size overflows 64 bits)");
    if (!CheckedAdd(total, bytes, &total) || total > kMaxModelBytes)
      return InvalidArgument("model of more than " + std::to_string(kMaxModelBytes) + " bytes at parameter '" + p.name +
                             "'; the limit is 16 TiB");
  }
  return Status::Ok();
}

// ---- A small JSON reader: exactly the subset the model format needs ----
namespace {

class JsonReader {
 public:
  explicit JsonReader(const std::string& s) : s_(s) {}

  Status Model(ModelSpec* m) {
    TE_RETURN_IF_ERROR(Expect('{'));
    bool first = true;
    while (true) {
      Skip();
      if (Peek() == '}') {
        ++i_;
        break;
      }
      if (!first) TE_RETURN_IF_ERROR(Expect(','));
      first = false;
      std::string key;
      TE_RETURN_IF_ERROR(String(&key));
      TE_RETURN_IF_ERROR(Expect(':'));
      if (key == "params")
        TE_RETURN_IF_ERROR(Params(m));
      else
        TE_RETURN_IF_ERROR(SkipValue());
    }
    Skip();
    if (i_ != s_.size()) return Error("text after the model object");
    return Status::Ok();
  }

 private:
  Status Params(ModelSpec* m) {
    TE_RETURN_IF_ERROR(Expect('['));
    Skip();
    if (Peek() == ']') return ++i_, Status::Ok();
    while (true) {
      ParamSpec p;
      TE_RETURN_IF_ERROR(Param(&p));
      m->params.push_back(std::move(p));
      Skip();
      if (Peek() == ']') return ++i_, Status::Ok();
      TE_RETURN_IF_ERROR(Expect(','));
    }
  }
  Status Param(ParamSpec* p) {
    TE_RETURN_IF_ERROR(Expect('{'));
    bool first = true, have_dtype = false;
    while (true) {
      Skip();
      if (Peek() == '}') {
        ++i_;
        break;
      }
      if (!first) TE_RETURN_IF_ERROR(Expect(','));
      first = false;
      std::string key;
      TE_RETURN_IF_ERROR(String(&key));
      TE_RETURN_IF_ERROR(Expect(':'));
      if (key == "name") {
        TE_RETURN_IF_ERROR(String(&p->name));
      } else if (key == "dtype") {
        std::string d;
        TE_RETURN_IF_ERROR(String(&d));
        auto dt = ParseDType(d);
        if (!dt.ok()) return Error(dt.status().message());
        p->dtype = *dt;
        have_dtype = true;
      } else if (key == "shape") {
        TE_RETURN_IF_ERROR(Expect('['));
        Skip();
        if (Peek() == ']') {
          ++i_;
          continue;
        }
        while (true) {
          uint64_t v;
          TE_RETURN_IF_ERROR(Number(&v));
          p->shape.push_back(v);
          Skip();
          if (Peek() == ']') {
            ++i_;
            break;
          }
          TE_RETURN_IF_ERROR(Expect(','));
        }
      } else {
        TE_RETURN_IF_ERROR(SkipValue());
      }
    }
    if (!have_dtype) return Error("parameter '" + p->name + "' has no dtype");
    return Status::Ok();
  }
  Status String(std::string* out) {
    Skip();
    if (Peek() != '"') return Error("expected a string");
    ++i_;
    out->clear();
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\' && i_ + 1 < s_.size()) ++i_;
      out->push_back(s_[i_++]);
    }
    if (i_ >= s_.size()) return Error("unterminated string");
    ++i_;
    return Status::Ok();
  }
  Status Number(uint64_t* v) {
    Skip();
    if (!std::isdigit(static_cast<unsigned char>(Peek()))) return Error("expected a non-negative integer");
    *v = 0;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) {
      if (*v > (uint64_t(1) << 50)) return Error("number too large");
      *v = *v * 10 + uint64_t(s_[i_++] - '0');
    }
    return Status::Ok();
  }
  Status SkipValue() {
    Skip();
    char c = Peek();
    if (c == '"') {
      std::string ignored;
      return String(&ignored);
    }
    if (c == '{' || c == '[') {
      int depth = 0;
      bool in_string = false;
      for (; i_ < s_.size(); ++i_) {
        char x = s_[i_];
        if (in_string) {
          if (x == '\\')
            ++i_;
          else if (x == '"')
            in_string = false;
        } else if (x == '"')
          in_string = true;
        else if (x == '{' || x == '[')
          ++depth;
        else if ((x == '}' || x == ']') && --depth == 0)
          return ++i_, Status::Ok();
      }
      return Error("unterminated value");
    }
    while (i_ < s_.size() &&
           (std::isalnum(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.' || s_[i_] == '-' || s_[i_] == '+'))
      ++i_;
    return Status::Ok();
  }
  Status Expect(char c) {
    Skip();
    if (Peek() != c) return Error(std::string("expected '") + c + "'");
    ++i_;
    return Status::Ok();
  }
  void Skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  char Peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  Status Error(const std::string& what) const {
    return InvalidArgument("model JSON at byte " + std::to_string(i_) + ": " + what);
  }

  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace

Result<ModelSpec> ParseModelJson(const std::string& text) {
  ModelSpec m;
  JsonReader r(text);
  TE_RETURN_IF_ERROR(r.Model(&m));
  TE_RETURN_IF_ERROR(m.Validate());
  return m;
}

Result<ModelSpec> ReadModelJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot read model file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  auto m = ParseModelJson(ss.str());
  if (!m.ok()) return m.status().WithContext(path);
  return m;
}

std::string ModelToJson(const ModelSpec& model) {
  std::ostringstream o;
  o << "{\"params\": [\n";
  for (size_t i = 0; i < model.params.size(); ++i) {
    const auto& p = model.params[i];
    o << "  {\"name\": \"" << p.name << "\", \"dtype\": \"" << DTypeName(p.dtype) << "\", \"shape\": [";
    for (size_t d = 0; d < p.shape.size(); ++d) o << (d ? ", " : "") << p.shape[d];
    o << "]}" << (i + 1 < model.params.size() ? "," : "") << "\n";
  }
  o << "]}\n";
  return o.str();
}

Result<ModelSpec> ModelPreset(const std::string& name, uint64_t target_bytes) {
  ModelSpec m;
  auto add = [&](std::string n, DType d, std::vector<uint64_t> shape) {
    m.params.push_back({std::move(n), d, std::move(shape)});
  };
  if (name == "tiny") {
    add("embed", DType::kBf16, {50, 24});
    add("layer0.norm", DType::kFp32, {24});
    add("layer0.qkv", DType::kBf16, {72, 24});
    add("layer0.out", DType::kBf16, {24, 24});
    add("layer0.experts.up", DType::kBf16, {6, 13, 24});
    add("layer0.experts.down", DType::kBf16, {6, 24, 13});
    add("odd", DType::kFp8, {7, 5, 3});
    add("head", DType::kBf16, {50, 24});
    return m;
  }
  // One layer of each shape, then layers until the target size.
  const bool moe = name == "moe";
  if (!moe && name != "dense") return InvalidArgument("preset '" + name + "' is not one of moe, dense, tiny");
  // Dimensions grow with the target, so small targets still get several layers.
  const int tier = target_bytes >= (2ull << 30) ? 2 : target_bytes >= (256ull << 20) ? 1 : 0;
  const uint64_t H = (moe ? 512 : 1024) << tier, F = moe ? H / 2 : H * 11 / 4, E = moe ? 8u << tier : 0,
                 V = tier == 0 ? 4096 : 32000;
  auto layer_bytes = [&] {
    uint64_t attn = 4 * H * H * 2;
    return moe ? attn + E * H * 4 + 3 * E * F * H * 2 + 3 * F * H * 2 + 2 * H * 4 : attn + 3 * F * H * 2 + 2 * H * 4;
  }();
  const uint64_t fixed = 2 * V * H * 2;
  const uint64_t layers = std::max<uint64_t>(1, (target_bytes > fixed ? target_bytes - fixed : 0) / layer_bytes);
  add("embed_tokens", DType::kBf16, {V, H});
  for (uint64_t l = 0; l < layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "input_norm", DType::kFp32, {H});
    add(p + "attn.q_proj", DType::kBf16, {H, H});
    add(p + "attn.k_proj", DType::kBf16, {H, H});
    add(p + "attn.v_proj", DType::kBf16, {H, H});
    add(p + "attn.o_proj", DType::kBf16, {H, H});
    add(p + "post_norm", DType::kFp32, {H});
    if (moe) {
      add(p + "mlp.router", DType::kFp32, {E, H});
      add(p + "mlp.experts.gate_proj", DType::kBf16, {E, F, H});
      add(p + "mlp.experts.up_proj", DType::kBf16, {E, F, H});
      add(p + "mlp.experts.down_proj", DType::kBf16, {E, H, F});
      add(p + "mlp.shared.gate_proj", DType::kBf16, {F, H});
      add(p + "mlp.shared.up_proj", DType::kBf16, {F, H});
      add(p + "mlp.shared.down_proj", DType::kBf16, {H, F});
    } else {
      add(p + "mlp.gate_proj", DType::kBf16, {F, H});
      add(p + "mlp.up_proj", DType::kBf16, {F, H});
      add(p + "mlp.down_proj", DType::kBf16, {H, F});
    }
  }
  add("lm_head", DType::kBf16, {V, H});
  return m;
}

}  // namespace te::weightsync
