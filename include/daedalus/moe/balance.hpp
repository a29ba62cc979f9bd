// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"

/// Expert load balancing for training: load statistics, the auxiliary-loss-free bias update
/// (Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
/// arXiv 2408.15664, Algorithm 1; DeepSeek-V3 report, section 2.1.2), and, as plain values for
/// users who train with them, the complementary sequence-wise balance loss (DeepSeek-V3 report,
/// eqs. 17-20) and the classic auxiliary loss (GShard/Switch; DeepSeek-V2's expert-level loss).
///
/// A training step with loss-free balancing:
///   moe::route(cpu, gate, x, ids, weights);                 // selection uses gate.bias()
///   stats.record(ids);                                      // counts of this step
///   balancer.update(gate.bias(), stats.step_counts());      // b_i += γ · sign(c̄ − c_i)
/// Every call validates its arguments before changing anything, so a step that throws (NaN
/// scores in `route`, an id out of range in `record`) leaves the counts and the bias as they were.
namespace daedalus::moe {

/// Maximal violation (MaxVio, arXiv 2408.15664, section 4.1): (max_i c_i − c̄) / c̄, c̄ = Σ_i c_i / E,
/// the relative overload of the busiest expert. 0 when perfectly balanced; 0 for no tokens at all.
inline double max_violation(std::span<const std::int64_t> counts) {
  if (counts.empty()) return 0.0;
  std::int64_t total = 0, most = 0;
  for (const std::int64_t c : counts) {
    total += c;
    most = std::max(most, c);
  }
  if (total == 0) return 0.0;
  const double mean = double(total) / double(counts.size());
  return (double(most) - mean) / mean;
}

/// Per-expert token counts of each step and of the whole run, with MaxVio of both: MaxVio_batch
/// (of the last step, and averaged over the steps recorded) and MaxVio_global (of the counts
/// accumulated over the run), as the loss-free balancing paper reports them (section 4.1).
class LoadStats {
 public:
  /// @throws InvalidArgument when num_experts < 1.
  explicit LoadStats(int num_experts) {
    daedalus::detail::require<InvalidArgument>(num_experts >= 1,
                                               "daedalus::moe::LoadStats: 'num_experts' is ",
                                               num_experts, "; expected at least 1");
    step_.assign(std::size_t(num_experts), 0);
    total_.assign(std::size_t(num_experts), 0);
  }

  /// Counts the slots of one step's gate output: c_i = #{(t, j) : topk_ids[t, j] = i}.
  /// @param topk_ids [tokens, k] expert ids
  /// @throws InvalidArgument for a non-packed view; OutOfRange naming the token and slot of an
  ///         id outside [0, num_experts). The statistics are unchanged on a throw.
  void record(HostView<const std::int32_t, 2> topk_ids) {
    constexpr std::string_view fn = "daedalus::moe::LoadStats::record";
    daedalus::detail::check_extents(fn, "topk_ids", topk_ids,
                                    {topk_ids.extent(0), topk_ids.extent(1)});
    const index_t k = topk_ids.extent(1);
    const std::int32_t experts = std::int32_t(step_.size());
    std::vector<std::int64_t> counts(step_.size(), 0);
    for (index_t i = 0; i < topk_ids.size(); ++i) {
      const std::int32_t e = topk_ids.data()[i];
      daedalus::detail::require<OutOfRange>(e >= 0 && e < experts, fn, ": 'topk_ids' holds ", e,
                                            " at token ", i / k, ", slot ", i % k,
                                            "; expected an expert id in [0, ", experts, ")");
      ++counts[std::size_t(e)];
    }
    commit(counts);
  }

