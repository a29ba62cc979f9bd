#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Copies the build's third-party dependencies (Eigen 3.4 and doctest headers, Google Benchmark's
# headers and shared library, with their CMake package files) from this machine's Debian packages
# (scripts/install-deps.sh) into one prefix, by default build/gpu-deps: for a GPU machine that has
# the CUDA toolkit but not these packages and cannot download them. bench/gpu/check.sh uses the
# prefix when it exists there (README, "GPU benchmarks").
#
# Usage: bench/gpu/stage-deps.sh [prefix]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
prefix="${1:-build/gpu-deps}"
multiarch="$(gcc -print-multiarch 2>/dev/null || true)"
multiarch="${multiarch:-x86_64-linux-gnu}"
libdir="/usr/lib/${multiarch}"

need() {
  local path
  for path in "$@"; do
    if [[ ! -e "${path}" ]]; then
      echo "stage-deps.sh: ${path} is missing; install the packages first (scripts/install-deps.sh)" >&2
      exit 1
    fi
  done
}
need /usr/include/eigen3/Eigen/Core /usr/share/eigen3/cmake/Eigen3Config.cmake \
  /usr/include/doctest/doctest.h /usr/lib/cmake/doctest/doctestConfig.cmake \
  /usr/include/benchmark/benchmark.h "${libdir}/cmake/benchmark/benchmarkConfig.cmake"

rm -rf "${prefix}"
mkdir -p "${prefix}/include" "${prefix}/share/eigen3" "${prefix}/lib/cmake" \
  "${prefix}/lib/${multiarch}/cmake"
# Each package's CMake files find their headers and libraries relative to their own location, so
# the same tree below any prefix works.
cp -a /usr/include/eigen3 "${prefix}/include/"
cp -a /usr/share/eigen3/cmake "${prefix}/share/eigen3/"
cp -a /usr/include/doctest "${prefix}/include/"
cp -a /usr/lib/cmake/doctest "${prefix}/lib/cmake/"
cp -a /usr/include/benchmark "${prefix}/include/"
cp -a "${libdir}"/libbenchmark* "${prefix}/lib/${multiarch}/"
cp -a "${libdir}/cmake/benchmark" "${prefix}/lib/${multiarch}/cmake/"

echo "stage-deps.sh: $(du -sh "${prefix}" | cut -f1) in ${prefix} (Eigen, doctest, Google Benchmark" \
  "for ${multiarch})"
