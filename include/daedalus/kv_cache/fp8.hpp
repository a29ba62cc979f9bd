// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "daedalus/core/macros.hpp"

namespace daedalus {

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
  static Fp8E4m3 from_float(float value) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(value);
    const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return {static_cast<std::uint8_t>(sign | 0x7fu)};  // NaN
    const float magnitude = std::bit_cast<float>(u);
    if (magnitude >= max_finite) return {static_cast<std::uint8_t>(sign | 0x7eu)};  // ±448
    const int exponent = int(u >> 23) - 127;
    if (exponent < -6) {
      // Subnormal range (below 2^-6): the value in units of 2^-9 is exact in fp32 (a power-of-two
      // scaling); round it to an integer, ties to even. 8 units is the smallest normal, whose
      // code (exponent field 1, mantissa 0) is also 8, so the codes run on without a seam.
      const float units = magnitude * 512.0f;
      float whole = std::floor(units);
      const float fraction = units - whole;
      if (fraction > 0.5f || (fraction == 0.5f && std::fmod(whole, 2.0f) != 0.0f)) whole += 1.0f;
      return {static_cast<std::uint8_t>(sign | static_cast<std::uint8_t>(whole))};
    }
    // Normal: keep the top 3 of fp32's 23 mantissa bits, rounding the 20 dropped ones to nearest
    // even; a carry out of the mantissa moves to the next binade.
    std::uint32_t mantissa = (u & 0x7fffffu) >> 20;
    const std::uint32_t dropped = u & 0xfffffu;
    int biased = exponent + 7;
    if (dropped > 0x80000u || (dropped == 0x80000u && (mantissa & 1u))) ++mantissa;
    if (mantissa == 8u) {
      mantissa = 0;
      ++biased;
    }
    // magnitude < 448 rounds to at most 448 = S.1111.110, never to the NaN code.
    return {static_cast<std::uint8_t>(sign | (std::uint32_t(biased) << 3) | mantissa)};
  }

  /// The exact value of the code as fp32 (every e4m3 value is an fp32 value).
  [[nodiscard]] float to_float() const {
    const int exponent_field = (bits >> 3) & 0xf;
    const int mantissa = bits & 0x7;
    float magnitude;
    if (exponent_field == 0xf && mantissa == 0x7) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent_field == 0) {
      magnitude = std::ldexp(float(mantissa), -9);
    } else {
      magnitude = std::ldexp(float(8 + mantissa), exponent_field - 10);
    }
    return (bits & 0x80) ? -magnitude : magnitude;
  }

  friend bool operator==(Fp8E4m3 a, Fp8E4m3 b) { return a.bits == b.bits; }
};

static_assert(sizeof(Fp8E4m3) == 1, "daedalus::Fp8E4m3 must be one byte: pools are byte arrays");

}  // namespace daedalus
