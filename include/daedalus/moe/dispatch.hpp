// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <string_view>
#include <type_traits>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/core/traits.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// Dispatch (gather token rows into the expert-ordered buffer a RoutingPlan describes) and
/// combine (the weighted sum of each token's expert outputs back in token order). The fronts
/// check every argument, then hand the work to `detail::DispatchImpl<Backend>`, which each backend
/// folder specialises.
namespace daedalus::moe {

/// Whether combine replaces the output or adds to what it holds (e.g. the shared experts' output).
enum class CombineInto { overwrite, accumulate };

namespace detail {

/// The backend's dispatch and combine kernels (`moe/cpu/dispatch.hpp`, `moe/cuda/...`).
template <class Backend>
struct DispatchImpl {
  static_assert(daedalus::detail::dependent_false<Backend>,
                "daedalus::moe: no dispatch/combine implementation for this backend is visible: "
                "include <daedalus/daedalus.hpp> for CpuBackend, or <daedalus/cuda.cuh> in a .cu "
                "file for CudaBackend");
};

/// The plan must be built, and live where the backend reads (RoutingPlan on the host,
/// DeviceRoutingPlan on the GPU).
template <class Backend, class Plan>
void check_plan(std::string_view fn, const Plan& plan) {
  static_assert(std::is_same_v<typename Plan::memory_space, typename Backend::memory_space>,
                "daedalus::moe: 'plan' lives in a memory space this backend cannot read (use "
                "RoutingPlan with CpuBackend, DeviceRoutingPlan with CudaBackend)");
  daedalus::detail::require<InvalidArgument>(plan.k() >= 1, fn,
                                             ": 'plan' is empty; expected a built RoutingPlan");
}

}  // namespace detail

/// Gathers each kept slot's token row into the expert-ordered buffer: row r of `expert_in` is
/// x[plan.row_slot()[r] / k], and padding rows are zero (so an expert run over a padded segment
/// sees finite inputs and produces zeros there).
///
/// @param plan      a RoutingPlan (CpuBackend) or DeviceRoutingPlan (CudaBackend)
/// @param x         [tokens, width] token rows (packed)
/// @param expert_in [plan.rows(), width] out
/// @throws InvalidArgument when the plan is empty or the extents disagree with it
template <class Backend, class Plan>
void dispatch(const Backend& backend, const Plan& plan,
              TensorView<const float, 2, typename Backend::memory_space> x,
              TensorView<float, 2, typename Backend::memory_space> expert_in) {
  constexpr std::string_view fn = "daedalus::moe::dispatch";
  detail::check_plan<Backend>(fn, plan);
  const index_t width = x.extent(1);
  daedalus::detail::check_extents(fn, "x", x, {plan.tokens(), width});
  daedalus::detail::check_extents(fn, "expert_in", expert_in, {plan.rows(), width});
  detail::DispatchImpl<Backend>::dispatch(backend, plan, x, expert_in);
}

/// out[t] = Σ_j w[t, j] · expert_out[row of slot (t, j)] over the kept slots of token t, summed
/// in slot order j = 0, 1, ... (after the existing value of out[t] with CombineInto::accumulate).
/// Each token is summed by one thread in that fixed order, so the result is bitwise the same
/// from run to run and for every thread count. Dropped slots contribute nothing; a token whose
/// slots were all dropped gets 0 (or keeps its value when accumulating). The weights are the
/// plan's (`row_weight`), i.e. the gate's topk_weights.
///
/// @param expert_out [plan.rows(), width] expert outputs in plan order
/// @param out        [tokens, width] out
/// @throws InvalidArgument when the plan is empty or the extents disagree with it
template <class Backend, class Plan>
void combine(const Backend& backend, const Plan& plan,
             TensorView<const float, 2, typename Backend::memory_space> expert_out,
             TensorView<float, 2, typename Backend::memory_space> out,
             CombineInto mode = CombineInto::overwrite) {
  constexpr std::string_view fn = "daedalus::moe::combine";
  detail::check_plan<Backend>(fn, plan);
  const index_t width = expert_out.extent(1);
  daedalus::detail::check_extents(fn, "expert_out", expert_out, {plan.rows(), width});
  daedalus::detail::check_extents(fn, "out", out, {plan.tokens(), width});
  detail::DispatchImpl<Backend>::combine(backend, plan, expert_out, out, mode);
}

}  // namespace daedalus::moe
