// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/moe.md: DeepSeek's gate on a batch, and auxiliary-loss-free balancing of its
// selection bias. The docs show the code for any preset `Model`; this file runs it with
// daedalus::Tiny (sigmoid scores with a bias, grouped routing, like DeepSeek-V3).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  using daedalus::HostView;
  using daedalus::index_t;
  namespace moe = daedalus::moe;
  const daedalus::CpuBackend cpu;
  const index_t T = 64;  // tokens in the batch

  // [snippet:route]
  constexpr int E = Model::n_routed_experts, k = Model::n_activated_experts;
  auto gate = moe::GateWeights<Model>::random(/*seed=*/1);  // or from_arrays(weight, bias)
  std::vector<float> x(std::size_t(T * Model::dim), 0.5f);  // [T, dim]
  std::vector<std::int32_t> ids(std::size_t(T * k));  // [T, k]: decreasing score, ties → lower id
  std::vector<float> weights(std::size_t(T * k));     // [T, k]: normalised, × route_scale
  moe::route(cpu, gate, HostView<const float, 2>(x.data(), {T, Model::dim}),
             HostView<std::int32_t, 2>(ids.data(), {T, k}),
             HostView<float, 2>(weights.data(), {T, k}));
  // [/snippet:route]

  // [snippet:balance]
  // Auxiliary-loss-free balancing (training): b_i += γ·sign(c̄ − c_i) after each step.
  moe::LoadStats stats(E);
  const moe::BiasBalancer balancer(E);  // sign rule, γ = 0.001 (DeepSeek-V3)
  stats.record(HostView<const std::int32_t, 2>(ids.data(), {T, k}));
  balancer.update(gate.bias(), stats.step_counts());
  const double vio = stats.max_vio_batch();  // also max_vio_global(), mean_max_vio_batch()
  // [/snippet:balance]

  std::printf("moe_gate: token 0 routes to experts %d, %d, %d; MaxVio_batch %.3f\n", ids[0], ids[1],
              ids[2], vio);
  return vio >= 0.0 ? 0 : 1;
}
