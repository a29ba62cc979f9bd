// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"

/// The routing plan of a Mixture-of-Experts layer: where each (token, slot) pair of the gate's
/// top-k output goes in an expert-contiguous buffer, and back. DeepSeek-V3 routes dropless
/// (DeepSeek-V3 report, section 2.1.2, "No Token-Dropping"); capacity and padding are options
/// for engines that need fixed-size expert batches (Megatron-Core's token dropping) or
/// block-aligned segments (vLLM's moe_align_block_size).
namespace daedalus::moe {

/// Which slots an expert over capacity keeps (Megatron-Core's `moe_token_drop_policy`).
enum class DropPolicy {
  /// Keep the `capacity` slots with the largest routing weight; equal weights keep the earlier
  /// slot (lower token index, then lower slot index).
  probs,
  /// Keep the first `capacity` slots in token order (lower token index, then lower slot index).
  position,
};

namespace detail {

/// Slots each expert may keep (Megatron-Core, moe_utils.get_capacity): ceil(slots / E · factor),
/// or `slots` when dropless (factor 0). Never more than `slots`, which no expert can exceed: the
/// same plan, and a huge factor cannot overflow the integer.
inline index_t expert_capacity(index_t slots, int num_experts, double capacity_factor) {
  if (capacity_factor <= 0.0) return slots;
  const double capacity = std::ceil(double(slots) / double(num_experts) * capacity_factor);
  return capacity >= double(slots) ? slots : index_t(capacity);
}

}  // namespace detail

/// Options of a routing plan. The defaults are DeepSeek's: dropless, unpadded.
struct PlanSettings {
  /// 0 (the default): dropless, every slot is kept. Positive: each expert keeps at most
  /// capacity = ceil(tokens · k / num_experts · capacity_factor) slots (Megatron-Core's
  /// `get_capacity`); the others are dropped and contribute nothing to the output.
  double capacity_factor = 0.0;
  /// Which slots an expert over capacity keeps.
  DropPolicy drop_policy = DropPolicy::probs;
  /// Each expert's segment is padded with empty rows to a multiple of this many rows (a grouped
  /// GEMM's block). 1: no padding. At most tokens · k + num_experts · (pad_block − 1) rows.
  index_t pad_block = 1;
};

namespace detail {

/// The checks of a plan's build that do not read the ids or weights, the same on every backend
/// (RoutingPlan::build, DeviceRoutingPlan::build): extents, expert count, settings, and that the
/// rows fit 32-bit indices (half the index traffic of 64-bit ones). Returns the slot count
/// tokens · k. Messages start with `fn`.
template <class IdsView, class WeightsView>
index_t check_plan_arguments(std::string_view fn, const IdsView& topk_ids,
                             const WeightsView& topk_weights, int num_experts,
                             const PlanSettings& settings) {
  const index_t tokens = topk_ids.extent(0);
  const index_t k = topk_ids.extent(1);
  daedalus::detail::require<InvalidArgument>(
      k >= 1, fn, ": 'topk_ids' has extents ",
      daedalus::detail::format_extents<index_t>(topk_ids.extents()),
      "; expected at least one column (k >= 1)");
  daedalus::detail::check_extents(fn, "topk_ids", topk_ids, {tokens, k});
  daedalus::detail::check_extents(fn, "topk_weights", topk_weights, {tokens, k});
  daedalus::detail::require<InvalidArgument>(num_experts >= 1, fn, ": 'num_experts' is ",
                                             num_experts, "; expected at least 1");
  daedalus::detail::require<InvalidArgument>(
      std::isfinite(settings.capacity_factor) && settings.capacity_factor >= 0.0, fn,
      ": 'capacity_factor' is ", settings.capacity_factor,
      "; expected 0 (dropless) or a positive finite number");
  daedalus::detail::require<InvalidArgument>(settings.pad_block >= 1, fn, ": 'pad_block' is ",
                                             settings.pad_block, "; expected at least 1");
  const index_t slots = tokens * k;
  const index_t max_rows = slots + index_t(num_experts) * (settings.pad_block - 1);
  daedalus::detail::require<InvalidArgument>(
      max_rows <= std::numeric_limits<std::int32_t>::max(), fn, ": a plan of ", tokens,
      " tokens × k = ", k, " with pad_block ", settings.pad_block, " may need ", max_rows,
      " rows; expected at most ", std::numeric_limits<std::int32_t>::max());
  return slots;
}

}  // namespace detail

/// A stable sort of the gate's (token, slot) pairs by expert: segment e of the expert-ordered
/// rows holds, in increasing (token, slot) order, the slots routed to expert e that were kept,
/// followed by padding rows. Slot s = token · k + j names column j of token `token` in the gate's
/// [tokens, k] outputs.
///
/// A plan is built once per batch and reused by dispatch, the experts and combine. `build`
/// reuses the plan's storage, so a plan kept across steps allocates only when a batch grows.
class RoutingPlan {
 public:
  using memory_space = HostMemory;

