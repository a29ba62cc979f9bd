// SPDX-License-Identifier: Apache-2.0
// MoE balancing under the emulation layer: the device balance losses (the bodies that
// daedalus_cuda_tests runs on a GPU, tests/cuda/cases/moe_balance_checks.hpp), and the balancing
// simulation at a reduced shape, then both again with blocks on 2 host threads in a shuffled
// order.
//
// What is checked where: the GPU test runs the simulation at the CPU test's shape (4096 tokens a
// step, 400 steps, γ = 0.001) with its checks (MaxVio from above 1 to below 0.1 within 150
// steps). Here a step costs about 1.2 ms per token (the gate's warps are emulated), so the
// simulation has 256 tokens a step and 16 steps with γ = 0.01, which converges in about 10
// steps: the device curve must still equal a CPU run of the same shape exactly, with and
// without the update, and the update must bring MaxVio from above 1 to the sampling noise (mean
// of the last 4 steps below 0.5; observed 0.15-0.28 over six seeds). At 256 tokens (c̄ = 64
// slots per expert) that noise is itself 0.1-0.3, so the fall below 0.1 is not checked here.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_balance_checks.hpp"

TEST_CASE("cuda moe: balancing simulation (reduced shape) equals the CPU curve") {
  using namespace daedalus::testing::moe_balance_checks;
  check_simulation(daedalus::CudaBackend{}, daedalus::testing::stream_seed(4960), 256, 16, 0.01, 4,
                   4, 0.5);
}

TEST_CASE("cuda moe: balance losses and simulation under a shuffled schedule on 2 host threads") {
  namespace emulation = daedalus::cuda_emulation;
  using namespace daedalus::testing::moe_balance_checks;
  const daedalus::CudaBackend cuda;
  // The losses in the default schedule, then again with blocks on 2 threads in a shuffled order
  // (the integer atomics then land in another order): the same bits.
  const LossCase shape{300, 64, 6, false};
  const LossData data = loss_data(shape, 4980);
  const auto scores_d = daedalus::cuda::to_device(cuda, data.scores);
  const auto ids_d = daedalus::cuda::to_device(cuda, data.ids);
  const ScoreView scores(scores_d.data(), {shape.tokens, shape.experts});
  const IdView ids(ids_d.data(), {shape.tokens, shape.k});
  const double seq = daedalus::moe::sequence_balance_loss(cuda, scores, shape.k);
  const double aux = daedalus::moe::auxiliary_balance_loss(cuda, scores, ids);

  emulation::Options options;
  options.schedule = emulation::Schedule::shuffled;
  options.seed = 23;
  options.host_threads = 2;
  emulation::ScopedOptions scoped(options);
  CHECK(same_bits(daedalus::moe::sequence_balance_loss(cuda, scores, shape.k), seq));
  CHECK(same_bits(daedalus::moe::auxiliary_balance_loss(cuda, scores, ids), aux));
  check_losses_match_reference(cuda);
  check_loss_bad_input(cuda);
  const auto seed = daedalus::testing::stream_seed(4970);
  const SimulationRun cpu = simulate_on_cpu(seed, 200, 4, true, 0.01);
  const SimulationRun gpu = simulate_on_device(cuda, seed, 200, 4, true, 0.01);
  CHECK(gpu.max_vio == cpu.max_vio);
  CHECK(gpu.bias == cpu.bias);
}
