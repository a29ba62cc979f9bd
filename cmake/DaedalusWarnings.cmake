# SPDX-License-Identifier: Apache-2.0
#
# daedalus_target_warnings(<target>)
#
# Turns on warnings for one of daedalus's own targets (tests, benchmarks, examples, the header
# check). Never call it on the INTERFACE library targets: their options would land in every
# user's build.
#
#   C++ (g++/clang++):  -Wall -Wextra -Wpedantic, plus -Wconversion when DAEDALUS_WCONVERSION is
#                       ON, plus -Werror when DAEDALUS_WERROR is ON.
#   CUDA (nvcc):        the same host warnings forwarded to the host compiler with -Xcompiler,
#                       and -Werror=all-warnings for nvcc's own diagnostics when DAEDALUS_WERROR is
#                       ON. -Wpedantic is not forwarded: nvcc's generated host code uses GCC-style
#                       line markers, and g++ -Wpedantic warns once per marker ("style of line
#                       directive is a GCC extension"), tens of thousands of lines per file.
#                       20012 is suppressed: Eigen 3.4's DenseStorage puts __host__ __device__ on
#                       explicitly defaulted members, which nvcc reports on every include.
#   MSVC:               /W4 (/WX with DAEDALUS_WERROR).
#
# DAEDALUS_WERROR is OFF by default, so that a newer compiler's new warning never breaks a user's
# or packager's build; .ci/run turns it on (preset "ci").
include_guard(GLOBAL)

option(DAEDALUS_WERROR "Treat warnings as errors in daedalus's own targets (never the library)" OFF)
option(DAEDALUS_WCONVERSION "Add -Wconversion to daedalus's own targets" ON)

function(daedalus_target_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:/W4>)
    if(DAEDALUS_WERROR)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:/WX>)
    endif()
  else()
    set(host_warnings -Wall -Wextra)
    if(DAEDALUS_WCONVERSION)
      list(APPEND host_warnings -Wconversion)
      # clang's -Wconversion includes -Wsign-conversion, GCC's (for C++) does not; keep the two
      # compilers to the same set (README, "Quality gates").
      if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
        list(APPEND host_warnings -Wno-sign-conversion)
      endif()
    endif()
    if(DAEDALUS_WERROR)
      list(APPEND host_warnings -Werror)
    endif()
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANGUAGE:CXX>:${host_warnings};-Wpedantic>")
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
      string(JOIN "," forwarded ${host_warnings})
      target_compile_options(${target} PRIVATE
        "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${forwarded}>")
    endif()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-diag-suppress=20012>)
    if(DAEDALUS_WERROR)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>)
    endif()
  endif()
endfunction()