  /// Builds the plan of one batch.
  /// @param topk_ids     [tokens, k] expert ids, each in [0, num_experts)
  /// @param topk_weights [tokens, k] routing weights (the gate's final weights); finite
  /// @param num_experts  number of routed experts, at least 1
  /// @param settings     capacity, drop policy and padding (default: dropless, unpadded)
  /// @throws InvalidArgument for mismatched extents, k < 1, num_experts < 1, a negative or
  ///         non-finite capacity factor, pad_block < 1 or a plan too large for 32-bit row
  ///         indices; OutOfRange for an expert id outside [0, num_experts), naming the token and
  ///         slot; NumericError for a non-finite weight, naming the token and slot. A failed
  ///         build leaves the plan as it was.
  void build(HostView<const std::int32_t, 2> topk_ids, HostView<const float, 2> topk_weights,
             int num_experts, const PlanSettings& settings = {}) {
    constexpr std::string_view fn = "daedalus::moe::RoutingPlan::build";
    const index_t tokens = topk_ids.extent(0);
    const index_t k = topk_ids.extent(1);
    const index_t slots =
        detail::check_plan_arguments(fn, topk_ids, topk_weights, num_experts, settings);
    const std::int32_t* ids = topk_ids.data();
    const float* weights = topk_weights.data();
    for (index_t s = 0; s < slots; ++s) {
      if (ids[s] < 0 || ids[s] >= num_experts) {
        throw OutOfRange(daedalus::detail::message(fn, ": 'topk_ids' holds expert id ", ids[s],
                                                   " at token ", s / k, ", slot ", s % k,
                                                   "; expected an id in [0, ", num_experts, ")"));
      }
      if (!std::isfinite(weights[s])) {
        throw NumericError(
            daedalus::detail::message(fn, ": 'topk_weights' holds a non-finite value (", weights[s],
                                      ") at token ", s / k, ", slot ", s % k));
      }
    }

    // Everything is valid: from here on nothing throws but allocation.
    tokens_ = tokens;
    k_ = k;
    num_experts_ = num_experts;
    settings_ = settings;
    const auto expert_count = std::size_t(num_experts);
    routed_counts_.assign(expert_count, 0);
    for (index_t s = 0; s < slots; ++s) ++routed_counts_[std::size_t(ids[s])];

    // Counting sort of the slots by expert, stable because slots are visited in (token, slot)
    // order: sorted_[starts[e] ..) lists expert e's slots in increasing slot order.
    std::vector<index_t>& starts = scratch_starts_;
    starts.assign(expert_count + 1, 0);
    for (std::size_t e = 0; e < expert_count; ++e) starts[e + 1] = starts[e] + routed_counts_[e];
    sorted_.resize(std::size_t(slots));
    {
      std::vector<index_t>& next = scratch_next_;
      next.assign(starts.begin(), starts.end() - 1);
      for (index_t s = 0; s < slots; ++s)
        sorted_[std::size_t(next[std::size_t(ids[s])]++)] = std::int32_t(s);
    }

    capacity_ = detail::expert_capacity(slots, num_experts, settings.capacity_factor);
    counts_.resize(expert_count);
    dropped_ = 0;
    for (std::size_t e = 0; e < expert_count; ++e) {
      const index_t n = routed_counts_[e];
      counts_[e] = std::min(n, capacity_);
      dropped_ += n - counts_[e];
      if (n <= capacity_) continue;
      // Over capacity: reorder this expert's slots so that the kept ones come first, then
      // restore (token, slot) order among the kept ones.
      std::int32_t* seg = sorted_.data() + starts[e];
      if (settings.drop_policy == DropPolicy::probs) {
        std::nth_element(seg, seg + capacity_ - 1, seg + n, [&](std::int32_t a, std::int32_t b) {
          return weights[a] != weights[b] ? weights[a] > weights[b] : a < b;
        });
        std::sort(seg, seg + capacity_);
      }
      // DropPolicy::position keeps the first `capacity` slots, already in place.
    }

    // Segments, padded to the block: offsets_[e] is where expert e's rows start.
    const index_t block = settings.pad_block;
    offsets_.resize(expert_count + 1);
    offsets_[0] = 0;
    for (std::size_t e = 0; e < expert_count; ++e)
      offsets_[e + 1] = offsets_[e] + (counts_[e] + block - 1) / block * block;
    const index_t rows = offsets_[expert_count];
    row_slot_.assign(std::size_t(rows), -1);
    row_weight_.assign(std::size_t(rows), 0.0f);
    slot_row_.assign(std::size_t(slots), -1);
    for (std::size_t e = 0; e < expert_count; ++e) {
      const std::int32_t* seg = sorted_.data() + starts[e];
      for (index_t i = 0; i < counts_[e]; ++i) {
        const std::int32_t s = seg[i];
        const index_t row = offsets_[e] + i;
        row_slot_[std::size_t(row)] = s;
        row_weight_[std::size_t(row)] = weights[s];
        slot_row_[std::size_t(s)] = std::int32_t(row);
      }
    }
  }

