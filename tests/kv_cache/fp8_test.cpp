// SPDX-License-Identifier: Apache-2.0
// Fp8E4m3: the decoding of all 256 codes against the format's definition, and rounding of fp32
// values (random, ties, subnormals, saturation, NaN) against a brute-force nearest-value search
// over every finite code, written independently of the bit manipulation in kv_cache/fp8.hpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <daedalus/daedalus.hpp>
#include <limits>
#include <vector>

#include "support/random.hpp"

namespace {

using daedalus::Fp8E4m3;
using daedalus::testing::Random;

/// The value of an E4M3FN code by the OCP FP8 specification, in double: (-1)^s · 2^(e-7) ·
/// (1 + m/8) for e > 0, (-1)^s · 2^-6 · (m/8) for e = 0; e = 15, m = 7 is NaN.
double reference_value(int code) {
  const int s = (code >> 7) & 1, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -magnitude : magnitude;
}

/// Round to nearest, ties to the code with an even mantissa, saturating at ±448: a search over
/// the 126 finite non-negative codes. Signed zero keeps its sign.
int reference_round(double x) {
  const bool negative = std::signbit(x);
  const double a = std::abs(x);
  if (a >= 448.0) return (negative ? 0x80 : 0) | 0x7e;
  int best = 0;
  double best_error = INFINITY;
  for (int code = 0; code <= 0x7e; ++code) {
    const double error = std::abs(reference_value(code) - a);
    if (error < best_error || (error == best_error && (code & 1) == 0)) {
      best = code;
      best_error = error;
    }
  }
  return (negative ? 0x80 : 0) | best;
}

}  // namespace

TEST_CASE("Fp8E4m3: every code decodes to its value by the OCP E4M3FN definition") {
  for (int code = 0; code < 256; ++code) {
    const float got = Fp8E4m3{std::uint8_t(code)}.to_float();
    const double expected = reference_value(code);
    if (std::isnan(expected)) {
      CHECK(std::isnan(got));
    } else {
      CAPTURE(code);
      CHECK(double(got) == expected);
    }
  }
  CHECK(Fp8E4m3{0x7e}.to_float() == 448.0f);
  CHECK(Fp8E4m3{0x01}.to_float() == 0x1p-9f);
  CHECK(Fp8E4m3{0x08}.to_float() == 0x1p-6f);
}

TEST_CASE("Fp8E4m3: every finite code round-trips exactly through fp32") {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;  // NaN
    const Fp8E4m3 value{std::uint8_t(code)};
    CAPTURE(code);
    CHECK(Fp8E4m3::from_float(value.to_float()).bits == code);
  }
}

TEST_CASE("Fp8E4m3: ties between neighbouring codes go to the even mantissa") {
  for (int code = 0; code < 0x7e; ++code) {
    // The midpoint of two neighbouring finite codes is exact in fp32 (it needs 5 significant
    // bits) and must round to the one of the two with the even mantissa.
    const double midpoint = 0.5 * (reference_value(code) + reference_value(code + 1));
    const int expected = (code & 1) == 0 ? code : code + 1;
    CAPTURE(code);
    CHECK(Fp8E4m3::from_float(float(midpoint)).bits == expected);
    CHECK(Fp8E4m3::from_float(float(-midpoint)).bits == (expected | 0x80));
    CHECK(reference_round(midpoint) == expected);
  }
}

TEST_CASE("Fp8E4m3: random fp32 values round like the nearest-value search") {
  Random random(801);
  int checked = 0;
  for (int i = 0; i < 20000; ++i) {
    // Magnitudes spread over 2^-14 .. 2^10: subnormals, every binade, past the saturation point.
    const double exponent = random.next(-14.0, 10.0);
    const double sign = random.next(-1.0, 1.0) < 0 ? -1.0 : 1.0;
    const float x = float(sign * std::exp2(exponent));
    CAPTURE(x);
    REQUIRE(Fp8E4m3::from_float(x).bits == reference_round(double(x)));
    ++checked;
  }
  CHECK(checked == 20000);
}

TEST_CASE("Fp8E4m3: saturation to ±448, zeros, the smallest values and NaN") {
  CHECK(Fp8E4m3::from_float(448.0f).bits == 0x7e);
  CHECK(Fp8E4m3::from_float(463.9f).bits == 0x7e);
  CHECK(Fp8E4m3::from_float(1e30f).bits == 0x7e);
  CHECK(Fp8E4m3::from_float(-1e30f).bits == 0xfe);
  CHECK(Fp8E4m3::from_float(std::numeric_limits<float>::infinity()).bits == 0x7e);
  CHECK(Fp8E4m3::from_float(0.0f).bits == 0x00);
  CHECK(Fp8E4m3::from_float(-0.0f).bits == 0x80);
  CHECK(Fp8E4m3::from_float(0x1p-10f).bits == 0x00);         // half the smallest: tie to 0
  CHECK(Fp8E4m3::from_float(0x1.0001p-10f).bits == 0x01);    // just past half: up
  CHECK(Fp8E4m3::from_float(3.0f * 0x1p-10f).bits == 0x02);  // 1.5 units: tie to even 2
  CHECK(Fp8E4m3::from_float(std::numeric_limits<float>::denorm_min()).bits == 0x00);
  CHECK((Fp8E4m3::from_float(std::numeric_limits<float>::quiet_NaN()).bits & 0x7f) == 0x7f);
  CHECK(std::isnan(Fp8E4m3::from_float(std::numeric_limits<float>::quiet_NaN()).to_float()));
}
