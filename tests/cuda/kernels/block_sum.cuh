// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test kernels: element-wise addition and a per-block sum through static shared memory. The
// same source compiles with nvcc and with a host compiler against the CUDA emulation layer.

#include <daedalus/cuda/platform.cuh>
#include <daedalus/cuda/shared_memory.cuh>

namespace daedalus::testing::kernels {

/// c = a + b over n elements; one thread per element, bounds-checked.
__global__ void vector_add(const float* a,  // [n]
                           const float* b,  // [n]
                           float* c,        // [n]
                           int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) c[i] = a[i] + b[i];
}

/// block_sums[blockIdx.x] = the sum of the block's grid-stride share of x: each thread sums its
/// elements, then the block reduces the kThreads partial sums as a tree in static shared memory.
/// kSynchronised = false leaves out the barriers between the tree's levels: the kernel a test
/// uses to show that the emulation catches a missing __syncthreads.
template <int kThreads, bool kSynchronised>
__global__ void __launch_bounds__(kThreads) block_sum(const float* x,  // [n]
                                                      int n,
                                                      float* block_sums) {  // [gridDim.x]
  static_assert((kThreads & (kThreads - 1)) == 0, "block_sum: kThreads must be a power of two");
  __shared__ float partial[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  float sum = 0.0f;
  for (int i = static_cast<int>(blockIdx.x) * kThreads + tid; i < n;
       i += static_cast<int>(gridDim.x) * kThreads) {
    sum += x[i];
  }
  partial[tid] = sum;
  if constexpr (kSynchronised) __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    if constexpr (kSynchronised) __syncthreads();
  }
  if (tid == 0) block_sums[blockIdx.x] = partial[0];
}

/// out[i] = in[n - 1 - i] through dynamic shared memory of n floats (one block): every thread
/// stores a strided share, then after the barrier loads another thread's share.
__global__ void reverse_through_shared(const float* in,  // [n]
                                       float* out,       // [n]
                                       int n) {
  float* staged = daedalus::cuda::dynamic_shared_memory<float>();  // [n]
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  for (int i = tid; i < n; i += threads) staged[i] = in[i];
  __syncthreads();
  for (int i = tid; i < n; i += threads) out[i] = staged[n - 1 - i];
}

}  // namespace daedalus::testing::kernels
