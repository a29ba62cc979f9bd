# SPDX-License-Identifier: Apache-2.0
#
# daedalus_target_warnings(<target>)
#
# Turns on warnings for one of daedalus's own targets (tests, benchmarks, examples). Never call it
# on the INTERFACE library targets: their options would land in every user's build.
#
#   C++ (g++/clang++):  -Wall -Wextra -Wpedantic
#   CUDA (nvcc):        -Wall -Wextra forwarded to the host compiler with -Xcompiler.
#                       -Wpedantic is not forwarded: nvcc's generated host code uses GCC-style
#                       line markers, and g++ -Wpedantic warns once per marker ("style of line
#                       directive is a GCC extension"), tens of thousands of lines per file.
#                       20012 is suppressed: Eigen 3.4's DenseStorage puts __host__ __device__ on
#                       explicitly defaulted members, which nvcc reports on every include.
#   MSVC:               /W4
include_guard(GLOBAL)

function(daedalus_target_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:/W4>)
  else()
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
    # GCC before 13 reports -Wmaybe-uninitialized inside its own avx512fintrin.h for every
    # _mm512_undefined_* that an intrinsic uses (GCC bug 105593, fixed in 13): false positives
    # in the compiler's headers, hundreds per AVX-512 kernel.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      target_compile_options(${target} PRIVATE
        $<$<COMPILE_LANGUAGE:CXX>:-Wno-maybe-uninitialized>)
    endif()
  endif()
  if(CMAKE_CUDA_COMPILER_LOADED AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA")
    if(MSVC)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=/W4>)
    else()
      target_compile_options(${target} PRIVATE
        $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
    endif()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-diag-suppress=20012>)
  endif()
endfunction()
