#include <cuda_bf16.h>

#include "moe/cuda/dispatch_kernels.h"

namespace te::moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kMaxBlocks = 4096;

__device__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ float Bf16Bits(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }

__device__ uint16_t ToBf16Bits(float f) {
  __nv_bfloat16 b = __float2bfloat16_rn(f);
  return *reinterpret_cast<uint16_t*>(&b);
}

__global__ void GatherPayloads(const uint8_t* tokens, const float* scales, const uint32_t* row_token, uint32_t rows,
                               uint8_t* staging, size_t record, size_t payload_offset, size_t token_words,
                               uint32_t scale_count) {
  for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint32_t t = row_token[r];
    const uint32_t* src = reinterpret_cast<const uint32_t*>(tokens) + size_t(t) * token_words;
    uint32_t* dst = reinterpret_cast<uint32_t*>(staging + size_t(r) * record + payload_offset);
    for (size_t i = threadIdx.x; i < token_words; i += blockDim.x) dst[i] = src[i];
    float* dst_scales = reinterpret_cast<float*>(dst + token_words);
    for (uint32_t i = threadIdx.x; i < scale_count; i += blockDim.x)
      dst_scales[i] = scales[size_t(t) * scale_count + i];
  }
}

__global__ void RaiseFlag(volatile uint64_t* flag, uint64_t value) {
  __threadfence_system();
  *flag = value;
  __threadfence_system();
}

__global__ void AwaitFlag(const volatile uint64_t* flag, uint64_t value, uint64_t timeout_ns,
                          volatile uint32_t* timed_out) {
  const uint64_t start = GlobalTimerNs();
  while (*flag < value) {
    if (GlobalTimerNs() - start > timeout_ns) {
      *timed_out = 1;
      break;
    }
    __nanosleep(1000);
  }
  __threadfence_system();  // what the host wrote before the flag is visible after it
}

__global__ void ScatterPayloads(const uint8_t* recv, const CopyOp* ops, const volatile uint32_t* count,
                                size_t token_words, uint32_t scale_count, uint8_t* expert_data, float* expert_scales) {
  const uint32_t n = *count;
  for (uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
    const CopyOp op = ops[i];
    const uint32_t* src = reinterpret_cast<const uint32_t*>(recv + op.src);
    uint32_t* dst = reinterpret_cast<uint32_t*>(expert_data + op.dst_data);
    for (size_t j = threadIdx.x; j < token_words; j += blockDim.x) dst[j] = src[j];
    const float* src_scales = reinterpret_cast<const float*>(src + token_words);
    for (uint32_t j = threadIdx.x; j < scale_count; j += blockDim.x) expert_scales[op.dst_scales + j] = src_scales[j];
  }
}

__global__ void ReducePartials(const uint16_t* outputs, const uint32_t* row_begin, const RowTerm* terms, uint32_t rows,
                               uint32_t hidden, uint16_t* partials) {
  for (uint32_t q = blockIdx.x; q < rows; q += gridDim.x) {
    for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      float acc = 0.0f;
      for (uint32_t i = row_begin[q]; i < row_begin[q + 1]; ++i)
        acc = __fadd_rn(acc, __fmul_rn(terms[i].weight, Bf16Bits(outputs[terms[i].output + j])));
      partials[size_t(q) * hidden + j] = ToBf16Bits(acc);
    }
  }
}

__global__ void SumPartials(const uint16_t* rows, const uint32_t* token_row_begin, const uint32_t* token_rows,
                            uint32_t tokens, uint32_t hidden, uint16_t* out) {
  for (uint32_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      float acc = 0.0f;
      for (uint32_t i = token_row_begin[t]; i < token_row_begin[t + 1]; ++i)
        acc = __fadd_rn(acc, Bf16Bits(rows[size_t(token_rows[i]) * hidden + j]));
      out[size_t(t) * hidden + j] = ToBf16Bits(acc);
    }
  }
}

uint32_t Blocks(uint64_t n) { return uint32_t(n < kMaxBlocks ? (n ? n : 1) : kMaxBlocks); }

}  // namespace

cudaError_t LaunchGatherPayloads(const uint8_t* tokens, const float* scales, const uint32_t* row_token, uint32_t rows,
                                 uint8_t* staging, size_t record, size_t payload_offset, size_t token_bytes,
                                 uint32_t scale_count, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  GatherPayloads<<<Blocks(rows), kThreads, 0, stream>>>(tokens, scales, row_token, rows, staging, record,
                                                        payload_offset, token_bytes / 4, scale_count);
  return cudaGetLastError();
}

cudaError_t LaunchRaiseFlag(uint64_t* flag, uint64_t value, cudaStream_t stream) {
  RaiseFlag<<<1, 1, 0, stream>>>(flag, value);
  return cudaGetLastError();
}

cudaError_t LaunchAwaitFlag(const uint64_t* flag, uint64_t value, uint64_t timeout_ns, uint32_t* timed_out,
                            cudaStream_t stream) {
  AwaitFlag<<<1, 1, 0, stream>>>(flag, value, timeout_ns, timed_out);
  return cudaGetLastError();
}

cudaError_t LaunchScatterPayloads(const uint8_t* recv, const CopyOp* ops, const uint32_t* count, size_t token_bytes,
                                  uint32_t scale_count, uint8_t* expert_data, float* expert_scales, uint32_t max_ops,
                                  cudaStream_t stream) {
  ScatterPayloads<<<Blocks(max_ops), kThreads, 0, stream>>>(recv, ops, count, token_bytes / 4, scale_count, expert_data,
                                                            expert_scales);
  return cudaGetLastError();
}

cudaError_t LaunchReducePartials(const uint16_t* expert_outputs, const uint32_t* row_begin, const RowTerm* terms,
                                 uint32_t rows, uint32_t hidden, uint16_t* partials, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ReducePartials<<<Blocks(rows), kThreads, 0, stream>>>(expert_outputs, row_begin, terms, rows, hidden, partials);
  return cudaGetLastError();
}

cudaError_t LaunchSumPartials(const uint16_t* rows, const uint32_t* token_row_begin, const uint32_t* token_rows,
                              uint32_t tokens, uint32_t hidden, uint16_t* out, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  SumPartials<<<Blocks(tokens), kThreads, 0, stream>>>(rows, token_row_begin, token_rows, tokens, hidden, out);
  return cudaGetLastError();
}

}  // namespace te::moe::cuda
