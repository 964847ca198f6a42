#include <cuda_runtime.h>

#include <vector>

#include "cuda/probe.h"

namespace llmcore::cuda {
namespace {

__global__ void add_one(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i] + 1.f;
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

std::string selftest(int n) {
  std::vector<float> host(n), out(n);
  for (int i = 0; i < n; ++i) host[i] = float(i);
  float *x = nullptr, *y = nullptr;
  cudaError_t err = cudaMalloc(&x, n * sizeof(float));
  if (err == cudaSuccess) err = cudaMalloc(&y, n * sizeof(float));
  if (err == cudaSuccess) err = cudaMemcpy(x, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  if (err == cudaSuccess) {
    add_one<<<(n + 255) / 256, 256>>>(x, y, n);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) err = cudaMemcpy(out.data(), y, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(x);
  cudaFree(y);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  for (int i = 0; i < n; ++i)
    if (out[i] != host[i] + 1.f) return "wrong result from the probe kernel";
  return "";
}

}  // namespace llmcore::cuda
