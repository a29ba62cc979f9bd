// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/moe/balance.hpp"
#include "daedalus/moe/cuda/balance.cuh"
#include "daedalus/moe/cuda/dispatch.cuh"
#include "daedalus/moe/cuda/experts.cuh"
#include "daedalus/moe/cuda/experts_cublas.cuh"
#include "daedalus/moe/cuda/gate.cuh"
#include "daedalus/moe/cuda/routing_plan.cuh"
#include "daedalus/moe/experts.hpp"
#include "daedalus/moe/gate.hpp"
#include "daedalus/moe/layer.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// One DeepSeek MoE layer on the GPU (DeepSeek-V3 reference inference/model.py `MoE.forward`;
/// DeepSeek-V2 paper section 2.2.1, eq. 21): the host MoeLayer's steps with the device pieces,
/// every one on the backend's stream: gate (cuBLAS fp32 logits, the fused routing kernel) →
/// DeviceRoutingPlan → dispatch → routed experts (grouped SwiGLU GEMM, bf16 weights) → shared
/// experts → combine (accumulating onto the shared output). DeviceExpertPath chooses how the
/// routed experts get their rows and which GEMM multiplies them.
namespace daedalus::moe {

/// How MoeLayer<C, CudaBackend> runs its routed experts. Each gives the same expert ids and the
/// same plan; they differ in the data they move and in the GEMM that multiplies.
enum class DeviceExpertPath {
  /// dispatch writes the expert-ordered [rows, dim] copy of the tokens, then the grouped
  /// tensor-core kernel (routed_experts) reads it. No host round trip.
  grouped_mma,
  /// The grouped kernel's first GEMM reads each row's token through the plan
  /// (routed_experts_from_tokens): no dispatched copy. Bitwise equal to grouped_mma.
  grouped_mma_permuted_read,
  /// dispatch, then cuBLAS: the routed experts through routed_experts_cublas (grouped batched
  /// GEMM, 16-bit products; one host round trip for the per-expert sizes) and the shared experts
  /// through shared_experts_cublas. Within the bf16 tolerance of grouped_mma, not bitwise.
  cublas_grouped,
};

/// MoeLayer for CudaBackend: weights and workspaces in device memory. The gate stays fp32 (as
/// DeepSeek-V3's Gate, and as the host layer, so that both route alike); the routed and shared
/// experts are held in bf16 (DeviceExpertWeights, DeviceSharedExpertWeights), activations
/// rounded to bf16 before the tensor-core products, fp32 accumulation. Workspaces grow to the
/// largest batch seen and are reused, so a layer is not for concurrent use (one per stream).
///
/// Host round trips per forward: the logits' finiteness check (16 bytes) and the plan's input
/// check (4 bytes), each with a stream synchronisation, so that bad input throws before anything
/// changes; forward_and_balance adds the balancer's bias check (4 bytes); the cublas_grouped
/// path adds the per-expert sizes cuBLAS reads from the host (4 · (2E + 1) bytes).
///
/// @tparam C an MoeConfig (presets: DeepSeekV2Lite, DeepSeekV2, DeepSeekV3, Tiny)
template <MoeConfig C>
class MoeLayer<C, CudaBackend> {
 public:
  static constexpr index_t dim = C::dim;
  static constexpr index_t k = C::n_activated_experts;

  /// Uploads the host weights (the experts rounded to bf16). Synchronises the backend's stream.
  /// @throws InvalidArgument for gate settings that are inconsistent or route another number of
  ///         experts than C's (the host layer's checks and messages).
  MoeLayer(const CudaBackend& backend, const GateWeights<C>& gate, const ExpertWeights<C>& experts,
           const SharedExpertWeights<C>& shared, const PlanSettings& plan_settings = {},
           const GateSettings& gate_settings = GateSettings::from_config<C>())
      : plan_settings_(plan_settings),
        gate_settings_(checked(gate_settings)),
        gate_(backend, gate),
        experts_(backend, experts),
        shared_(backend, shared),
        no_tokens_(backend, C::n_routed_experts) {}

  /// A layer with the weights of the host MoeLayer<C>::random(seed): GateWeights, ExpertWeights
  /// and SharedExpertWeights::random from seed, seed + 1, seed + 2.
  static MoeLayer random(const CudaBackend& backend, std::uint64_t seed,
                         const PlanSettings& plan_settings = {}) {
    return MoeLayer(backend, GateWeights<C>::random(seed), ExpertWeights<C>::random(seed + 1),
                    SharedExpertWeights<C>::random(seed + 2), plan_settings);
  }

