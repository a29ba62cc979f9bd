// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/core/traits.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// DeepSeek's SwiGLU experts (DeepSeek-V3 reference inference/model.py `Expert` and `MLP`):
/// y = w2(silu(w1 x) ⊙ w3 x), with w1, w3 [inter, dim] and w2 [dim, inter] in `nn.Linear`'s
/// [out, in] layout. The routed experts run as one grouped GEMM over a RoutingPlan's segments;
/// the shared experts are one MLP of width n_shared_experts · moe_inter_dim applied to every
/// token (DeepSeek-V2 paper, section 2.2.1, eq. 21; DeepSeek-V3 `MoE.shared_experts`).
namespace daedalus::moe {

namespace detail {

/// The backend's SwiGLU kernels (`moe/cpu/experts.hpp`, `moe/cuda/...`).
template <class Backend>
struct ExpertsImpl {
  static_assert(daedalus::detail::dependent_false<Backend>,
                "daedalus::moe: no expert implementation for this backend is visible: include "
                "<daedalus/daedalus.hpp> for CpuBackend, or <daedalus/cuda.cuh> in a .cu file "
                "for CudaBackend");
};

/// Copies `src` into `dst` when it has `expected` values, else throws naming the array.
inline void take_array(std::string_view fn, std::string_view config, std::vector<float>& dst,
                       std::span<const float> src, std::string_view name, std::size_t expected) {
  if (src.size() != expected) {
    throw InvalidArgument(daedalus::detail::message(
        fn, ": '", name, "' has ", src.size(), " values; expected ", expected, " for ", config));
  }
  dst.assign(src.begin(), src.end());
}

/// `n` values uniform in ±1/sqrt(in), `nn.Linear`'s default initialisation range.
inline std::vector<float> random_linear(std::mt19937_64& rng, std::size_t n, std::size_t in) {
  const float bound = 1.0f / std::sqrt(float(in));
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

/// The checks every routed-experts entry point makes of its plan, with `fn` (the caller's name)
/// in the messages: the plan is built, for C's number of experts. Returns plan.rows().
/// @throws InvalidArgument otherwise
template <MoeConfig C, class Plan>
index_t check_routed_plan(std::string_view fn, const Plan& plan) {
  daedalus::detail::require<InvalidArgument>(plan.k() >= 1, fn,
                                             ": 'plan' is empty; expected a built RoutingPlan");
  daedalus::detail::require<InvalidArgument>(
      plan.num_experts() == C::n_routed_experts, fn, ": 'plan' was built for ", plan.num_experts(),
      " experts; expected ", C::n_routed_experts, " for ", config_name<C>());
  return plan.rows();
}

/// check_routed_plan, and `expert_in` is [plan.rows(), dim]. Returns plan.rows().
/// @throws InvalidArgument otherwise
template <MoeConfig C, class Plan, class Space>
index_t check_routed_plan_and_input(std::string_view fn, const Plan& plan,
                                    TensorView<const float, 2, Space> expert_in) {
  const index_t rows = check_routed_plan<C>(fn, plan);
  daedalus::detail::check_extents(fn, "expert_in", expert_in, {rows, index_t(C::dim)});
  return rows;
}

}  // namespace detail

/// The SwiGLU weights of one MLP of `width` hidden units over `dim` inputs, the layout all
/// expert kernels read: w1 and w3 stacked as one [2 · width, dim] matrix (w1's rows, then w3's),
/// so one pass over a token block reads both gate projections, and w2 [dim, width].
struct SwigluView {
  const float* w13;  // [2 * width, dim]: w1 rows then w3 rows
  const float* w2;   // [dim, width]
  index_t width;
};

/// The routed experts of one MoE layer, fp32, DeepSeek's [out, in] layout.
template <MoeConfig C>
class ExpertWeights {
 public:
  using config = C;
  using memory_space = HostMemory;
  static constexpr int num_experts = C::n_routed_experts;
  static constexpr index_t dim = C::dim;
  static constexpr index_t inter = C::moe_inter_dim;

  /// Copies checkpoint arrays: w1 and w3 [n_routed_experts, moe_inter_dim, dim] (expert e's
  /// `w1.weight` at e · inter · dim), w2 [n_routed_experts, dim, moe_inter_dim].
  /// @throws InvalidArgument naming the first array whose size is wrong.
  static ExpertWeights from_arrays(std::span<const float> w1, std::span<const float> w3,
                                   std::span<const float> w2) {
    constexpr std::string_view fn = "daedalus::moe::ExpertWeights::from_arrays";
    const std::size_t per = std::size_t(inter) * std::size_t(dim);
    const std::size_t all = per * std::size_t(num_experts);
    std::vector<float> check;  // sizes are checked before anything is copied
    if (w1.size() != all || w3.size() != all || w2.size() != all) {
      detail::take_array(fn, config_name<C>(), check, w1, "w1", all);
      detail::take_array(fn, config_name<C>(), check, w3, "w3", all);
      detail::take_array(fn, config_name<C>(), check, w2, "w2", all);
    }
    ExpertWeights w;
    w.w13_.resize(2 * all);
    for (int e = 0; e < num_experts; ++e) {
      float* dst = w.w13_.data() + std::size_t(e) * 2 * per;
      std::copy_n(w1.data() + std::size_t(e) * per, per, dst);
      std::copy_n(w3.data() + std::size_t(e) * per, per, dst + per);
    }
    w.w2_.assign(w2.begin(), w2.end());
    return w;
  }

