#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Static checks of the CUDA kernels that need no GPU. Every source in KERNEL_SOURCES is compiled
# for sm_80 and sm_90a to a cubin with `-Xptxas -v`; the check fails when
#   - ptxas reports local-memory spills (spill stores or loads) or a stack frame in any kernel, or
#   - the SASS (`cuobjdump -sass`) of any kernel whose name matches TENSOR_CORE_KERNELS contains
#     no tensor-core instruction (HMMA).
# Usage: scripts/cuda-static-check.sh [output-dir]      (default build/cuda-static-check)
# Environment: NVCC, CUOBJDUMP (default: from PATH, else next to nvcc, else installed; see below),
# EIGEN_INCLUDE_DIRS (':'-separated, default /usr/include/eigen3).
# Exit: 0 pass, 1 a kernel fails, 2 no nvcc, 77 local memory checked but no cuobjdump for SASS.
set -euo pipefail

# The output directory is taken relative to where the script is called from.
out_dir="${1:-$(dirname "${BASH_SOURCE[0]}")/../build/cuda-static-check}"
mkdir -p "${out_dir}"
out_dir="$(cd "${out_dir}" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# nvcc: $NVCC, PATH, /usr/local/cuda/bin.
if [[ -z "${NVCC:-}" ]]; then
  NVCC="$(command -v nvcc || true)"
  [[ -n "${NVCC}" ]] || NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ ! -x "${NVCC}" ]]; then
  echo "cuda-static-check: nvcc not found (set NVCC)" >&2
  exit 2
fi
nvcc_major="$("${NVCC}" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"

# cuobjdump (which needs nvdisasm): $CUOBJDUMP, PATH, next to nvcc, or the copies this script
# installed earlier. A toolkit installed without them (nvcc-only installs are common) gets the
# toolkit's own cuobjdump and nvdisasm of the same major version from PyPI, into a private
# virtual environment under the output directory.
tools_dir="${out_dir}/cuda-tools"
find_cuobjdump() {
  local candidate
  for candidate in "${CUOBJDUMP:-}" "$(command -v cuobjdump || true)" \
                   "$(dirname "${NVCC}")/cuobjdump" \
                   "${tools_dir}"/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump; do
    if [[ -n "${candidate}" && -x "${candidate}" ]]; then
      echo "${candidate}"
      return
    fi
  done
}
CUOBJDUMP="$(find_cuobjdump)"
if [[ -z "${CUOBJDUMP}" ]]; then
  echo "cuda-static-check: cuobjdump not found; installing nvidia-cuda-cuobjdump and" \
       "nvidia-cuda-nvdisasm ${nvcc_major}.x into ${tools_dir}"
  if python3 -m venv "${tools_dir}" >/dev/null &&
     "${tools_dir}/bin/pip" install --quiet --disable-pip-version-check \
       "nvidia-cuda-cuobjdump>=${nvcc_major},<$((nvcc_major + 1))" \
       "nvidia-cuda-nvdisasm>=${nvcc_major},<$((nvcc_major + 1))"; then
    CUOBJDUMP="$(find_cuobjdump)"
  fi
fi
if [[ -n "${CUOBJDUMP}" ]]; then
  # cuobjdump -sass runs nvdisasm, looked up next to it or on PATH.
  export PATH="$(dirname "${CUOBJDUMP}"):${PATH}"
fi

# Sources with explicit instantiations of the kernels to check, and a regex (on the mangled
# names) of the kernels that must use the tensor cores.
KERNEL_SOURCES=(tests/cuda/kernels/mma_gemm_instances.cu tests/cuda/kernels/absorbed_decode_instances.cu
                tests/cuda/kernels/grouped_experts_instances.cu)
TENSOR_CORE_KERNELS='mma_gemm|decode_attention|grouped_swiglu_gemm'
ARCHS=(sm_80 sm_90a)

