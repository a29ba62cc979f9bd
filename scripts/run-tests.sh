#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Configures, builds everything (tests, benchmarks, examples) and runs the test suites.
# DAEDALUS_SEED=<n> reruns the host tests with the data seed a failing run printed.
# DAEDALUS_TEST_PRESET=<workflow> picks another workflow preset (default "test"; .ci/run uses "ci",
# the same suites with every quality gate of the build on).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
cmake --workflow --preset "${DAEDALUS_TEST_PRESET:-test}"