  /// Records one step's per-expert counts directly (e.g. summed over data-parallel ranks).
  /// @throws InvalidArgument for a size other than num_experts or a negative count.
  void record_counts(std::span<const std::int64_t> counts) {
    constexpr std::string_view fn = "daedalus::moe::LoadStats::record_counts";
    daedalus::detail::require<InvalidArgument>(counts.size() == step_.size(), fn, ": 'counts' has ",
                                               counts.size(), " entries; expected ", step_.size());
    for (std::size_t e = 0; e < counts.size(); ++e) {
      daedalus::detail::require<InvalidArgument>(counts[e] >= 0, fn, ": 'counts' holds ", counts[e],
                                                 " at expert ", e, "; expected a count >= 0");
    }
    commit(std::vector<std::int64_t>(counts.begin(), counts.end()));
  }

  [[nodiscard]] int num_experts() const { return int(step_.size()); }
  /// Steps recorded since construction or reset().
  [[nodiscard]] std::int64_t steps() const { return steps_; }
  /// [num_experts] counts of the last step recorded (zeros before the first).
  [[nodiscard]] std::span<const std::int64_t> step_counts() const { return step_; }
  /// [num_experts] counts summed over every step recorded.
  [[nodiscard]] std::span<const std::int64_t> total_counts() const { return total_; }
  /// MaxVio_batch of the last step.
  [[nodiscard]] double max_vio_batch() const { return max_violation(step_); }
  /// MaxVio_batch averaged over the steps recorded (0 before the first).
  [[nodiscard]] double mean_max_vio_batch() const {
    return steps_ ? sum_max_vio_batch_ / double(steps_) : 0.0;
  }
  /// MaxVio_global: of the counts accumulated over the run.
  [[nodiscard]] double max_vio_global() const { return max_violation(total_); }

  /// Forgets every step (e.g. to measure a validation run on its own).
  void reset() {
    std::fill(step_.begin(), step_.end(), 0);
    std::fill(total_.begin(), total_.end(), 0);
    steps_ = 0;
    sum_max_vio_batch_ = 0.0;
  }

 private:
  void commit(const std::vector<std::int64_t>& counts) {
    step_ = counts;
    for (std::size_t e = 0; e < counts.size(); ++e) total_[e] += counts[e];
    ++steps_;
    sum_max_vio_batch_ += max_violation(step_);
  }

  std::vector<std::int64_t> step_;   // [E]
  std::vector<std::int64_t> total_;  // [E]
  std::int64_t steps_ = 0;
  double sum_max_vio_batch_ = 0.0;
};

/// How the balancer moves the selection bias from a step's counts c_i (c̄ = their mean,
/// e_i = c̄ − c_i the expert's shortfall).
enum class BiasUpdate {
  /// b_i ← b_i + u · sign(e_i): DeepSeek-V3's rule (report, section 2.1.2; γ = 0.001) and the
  /// paper's default (arXiv 2408.15664, Algorithm 1). For an additive bias.
  sign,
  /// b_i ← b_i + u · e_i / c̄: the paper's proportional variant ("b_i += u·e_i", which it finds
  /// best for softmax gates),
  /// here on the shortfall relative to the mean so that u does not depend on the batch size
  /// (the paper's u applies to raw counts: u_paper = u / c̄). For an additive bias.
  proportional,
  /// b_i ← b_i · (1 + u · sign(e_i)): for the paper's multiplicative bias (selection score
  /// s · b, b starting at 1, which the paper compares with the additive one). The paper gives
  /// no formula for this update; a sign step on the factor is daedalus's choice. Use with
  /// GateSettings::bias_mode = BiasMode::multiplicative. Biases must stay positive.
  multiplicative,
};

/// Options of a BiasBalancer.
struct BalancerSettings {
  BiasUpdate rule = BiasUpdate::sign;
  /// u (γ in the V3 report): 0.001 as in DeepSeek-V3; DeepSeek-V3 sets it to 0 for its last
  /// 500B training tokens, which `update_rate = 0` reproduces.
  double update_rate = 0.001;
};

/// The auxiliary-loss-free balancer: after each step, nudges every expert's selection bias
/// towards balance. The bias has no gradient and only chooses experts (gate.hpp, step 2).
class BiasBalancer {
 public:
  /// @throws InvalidArgument when num_experts < 1 or the update rate is negative or not finite.
  explicit BiasBalancer(int num_experts, const BalancerSettings& settings = {})
      : experts_(num_experts), settings_(settings) {
    constexpr std::string_view fn = "daedalus::moe::BiasBalancer";
    daedalus::detail::require<InvalidArgument>(num_experts >= 1, fn, ": 'num_experts' is ",
                                               num_experts, "; expected at least 1");
    daedalus::detail::require<InvalidArgument>(
        std::isfinite(settings.update_rate) && settings.update_rate >= 0.0, fn,
        ": 'update_rate' is ", settings.update_rate, "; expected a finite value >= 0");
  }