  /// out = Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) + shared(x[t]) for every token
  /// t, over the slots the plan keeps (all of them unless a capacity is set). Bitwise the same
  /// from run to run. On return topk_ids(), topk_weights(), logits() and plan() describe this
  /// batch.
  ///
  /// @param x   [tokens, dim] device activations (finite)
  /// @param out [tokens, dim] device out
  /// @throws InvalidArgument for wrong extents or plan settings; NumericError naming the token
  ///         whose gate logits are not finite. On a throw `out` and the layer are unchanged.
  void forward(const CudaBackend& backend, TensorView<const float, 2, DeviceMemory> x,
               TensorView<float, 2, DeviceMemory> out) {
    constexpr std::string_view fn = "daedalus::moe::MoeLayer::forward";
    const index_t tokens = x.extent(0);
    daedalus::detail::check_extents(fn, "x", x, {tokens, dim});
    daedalus::detail::check_extents(fn, "out", out, {tokens, dim});

    // Every step writes into the next_* buffers; they become the layer's state only once all
    // that can throw has succeeded, so a failed call leaves the layer as it was.
    constexpr index_t experts = C::n_routed_experts;
    cuda::grow(next_ids_, std::size_t(tokens * k));
    cuda::grow(next_weights_, std::size_t(tokens * k));
    cuda::grow(next_logits_, std::size_t(tokens * experts));
    const TensorView<std::int32_t, 2, DeviceMemory> ids(next_ids_.data(), {tokens, k});
    const TensorView<float, 2, DeviceMemory> weights(next_weights_.data(), {tokens, k});
    route(backend, gate_, x,
          TensorView<float, 2, DeviceMemory>(next_logits_.data(), {tokens, experts}), ids, weights,
          gate_settings_);
    next_plan_.build(backend, TensorView<const std::int32_t, 2, DeviceMemory>(ids),
                     TensorView<const float, 2, DeviceMemory>(weights), C::n_routed_experts,
                     plan_settings_);

    const index_t rows = next_plan_.rows();
    constexpr index_t inter = C::moe_inter_dim;
    constexpr index_t shared_width = SharedExpertWeights<C>::width;
    cuda::grow(expert_out_, std::size_t(rows * dim));
    const TensorView<float, 2, DeviceMemory> expert_out(expert_out_.data(), {rows, dim});
    if (expert_path_ == DeviceExpertPath::cublas_grouped) {  // its workspaces hold the rest
      const TensorView<float, 2, DeviceMemory> expert_in = dispatched(rows);
      dispatch(backend, next_plan_, x, expert_in);
      routed_experts_cublas(backend, experts_, next_plan_,
                            TensorView<const float, 2, DeviceMemory>(expert_in), cublas_routed_,
                            expert_out);
      shared_experts_cublas(backend, shared_, x, cublas_shared_, out);
    } else {
      cuda::grow(hidden_, std::size_t(rows * inter));
      cuda::grow(shared_hidden_, std::size_t(tokens * shared_width));
      const TensorView<float, 2, DeviceMemory> hidden(hidden_.data(), {rows, inter});
      if (expert_path_ == DeviceExpertPath::grouped_mma_permuted_read) {
        routed_experts_from_tokens(backend, experts_, next_plan_, x, hidden, expert_out);
      } else {
        const TensorView<float, 2, DeviceMemory> expert_in = dispatched(rows);
        dispatch(backend, next_plan_, x, expert_in);
        routed_experts(backend, experts_, next_plan_,
                       TensorView<const float, 2, DeviceMemory>(expert_in), hidden, expert_out);
      }
      shared_experts(
          backend, shared_, x,
          TensorView<float, 2, DeviceMemory>(shared_hidden_.data(), {tokens, shared_width}), out);
    }
    combine(backend, next_plan_, TensorView<const float, 2, DeviceMemory>(expert_out), out,
            CombineInto::accumulate);

    std::swap(ids_, next_ids_);
    std::swap(weights_, next_weights_);
    std::swap(logits_, next_logits_);
    std::swap(plan_, next_plan_);
    tokens_ = tokens;
  }

  /// A training step's forward with auxiliary-loss-free balancing (DeepSeek-V3 report, section
  /// 2.1.2; arXiv 2408.15664, Algorithm 1), all on the device: forward, then `stats` records this
  /// batch's per-expert loads (before any capacity, from the plan) and `balancer` updates the
  /// gate's device bias from them, so the next batch routes with the updated bias. The same
  /// arithmetic as the host layer's step, so the biases agree bit for bit.
  ///
  /// @throws what forward throws; InvalidArgument when `stats` or `balancer` is for another
  ///         number of experts, the gate has no selection bias, or the bias is unusable by the
  ///         balancer's rule (checked on the device first: one 4-byte copy). On a throw `out`, the
  ///         layer, the bias and `stats` are as they were.
  void forward_and_balance(const CudaBackend& backend, TensorView<const float, 2, DeviceMemory> x,
                           TensorView<float, 2, DeviceMemory> out, DeviceLoadStats& stats,
                           const DeviceBiasBalancer& balancer) {
    constexpr std::string_view fn = "daedalus::moe::MoeLayer::forward_and_balance";
    daedalus::detail::require<InvalidArgument>(
        stats.num_experts() == C::n_routed_experts && balancer.num_experts() == C::n_routed_experts,
        fn, ": 'stats' and 'balancer' are for ", stats.num_experts(), " and ",
        balancer.num_experts(), " experts; expected ", C::n_routed_experts);
    daedalus::detail::require<InvalidArgument>(
        gate_.has_bias(), fn,
        ": the gate has no selection bias to balance; expected one (GateWeights::set_has_bias)");
    // A dry run, as the host layer's: an update from a step without tokens changes no bias but
    // validates it (finite; positive for the multiplicative rule), and check() reports a refusal.
    balancer.update(backend, gate_.bias_mut(), no_tokens_);
    balancer.check(backend, gate_.bias());
    forward(backend, x, out);
    stats.record(backend, plan_);
    balancer.update(backend, gate_.bias_mut(), stats);
  }