  /// Random weights for examples, benchmarks and tests, uniform in ±1/sqrt(in) (`nn.Linear`'s
  /// default range); deterministic for a given seed. Drawn in place (V2-Lite's experts are
  /// 2.2 GB in fp32; a detour through checkpoint-layout arrays would double that).
  static ExpertWeights random(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const std::size_t per = std::size_t(inter) * std::size_t(dim);
    ExpertWeights w;
    w.w13_.resize(2 * per * std::size_t(num_experts));
    w.w2_.resize(per * std::size_t(num_experts));
    auto fill = [&](float* dst, std::size_t n, std::size_t in) {
      std::uniform_real_distribution<float> dist(-1.0f / std::sqrt(float(in)),
                                                 1.0f / std::sqrt(float(in)));
      for (std::size_t i = 0; i < n; ++i) dst[i] = dist(rng);
    };
    for (int half = 0; half < 2; ++half)  // every w1, then every w3
      for (int e = 0; e < num_experts; ++e)
        fill(w.w13_.data() + (std::size_t(e) * 2 + std::size_t(half)) * per, per, dim);
    fill(w.w2_.data(), w.w2_.size(), inter);
    return w;
  }

  /// [inter, dim] expert e's w1.
  [[nodiscard]] HostView<const float, 2> w1(int e) const { return {w13(e), {inter, dim}}; }
  /// [inter, dim] expert e's w3.
  [[nodiscard]] HostView<const float, 2> w3(int e) const {
    return {w13(e) + inter * dim, {inter, dim}};
  }
  /// [dim, inter] expert e's w2.
  [[nodiscard]] HostView<const float, 2> w2(int e) const {
    return {w2_.data() + std::size_t(e) * dim * inter, {dim, inter}};
  }
  /// Expert e in the kernels' layout.
  [[nodiscard]] SwigluView swiglu(int e) const { return {w13(e), w2(e).data(), inter}; }

 private:
  const float* w13(int e) const { return w13_.data() + std::size_t(e) * 2 * inter * dim; }
  std::vector<float> w13_;  // [E, 2 * inter, dim]
  std::vector<float> w2_;   // [E, dim, inter]
};

/// The shared experts of one MoE layer: DeepSeek's `MLP(dim, n_shared_experts · moe_inter_dim)`,
/// fp32, [out, in] layout. Empty (width 0, output 0) for a config without shared experts.
template <MoeConfig C>
class SharedExpertWeights {
 public:
  using config = C;
  using memory_space = HostMemory;
  static constexpr index_t dim = C::dim;
  static constexpr index_t width = index_t(C::n_shared_experts) * C::moe_inter_dim;

  /// Copies checkpoint arrays: w1 and w3 [n_shared · inter, dim], w2 [dim, n_shared · inter].
  /// @throws InvalidArgument naming the first array whose size is wrong.
  static SharedExpertWeights from_arrays(std::span<const float> w1, std::span<const float> w3,
                                         std::span<const float> w2) {
    constexpr std::string_view fn = "daedalus::moe::SharedExpertWeights::from_arrays";
    const std::size_t all = std::size_t(width) * std::size_t(dim);
    std::vector<float> check;
    if (w1.size() != all || w3.size() != all || w2.size() != all) {
      detail::take_array(fn, config_name<C>(), check, w1, "w1", all);
      detail::take_array(fn, config_name<C>(), check, w3, "w3", all);
      detail::take_array(fn, config_name<C>(), check, w2, "w2", all);
    }
    SharedExpertWeights w;
    w.w13_.resize(2 * all);
    std::copy(w1.begin(), w1.end(), w.w13_.begin());
    std::copy(w3.begin(), w3.end(), w.w13_.begin() + std::ptrdiff_t(all));
    w.w2_.assign(w2.begin(), w2.end());
    return w;
  }

  /// Random weights uniform in ±1/sqrt(in); deterministic for a given seed.
  static SharedExpertWeights random(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const std::size_t all = std::size_t(width) * dim;
    const std::vector<float> w1 = detail::random_linear(rng, all, dim);
    const std::vector<float> w3 = detail::random_linear(rng, all, dim);
    const std::vector<float> w2 =
        detail::random_linear(rng, all, std::size_t(std::max<index_t>(width, 1)));
    return from_arrays(w1, w3, w2);
  }

