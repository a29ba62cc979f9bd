#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fails when a C++ or CUDA source in the tree is not formatted as .clang-format says (clang-format
# --dry-run -Werror); prints each offending place. Fix with: clang-format -i <file>.
# Files: those git tracks or would add (untracked, not ignored); without git, every such file
# outside build/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

patterns=('*.hpp' '*.cpp' '*.h' '*.cc' '*.cu' '*.cuh')
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files --cached --others --exclude-standard -- "${patterns[@]}")
else
  mapfile -t files < <(find . -path ./build -prune -o -type f \( -name '*.hpp' -o -name '*.cpp' \
    -o -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \) -print | sed 's|^\./||')
fi
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check-format: no C++ sources found" >&2
  exit 1
fi
clang-format --dry-run -Werror "${files[@]}"
echo "check-format: ${#files[@]} files formatted as .clang-format says ($(clang-format --version))"
