// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test kernel for atomics: many threads of many blocks update the same words.

#include <daedalus/cuda/platform.cuh>

namespace daedalus::testing::kernels {

/// For every element x[i] (one thread each, bounds-checked):
///   histogram[bin] += 1 with bin = floor((x + 1) / 2 · bins) clamped (atomicAdd on int);
///   *total += x (atomicAdd on float);
///   *max_key = max over i of keys[i] (atomicMax on int);
///   *claimed: the first thread to atomicCAS 0 -> i + 1 wins; claims[i] = 1 for that thread only.
__global__ void atomics(const float* x,   // [n]
                        const int* keys,  // [n]
                        int n, int bins,
                        int* histogram,  // [bins], zeroed
                        float* total,    // [1], zeroed
                        int* max_key,    // [1], holds INT_MIN
                        int* claimed,    // [1], zeroed
                        int* claims) {   // [n]
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  int bin = static_cast<int>((x[i] + 1.0f) * 0.5f * static_cast<float>(bins));
  bin = bin < 0 ? 0 : (bin >= bins ? bins - 1 : bin);
  atomicAdd(&histogram[bin], 1);
  atomicAdd(total, x[i]);
  atomicMax(max_key, keys[i]);
  claims[i] = atomicCAS(claimed, 0, i + 1) == 0 ? 1 : 0;
}

}  // namespace daedalus::testing::kernels
