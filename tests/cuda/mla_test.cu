// SPDX-License-Identifier: Apache-2.0
// MLA on a real device: the same bodies that daedalus_emulated_tests runs on the CPU
// (tests/cuda/cases/mla_checks.hpp).
#include <daedalus/cuda.cuh>

#include "cuda/cases/mla_checks.hpp"
