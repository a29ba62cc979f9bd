// SPDX-License-Identifier: Apache-2.0
// The MoE routing plan, dispatch and combine on a real device: the same bodies that
// daedalus_emulated_tests runs on the CPU (tests/cuda/cases/moe_plan_checks.hpp).
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_plan_checks.hpp"
