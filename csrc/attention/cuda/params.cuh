// The parameter block every attention kernel receives by value (kernel parameter space).
// Strides are in elements. Varlen problems have batch strides of 0 and address rows through
// cu_seqlens (tile_math.h: seq_span); dense ones have cu_q == cu_k == nullptr.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace llmcore::attention::cuda {

struct Strides {
  int64_t batch = 0, head = 0, row = 0;
};

struct Params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;  // forward output; the backward reads it
  Strides q_s, k_s, v_s, o_s;
  float* lse = nullptr;  // base-2 logsumexp; row stride 1
  Strides lse_s;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  int batch = 0, heads_q = 0, heads_kv = 0, group = 1;
  int len_q = 0, len_k = 0;  // per sequence; the maxima for varlen
  int d = 0, dv = 0;         // head dims of q/k and of v/o (multiples of 8)
  float scale = 1.f;         // softmax scale
  float scale_log2 = 1.f;    // scale * log2(e)
  bool causal = false;
  bool bottom_right = false;
  // backward only
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv_out = nullptr;
  Strides do_s, dq_s, dk_s, dv_s;
  float* dq_accum = nullptr;
  Strides dqa_s;
  float* delta = nullptr;  // rowsum(dO * O), laid out as lse
};

// Launchers, specialized per (dtype, head-dim bucket 64 / 128 / 256) in forward_hdim*.cu and
// backward_hdim*.cu. They return "" or a CUDA error.
template <class T, int kHeadDim>
std::string run_forward(const Params& p, cudaStream_t stream);
template <class T, int kHeadDim>
std::string run_backward(const Params& p, cudaStream_t stream);
template <int kHeadDim>
int forward_smem_bytes();
template <int kHeadDim>
int backward_smem_bytes();

#define LLMCORE_DECLARE_ATTENTION_KERNELS(D)                                           \
  template <>                                                                          \
  std::string run_forward<__nv_bfloat16, D>(const Params& p, cudaStream_t stream);    \
  template <>                                                                          \
  std::string run_forward<__half, D>(const Params& p, cudaStream_t stream);           \
  template <>                                                                          \
  std::string run_backward<__nv_bfloat16, D>(const Params& p, cudaStream_t stream);   \
  template <>                                                                          \
  std::string run_backward<__half, D>(const Params& p, cudaStream_t stream);          \
  template <>                                                                          \
  int forward_smem_bytes<D>();                                                         \
  template <>                                                                          \
  int backward_smem_bytes<D>();
LLMCORE_DECLARE_ATTENTION_KERNELS(64)
LLMCORE_DECLARE_ATTENTION_KERNELS(128)
LLMCORE_DECLARE_ATTENTION_KERNELS(256)
#undef LLMCORE_DECLARE_ATTENTION_KERNELS

// Raises a kernel's dynamic shared memory limit to `bytes`, once per device (`done` is the
// kernel's bit set of devices already raised).
inline cudaError_t allow_smem(const void* kernel, int bytes, std::atomic<uint64_t>& done) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

inline std::string error_text(cudaError_t err, const char* what) {
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace llmcore::attention::cuda
