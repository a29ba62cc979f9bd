// SPDX-License-Identifier: Apache-2.0
// MLA on the GPU under the emulation layer: the same bodies that daedalus_cuda_tests runs on a
// device (tests/cuda/cases/mla_checks.hpp): cuBLAS's subset, the norm and RoPE kernels, whole
// layers against the CPU backend, bad input.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/mla_checks.hpp"
