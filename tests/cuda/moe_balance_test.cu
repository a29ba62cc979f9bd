// SPDX-License-Identifier: Apache-2.0
// MoE balancing on a real device: the balance losses (tests/cuda/cases/moe_balance_checks.hpp,
// also run by daedalus_emulated_tests) and the balancing simulation at the full shape of the CPU
// test (tests/moe/balance_test.cpp: 4096 tokens a step, 400 steps, γ = 0.001), whose MaxVio
// curve must equal the CPU's step for step, with the CPU test's checks of its behaviour.
#include <daedalus/cuda.cuh>

#include "cuda/cases/moe_balance_checks.hpp"

TEST_CASE("device balancing simulation (full shape) equals the CPU curve; MaxVio below 0.1") {
  using namespace daedalus::testing::moe_balance_checks;
  const daedalus::CudaBackend cuda;
  constexpr int steps = 400;
  const SimulationRun run = check_simulation(cuda, daedalus::testing::stream_seed(4950), 4096,
                                             steps, 0.001, 100, 150, 0.07);
  // As on the CPU: below 0.1 within 150 steps, and sampling noise (c̄ = 1024 slots per expert)
  // after that.
  const auto first_below =
      std::find_if(run.max_vio.begin(), run.max_vio.end(), [](double v) { return v < 0.1; });
  CHECK(first_below - run.max_vio.begin() <= 150);
  CHECK(*std::max_element(run.max_vio.begin() + 250, run.max_vio.end()) < 0.15);
}