  /// [tokens, k] device: the experts each token of the last batch chose.
  [[nodiscard]] TensorView<const std::int32_t, 2, DeviceMemory> topk_ids() const {
    return {ids_.data(), {tokens_, k}};
  }
  /// [tokens, k] device: their weights.
  [[nodiscard]] TensorView<const float, 2, DeviceMemory> topk_weights() const {
    return {weights_.data(), {tokens_, k}};
  }
  /// [tokens, n_routed_experts] device: the last batch's gate logits (fp32).
  [[nodiscard]] TensorView<const float, 2, DeviceMemory> logits() const {
    return {logits_.data(), {tokens_, index_t(C::n_routed_experts)}};
  }
  /// The last batch's routing plan (per-expert loads: routed_counts(), on the device).
  [[nodiscard]] const DeviceRoutingPlan& plan() const { return plan_; }

  [[nodiscard]] const DeviceGateWeights<C>& gate() const { return gate_; }
  /// Mutable for a DeviceBiasBalancer, which updates the selection bias between steps.
  [[nodiscard]] DeviceGateWeights<C>& gate() { return gate_; }
  [[nodiscard]] const DeviceExpertWeights<C>& experts() const { return experts_; }
  [[nodiscard]] const DeviceSharedExpertWeights<C>& shared() const { return shared_; }
  [[nodiscard]] const GateSettings& gate_settings() const { return gate_settings_; }
  [[nodiscard]] const PlanSettings& plan_settings() const { return plan_settings_; }
  /// Capacity, drop policy and padding of later batches; checked by the next forward.
  void set_plan_settings(const PlanSettings& settings) { plan_settings_ = settings; }
  [[nodiscard]] DeviceExpertPath expert_path() const { return expert_path_; }
  /// The routed experts' path of later batches (grouped_mma unless set).
  /// @throws InvalidArgument for a value that is not one of DeviceExpertPath's.
  void set_expert_path(DeviceExpertPath path) {
    daedalus::detail::require<InvalidArgument>(
        path == DeviceExpertPath::grouped_mma ||
            path == DeviceExpertPath::grouped_mma_permuted_read ||
            path == DeviceExpertPath::cublas_grouped,
        "daedalus::moe::MoeLayer::set_expert_path: 'path' is ", int(path),
        "; expected a DeviceExpertPath");
    expert_path_ = path;
  }

  /// Useful FLOPs of one forward over `tokens` tokens, as the host layer's.
  static constexpr double flops(index_t tokens) { return MoeLayer<C, CpuBackend>::flops(tokens); }

 private:
  static GateSettings checked(const GateSettings& settings) {
    settings.validate("daedalus::moe::MoeLayer");
    daedalus::detail::require<InvalidArgument>(
        settings.n_routed_experts == C::n_routed_experts && settings.topk == k,
        "daedalus::moe::MoeLayer: 'gate_settings' routes ", settings.topk, " of ",
        settings.n_routed_experts, " experts; expected ", k, " of ", C::n_routed_experts, " for ",
        config_name<C>());
    return settings;
  }

  /// The [rows, dim] buffer of dispatched rows, grown to `rows`.
  TensorView<float, 2, DeviceMemory> dispatched(index_t rows) {
    cuda::grow(expert_in_, std::size_t(rows * dim));
    return {expert_in_.data(), {rows, dim}};
  }

  PlanSettings plan_settings_;
  GateSettings gate_settings_;
  DeviceExpertPath expert_path_ = DeviceExpertPath::grouped_mma;
  DeviceGateWeights<C> gate_;
  DeviceExpertWeights<C> experts_;
  DeviceSharedExpertWeights<C> shared_;
  DeviceLoadStats no_tokens_;  // zero counts: forward_and_balance's dry run of the balancer
  index_t tokens_ = 0;
  cuda::DeviceBuffer<std::int32_t> ids_, next_ids_;
  cuda::DeviceBuffer<float> weights_, next_weights_, logits_, next_logits_;
  DeviceRoutingPlan plan_, next_plan_;
  cuda::DeviceBuffer<float> expert_in_, hidden_, expert_out_, shared_hidden_;
  CublasExpertWorkspace cublas_routed_;  // DeviceExpertPath::cublas_grouped only
  CublasSharedExpertWorkspace cublas_shared_;
};

}  // namespace daedalus::moe