  /// [n_shared · inter, dim]
  [[nodiscard]] HostView<const float, 2> w1() const { return {w13_.data(), {width, dim}}; }
  /// [n_shared · inter, dim]
  [[nodiscard]] HostView<const float, 2> w3() const {
    return {w13_.data() + width * dim, {width, dim}};
  }
  /// [dim, n_shared · inter]
  [[nodiscard]] HostView<const float, 2> w2() const { return {w2_.data(), {dim, width}}; }
  /// The MLP in the kernels' layout.
  [[nodiscard]] SwigluView swiglu() const { return {w13_.data(), w2_.data(), width}; }

 private:
  std::vector<float> w13_;  // [2 * width, dim]
  std::vector<float> w2_;   // [dim, width]
};

/// Runs every routed expert over its segment of the plan: for each expert e and each kept row r
/// of segment e, expert_out[r] = w2_e(silu(w1_e expert_in[r]) ⊙ w3_e expert_in[r]); padding rows
/// of `hidden` and `expert_out` are set to zero (what the expert gives for dispatch's zero rows). A
/// grouped GEMM: each segment is one block of rows multiplied by its expert's weights. Every output
/// element is computed by one thread in a fixed order, so the result does not depend on the thread
/// count.
///
/// @param weights    ExpertWeights<C> (CpuBackend) or DeviceExpertWeights<C, T> (CudaBackend:
///                   16-bit weights, activations rounded to T before the tensor-core products)
/// @param plan       RoutingPlan or DeviceRoutingPlan, built for C's experts
/// @param expert_in  [plan.rows(), dim] dispatched rows
/// @param hidden     [plan.rows(), moe_inter_dim] workspace (silu(w1 x) ⊙ w3 x on return)
/// @param expert_out [plan.rows(), dim] out
/// @throws InvalidArgument when the plan is empty, was built for another number of experts, or
///         the extents disagree with it
template <class Backend, class Weights, class Plan>
void routed_experts(const Backend& backend, const Weights& weights, const Plan& plan,
                    TensorView<const float, 2, typename Backend::memory_space> expert_in,
                    TensorView<float, 2, typename Backend::memory_space> hidden,
                    TensorView<float, 2, typename Backend::memory_space> expert_out) {
  using C = typename Weights::config;
  static_assert(std::is_same_v<typename Weights::memory_space, typename Backend::memory_space> &&
                    std::is_same_v<typename Plan::memory_space, typename Backend::memory_space>,
                "daedalus::moe::routed_experts: 'weights' and 'plan' must live where the backend "
                "reads (ExpertWeights and RoutingPlan with CpuBackend, DeviceExpertWeights and "
                "DeviceRoutingPlan with CudaBackend)");
  constexpr std::string_view fn = "daedalus::moe::routed_experts";
  const index_t rows = detail::check_routed_plan_and_input<C>(fn, plan, expert_in);
  daedalus::detail::check_extents(fn, "hidden", hidden, {rows, index_t(C::moe_inter_dim)});
  daedalus::detail::check_extents(fn, "expert_out", expert_out, {rows, index_t(C::dim)});
  detail::ExpertsImpl<Backend>::routed(backend, weights, plan, expert_in, hidden, expert_out);
}

/// The shared experts over every token: out = w2(silu(w1 x) ⊙ w3 x) (DeepSeek `MoE.forward`'s
/// z), overwriting `out`; a layer then adds the routed experts with CombineInto::accumulate.
///
/// @param weights SharedExpertWeights<C> (CpuBackend) or DeviceSharedExpertWeights<C, T>
///                (CudaBackend: 16-bit weights, activations rounded to T before the tensor-core
///                products)
/// @param x       [tokens, dim]
/// @param hidden  [tokens, n_shared_experts · moe_inter_dim] workspace
/// @param out     [tokens, dim] out (zero for a config without shared experts)
/// @throws InvalidArgument when the extents disagree
template <class Backend, class Weights>
void shared_experts(const Backend& backend, const Weights& weights,
                    TensorView<const float, 2, typename Backend::memory_space> x,
                    TensorView<float, 2, typename Backend::memory_space> hidden,
                    TensorView<float, 2, typename Backend::memory_space> out) {
  using C = typename Weights::config;
  static_assert(std::is_same_v<typename Weights::memory_space, typename Backend::memory_space>,
                "daedalus::moe::shared_experts: 'weights' must live where the backend reads "
                "(SharedExpertWeights with CpuBackend, DeviceSharedExpertWeights with "
                "CudaBackend)");
  constexpr std::string_view fn = "daedalus::moe::shared_experts";
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, index_t(C::dim)});
  daedalus::detail::check_extents(fn, "hidden", hidden, {tokens, Weights::width});
  daedalus::detail::check_extents(fn, "out", out, {tokens, index_t(C::dim)});
  detail::ExpertsImpl<Backend>::shared(backend, weights, x, hidden, out);
}

}  // namespace daedalus::moe
