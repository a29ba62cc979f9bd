#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian/Ubuntu packages daedalus builds with, and only those that are missing:
# cmake (3.25 or newer), g++, make, Eigen 3.4, doctest, Google Benchmark.
#   --ci  also what the quality gates of .ci/run need: clang-format, clang-tidy, and clang++ with
#         LLVM's OpenMP runtime (its Archer tool) and sanitizer runtimes for the TSan build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake g++ make libeigen3-dev doctest-dev libbenchmark-dev)
for arg in "$@"; do
  case "$arg" in
    --ci) packages+=(git clang clang-format clang-tidy libomp-dev libclang-rt-dev) ;;
    *)
      echo "install-deps: unknown argument '$arg'; expected --ci or nothing" >&2
      exit 2
      ;;
  esac
done

missing=()
for pkg in "${packages[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all present (${packages[*]})"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing ${missing[*]}, and apt-get is not available; install them by hand" >&2
  exit 1
fi

sudo=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
