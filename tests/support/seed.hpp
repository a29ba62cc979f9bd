// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>

/// The seed every randomised test derives its data from: the value of the environment variable
/// DAEDALUS_SEED (a decimal unsigned 64-bit integer), or 20261128 when it is unset or empty.
/// tests/main.cpp prints it before any test runs, so a failing run can be repeated exactly with
/// `DAEDALUS_SEED=<printed value> ./daedalus_tests`. An unparsable DAEDALUS_SEED ends the run
/// with exit code 2 and a message, rather than silently testing with some other seed.
/// Defined in tests/main.cpp.
std::uint64_t daedalus_test_seed();
