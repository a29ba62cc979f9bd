// SPDX-License-Identifier: Apache-2.0
#pragma once

// Tolerances of the host tests, one per storage type and kind of comparison, each with the
// reason it has the value it has. The unit roundoffs are written out here rather than taken from
// daedalus's StorageTraits, so that a wrong trait is caught (tests/core/backend_test.cpp compares).
//
// Every comparison uses the same error measure, `row_relative_error`: for each row (one token's
// output, one cache row, ...) the largest absolute difference divided by the largest magnitude of
// the expected row, then the maximum over rows. Relative to the row, not per element: elements
// near zero carry absolute errors of the size of the row's rounding, not of their own size, and
// a per-row measure still catches a single wrong token.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <daedalus/core/dtype.hpp>
#include <type_traits>

namespace daedalus::testing::tolerance {

/// Unit roundoffs u (half the gap from 1 to the next value): rounding x changes it by ≤ u·|x|.
inline constexpr double fp32_u = 0x1p-24;  // 24 significant bits
inline constexpr double bf16_u = 0x1p-8;   // 8 significant bits
inline constexpr double fp16_u = 0x1p-11;  // 11 significant bits

/// fp32 kernels against the fp64 reference, for a computation whose longest fp32 accumulation
/// (a dot product, a softmax sum, a weighted sum of values) has K terms. A K-term fp32 sum of
/// independent rounding errors is within about √K·u of the exact value relative to the sum of
/// the magnitudes of its terms (Higham & Mary, "A new approach to probabilistic rounding error
/// analysis", SISC 2019; the worst case is K·u, Higham's γ_K). With random-signed data a result
/// is √K times smaller than that sum of magnitudes, so relative to the result the error is
/// about K·u per accumulation. An MLA layer chains four of them (projection, score, value sum,
/// output projection) plus a softmax whose exp and normalisation add a few u: 4·K·u. This sits
/// well above the rounding actually seen (≤ ~2e-6 for every config here) and well below the
/// effect of any real bug (a wrong scale, frequency band, mask, layout or norm gives ≥ 1e-2).
constexpr double fp32_vs_reference(std::int64_t accumulation_length) {
  return 4.0 * double(accumulation_length) * fp32_u;
}

/// Two fp32 paths that compute the same quantity with different summation orders (naive vs
/// absorbed, chunked vs one-shot, 1 vs 2 threads, decode vs prefill): each is within
/// fp32_vs_reference(K) of the exact value, so they are within twice that of each other.
constexpr double fp32_vs_fp32(std::int64_t accumulation_length) {
  return 2.0 * fp32_vs_reference(accumulation_length);
}

/// Storing an fp32 value in a cache of type T and reading it back: |read - x| ≤ relative·|x| +
/// absolute. fp32 is stored as is (0). bf16 has fp32's exponent range, so every test value is
/// normal and the bound is u_bf16 = 2^-8. fp16 values below 2^-14 are subnormal, with a fixed
/// spacing of 2^-24: rounding them errs by up to 2^-25 absolutely, on top of u_fp16 = 2^-11.
struct RoundTrip {
  double relative;
  double absolute;
};
template <class T>
constexpr RoundTrip round_trip() {
  if constexpr (std::is_same_v<T, float>)
    return {0.0, 0.0};
  else if constexpr (std::is_same_v<T, daedalus::bfloat16>)
    return {bf16_u, 0.0};
  else if constexpr (std::is_same_v<T, daedalus::half>)
    return {fp16_u, 0x1p-25};
  else
    static_assert(!sizeof(T), "tolerance::round_trip: no tolerance for this storage type");
}

/// An MLA layer's output computed from a cache of type T against the same computation from an
/// fp32 cache. Every cached value (latent c and k_pe) carries a relative error ≤ u_T. The values
/// (the first kv_lora_rank columns) enter the output linearly and contribute about u_T; but the
/// scores q·[c; k_pe]·scale shift too, and when the softmax spreads over n random values the
/// output is about √n smaller than each value while the shift of the weights is not, so the
/// relative effect grows past u_T. The fp64 reference fed with bf16-rounded rows shows up to
/// 3.6·u_T on Tiny (150 tokens, over seeds 1-11) and about 1·u_T on V2-Lite (40 tokens). 8·u_T
/// therefore only catches gross misreads (wrong bits, wrong widening); the tight check of a
/// low-precision cache is against the fp64 reference fed with the rows the cache actually
/// holds, within fp32_vs_reference (tests/mla/forward_consistency_test.cpp).
template <class T>
constexpr double cache_effect() {
  if constexpr (std::is_same_v<T, float>)
    return 0.0;
  else if constexpr (std::is_same_v<T, daedalus::bfloat16>)
    return 8.0 * bf16_u;
  else if constexpr (std::is_same_v<T, daedalus::half>)
    return 8.0 * fp16_u;
  else
    static_assert(!sizeof(T), "tolerance::cache_effect: no tolerance for this storage type");
}

/// max over rows of (max_j |got[j] - expected[j]| / max_j |expected[j]|) for rows of
/// `row_width` elements. Both ranges need size() and operator[] convertible to double.
template <class Got, class Expected>
double row_relative_error(const Got& got, const Expected& expected, std::size_t row_width) {
  double worst = 0.0;
  const std::size_t n = std::size_t(expected.size());
  if (std::size_t(got.size()) != n || row_width == 0) return INFINITY;
  for (std::size_t r0 = 0; r0 < n; r0 += row_width) {
    double err = 0.0, mag = 0.0;
    for (std::size_t i = r0; i < std::min(n, r0 + row_width); ++i) {
      const double g = static_cast<double>(got[i]);
      const double e = static_cast<double>(expected[i]);
      if (!std::isfinite(g)) return INFINITY;
      err = std::max(err, std::abs(g - e));
      mag = std::max(mag, std::abs(e));
    }
    worst = std::max(worst, mag > 0.0 ? err / mag : err);
  }
  return worst;
}

}  // namespace daedalus::testing::tolerance
