// SPDX-License-Identifier: Apache-2.0
// A user's .cu file: the headers compile under nvcc, a kernel uses a device TensorView, and the
// program links against daedalus::cuda (cudart). The package test compiles and links it only, so
// no GPU is needed.
#include <cuda_runtime.h>

#include <cstdio>
#include <daedalus/daedalus.hpp>

__global__ void scale_kernel(daedalus::TensorView<float, 1, daedalus::DeviceMemory> values,
                             float factor) {
  const auto i = static_cast<daedalus::index_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < values.extent(0)) values(i) *= factor;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("consumer_cuda: no CUDA device\n");
    return 0;
  }
  float* data = nullptr;
  if (cudaMalloc(&data, 64 * sizeof(float)) != cudaSuccess) return 1;
  scale_kernel<<<1, 64>>>(daedalus::TensorView<float, 1, daedalus::DeviceMemory>(data, {64}), 2.0f);
  const cudaError_t status = cudaDeviceSynchronize();
  cudaFree(data);
  std::printf("consumer_cuda: kernel %s\n", cudaGetErrorString(status));
  return status == cudaSuccess ? 0 : 1;
}
