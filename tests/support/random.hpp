// SPDX-License-Identifier: Apache-2.0
#pragma once

// Seeded random test data. Every test draws from its own stream: the run's seed
// (daedalus_test_seed(), printed by tests/main.cpp and settable with DAEDALUS_SEED) mixed with a
// per-test offset, so a failure repeats exactly and tests do not shift each other's data.
// Values are uniform and never exactly zero: a zero would hide a dropped term or a wrong index.

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "support/seed.hpp"

namespace daedalus::testing {

/// The seed of the stream with the given offset: splitmix64 of (run seed + offset), so nearby
/// offsets give unrelated streams.
inline std::uint64_t stream_seed(std::uint64_t offset) {
  std::uint64_t z = daedalus_test_seed() + offset * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A stream of uniform values. The conversion from bits is written out (not
/// std::uniform_real_distribution, whose output the standard leaves to the library), so the
/// data for a seed is the same with every compiler.
class Random {
 public:
  explicit Random(std::uint64_t offset) : engine_(stream_seed(offset)) {}

  /// One value uniform in [lo, hi], redrawn while it is exactly zero.
  double next(double lo, double hi) {
    for (;;) {
      const double u = double(engine_() >> 11) * 0x1p-53;  // [0, 1)
      const double v = lo + (hi - lo) * u;
      if (v != 0.0) return v;
    }
  }

  /// `n` floats uniform in [-scale, scale], none exactly zero.
  std::vector<float> uniform(std::size_t n, double scale = 1.0) {
    return uniform_in(n, -scale, scale);
  }

  /// `n` floats uniform in [lo, hi], none exactly zero.
  std::vector<float> uniform_in(std::size_t n, double lo, double hi) {
    std::vector<float> v(n);
    for (float& x : v) {
      do {
        x = static_cast<float>(next(lo, hi));
      } while (x == 0.0f);  // a tiny double may round to a zero float
    }
    return v;
  }

  /// An integer uniform in [lo, hi].
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {
    return lo + std::int64_t(engine_() % std::uint64_t(hi - lo + 1));
  }

 private:
  std::mt19937_64 engine_;
};

/// Widens floats to doubles (exactly) for the fp64 references.
inline std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

}  // namespace daedalus::testing
