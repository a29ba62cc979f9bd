// SPDX-License-Identifier: Apache-2.0
// The MoE layer on the GPU (device gate, compute_scores, shared experts, MoeLayer<C, CudaBackend>)
// under the emulation layer: the same bodies that daedalus_cuda_tests runs on a GPU
// (tests/cuda/cases/moe_layer_checks.hpp), then again with blocks on several OS threads and a
// shuffled thread order.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_layer_checks.hpp"

TEST_CASE("cuda moe: the device layer under a shuffled schedule on 2 host threads") {
  namespace emulation = daedalus::cuda_emulation;
  emulation::Options options;
  options.schedule = emulation::Schedule::shuffled;
  options.seed = 23;
  options.host_threads = 2;
  emulation::ScopedOptions scoped(options);
  using namespace daedalus::testing::moe_layer_checks;
  const daedalus::CudaBackend cuda;
  check_layer<OddLayer>(cuda, 45, 8351,
                        daedalus::moe::PlanSettings{1.0, daedalus::moe::DropPolicy::probs, 1});
  check_forward_and_balance<daedalus::Tiny>(cuda, 32, 8352, daedalus::moe::BalancerSettings{});
  check_compute_scores(cuda, daedalus::ScoreFunc::softmax, 40, 8353);
}
