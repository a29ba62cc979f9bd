// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>
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

/// 16 bytes, copied as one vector load or store (16-byte aligned addresses only).
struct alignas(16) Bytes16 {
  std::uint32_t word[4];
};

namespace detail {

/// Stores two 16-bit elements packed in one register (low half first) at `p`, 4-byte aligned.
/// On the device one 32-bit store; a host compiler (the emulation) copies the bytes, which
/// strict aliasing allows.
template <class Element>
__device__ __forceinline__ void store_pair(Element* p, std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<std::uint32_t*>(p) = bits;
#else
  std::memcpy(static_cast<void*>(p), &bits, sizeof(bits));
#endif
}

/// Stores 16 bytes at `p` (16-byte aligned): one vector store on the device, a byte copy on the
/// host, as store_pair.
template <class Element>
__device__ __forceinline__ void store_16(Element* p, const Bytes16& bytes) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Bytes16*>(p) = bytes;
#else
  std::memcpy(static_cast<void*>(p), &bytes, sizeof(bytes));
#endif
}

}  // namespace detail

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
