// Backward kernels for head dims up to 128, bf16 and fp16 (the files compile in parallel).
#include "attention/cuda/backward.cuh"

namespace llmcore::attention::cuda {

#define LLMCORE_BWD_CONFIG 128, 64, 128, 8, 2  // kD, kBM, kBN, kWarps, kStages (BwdTraits)

template <>
std::string run_backward<__nv_bfloat16, 128>(const Params& p, cudaStream_t stream) {
  return launch_backward<__nv_bfloat16, LLMCORE_BWD_CONFIG>(p, stream);
}
template <>
std::string run_backward<__half, 128>(const Params& p, cudaStream_t stream) {
  return launch_backward<__half, LLMCORE_BWD_CONFIG>(p, stream);
}
template <>
int backward_smem_bytes<128>() {
  return BwdTraits<__nv_bfloat16, LLMCORE_BWD_CONFIG>::kSmem;
}

}  // namespace llmcore::attention::cuda
