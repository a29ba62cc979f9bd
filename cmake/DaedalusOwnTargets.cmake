# SPDX-License-Identifier: Apache-2.0
#
# daedalus_add_own_target_flags(<target>)
#
# What every one of daedalus's own targets (tests, benchmarks, examples, the header check) gets,
# and the INTERFACE library targets never do: warnings (DaedalusWarnings.cmake), strict C++20,
# the shared CUDA runtime, optionally -march=native, and executables at the top of the build
# directory (build/<preset>/daedalus_tests, build/<preset>/bench_mla, ...), where the scripts,
# .ci/run and bench/gpu/check.sh look for them whichever CMakeLists.txt defines them.
#
# -march=native (DAEDALUS_NATIVE) goes to C++ sources only: the host side of the CUDA tests does
# no heavy work, and a CPU-specific host flag in .cu files would only add nvcc/g++ pairings to go
# wrong.
include_guard(GLOBAL)

include(CheckCXXCompilerFlag)
include(DaedalusWarnings)

if(DAEDALUS_NATIVE)
  check_cxx_compiler_flag(-march=native DAEDALUS_HAS_MARCH_NATIVE)
endif()

function(daedalus_add_own_target_flags target)
  daedalus_target_warnings(${target})
  # -std=c++20, not gnu++20: what builds here must build with any conforming compiler.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF CUDA_EXTENSIONS OFF)
  # daedalus::cuda links the shared runtime (CUDA::cudart); CMake's default for targets with .cu
  # sources would link the static one as well, giving the process two runtimes. No effect on
  # targets without CUDA sources.
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Shared)
  set_target_properties(${target} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}")
  if(DAEDALUS_NATIVE AND DAEDALUS_HAS_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=native>)
  endif()
endfunction()
