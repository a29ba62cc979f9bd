// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/core/dtype.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus::mla::detail {

/// Widens `n` stored values to fp32 at `dst`. Kernels accumulate in fp32 whatever the storage.
inline void widen_latent_values(const float* src, index_t n, float* dst) {
  std::memcpy(dst, src, sizeof(float) * std::size_t(n));
}

/// bf16 → fp32 is exact: the 16 bits are the high half of the fp32 pattern, so a shift widens
/// them (and the loop vectorises, unlike a per-element conversion call).
inline void widen_latent_values(const bfloat16* src, index_t n, float* dst) {
  const auto* bits = reinterpret_cast<const std::uint16_t*>(src);
  for (index_t i = 0; i < n; ++i) {
    const std::uint32_t wide = std::uint32_t(bits[i]) << 16;
    std::memcpy(dst + i, &wide, sizeof wide);
  }
}

/// fp16 → fp32 is exact; with AVX-512, 16 values per `vcvtph2ps`, else Eigen's conversion
/// (F16C where the target has it) one value at a time.
inline void widen_latent_values(const half* src, index_t n, float* dst) {
  index_t vector_end = 0;
#if defined(__AVX512F__)
  vector_end = n - n % 16;
  for (index_t i = 0; i < vector_end; i += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(bits));
  }
#endif
  for (index_t i = vector_end; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

/// Returns `rows × width` cached values as fp32: the cache itself when it stores fp32, otherwise
/// a widened copy in `scratch`.
inline const float* widen_latent_rows(const float* src, index_t, index_t, std::vector<float>&) {
  return src;
}

template <class Storage>
inline const float* widen_latent_rows(const Storage* src, index_t rows, index_t width,
                                      std::vector<float>& scratch) {
  const std::size_t n = std::size_t(rows * width);
  if (scratch.size() < n) scratch.resize(n);
  widen_latent_values(src, index_t(n), scratch.data());
  return scratch.data();
}

}  // namespace daedalus::mla::detail
