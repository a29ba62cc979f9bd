// SPDX-License-Identifier: Apache-2.0
// The CUDA test cases on a real device: the same bodies that daedalus_emulated_tests runs on
// the CPU (tests/cuda/cases/kernel_cases.hpp).
#include <daedalus/cuda.cuh>

#include "cuda/cases/kernel_cases.hpp"
