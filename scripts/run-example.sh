#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds and runs the MLA decode example (examples/01_mla_decode). Extra arguments go to it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
cmake --workflow --preset example
./build/release/example_mla_decode "$@"
