// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/balance.hpp"
#include "daedalus/moe/dispatch.hpp"
#include "daedalus/moe/experts.hpp"
#include "daedalus/moe/gate.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// One DeepSeek MoE layer (DeepSeek-V3 reference inference/model.py `MoE.forward`; DeepSeek-V2
/// paper section 2.2.1, eq. 21): out = Σ_{i ∈ top-k} g_i · FFN_i(x) + shared(x), composed of the
/// pieces each usable alone: gate (moe::route) → plan (RoutingPlan) → dispatch → routed experts
/// (one grouped GEMM) → shared experts → combine (accumulating onto the shared output).
namespace daedalus::moe {

/// A whole MoE layer of config `C` on `Backend`: the gate, the routed and shared experts, the
/// plan settings, and the workspaces a forward pass reuses from call to call (so a layer is not
/// for concurrent use; give each thread its own or serialise calls).
///
/// @tparam C       an MoeConfig (presets: DeepSeekV2Lite, DeepSeekV2, DeepSeekV3, Tiny)
/// @tparam Backend the backend whose memory the workspaces live in: a host backend here;
///                 CudaBackend selects the device layer (moe/cuda/layer.cuh, included by
///                 <daedalus/cuda.cuh>)
template <MoeConfig C, class Backend = CpuBackend>
class MoeLayer {
  static_assert(std::is_same_v<typename Backend::memory_space, HostMemory>,
                "daedalus::moe::MoeLayer: this layer keeps its workspaces in host memory; for "
                "MoeLayer<C, CudaBackend> include <daedalus/cuda.cuh> in a .cu file (it brings "
                "the device layer, moe/cuda/layer.cuh)");

 public:
  static constexpr index_t dim = C::dim;
  static constexpr index_t k = C::n_activated_experts;

  MoeLayer(GateWeights<C> gate, ExpertWeights<C> experts, SharedExpertWeights<C> shared,
           const PlanSettings& plan_settings = {},
           const GateSettings& gate_settings = GateSettings::from_config<C>())
      : gate_(std::move(gate)),
        experts_(std::move(experts)),
        shared_(std::move(shared)),
        plan_settings_(plan_settings),
        gate_settings_(gate_settings) {
    gate_settings_.validate("daedalus::moe::MoeLayer");
    daedalus::detail::require<InvalidArgument>(
        gate_settings_.n_routed_experts == C::n_routed_experts && gate_settings_.topk == k,
        "daedalus::moe::MoeLayer: 'gate_settings' routes ", gate_settings_.topk, " of ",
        gate_settings_.n_routed_experts, " experts; expected ", k, " of ", C::n_routed_experts,
        " for ", config_name<C>());
  }

  /// A layer with random weights (GateWeights/ExpertWeights/SharedExpertWeights::random from
  /// seed, seed + 1, seed + 2), for examples, benchmarks and tests.
  static MoeLayer random(std::uint64_t seed, const PlanSettings& plan_settings = {}) {
    return MoeLayer(GateWeights<C>::random(seed), ExpertWeights<C>::random(seed + 1),
                    SharedExpertWeights<C>::random(seed + 2), plan_settings);
  }

  /// out = Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) + shared(x[t]) for every token
  /// t, over the slots the plan keeps (all of them unless a capacity is set). Bitwise the same
  /// for every thread count of the backend. On return topk_ids(), topk_weights() and plan()
  /// describe this batch.
  ///
  /// @param x   [tokens, dim] activations (finite)
  /// @param out [tokens, dim] out
  /// @throws InvalidArgument for wrong extents or plan settings; NumericError naming the token
  ///         whose gate logits are not finite. On a throw `out` and the layer are unchanged.
  void forward(const Backend& backend, HostView<const float, 2> x, HostView<float, 2> out) {
    constexpr std::string_view fn = "daedalus::moe::MoeLayer::forward";
    const index_t tokens = x.extent(0);
    daedalus::detail::check_extents(fn, "x", x, {tokens, dim});
    daedalus::detail::check_extents(fn, "out", out, {tokens, dim});

    // Every step writes into the next_* buffers; they become the layer's state only once all
    // that can throw has succeeded, so a failed call leaves the layer as it was.
    next_ids_.resize(std::size_t(tokens * k));
    next_weights_.resize(std::size_t(tokens * k));
    const HostView<std::int32_t, 2> ids(next_ids_.data(), {tokens, k});
    const HostView<float, 2> weights(next_weights_.data(), {tokens, k});
    // moe::route computes each token's logits in chunks whose boundaries do not depend on the
    // thread count, so the experts chosen and their weights do not either.
    route(backend, gate_, x, ids, weights, gate_settings_);
    next_plan_.build(ids, weights, C::n_routed_experts, plan_settings_);

    const index_t rows = next_plan_.rows();
    constexpr index_t inter = C::moe_inter_dim;
    constexpr index_t shared_width = SharedExpertWeights<C>::width;
    expert_in_.resize(std::size_t(rows * dim));
    hidden_.resize(std::size_t(rows * inter));
    expert_out_.resize(std::size_t(rows * dim));
    shared_hidden_.resize(std::size_t(tokens * shared_width));
    const HostView<float, 2> expert_in(expert_in_.data(), {rows, dim});
    const HostView<float, 2> expert_out(expert_out_.data(), {rows, dim});
    dispatch(backend, next_plan_, x, expert_in);
    routed_experts(backend, experts_, next_plan_, HostView<const float, 2>(expert_in),
                   HostView<float, 2>(hidden_.data(), {rows, inter}), expert_out);
    shared_experts(backend, shared_, x,
                   HostView<float, 2>(shared_hidden_.data(), {tokens, shared_width}), out);
    combine(backend, next_plan_, HostView<const float, 2>(expert_out), out,
            CombineInto::accumulate);

    std::swap(ids_, next_ids_);
    std::swap(weights_, next_weights_);
    std::swap(plan_, next_plan_);
    tokens_ = tokens;
  }

