// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <type_traits>

#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// The storage types device kernels read and write: fp32, bf16, fp16. Kernels widen them to fp32
/// and accumulate in fp32.
template <class T>
concept DeviceElement =
    std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

/// Widens a stored value to fp32 (exact).
template <DeviceElement T>
__host__ __device__ __forceinline__ float to_float(T value) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(value);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(value);
  } else {
    return value;
  }
}

/// Rounds an fp32 value to storage type T (round to nearest even).
template <DeviceElement T>
__host__ __device__ __forceinline__ T from_float(float value) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(value);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(value);
  } else {
    return value;
  }
}

}  // namespace daedalus::cuda
