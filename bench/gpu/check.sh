#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The GPU check (the MLA decode and MoE targets), in one call on a machine with an NVIDIA GPU
# (Hopper: sm_90a), the CUDA toolkit and PyTorch, in under 6 minutes:
#
#   env        the GPU, driver, clocks, toolkit and PyTorch versions
#   configure  Release, CUDA on, CMAKE_CUDA_ARCHITECTURES=90a (build/gpu)
#   build      daedalus_cuda_tests, bench_cuda_mla_decode and bench_cuda_moe only, 16 jobs
#   tests      daedalus_cuda_tests (the device test cases)
#   bench      bench_cuda_mla_decode on FlashMLA's grid, roofs measured in the same run (JSON)
#   moe-bench  bench_cuda_moe: the V3 gate at 1-65536 tokens, plan, dispatch + combine at 4096 x
#              7168, the V2-Lite MoE layer at 1-4096 tokens (JSON)
#   torch      bench/gpu/torch_mla_decode.py, the PyTorch bf16 baseline on the same shapes (JSON)
#   moe-torch  bench/compare/torch_moe.py --device cuda, the PyTorch gate, dispatch + combine and
#              expert loop on the MoE benchmark's shapes (JSON)
#   memcheck   compute-sanitizer --tool memcheck on daedalus_cuda_tests, when the tool is there;
#              last, so that when time runs short it is the step the budget cuts
#   table      bench/gpu/table.py: one table, the MLA decode and MoE targets evaluated
#
# Every step runs under `timeout`, capped by its own limit and by what is left of the whole
# budget (DAEDALUS_GPU_BUDGET seconds, default 330, so that a step killed 5 s after its cap still
# leaves the table time inside 6 minutes); a step that fails or runs out of time is
# reported and the next ones still run; the table prints whatever exists. Exit status: 0 when
# every step passed, else 1.
#
# Outputs under ${OUT:-build/gpu-check}: check.log (every step's output), steps.tsv, env.txt,
# bench.json, torch.json, moe_bench.json, moe_torch.json, memcheck.log, table.md (nine files).
#
# Dependencies: a machine without Eigen 3.4, doctest and Google Benchmark uses the prefix that
# bench/gpu/stage-deps.sh makes (DAEDALUS_GPU_DEPS, default build/gpu-deps) when it exists.
# Environment: DAEDALUS_GPU_BUILD (build directory, default build/gpu), DAEDALUS_GPU_BUDGET,
# DAEDALUS_BENCH_REPETITIONS (default 5), DAEDALUS_BENCH_ITERATIONS (calls per repetition,
# default 10), DAEDALUS_GPU_JOBS (build jobs, default 16), PYTHON (default python3).
#
# The step functions below run through step(), in a child shell: shellcheck cannot see the calls.
# shellcheck disable=SC2317
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

out="${OUT:-build/gpu-check}"
mkdir -p "${out}"
out="$(cd "${out}" && pwd)"
build="${DAEDALUS_GPU_BUILD:-build/gpu}"
deps="${DAEDALUS_GPU_DEPS:-build/gpu-deps}"
budget="${DAEDALUS_GPU_BUDGET:-330}"
repetitions="${DAEDALUS_BENCH_REPETITIONS:-5}"
python="${PYTHON:-python3}"
jobs="${DAEDALUS_GPU_JOBS:-16}"
export DAEDALUS_BENCH_ITERATIONS="${DAEDALUS_BENCH_ITERATIONS:-10}"
export PYTHONUNBUFFERED=1

log="${out}/check.log"
steps="${out}/steps.tsv"
: >"${log}"
: >"${steps}"
rm -f "${out}/bench.json" "${out}/torch.json" "${out}/moe_bench.json" "${out}/moe_torch.json" \
  "${out}/table.md" "${out}/env.txt" "${out}/memcheck.log"
scratch="$(mktemp -d)"
trap 'rm -rf "${scratch}"' EXIT

start=${SECONDS}
failed=0

