// SPDX-License-Identifier: Apache-2.0
// Snippets of README.md and docs/moe.md: a DeepSeek MoE layer on the CPU, whole and in pieces.
// The docs show the code for any preset `Model`; this file runs it with daedalus::Tiny.
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
  const index_t tokens = 32;
  std::vector<float> x_values(std::size_t(tokens * Model::dim), 0.5f);
  for (std::size_t i = 0; i < x_values.size(); ++i) x_values[i] = float(i % 7) * 0.1f - 0.3f;
  std::vector<float> out_values(x_values.size());
  const HostView<const float, 2> x(x_values.data(), {tokens, Model::dim});
  const HostView<float, 2> out(out_values.data(), {tokens, Model::dim});

  // [snippet:tour]
  namespace moe = daedalus::moe;
  // Gate, routed experts and shared experts of one layer. From a checkpoint:
  // moe::MoeLayer<Model>(moe::GateWeights<Model>::from_arrays(weight, bias),
  //                      moe::ExpertWeights<Model>::from_arrays(w1, w3, w2),
  //                      moe::SharedExpertWeights<Model>::from_arrays(w1, w3, w2));
  auto layer = moe::MoeLayer<Model>::random(/*seed=*/1);

  // out = Σ_j w_j · expert_j(x) + shared(x) for every token of x [tokens, dim].
  layer.forward(cpu, x, out);
  const std::int32_t first = layer.topk_ids()(0, 0);     // [tokens, k]: token 0's top expert
  const index_t load = layer.plan().routed_counts()[0];  // slots routed to expert 0

  // Training: also count the loads and step the gate's selection bias (DeepSeek-V3's
  // auxiliary-loss-free balancing), all checked before anything changes.
  moe::LoadStats stats(Model::n_routed_experts);
  const moe::BiasBalancer balancer(Model::n_routed_experts);  // sign rule, γ = 0.001
  layer.forward_and_balance(cpu, x, out, stats, balancer);
  // [/snippet:tour]

  // [snippet:pieces]
  // The same layer in pieces, for an engine that schedules them itself.
  constexpr index_t dim = Model::dim, inter = Model::moe_inter_dim;
  constexpr int E = Model::n_routed_experts, k = Model::n_activated_experts;
  std::vector<std::int32_t> ids(std::size_t(tokens * k));
  std::vector<float> weights(std::size_t(tokens * k));
  moe::route(cpu, layer.gate(), x, HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
             HostView<float, 2>(weights.data(), {tokens, k}));

  moe::RoutingPlan plan;  // keep it across steps: build() reuses its storage
  plan.build(HostView<const std::int32_t, 2>(ids.data(), {tokens, k}),
             HostView<const float, 2>(weights.data(), {tokens, k}), E);
  // Dropless, as DeepSeek. Or: {.capacity_factor = 1.25, .drop_policy = moe::DropPolicy::probs,
  //                             .pad_block = 16}
  const index_t rows = plan.rows();
  std::vector<float> expert_in(std::size_t(rows * dim)), hidden(std::size_t(rows * inter));
  std::vector<float> expert_out(std::size_t(rows * dim));
  std::vector<float> shared_hidden(std::size_t(tokens * moe::SharedExpertWeights<Model>::width));

  moe::dispatch(cpu, plan, x, HostView<float, 2>(expert_in.data(), {rows, dim}));  // expert order
  moe::routed_experts(cpu, layer.experts(), plan,
                      HostView<const float, 2>(expert_in.data(), {rows, dim}),
                      HostView<float, 2>(hidden.data(), {rows, inter}),
                      HostView<float, 2>(expert_out.data(), {rows, dim}));  // grouped SwiGLU
  moe::shared_experts(
      cpu, layer.shared(), x,
      HostView<float, 2>(shared_hidden.data(), {tokens, moe::SharedExpertWeights<Model>::width}),
      out);  // out = shared MLP(x)
  moe::combine(cpu, plan, HostView<const float, 2>(expert_out.data(), {rows, dim}), out,
               moe::CombineInto::accumulate);  // out += Σ_j w_j · y_j, in slot order
  // [/snippet:pieces]

  std::printf("moe_layer: token 0 chose expert %d first; expert 0 took %lld slots; %lld rows\n",
              first, static_cast<long long>(load), static_cast<long long>(rows));
  return stats.steps() == 1 ? 0 : 1;
}
