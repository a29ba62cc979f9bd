// SPDX-License-Identifier: Apache-2.0
// The MoE gate, routing plan, dispatch, combine and balancing kernels under the emulation layer:
// the same bodies that daedalus_cuda_tests runs on a GPU (tests/cuda/cases/moe_*_checks.hpp), then
// again with blocks on several OS threads and a shuffled thread order.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_experts_checks.hpp"
#include "cuda/cases/moe_gate_checks.hpp"
#include "cuda/cases/moe_plan_checks.hpp"

TEST_CASE("cuda moe: plan, dispatch and combine under a shuffled schedule on 2 host threads") {
  namespace emulation = daedalus::cuda_emulation;
  emulation::Options options;
  options.schedule = emulation::Schedule::shuffled;
  options.seed = 21;
  options.host_threads = 2;
  emulation::ScopedOptions scoped(options);
  using namespace daedalus::testing::moe_plan_checks;
  check_plan_matches_cpu(daedalus::CudaBackend{});
  check_dispatch_combine(daedalus::CudaBackend{});
}