  [[nodiscard]] int num_experts() const { return experts_; }
  [[nodiscard]] const BalancerSettings& settings() const { return settings_; }

  /// Updates `bias` from one step's counts (LoadStats::step_counts()). A step with no tokens
  /// changes nothing.
  /// @param bias   [num_experts] the gate's selection bias (GateWeights::bias())
  /// @param counts [num_experts] tokens routed to each expert this step
  /// @throws InvalidArgument for mismatched sizes, a negative count, a non-finite bias, or (for
  ///         the multiplicative rule) a bias that is not positive. The bias is unchanged on a
  ///         throw.
  void update(HostView<float, 1> bias, std::span<const std::int64_t> counts) const {
    constexpr std::string_view fn = "daedalus::moe::BiasBalancer::update";
    daedalus::detail::check_extents(fn, "bias", bias, {index_t(experts_)});
    daedalus::detail::require<InvalidArgument>(counts.size() == std::size_t(experts_), fn,
                                               ": 'counts' has ", counts.size(),
                                               " entries; expected ", experts_);
    std::int64_t total = 0;
    for (int e = 0; e < experts_; ++e) {
      daedalus::detail::require<InvalidArgument>(counts[std::size_t(e)] >= 0, fn,
                                                 ": 'counts' holds ", counts[std::size_t(e)],
                                                 " at expert ", e, "; expected a count >= 0");
      const float b = bias.data()[e];
      daedalus::detail::require<InvalidArgument>(std::isfinite(b), fn, ": 'bias' holds ", b,
                                                 " at expert ", e, "; expected a finite value");
      daedalus::detail::require<InvalidArgument>(
          settings_.rule != BiasUpdate::multiplicative || b > 0.0f, fn, ": 'bias' holds ", b,
          " at expert ", e, "; the multiplicative rule needs positive biases (start at 1)");
      total += counts[std::size_t(e)];
    }
    if (total == 0) return;
    const double mean = double(total) / double(experts_);
    const double u = settings_.update_rate;
    for (int e = 0; e < experts_; ++e) {
      const double shortfall = mean - double(counts[std::size_t(e)]);  // e_i = c̄ − c_i
      const double sign = double((shortfall > 0.0) - (shortfall < 0.0));
      float& b = bias.data()[e];
      switch (settings_.rule) {
        case BiasUpdate::sign:
          b = float(double(b) + u * sign);
          break;
        case BiasUpdate::proportional:
          b = float(double(b) + u * shortfall / mean);
          break;
        case BiasUpdate::multiplicative:
          b = float(double(b) * (1.0 + u * sign));
          break;
      }
    }
  }

