#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Configures, builds everything (tests, benchmarks, examples) and runs the test suites.
# DAEDALUS_SEED=<n> reruns the host tests with the data seed a failing run printed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
cmake --workflow --preset test
