# SPDX-License-Identifier: Apache-2.0
#
# daedalus_enable_nvcc_cxx20()
#
# Call after enable_language(CUDA). nvcc has accepted -std=c++20 since CUDA 12.0, but CMake 3.25
# (the oldest we support, Debian 12's) does not know that: it lists no cuda_std_20 feature for
# nvcc, so `target_compile_features(... cuda_std_20)` fails and CUDA_STANDARD 20 silently adds no
# flag, leaving nvcc at its default C++17. This teaches the current directory scope (and the
# directories below it) the flag. It does nothing on CMake versions that already know it, on
# other CUDA compilers and on nvcc older than 12.0.
#
# daedalusConfig.cmake calls it for consumers that enabled CUDA before find_package(daedalus).
include_guard(GLOBAL)

macro(daedalus_enable_nvcc_cxx20)
  if(CMAKE_CUDA_COMPILER_LOADED
     AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
     AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0
     AND NOT "cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
    list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  endif()
endmacro()
