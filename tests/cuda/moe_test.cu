// SPDX-License-Identifier: Apache-2.0
// The MoE gate, routing plan, dispatch, combine and balancing on a real device: the same bodies
// that daedalus_emulated_tests runs on the CPU (tests/cuda/cases/moe_*_checks.hpp).
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_experts_checks.hpp"
#include "cuda/cases/moe_gate_checks.hpp"
#include "cuda/cases/moe_plan_checks.hpp"
