// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "daedalus/core/dtype.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus::mla::detail {

/// Returns `rows × width` cached values as fp32: the cache itself when it stores fp32, otherwise
/// a widened copy in `scratch`. Kernels accumulate in fp32 whatever the storage type.
inline const float* widen_latent_rows(const float* src, index_t, index_t, std::vector<float>&) {
  return src;
}

/// bf16 → fp32 is exact: the 16 bits are the high half of the fp32 pattern, so a shift widens
/// them (and the loop vectorises, unlike a per-element conversion call).
inline const float* widen_latent_rows(const bfloat16* src, index_t rows, index_t width,
                                      std::vector<float>& scratch) {
  const std::size_t n = std::size_t(rows * width);
  if (scratch.size() < n) scratch.resize(n);
  const auto* bits = reinterpret_cast<const std::uint16_t*>(src);
  float* dst = scratch.data();
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t wide = std::uint32_t(bits[i]) << 16;
    std::memcpy(dst + i, &wide, sizeof wide);
  }
  return dst;
}

/// fp16 → fp32 is exact; Eigen's conversion uses F16C where the target has it.
inline const float* widen_latent_rows(const half* src, index_t rows, index_t width,
                                      std::vector<float>& scratch) {
  const std::size_t n = std::size_t(rows * width);
  if (scratch.size() < n) scratch.resize(n);
  for (std::size_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
  return scratch.data();
}

}  // namespace daedalus::mla::detail