 private:
  int experts_;
  BalancerSettings settings_;
};

namespace detail {

/// The losses' checks that need no values, so that the CPU and the device functions share them
/// (any memory space): scores [tokens, experts] packed with at least one token and one expert.
template <class Space>
void check_loss_score_extents(std::string_view fn,
                              const TensorView<const float, 2, Space>& scores) {
  daedalus::detail::check_extents(fn, "scores", scores, {scores.extent(0), scores.extent(1)});
  daedalus::detail::require<InvalidArgument>(
      scores.extent(0) >= 1 && scores.extent(1) >= 1, fn, ": 'scores' has extents ",
      daedalus::detail::format_extents<index_t>(scores.extents()),
      "; expected at least one token and one expert");
}

/// The sequence-wise loss's K: in [1, E].
inline void check_loss_k(std::string_view fn, int k, index_t experts) {
  daedalus::detail::require<InvalidArgument>(k >= 1 && k <= experts, fn, ": 'k' is ", k,
                                             "; expected a value in [1, ", experts, "]");
}

/// The auxiliary loss's topk_ids: [tokens, K], K >= 1, packed (any memory space).
template <class Space>
void check_loss_id_extents(std::string_view fn, index_t tokens,
                           const TensorView<const std::int32_t, 2, Space>& topk_ids) {
  const index_t k = topk_ids.extent(1);
  daedalus::detail::require<InvalidArgument>(
      k >= 1, fn, ": 'topk_ids' has extents ",
      daedalus::detail::format_extents<index_t>(topk_ids.extents()),
      "; expected at least one column");
  daedalus::detail::check_extents(fn, "topk_ids", topk_ids, {tokens, k});
}

/// The NumericError of a bad score row: the first bad score of token t (at expert i), or, when
/// every score is finite and non-negative, a row summing to 0. Shared by the CPU check and the
/// device functions' report, so both say the same.
inline NumericError loss_score_error(std::string_view fn, index_t t, index_t i, float s) {
  return NumericError(daedalus::detail::message(
      fn, ": token ", t, " has score ", s, " at expert ", i,
      "; expected finite non-negative scores (softmax or sigmoid outputs)"));
}
inline NumericError loss_zero_row_error(std::string_view fn, index_t t) {
  return NumericError(daedalus::detail::message(fn, ": token ", t,
                                                " has scores summing to 0; expected a "
                                                "positive sum"));
}

/// The OutOfRange of an expert id outside [0, E) at flat slot i of topk_ids [tokens, k].
inline OutOfRange loss_id_error(std::string_view fn, index_t i, index_t k, std::int32_t e,
                                index_t experts) {
  return OutOfRange(daedalus::detail::message(fn, ": 'topk_ids' holds ", e, " at token ", i / k,
                                              ", slot ", i % k, "; expected an expert id in [0, ",
                                              experts, ")"));
}

/// Checks scores [tokens, experts] for the losses: finite, non-negative, positive row sums.
inline void check_loss_scores(std::string_view fn, const HostView<const float, 2>& scores) {
  check_loss_score_extents(fn, scores);
  const index_t experts = scores.extent(1);
  for (index_t t = 0; t < scores.extent(0); ++t) {
    double sum = 0.0;
    for (index_t i = 0; i < experts; ++i) {
      const float s = scores.data()[t * experts + i];
      if (!(std::isfinite(s) && s >= 0.0f)) throw loss_score_error(fn, t, i, s);
      sum += s;
    }
    if (!(sum > 0.0)) throw loss_zero_row_error(fn, t);
  }
}

/// P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t} (DeepSeek-V3 report, eqs. 19-20), in fp64.
inline std::vector<double> mean_normalized_scores(const HostView<const float, 2>& scores) {
  const index_t tokens = scores.extent(0), experts = scores.extent(1);
  std::vector<double> p(static_cast<std::size_t>(experts), 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    const float* row = scores.data() + t * experts;
    double sum = 0.0;
    for (index_t i = 0; i < experts; ++i) sum += row[i];
    for (index_t i = 0; i < experts; ++i) p[std::size_t(i)] += double(row[i]) / sum;
  }
  for (double& v : p) v /= double(tokens);
  return p;
}

}  // namespace detail

/// The complementary sequence-wise balance loss of DeepSeek-V3 (report, eqs. 17-20), as a value:
///   L = α Σ_i f_i P_i,  f_i = E / (K·T) · #{t : s_{i,t} ∈ TopK({s_{j,t}}_j, K)},
///   P_i = (1/T) Σ_t s'_{i,t},  s'_{i,t} = s_{i,t} / Σ_j s_{j,t},
/// over the T tokens of ONE sequence. The top-K here is over the unbiased scores of all experts
/// (eq. 18), not the group-limited biased choice; ties go to the lower expert id. A balanced
/// sequence gives L = α; a sequence routed entirely to K experts holding all the score gives
/// α·E/K.
/// @param scores [T, E] unbiased affinity scores (sigmoid or softmax outputs) of one sequence
/// @param k      K, the experts each token activates, in [1, E]
/// @param alpha  the balance factor; DeepSeek-V3 uses 0.0001
/// @throws InvalidArgument for bad extents or k; NumericError naming the token for a
///         non-finite or negative score or an all-zero row.
inline double sequence_balance_loss(HostView<const float, 2> scores, int k, double alpha = 1e-4) {
  constexpr std::string_view fn = "daedalus::moe::sequence_balance_loss";
  detail::check_loss_scores(fn, scores);
  const index_t tokens = scores.extent(0), experts = scores.extent(1);
  detail::check_loss_k(fn, k, experts);
  std::vector<double> f(static_cast<std::size_t>(experts), 0.0);
  std::vector<index_t> order(static_cast<std::size_t>(experts));
  for (index_t t = 0; t < tokens; ++t) {
    const float* row = scores.data() + t * experts;
    for (index_t i = 0; i < experts; ++i) order[std::size_t(i)] = i;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](index_t a, index_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    for (int j = 0; j < k; ++j) f[std::size_t(order[std::size_t(j)])] += 1.0;
  }
  const std::vector<double> p = detail::mean_normalized_scores(scores);
  double sum = 0.0;
  const double f_scale = double(experts) / (double(k) * double(tokens));
  for (index_t i = 0; i < experts; ++i) sum += f_scale * f[std::size_t(i)] * p[std::size_t(i)];
  return alpha * sum;
}

/// The classic auxiliary balance loss (GShard; Switch Transformer eq. 4; DeepSeek-V2's
/// expert-level loss), as a value, over a batch:
///   L = α · E · Σ_i f_i P_i,  f_i = c_i / (T·K) the fraction of slots routed to expert i (from
///   the gate's actual choice), P_i = (1/T) Σ_t s'_{i,t} the mean normalised score.
/// A balanced batch gives L = α.
/// @param scores   [T, E] unbiased scores (softmax or sigmoid outputs)
/// @param topk_ids [T, K] the experts chosen for each token
/// @param alpha    the loss weight; DeepSeek-V2 uses 0.003 (its α1)
/// @throws InvalidArgument for mismatched extents; OutOfRange naming the token and slot of an id
///         outside [0, E); NumericError naming the token for a bad score row.
inline double auxiliary_balance_loss(HostView<const float, 2> scores,
                                     HostView<const std::int32_t, 2> topk_ids,
                                     double alpha = 0.003) {
  constexpr std::string_view fn = "daedalus::moe::auxiliary_balance_loss";
  detail::check_loss_scores(fn, scores);
  const index_t tokens = scores.extent(0), experts = scores.extent(1);
  const index_t k = topk_ids.extent(1);
  detail::check_loss_id_extents(fn, tokens, topk_ids);
  std::vector<double> f(static_cast<std::size_t>(experts), 0.0);
  for (index_t i = 0; i < topk_ids.size(); ++i) {
    const std::int32_t e = topk_ids.data()[i];
    if (!(e >= 0 && e < experts)) throw detail::loss_id_error(fn, i, k, e, experts);
    f[std::size_t(e)] += 1.0 / double(tokens * k);
  }
  const std::vector<double> p = detail::mean_normalized_scores(scores);
  double sum = 0.0;
  for (index_t i = 0; i < experts; ++i) sum += f[std::size_t(i)] * p[std::size_t(i)];
  return alpha * double(experts) * sum;
}

}  // namespace daedalus::moe
