// SPDX-License-Identifier: Apache-2.0
// The entry point of daedalus_tests: prints the data seed, then hands the command line to doctest
// (so every doctest option works: -tc="name", -ts="suite", --success, -d, ...).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "support/seed.hpp"

namespace {

constexpr std::uint64_t kDefaultSeed = 20261128;
constexpr const char* kSeedVariable = "DAEDALUS_SEED";

/// Reads DAEDALUS_SEED; exits with code 2 when it is set but is not a decimal unsigned 64-bit
/// integer (a typo must not silently run the suite with some other seed).
std::uint64_t read_seed() {
  const char* text = std::getenv(kSeedVariable);
  if (text == nullptr || *text == '\0') return kDefaultSeed;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || text[0] == '+') {
    std::fprintf(
        stderr,
        "daedalus_tests: %s is '%s'; expected a decimal integer in [0, 18446744073709551615]\n",
        kSeedVariable, text);
    std::exit(2);
  }
  return static_cast<std::uint64_t>(value);
}

}  // namespace

std::uint64_t daedalus_test_seed() {
  static const std::uint64_t seed = read_seed();
  return seed;
}

int main(int argc, char** argv) {
  const std::uint64_t seed = daedalus_test_seed();
  const bool from_env =
      std::getenv(kSeedVariable) != nullptr && *std::getenv(kSeedVariable) != '\0';
  std::printf("daedalus_tests: seed %llu (%s; repeat with %s=%llu)\n",
              static_cast<unsigned long long>(seed), from_env ? "from DAEDALUS_SEED" : "default",
              kSeedVariable, static_cast<unsigned long long>(seed));
  std::fflush(stdout);

  doctest::Context context(argc, argv);
  return context.run();
}
