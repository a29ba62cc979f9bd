// SPDX-License-Identifier: Apache-2.0
// The MoE layer on a real device (device gate, compute_scores, shared experts,
// MoeLayer<C, CudaBackend>): the same bodies that daedalus_emulated_tests runs on the CPU
// (tests/cuda/cases/moe_layer_checks.hpp).
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_layer_checks.hpp"