  /// A training step's forward with auxiliary-loss-free balancing (DeepSeek-V3 report, section
  /// 2.1.2; arXiv 2408.15664, Algorithm 1): forward, then `stats` records this batch's per-expert
  /// loads (before any capacity) and `balancer` nudges the gate's selection bias from them, so
  /// the next batch routes with the updated bias.
  ///
  /// @throws what forward throws; InvalidArgument when `stats` or `balancer` is for another
  ///         number of experts, the gate has no selection bias (GateWeights::set_has_bias), or
  ///         the bias is unusable by the balancer's rule. Everything is checked before anything
  ///         changes: on a throw `out`, the layer, the bias and `stats` are as they were.
  void forward_and_balance(const Backend& backend, HostView<const float, 2> x,
                           HostView<float, 2> out, LoadStats& stats, const BiasBalancer& balancer) {
    constexpr std::string_view fn = "daedalus::moe::MoeLayer::forward_and_balance";
    daedalus::detail::require<InvalidArgument>(
        stats.num_experts() == C::n_routed_experts && balancer.num_experts() == C::n_routed_experts,
        fn, ": 'stats' and 'balancer' are for ", stats.num_experts(), " and ",
        balancer.num_experts(), " experts; expected ", C::n_routed_experts);
    daedalus::detail::require<InvalidArgument>(
        gate_.has_bias(), fn,
        ": the gate has no selection bias to balance; expected one (GateWeights::set_has_bias)");
    {
      // The balancer checks the bias (finite; positive for the multiplicative rule) before it
      // updates anything, and a step with no tokens changes nothing: a dry run on a copy
      // surfaces any such error before the forward pass.
      std::vector<float> copy(gate_.bias().data(), gate_.bias().data() + gate_.bias().size());
      const std::vector<std::int64_t> no_tokens(std::size_t(C::n_routed_experts), 0);
      balancer.update(HostView<float, 1>(copy.data(), {index_t(copy.size())}), no_tokens);
    }
    forward(backend, x, out);
    stats.record_counts(plan_.routed_counts());
    balancer.update(gate_.bias(), stats.step_counts());
  }

  /// [tokens, k] the experts each token of the last batch chose.
  [[nodiscard]] HostView<const std::int32_t, 2> topk_ids() const {
    return {ids_.data(), {tokens_, k}};
  }
  /// [tokens, k] their weights.
  [[nodiscard]] HostView<const float, 2> topk_weights() const {
    return {weights_.data(), {tokens_, k}};
  }
  /// The last batch's routing plan (per-expert loads: routed_counts()).
  [[nodiscard]] const RoutingPlan& plan() const { return plan_; }

  [[nodiscard]] const GateWeights<C>& gate() const { return gate_; }
  /// Mutable for a BiasBalancer, which updates the selection bias between steps.
  [[nodiscard]] GateWeights<C>& gate() { return gate_; }
  [[nodiscard]] const ExpertWeights<C>& experts() const { return experts_; }
  [[nodiscard]] const SharedExpertWeights<C>& shared() const { return shared_; }
  [[nodiscard]] const GateSettings& gate_settings() const { return gate_settings_; }
  [[nodiscard]] const PlanSettings& plan_settings() const { return plan_settings_; }
  /// Capacity, drop policy and padding of later batches; checked by the next forward.
  void set_plan_settings(const PlanSettings& settings) { plan_settings_ = settings; }

  /// Useful FLOPs of one forward over `tokens` tokens (an FMA counts 2): the gate's logits,
  /// k routed experts and the shared MLP per token, three matrix products each.
  static constexpr double flops(index_t tokens) {
    return 2.0 * double(tokens) *
           (double(dim) * C::n_routed_experts +
            3.0 * double(dim) *
                (double(k) * C::moe_inter_dim + double(SharedExpertWeights<C>::width)));
  }

 private:
  GateWeights<C> gate_;
  ExpertWeights<C> experts_;
  SharedExpertWeights<C> shared_;
  PlanSettings plan_settings_;
  GateSettings gate_settings_;
  index_t tokens_ = 0;
  std::vector<std::int32_t> ids_, next_ids_;
  std::vector<float> weights_, next_weights_;
  RoutingPlan plan_, next_plan_;
  std::vector<float> expert_in_, hidden_, expert_out_, shared_hidden_;
};

}  // namespace daedalus::moe
