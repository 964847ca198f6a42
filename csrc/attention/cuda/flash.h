// Host entry points of the CUDA attention kernels (FlashAttention-2 algorithm, mma.sync
// tensor cores). Plain C++: the bindings include this without CUDA headers.
//
// Same parameters and layouts as the CPU kernels (attention/attention.h), with these limits:
// bf16 or fp16; head dims at most 256 and multiples of 8; every row start 16-byte aligned
// (the Python launcher pads and copies to guarantee it); no attention mask and no dropout
// (masks of key padding are expressed through varlen). Pointers are device pointers, the
// cu_seqlens too; kernels are queued on `stream` (a cudaStream_t passed as an integer) of the
// current device and nothing here synchronizes.
//
// The backward needs two fp32 scratch buffers the caller allocates:
//   dq_accum  zero-filled, laid out as q with head_dim columns: (B, Hq, Lq, D) contiguous, or
//             (total_q, Hq, D) contiguous for varlen;
//   delta     laid out as lse: (B, Hq, Lq) or (Hq, total_q).
#pragma once
#include <cstdint>
#include <string>

#include "attention/attention.h"

namespace llmcore::attention::cuda {

// Queue the kernels. Bad arguments throw std::invalid_argument (nothing is launched); a CUDA
// error at launch throws std::runtime_error. Errors inside a kernel surface at the next sync.
void forward(const ForwardArgs& args, uintptr_t stream);
void backward(const BackwardArgs& args, float* dq_accum, float* delta, uintptr_t stream);

// "" when the kernels can run on `device`, else why not (compute capability, shared memory).
std::string device_support(int device);

// The most dynamic shared memory any of the kernels asks for, in bytes.
int max_shared_memory_bytes();

}  // namespace llmcore::attention::cuda