# Eigen's headers (core/dtype.hpp): EIGEN_INCLUDE_DIRS (':'-separated; CTest passes the
# target's), else Debian's /usr/include/eigen3.
eigen_flags=()
IFS=':' read -r -a eigen_dirs <<<"${EIGEN_INCLUDE_DIRS:-/usr/include/eigen3}"
for dir in "${eigen_dirs[@]}"; do
  [[ -n "${dir}" ]] && eigen_flags+=(-isystem "${dir}")
done

failures=0
unchecked=0
for source in "${KERNEL_SOURCES[@]}"; do
  base="$(basename "${source}" .cu)"
  for arch in "${ARCHS[@]}"; do
    cubin="${out_dir}/${base}.${arch}.cubin"
    log="${out_dir}/${base}.${arch}.ptxas.txt"
    "${NVCC}" -std=c++20 -O3 -arch="${arch}" -cubin -Xptxas -v --expt-relaxed-constexpr \
      -Iinclude -Itests "${eigen_flags[@]}" -o "${cubin}" "${source}" 2>"${log}" || {
      cat "${log}" >&2
      echo "cuda-static-check: FAIL ${source} does not compile for ${arch}" >&2
      exit 1
    }
    # ptxas -v prints, per kernel: "Compiling entry function '<name>' for '<arch>'", then
    # "<n> bytes stack frame, <s> bytes spill stores, <l> bytes spill loads", then registers.
    report="$(awk '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); kernel = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ {
        for (i = 1; i <= NF; ++i) {
          if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = $i
          if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "stores") stores = $i
          if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "loads") loads = $i
        }
      }
      /Used [0-9]+ registers/ {
        match($0, /Used [0-9]+ registers/); registers = substr($0, RSTART + 5, RLENGTH - 15)
        if (kernel != "") print kernel, registers, stack + 0, stores + 0, loads + 0
        kernel = ""; stack = 0; stores = 0; loads = 0
      }' "${log}")"
    if [[ -z "${report}" ]]; then
      cat "${log}" >&2
      echo "cuda-static-check: FAIL no kernel found in the ptxas report of ${source} (${arch})" >&2
      exit 1
    fi
    sass=""
    if [[ -n "${CUOBJDUMP}" ]]; then
      sass="$("${CUOBJDUMP}" -sass "${cubin}")"
    fi
    while read -r kernel registers stack stores loads; do
      demangled="$(echo "${kernel}" | c++filt)"
      # HMMA lines of this kernel's SASS: from its "Function : <name>" header to the next one.
      hmma="$(awk -v k="${kernel}" '
        /Function :/ { inside = ($NF == k) }
        inside && /HMMA/ { ++n }
        END { print n + 0 }' <<<"${sass}")"
      status=ok
      if ((stores > 0 || loads > 0 || stack > 0)); then
        status="FAIL (local memory: ${stack} bytes stack frame, ${stores} bytes spill stores, ${loads} bytes spill loads)"
      elif [[ -z "${CUOBJDUMP}" ]]; then
        status="no SASS check (cuobjdump unavailable)"
        unchecked=$((unchecked + 1))
      elif [[ "${kernel}" =~ ${TENSOR_CORE_KERNELS} ]] && ((hmma == 0)); then
        status="FAIL (no HMMA instruction in the SASS)"
      fi
      printf '%-7s %-60s regs %3s  stack %s  spill %s/%s  HMMA %3s  %s\n' "${arch}" \
        "${demangled:0:60}" "${registers}" "${stack}" "${stores}" "${loads}" "${hmma}" "${status}"
      [[ "${status}" == ok || "${status}" == "no SASS check"* ]] || failures=$((failures + 1))
    done <<<"${report}"
  done
done

if ((failures > 0)); then
  echo "cuda-static-check: ${failures} kernel(s) failed" >&2
  exit 1
fi
if ((unchecked > 0)); then
  # 77: CTest's SKIP_RETURN_CODE for this test. The local-memory checks did run and pass.
  echo "cuda-static-check: no local memory in any kernel, but the SASS was NOT checked:" \
       "cuobjdump is unavailable and could not be installed" >&2
  exit 77
fi
echo "cuda-static-check: all kernels pass (no local memory, tensor-core instructions present)"
