// ModelSpec: the parameters a weight update moves (name, dtype, shape), from
// a JSON description or a built-in preset.
//
// JSON: {"params": [{"name": "layers.0.attn.q", "dtype": "bf16",
//                    "shape": [4096, 4096]}, ...]}
// dtypes: bf16, fp16, fp32, fp8 (one byte, e4m3), int8.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::weightsync {

enum class DType : uint8_t { kBf16, kFp16, kFp32, kFp8, kInt8 };
size_t DTypeBytes(DType d);
const char* DTypeName(DType d);
// "[4096, 7168]": a shape as errors name it.
std::string ShapeString(const std::vector<uint64_t>& shape);
Result<DType> ParseDType(const std::string& name);

struct ParamSpec {
  std::string name;
  DType dtype = DType::kBf16;
  std::vector<uint64_t> shape;
  uint64_t elements() const;
  uint64_t bytes() const { return elements() * DTypeBytes(dtype); }
};

struct ModelSpec {
  std::vector<ParamSpec> params;
  uint64_t bytes() const;
  // Names unique and present, shapes of 1 to 8 positive dimensions, every
  // size and the total at most kMaxModelBytes.
  Status Validate() const;
};

// The largest model a spec may describe: 16 TiB.
inline constexpr uint64_t kMaxModelBytes = uint64_t(1) << 44;

Result<ModelSpec> ParseModelJson(const std::string& text);
Result<ModelSpec> ReadModelJson(const std::string& path);
std::string ModelToJson(const ModelSpec& model);

// Built-in shapes:
//   "moe" — a DeepSeek-like MoE parameter list (attention, router, stacked
//           experts per layer, shared expert, embeddings), scaled to about
//           `target_bytes`: hidden size and experts grow in three tiers
//           (below 256 MiB, below 2 GiB, above), then layers fill the rest;
//   "dense" — a Llama-like dense list, scaled the same way;
//   "tiny" — a few odd-shaped tensors for tests.
Result<ModelSpec> ModelPreset(const std::string& name, uint64_t target_bytes);

}  // namespace te::weightsync
