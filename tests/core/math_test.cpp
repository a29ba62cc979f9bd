// SPDX-License-Identifier: Apache-2.0
// core/math.hpp: exp_f32 and sigmoid_f32 against the fp64 functions of the C library, over
// their whole useful range, and at their edges (NaN, overflow, underflow).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/core/math.hpp>
#include <limits>

namespace {

/// |a - b| in units of the last place of fp32 at b (b a double, rounded to fp32's exponent).
double ulps(float a, double b) {
  const double ulp = std::ldexp(1.0, std::ilogb(b) - 23);
  return std::fabs(double(a) - b) / ulp;
}

}  // namespace

TEST_CASE("exp_f32 is within 2 ulp of exp over [-87, 88.37]") {
  double worst = 0.0;
  float worst_x = 0.0f;
  // A dense sweep (step 1/4096 through every binade's share) plus every 64th float of [-1, 1].
  for (double x = -87.0; x <= 88.37; x += 1.0 / 4096.0) {
    const float xf = float(x);
    const double e = ulps(daedalus::detail::exp_f32(xf), std::exp(double(xf)));
    if (e > worst) {
      worst = e;
      worst_x = xf;
    }
  }
  for (float x = -1.0f; x <= 1.0f; x = std::nextafter(x, 2.0f)) {
    const double e = ulps(daedalus::detail::exp_f32(x), std::exp(double(x)));
    if (e > worst) {
      worst = e;
      worst_x = x;
    }
    for (int skip = 0; skip < 63; ++skip) x = std::nextafter(x, 2.0f);
  }
  CAPTURE(worst_x);
  CHECK(worst <= 2.0);
  CHECK(daedalus::detail::exp_f32(0.0f) == 1.0f);
}

TEST_CASE("exp_f32 and sigmoid_f32 at the edges") {
  using daedalus::detail::exp_f32;
  using daedalus::detail::sigmoid_f32;
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(std::isnan(exp_f32(std::nanf(""))));
  CHECK(exp_f32(inf) == inf);
  CHECK(exp_f32(89.0f) == inf);
  CHECK(exp_f32(-inf) == 0.0f);
  CHECK(exp_f32(-90.0f) == 0.0f);
  CHECK(std::isfinite(exp_f32(88.37f)));
  CHECK(sigmoid_f32(-inf) == 0.0f);
  CHECK(sigmoid_f32(inf) == 1.0f);
  CHECK(sigmoid_f32(0.0f) == 0.5f);
  CHECK(std::isnan(sigmoid_f32(std::nanf(""))));
}

TEST_CASE("sigmoid_f32 is within 3 ulp of 1 / (1 + e^-x) over [-40, 40]") {
  double worst = 0.0;
  for (double x = -40.0; x <= 40.0; x += 1.0 / 1024.0) {
    const float xf = float(x);
    const double want = 1.0 / (1.0 + std::exp(-double(xf)));
    worst = std::max(worst, ulps(daedalus::detail::sigmoid_f32(xf), want));
  }
  CHECK(worst <= 3.0);
}
