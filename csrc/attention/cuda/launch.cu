// Host side of the CUDA attention kernels: checks the call, fills the kernels' parameter
// block and picks the instantiation for the dtype and head-dim bucket (64, 128 or 256; a
// smaller head dim runs in the next bucket with zero-filled columns).
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/cuda/flash.h"
#include "attention/cuda/params.cuh"

namespace llmcore::attention::cuda {
namespace {

__global__ void probe_kernel() {}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("CUDA attention: " + what);
}

Strides strides(const TensorRef& t) { return {t.batch_stride, t.head_stride, t.seq_stride}; }

// Every row must start on a 16-byte boundary: the kernels copy 16 bytes at a time.
void require_aligned(const TensorRef& t, const char* name) {
  require(t.data != nullptr, std::string(name) + ": null data pointer");
  const bool ok = reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.batch_stride % 8 == 0 &&
                  t.head_stride % 8 == 0 && t.seq_stride % 8 == 0;
  require(ok, std::string(name) + ": data pointer and strides must be multiples of 16 bytes");
}

Params make_params(const Problem& pr, const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& o,
                   float* lse) {
  require(pr.dtype == DType::bf16 || pr.dtype == DType::f16, "dtype must be bfloat16 or float16");
  require(pr.mask_kind == MaskKind::none, "attention masks are not supported (key padding: use varlen)");
  require(pr.dropout_p == 0.f, "dropout is not supported");
  require(pr.head_dim > 0 && pr.head_dim <= 256 && pr.head_dim % 8 == 0,
          "head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(pr.head_dim));
  require(pr.head_dim_v > 0 && pr.head_dim_v <= 256 && pr.head_dim_v % 8 == 0,
          "head_dim_v must be a multiple of 8 in [8, 256], got " + std::to_string(pr.head_dim_v));
  require(pr.heads_q > 0 && pr.heads_kv > 0 && pr.heads_q % pr.heads_kv == 0,
          "heads_q must be a positive multiple of heads_kv");
  require(pr.batch > 0 && pr.batch <= 65535 && pr.heads_q <= 65535, "batch and heads must be in [1, 65535]");
  require(pr.len_q > 0 && pr.len_k > 0 && pr.len_q < INT_MAX / 2 && pr.len_k < INT_MAX / 2,
          "sequence lengths must be positive (empty problems are the caller's)");
  require((pr.cu_seqlens_q == nullptr) == (pr.cu_seqlens_k == nullptr), "give both cu_seqlens or neither");
  require(lse != nullptr, "lse: null data pointer");
  require_aligned(q, "q");
  require_aligned(k, "k");
  require_aligned(v, "v");
  require_aligned(o, "out");

  Params p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.o = o.data;
  p.q_s = strides(q);
  p.k_s = strides(k);
  p.v_s = strides(v);
  p.o_s = strides(o);
  p.lse = lse;
  p.cu_q = pr.cu_seqlens_q;
  p.cu_k = pr.cu_seqlens_k;
  const bool varlen = pr.cu_seqlens_q != nullptr;
  if (varlen) {
    require(pr.total_q > 0 && pr.total_k > 0, "varlen needs rows in q and k");
    p.q_s.batch = p.k_s.batch = p.v_s.batch = p.o_s.batch = 0;
    p.lse_s = {0, pr.total_q, 1};  // (Hq, total_q)
  } else {
    p.lse_s = {pr.heads_q * pr.len_q, pr.len_q, 1};  // (B, Hq, Lq)
  }
  p.total_q = pr.total_q;
  p.total_k = pr.total_k;
  p.batch = int(pr.batch);
  p.heads_q = int(pr.heads_q);
  p.heads_kv = int(pr.heads_kv);
  p.group = int(pr.heads_q / pr.heads_kv);
  p.len_q = int(pr.len_q);
  p.len_k = int(pr.len_k);
  p.d = int(pr.head_dim);
  p.dv = int(pr.head_dim_v);
  p.scale = pr.scale;
  p.scale_log2 = pr.scale * 1.4426950408889634f;
  p.causal = pr.causal;
  p.bottom_right = pr.causal_bottom_right;
  return p;
}

int bucket(const Params& p) {
  const int d = p.d > p.dv ? p.d : p.dv;
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

template <int D>
std::string run(const Params& p, DType dtype, bool fwd, cudaStream_t s) {
  if (dtype == DType::bf16) return fwd ? run_forward<__nv_bfloat16, D>(p, s) : run_backward<__nv_bfloat16, D>(p, s);
  return fwd ? run_forward<__half, D>(p, s) : run_backward<__half, D>(p, s);
}

void dispatch(const Params& p, DType dtype, bool fwd, uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  std::string err;
  switch (bucket(p)) {
    case 64: err = run<64>(p, dtype, fwd, s); break;
    case 128: err = run<128>(p, dtype, fwd, s); break;
    default: err = run<256>(p, dtype, fwd, s); break;
  }
  if (!err.empty()) throw std::runtime_error("CUDA attention: " + err);
}

}  // namespace

void forward(const ForwardArgs& a, uintptr_t stream) {
  const Params p = make_params(a.p, a.q, a.k, a.v, a.o, a.lse);
  dispatch(p, a.p.dtype, true, stream);
}

void backward(const BackwardArgs& a, float* dq_accum, float* delta, uintptr_t stream) {
  Params p = make_params(a.p, a.q, a.k, a.v, a.o, const_cast<float*>(a.lse));
  require(dq_accum != nullptr && delta != nullptr, "dq_accum and delta: null data pointer");
  require(reinterpret_cast<uintptr_t>(dq_accum) % 16 == 0, "dq_accum must be 16-byte aligned");
  require_aligned(a.dout, "grad_out");
  require_aligned(a.dq, "dq");
  require_aligned(a.dk, "dk");
  require_aligned(a.dv, "dv");
  p.dout = a.dout.data;
  p.dq = a.dq.data;
  p.dk = a.dk.data;
  p.dv_out = a.dv.data;
  p.do_s = strides(a.dout);
  p.dq_s = strides(a.dq);
  p.dk_s = strides(a.dk);
  p.dv_s = strides(a.dv);
  const int64_t hq = p.heads_q, d = p.d;
  if (p.cu_q != nullptr) {
    p.do_s.batch = p.dq_s.batch = p.dk_s.batch = p.dv_s.batch = 0;
    p.dqa_s = {0, d, hq * d};  // (total_q, Hq, D)
  } else {
    p.dqa_s = {hq * p.len_q * d, p.len_q * d, d};  // (B, Hq, Lq, D)
  }
  p.dq_accum = dq_accum;
  p.delta = delta;
  dispatch(p, a.p.dtype, false, stream);
}

int max_shared_memory_bytes() {
  int most = 0;
  for (int b : {forward_smem_bytes<64>(), forward_smem_bytes<128>(), forward_smem_bytes<256>(),
                backward_smem_bytes<64>(), backward_smem_bytes<128>(), backward_smem_bytes<256>()})
    most = b > most ? b : most;
  return most;
}

std::string device_support(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(err);
  }
  if (device < 0 || device >= count) return "CUDA device " + std::to_string(device) + " does not exist";
  int major = 0, minor = 0, smem = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  if (major < 8) return "compute capability " + cc + ": the CUDA attention kernels need 8.0 or newer";
  if (smem < max_shared_memory_bytes())
    return "compute capability " + cc + " allows " + std::to_string(smem) +
           " bytes of shared memory per block; the CUDA attention kernels need " +
           std::to_string(max_shared_memory_bytes());
  // Is there code for this device in the module (SASS for sm_80 / sm_90a, or PTX to JIT)?
  int current = 0;
  cudaGetDevice(&current);
  cudaSetDevice(device);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(probe_kernel));
  cudaSetDevice(current);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "compute capability " + cc + ": no kernel image for this device (" + cudaGetErrorString(err) + ")";
  }
  return "";
}

}  // namespace llmcore::attention::cuda
