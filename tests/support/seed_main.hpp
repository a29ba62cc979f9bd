// SPDX-License-Identifier: Apache-2.0
#pragma once

// What the entry points of the test binaries (tests/main.cpp, tests/cuda/main.cpp) share: reading
// DAEDALUS_SEED once, and the line that tells how to repeat a run. Included by exactly one
// translation unit of each binary; it defines daedalus_test_seed() (support/seed.hpp).

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "support/seed.hpp"

namespace daedalus::testing {

inline constexpr std::uint64_t kDefaultSeed = 20261128;
inline constexpr const char* kSeedVariable = "DAEDALUS_SEED";

/// The name the binary's messages start with; each main sets it before anything else.
inline const char*& test_binary_name() {
  static const char* name = "daedalus_tests";
  return name;
}

/// Reads DAEDALUS_SEED; exits with code 2 when it is set but is not a decimal unsigned 64-bit
/// integer (a typo must not silently run the suite with some other seed).
inline std::uint64_t read_seed() {
  const char* text = std::getenv(kSeedVariable);
  if (text == nullptr || *text == '\0') return kDefaultSeed;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || text[0] == '+') {
    std::fprintf(stderr,
                 "%s: %s is '%s'; expected a decimal integer in [0, 18446744073709551615]\n",
                 test_binary_name(), kSeedVariable, text);
    std::exit(2);
  }
  return static_cast<std::uint64_t>(value);
}

/// Prints the seed and how to repeat the run with it.
inline void print_seed() {
  const std::uint64_t seed = daedalus_test_seed();
  const char* text = std::getenv(kSeedVariable);
  const bool from_env = text != nullptr && *text != '\0';
  std::printf("%s: seed %llu (%s; repeat with %s=%llu)\n", test_binary_name(),
              static_cast<unsigned long long>(seed), from_env ? "from DAEDALUS_SEED" : "default",
              kSeedVariable, static_cast<unsigned long long>(seed));
  std::fflush(stdout);
}

}  // namespace daedalus::testing

std::uint64_t daedalus_test_seed() {
  static const std::uint64_t seed = daedalus::testing::read_seed();
  return seed;
}
