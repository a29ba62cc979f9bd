// SPDX-License-Identifier: Apache-2.0
// The entry point of daedalus_tests (and of daedalus_emulated_tests): prints the data seed, then
// hands the command line to doctest (so every doctest option works: -tc="name", -ts="suite",
// --success, -d, ...).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstddef>
#include <string_view>

#include "support/seed_main.hpp"

int main(int argc, char** argv) {
  // Messages name the binary (daedalus_tests or daedalus_emulated_tests).
  if (argc > 0) {
    const std::size_t slash = std::string_view(argv[0]).find_last_of('/');
    daedalus::testing::test_binary_name() =
        slash == std::string_view::npos ? argv[0] : argv[0] + slash + 1;
  }
  daedalus::testing::print_seed();
  doctest::Context context(argc, argv);
  return context.run();
}