# step NAME CAP RESERVE COMMAND...: runs COMMAND under `timeout`, for at most CAP seconds and at
# most what is left of the budget once RESERVE percent of it is kept for the steps after it. Output
# goes to the terminal and check.log; the outcome goes to steps.tsv. Never fails the script.
step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local left=$((budget - (SECONDS - start) - budget * reserve / 100))
  ((cap <= left)) || cap=${left}
  if ((cap < 5)); then
    printf '%s\tSKIPPED\t0\tno time left in the %s s budget\n' "${name}" "${budget}" >>"${steps}"
    echo "=== check.sh: ${name}: skipped, no time left" | tee -a "${log}"
    failed=1
    return 0
  fi
  echo "=== check.sh: ${name} (at most ${cap} s): $*" | tee -a "${log}"
  local began=${SECONDS} status=0
  set +e
  # bash -c so that COMMAND may be one of the functions below (exported to the child shell).
  # The step's own cap, for a step that stops itself first (memcheck).
  export DAEDALUS_STEP_CAP=${cap}
  timeout --kill-after=5 "${cap}" bash -c '"$@"' "${name}" "$@" 2>&1 |
    tee "${scratch}/${name}.log"
  status=${PIPESTATUS[0]}
  set -e
  cat "${scratch}/${name}.log" >>"${log}"
  local took=$((SECONDS - began)) outcome note=""
  case ${status} in
    0) outcome=ok ;;
    77) outcome=SKIPPED note="no CUDA device answered (exit 77)" failed=1 ;;
    78) outcome=SKIPPED note="tool not found" ;;
    79) outcome=PARTIAL note="stopped at its time limit before the end, no error reported" ;;
    124 | 137) outcome="TIMED OUT" note="stopped at ${cap} s" failed=1 ;;
    *) outcome=FAILED note="exit ${status}" failed=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "${name}" "${outcome}" "${took}" "${note}" >>"${steps}"
  echo "=== check.sh: ${name}: ${outcome} after ${took} s ${note}" | tee -a "${log}"
  return 0
}

# A step that did not run because an earlier one failed.
not_run() {
  printf '%s\tNOT RUN\t0\t%s\n' "$1" "$2" >>"${steps}"
  echo "=== check.sh: $1: not run ($2)" | tee -a "${log}"
  failed=1
}

environment() {
  date -u '+date: %Y-%m-%dT%H:%M:%SZ'
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git metadata)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv || echo "nvidia-smi failed"
  nvcc --version 2>/dev/null | tail -n 2 ||
    /usr/local/cuda/bin/nvcc --version | tail -n 2 || echo "nvcc not found"
  cmake --version | head -n 1
  g++ --version | head -n 1
  "${python}" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' ||
    echo "PyTorch not importable by ${python}"
}
environment_to_file() { environment | tee "${out}/env.txt"; }

configure() {
  local -a args=(-S . -B "${build}" -DCMAKE_BUILD_TYPE=Release -DDAEDALUS_ENABLE_CUDA=ON
    -DCMAKE_CUDA_ARCHITECTURES=90a -DDAEDALUS_BUILD_EXAMPLES=OFF)
  command -v ninja >/dev/null && args+=(-G Ninja)
  if [[ -d "${deps}" ]]; then
    local root benchmark_dir
    root="$(cd "${deps}" && pwd)"
    benchmark_dir="$(echo "${root}"/lib/*/cmake/benchmark)"
    echo "check.sh: Eigen, doctest and Google Benchmark from ${root}"
    args+=("-DEigen3_DIR=${root}/share/eigen3/cmake" "-Ddoctest_DIR=${root}/lib/cmake/doctest"
      "-Dbenchmark_DIR=${benchmark_dir}")
  fi
  cmake "${args[@]}"
}

build_targets() {
  # Keep going past a failed target, so that the other one is still built.
  local -a keep_going=(-k)
  [[ -f "${build}/build.ninja" ]] && keep_going=(-k 0)
  local status=0
  cmake --build "${build}" -j "${jobs}" --target daedalus_cuda_tests bench_cuda_mla_decode \
    bench_cuda_moe -- "${keep_going[@]}" || status=$?
  # Libraries staged from another distribution (stage-deps.sh) may not load here: say which
  # binary misses what now, rather than as a bare loader error in a later step.
  local binary
  for binary in daedalus_cuda_tests bench_cuda_mla_decode bench_cuda_moe; do
    [[ -x "${build}/${binary}" ]] || continue
    if ldd "${build}/${binary}" | grep -q 'not found'; then
      echo "check.sh: ${binary} cannot load:"
      ldd "${build}/${binary}" | grep 'not found'
      status=1
    fi
  done
  return "${status}"
}