  /// Tokens of the batch the plan was built for.
  [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
  /// Experts per token (columns of topk_ids).
  [[nodiscard]] index_t k() const noexcept { return k_; }
  /// Routed experts.
  [[nodiscard]] int num_experts() const noexcept { return num_experts_; }
  /// Rows of the expert-ordered buffer: kept slots plus padding rows.
  [[nodiscard]] index_t rows() const noexcept { return offsets_.empty() ? 0 : offsets_.back(); }
  /// Slots each expert may keep: tokens · k when dropless, and at most that.
  [[nodiscard]] index_t capacity() const noexcept { return capacity_; }
  /// Slots dropped for capacity in this batch (0 when dropless).
  [[nodiscard]] index_t dropped() const noexcept { return dropped_; }
  /// The settings the plan was built with.
  [[nodiscard]] const PlanSettings& settings() const noexcept { return settings_; }

  /// [num_experts + 1] expert e's rows are [offsets[e], offsets[e+1]), padding included.
  [[nodiscard]] std::span<const index_t> offsets() const noexcept { return offsets_; }
  /// [num_experts] kept slots per expert: the first counts[e] rows of segment e are real.
  [[nodiscard]] std::span<const index_t> counts() const noexcept { return counts_; }
  /// [num_experts] slots the gate routed to each expert, before capacity (the load).
  [[nodiscard]] std::span<const index_t> routed_counts() const noexcept { return routed_counts_; }
  /// [rows] the slot (token · k + j) each row holds, or -1 for a padding row: the permutation.
  [[nodiscard]] std::span<const std::int32_t> row_slot() const noexcept { return row_slot_; }
  /// [rows] the routing weight of each row's slot; 0 for padding rows.
  [[nodiscard]] std::span<const float> row_weight() const noexcept { return row_weight_; }
  /// [tokens · k] the row each slot went to, or -1 if it was dropped: the inverse map.
  [[nodiscard]] std::span<const std::int32_t> slot_row() const noexcept { return slot_row_; }

 private:
  index_t tokens_ = 0;
  index_t k_ = 0;
  int num_experts_ = 0;
  index_t capacity_ = 0;
  index_t dropped_ = 0;
  PlanSettings settings_{};
  std::vector<index_t> offsets_, counts_, routed_counts_;
  std::vector<std::int32_t> row_slot_, slot_row_;
  std::vector<float> row_weight_;
  // Working storage kept between builds so a reused plan does not allocate.
  std::vector<std::int32_t> sorted_;
  std::vector<index_t> scratch_starts_, scratch_next_;
};

}  // namespace daedalus::moe
