// SPDX-License-Identifier: Apache-2.0
#pragma once

// What every daedalus CUDA header builds on: the CUDA runtime, bf16 and fp16 types, cuBLAS (the
// projections' GEMMs, daedalus/cuda/blas.cuh). Compiled by
// nvcc; or by a host compiler after the test-only CUDA emulation layer
// (emulation/cuda_emulation.hpp; emulation/README.md), which defines DAEDALUS_CUDA_EMULATION and
// provides the same names, so that kernels run on CPU threads in CI.
#if defined(DAEDALUS_CUDA_EMULATION)
// Everything this header would include comes from the emulation layer.
#elif defined(__CUDACC__)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#error \
    "daedalus CUDA headers (.cuh) must be compiled by nvcc: include <daedalus/cuda.cuh> from a .cu file (plain C++ code includes <daedalus/daedalus.hpp>)"
#endif

// Loops over register arrays must be unrolled, or their indices force the arrays into local
// memory. nvcc honours `#pragma unroll`; host compilers (the emulation) need nothing. Kernels
// write DAEDALUS_UNROLL before such a loop.
#if !defined(DAEDALUS_UNROLL)
#if defined(__CUDACC__)
#define DAEDALUS_UNROLL _Pragma("unroll")
#else
#define DAEDALUS_UNROLL
#endif
#endif
