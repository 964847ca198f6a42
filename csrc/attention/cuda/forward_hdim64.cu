// Forward kernels for head dims up to 64, bf16 and fp16 (the files compile in parallel).
#include "attention/cuda/forward.cuh"

namespace llmcore::attention::cuda {

#define LLMCORE_FWD_CONFIG 64, 128, 64, 4  // kD, kBM, kBN, kWarps (FwdTraits)

template <>
std::string run_forward<__nv_bfloat16, 64>(const Params& p, cudaStream_t stream) {
  return launch_forward<__nv_bfloat16, LLMCORE_FWD_CONFIG>(p, stream);
}
template <>
std::string run_forward<__half, 64>(const Params& p, cudaStream_t stream) {
  return launch_forward<__half, LLMCORE_FWD_CONFIG>(p, stream);
}
template <>
int forward_smem_bytes<64>() {
  return FwdTraits<__nv_bfloat16, LLMCORE_FWD_CONFIG>::kSmem;
}

}  // namespace llmcore::attention::cuda
