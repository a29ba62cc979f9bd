// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace daedalus {

namespace detail {

/// The value of every E4M3FN code (OCP FP8 specification): (-1)^s · 2^(e-7) · (1 + m/8) for
/// exponent field e > 0, (-1)^s · 2^-6 · m/8 for e = 0, NaN for S.1111.111.
constexpr std::array<float, 256> make_e4m3_values() {
  std::array<float, 256> values{};
  for (int code = 0; code < 256; ++code) {
    const int e = (code >> 3) & 0xf;
    const int m = code & 0x7;
    float magnitude;
    if (e == 0xf && m == 0x7) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else {
      magnitude = float(e == 0 ? m : 8 + m) * 0x1p-9f;  // value of the code at exponent field 1
      for (int k = 1; k < e; ++k) magnitude *= 2.0f;
    }
    values[std::size_t(code)] = (code & 0x80) ? -magnitude : magnitude;
  }
  return values;
}
inline constexpr std::array<float, 256> e4m3_values = make_e4m3_values();

}  // namespace detail

/// An 8-bit float in the OCP "E4M3FN" encoding (the `float8_e4m3fn` of PyTorch and FlashMLA's fp8
/// cache, CUDA's `__nv_fp8_e4m3`): 1 sign bit, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities; S.1111.111 is NaN; the largest finite magnitude is 1.75·2^8 = 448 and the smallest
/// subnormal 2^-9. Conversion is written out here (not taken from a GPU header) so the host can
/// produce and read the bytes that an fp8 kernel reads.
struct Fp8E4m3 {
  std::uint8_t bits = 0;

  static constexpr float max_finite = 448.0f;
  /// Half the distance between consecutive normal values relative to the value: 3 mantissa bits
  /// give a spacing of 2^-3 per binade, so rounding to nearest errs by at most 2^-4·|x|.
  static constexpr double unit_roundoff = 0x1p-4;
  /// Half the subnormal spacing (2^-9): the absolute rounding error of values below 2^-6.
  static constexpr double subnormal_half_spacing = 0x1p-10;

  /// Rounds `value` to the nearest e4m3 value, ties to even; magnitudes past 448 saturate to ±448
  /// (the encoding has no infinity; saturating is what FlashMLA's and PyTorch's scaled casts do
  /// after clamping). NaN maps to the NaN encoding; the caches reject NaN before converting.
  /// Branch-free, so a loop of conversions vectorises.
  static Fp8E4m3 from_float(float value) {
    const std::uint32_t sign = (std::bit_cast<std::uint32_t>(value) >> 24) & 0x80u;
    // std::min(NaN, 448) is NaN: a NaN keeps its (fp32) NaN bits here.
    const float magnitude = std::min(std::abs(value), max_finite);
    const std::uint32_t u = std::bit_cast<std::uint32_t>(magnitude);
    // Normal range [2^-6, 448]: keep the top 3 of fp32's 23 mantissa bits, rounding the 20
    // dropped ones to nearest even (adding 0x7ffff plus the kept lowest bit carries exactly when
    // the dropped part exceeds half, or equals half with an odd kept part); a carry out of the
    // mantissa moves into the exponent by itself. (u >> 20) is then the fp32 exponent (bias 127)
    // and 3 mantissa bits; rebiasing to 7 subtracts 120 << 3.
    const std::uint32_t rounded = u + 0x7ffffu + ((u >> 20) & 1u);
    const std::uint32_t normal = (rounded >> 20) - (120u << 3);
    // Subnormal range (below 2^-6, spacing 2^-9): adding 2^14, whose fp32 spacing is 2^-9,
    // rounds to a multiple of 2^-9, ties to even; subtracting it again is exact. 8 units is the
    // smallest normal, whose code (exponent field 1, mantissa 0) is also 8: no seam.
    const float small = magnitude < 0x1p-6f ? magnitude : 0.0f;
    const std::uint32_t subnormal = std::uint32_t(((small + 16384.0f) - 16384.0f) * 512.0f);
    std::uint32_t code = magnitude < 0x1p-6f ? subnormal : normal;
    code = u > 0x7f800000u ? 0x7fu : code;  // NaN
    return {static_cast<std::uint8_t>(sign | code)};
  }

  /// The exact value of the code as fp32 (every e4m3 value is an fp32 value).
  [[nodiscard]] float to_float() const { return detail::e4m3_values[bits]; }

  friend bool operator==(Fp8E4m3 a, Fp8E4m3 b) { return a.bits == b.bits; }
};

static_assert(sizeof(Fp8E4m3) == 1, "daedalus::Fp8E4m3 must be one byte: pools are byte arrays");

}  // namespace daedalus
