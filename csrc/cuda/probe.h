// The CUDA toolchain probe: a tiny kernel that proves nvcc, the static cudart and the
// module's link all work. The real CUDA kernels live in csrc/attention/cuda/.
#pragma once
#include <string>

namespace llmcore::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();
// cudart's version as reported by cudaRuntimeGetVersion (e.g. 13000).
int runtime_version();
// Runs y[i] = x[i] + 1 on device 0 for n elements and checks the result; returns "" on
// success, else the CUDA error text. Requires device_count() > 0.
std::string selftest(int n);

}  // namespace llmcore::cuda
