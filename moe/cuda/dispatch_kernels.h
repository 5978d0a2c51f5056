// Kernels of the CUDA dispatch/combine path (cuda_ep_dispatcher.h): they move
// payloads between device tensors and the dispatcher's registered host
// buffers (mapped into the GPU), and talk to the host proxy through
// host-mapped flags. Launchers return cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace te::moe::cuda {

// Received payload -> expert buffers: bytes `src` of the receive region to
// `dst_data` of the expert data buffer, and the fp8 scales after it to
// `dst_scales` (in floats) of the expert scale buffer.
struct CopyOp {
  uint64_t src;
  uint64_t dst_data;
  uint64_t dst_scales;
};

// One local expert output row weighted into a partial: element offset into
// the expert output buffer, and the router weight.
struct RowTerm {
  uint64_t output;
  float weight;
  uint32_t pad;
};

// For every staging row r: the payload of token row_token[r] (token bytes,
// then scales) into the record at staging + r * record + payload_offset.
// token_bytes must be a multiple of 4.
cudaError_t LaunchGatherPayloads(const uint8_t* tokens, const float* scales, const uint32_t* row_token, uint32_t rows,
                                 uint8_t* staging, size_t record, size_t payload_offset, size_t token_bytes,
                                 uint32_t scale_count, cudaStream_t stream);

// *flag = value once all earlier work on the stream is visible to the host.
cudaError_t LaunchRaiseFlag(uint64_t* flag, uint64_t value, cudaStream_t stream);

// Holds the stream until the host raises *flag to >= value; after
// timeout_ns sets *timed_out = 1 and lets the stream go on.
cudaError_t LaunchAwaitFlag(const uint64_t* flag, uint64_t value, uint64_t timeout_ns, uint32_t* timed_out,
                            cudaStream_t stream);

// ops[0 .. *count): copy token_bytes (and scale_count floats) each.
cudaError_t LaunchScatterPayloads(const uint8_t* recv, const CopyOp* ops, const uint32_t* count, size_t token_bytes,
                                  uint32_t scale_count, uint8_t* expert_data, float* expert_scales, uint32_t max_ops,
                                  cudaStream_t stream);

// partial[q] = bf16(sum over terms[row_begin[q] .. row_begin[q + 1]) of
// weight x output), float accumulation in order, no fused multiply-add: the
// same bits as the host's ReduceRows.
cudaError_t LaunchReducePartials(const uint16_t* expert_outputs, const uint32_t* row_begin, const RowTerm* terms,
                                 uint32_t rows, uint32_t hidden, uint16_t* partials, cudaStream_t stream);

// out[t] = bf16(sum of rows[token_rows[token_row_begin[t] .. +1)]) in order.
cudaError_t LaunchSumPartials(const uint16_t* rows, const uint32_t* token_row_begin, const uint32_t* token_rows,
                              uint32_t tokens, uint32_t hidden, uint16_t* out, cudaStream_t stream);

}  // namespace te::moe::cuda
