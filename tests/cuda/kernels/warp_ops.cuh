// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test kernels for warp collectives: shuffles (idx, up, down, xor) and votes (ballot, any, all).

#include <daedalus/cuda/platform.cuh>

namespace daedalus::testing::kernels {

inline constexpr unsigned kFullMask = 0xffffffffu;

/// Per warp w (32 consecutive elements of x):
///   sums[w]          = Σ x over the warp, by a __shfl_down_sync tree (lane 0's value);
///   butterfly[32w+l] = the same sum as every lane sees it after a __shfl_xor_sync butterfly;
///   scan[32w+l]      = inclusive prefix sum x[32w] + ... + x[32w+l] (__shfl_up_sync);
///   broadcast[32w+l] = x[32w + (l * 7 + 3) % 32] (__shfl_sync from a computed lane);
///   ballot[w]        = bit l set iff x[32w+l] > 0; any_all[2w] = any x > 0.5, [2w+1] = all x >
///   -0.9.
/// One thread per element; the grid covers whole warps (n a multiple of 32).
__global__ void warp_ops(const float* x,    // [n]
                         float* sums,       // [n / 32]
                         float* butterfly,  // [n]
                         float* scan,       // [n]
                         float* broadcast,  // [n]
                         unsigned* ballot,  // [n / 32]
                         int* any_all,      // [2 * n / 32]
                         int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = i / 32;
  // Every lane of the warp takes part in every collective (n is a multiple of 32), so the
  // full mask is exact.
  const float v = i < n ? x[i] : 0.0f;

  float down = v;
  for (int offset = 16; offset > 0; offset /= 2) down += __shfl_down_sync(kFullMask, down, offset);

  float all = v;
  for (int mask = 1; mask < 32; mask *= 2) all += __shfl_xor_sync(kFullMask, all, mask);

  float prefix = v;
  for (int offset = 1; offset < 32; offset *= 2) {
    const float up = __shfl_up_sync(kFullMask, prefix, offset);
    if (lane >= offset) prefix += up;
  }

  const float picked = __shfl_sync(kFullMask, v, (lane * 7 + 3) % 32);
  const unsigned positive = __ballot_sync(kFullMask, v > 0.0f);
  const int any_large = __any_sync(kFullMask, v > 0.5f);
  const int all_above = __all_sync(kFullMask, v > -0.9f);

  if (i < n) {
    butterfly[i] = all;
    scan[i] = prefix;
    broadcast[i] = picked;
    if (lane == 0) {
      sums[warp] = down;
      ballot[warp] = positive;
      any_all[2 * warp] = any_large;
      any_all[2 * warp + 1] = all_above;
    }
  }
}

/// Sums 16-lane halves of each warp with __shfl_xor_sync of width 16 and mask per half:
/// half_sums[2w + h] = Σ x over lanes 16h..16h+15 of warp w. The two halves use different
/// masks, so they are independent groups.
__global__ void half_warp_sums(const float* x,    // [n]
                               float* half_sums,  // [n / 16]
                               int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  float sum = i < n ? x[i] : 0.0f;
  for (int mask = 1; mask < 16; mask *= 2) sum += __shfl_xor_sync(half_mask, sum, mask, 16);
  if (i < n && lane % 16 == 0) half_sums[i / 16] = sum;
}

/// For a 3-D block in a 2-D grid: out[2·t] = the thread's linear index in the grid, out[2·t + 1]
/// = the linear index (within the block) of lane 0 of its warp, read with __shfl_sync. Warps
/// are formed from the linear thread index x + y·Dx + z·Dx·Dy, x fastest.
__global__ void thread_layout(int* out) {  // [2 · total threads]
  const int in_block = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x +
                                        threadIdx.z * blockDim.x * blockDim.y);
  const int threads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  const int block = static_cast<int>(blockIdx.x + blockIdx.y * gridDim.x);
  const int t = block * threads + in_block;
  out[2 * t] = t;
  out[2 * t + 1] = __shfl_sync(kFullMask, in_block, 0);
}

}  // namespace daedalus::testing::kernels