run_bench() {
  "${build}/bench_cuda_mla_decode" --benchmark_repetitions="${repetitions}" \
    --benchmark_display_aggregates_only=true --benchmark_out="${out}/bench.json" \
    --benchmark_out_format=json
}

run_moe_bench() {
  "${build}/bench_cuda_moe" --benchmark_repetitions="${repetitions}" \
    --benchmark_display_aggregates_only=true --benchmark_out="${out}/moe_bench.json" \
    --benchmark_out_format=json
}

run_memcheck() {
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || true)"
  [[ -n "${sanitizer}" ]] || sanitizer=/usr/local/cuda/bin/compute-sanitizer
  if [[ ! -x "${sanitizer}" ]]; then
    echo "check.sh: compute-sanitizer not found; memcheck not run"
    return 78
  fi
  # The error-path test provokes failing API calls on purpose (a 2^62-byte cudaMalloc, a launch
  # of 2048 threads per block): they are not memory errors, so API errors are not reported. The
  # full-shape cases (the 400-step balancing simulation, 8K and 4K contexts, 128 heads) would
  # not finish under instrumentation; every kernel family still runs in the smaller cases.
  local status limit=$((DAEDALUS_STEP_CAP - 5))
  timeout "${limit}" "${sanitizer}" --tool memcheck --report-api-errors no --error-exitcode 1 \
    --leak-check no "${build}/daedalus_cuda_tests" \
    -tce='*full shape*,*long contexts*,*DeepSeek-V3 (128 heads)*' |
    tee "${out}/memcheck.log"
  status=${PIPESTATUS[0]}
  # Stopped by the time limit: partial, unless an error was reported before that.
  if ((status == 124)); then
    if grep -qE '^========= (Invalid|Program hit|Error)' "${out}/memcheck.log"; then return 1; fi
    return 79
  fi
  return "${status}"
}

export out build deps repetitions python jobs
export -f environment environment_to_file configure build_targets run_bench run_moe_bench \
  run_memcheck

# The share of the budget (percent) kept back for what follows each step, with the default 330 s:
# about 150 s after the build for the tests, the benchmarks and their baselines; the table's few
# seconds after the rest.
step env 20 95 environment_to_file
step configure 60 78 configure
if grep -q $'^configure\tok' "${steps}"; then
  step build 200 44 build_targets
else
  not_run build "configure failed"
fi
if [[ -x "${build}/daedalus_cuda_tests" ]]; then
  step tests 60 37 "${build}/daedalus_cuda_tests"
else
  not_run tests "daedalus_cuda_tests was not built"
fi
if [[ -x "${build}/bench_cuda_mla_decode" ]]; then
  step bench 100 25 run_bench
else
  not_run bench "bench_cuda_mla_decode was not built"
fi
if [[ -x "${build}/bench_cuda_moe" ]]; then
  step moe-bench 60 17 run_moe_bench
else
  not_run moe-bench "bench_cuda_moe was not built"
fi
step torch 60 9 "${python}" bench/gpu/torch_mla_decode.py --runs 10 --warmup 3 \
  --json "${out}/torch.json"
step moe-torch 50 2 "${python}" bench/compare/torch_moe.py --device cuda --runs 10 --warmup 3 \
  --budget 1 --json "${out}/moe_torch.json"
if [[ -x "${build}/daedalus_cuda_tests" ]]; then
  step memcheck 120 2 run_memcheck
else
  not_run memcheck "daedalus_cuda_tests was not built"
fi

echo "=== check.sh: table ($((SECONDS - start)) s so far) ===" | tee -a "${log}"
set +e
"${python}" bench/gpu/table.py --steps "${steps}" --bench "${out}/bench.json" \
  --torch "${out}/torch.json" --moe-bench "${out}/moe_bench.json" \
  --moe-torch "${out}/moe_torch.json" >"${out}/table.md" 2>>"${log}"
table_status=$?
set -e
tee -a "${log}" <"${out}/table.md"
# table.py exits 3 when a target is missed: that is a result, not a failure of the check.
if ((table_status != 0 && table_status != 3)); then
  echo "check.sh: table.py failed (exit ${table_status})" | tee -a "${log}"
  failed=1
fi
echo "check.sh: done in $((SECONDS - start)) s; outputs in ${out}" | tee -a "${log}"
exit "${failed}"
