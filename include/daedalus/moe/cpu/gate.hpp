// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/gate.hpp"

/// The CPU gate. Tokens are independent, so the work is split by token ranges over the backend's
/// threads: each thread computes the logits of a chunk of its tokens with one single-threaded
/// Eigen GEMM (x_chunk · Wᵀ) and routes them while they are still in cache. Small batches (where a
/// GEMM per thread would read all of W once per thread) split the experts instead
/// (daedalus::cpu::linear), then route by token ranges.
namespace daedalus::moe::cpu_gate {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

/// Tokens per logits chunk of the fused path: 512 × 256 experts × 4 B = 512 KiB stays in a
/// 1 MiB L2 while it is routed, and W (7 MiB for V3) is repacked once per 512 tokens (~3% of
/// the GEMM's time).
inline constexpr index_t kChunkTokens = 512;
/// Below this many tokens per thread the experts are split instead of the tokens.
inline constexpr index_t kMinTokensPerThread = 64;

/// Largest k the fixed-size top-k buffer of route_scored_token holds.
inline constexpr int kMaxTopk = 64;

/// Writes the scores of one token: sigmoid or softmax of `logits`, fp32 (vectorised by Eigen).
/// Returns false when a logit is not finite (the scores are then unspecified).
inline bool token_scores(ScoreFunc score_func, const float* logits, index_t experts,
                         float* scores) {
  ConstArrayMap l(logits, experts);
  ArrayMap s(scores, experts);
  // l·0 is 0 for finite l and NaN for ±inf or NaN; Eigen's vectorised sum propagates the NaN.
  if (!std::isfinite((l * 0.0f).sum())) return false;
  if (score_func == ScoreFunc::sigmoid) {
    s = ((-l).exp() + 1.0f).inverse();
  } else {
    const float max = l.maxCoeff();
    s = (l - max).exp();
    s *= 1.0f / s.sum();
  }
  return true;
}

/// Scratch one thread reuses across its tokens.
struct TokenScratch {
  std::vector<float> scores;     // [E]
  std::vector<float> selection;  // [E]
  std::vector<float> group_score;
  std::vector<char> group_kept;
  explicit TokenScratch(const GateSettings& s)
      : scores(std::size_t(s.n_routed_experts)),
        selection(std::size_t(s.n_routed_experts)),
        group_score(std::size_t(s.n_expert_groups)),
        group_kept(std::size_t(s.n_expert_groups)) {}
};

/// Routes one token whose scores are in scratch.scores (gate.hpp, steps 2-6). Writes k ids and
/// weights.
inline void route_scored_token(const GateSettings& settings, const float* bias,
                               TokenScratch& scratch, std::int32_t* ids, float* weights) {
  const int experts = settings.n_routed_experts;
  const int k = settings.topk;
  const float* scores = scratch.scores.data();

  // Step 2: selection scores (the scores themselves without a bias).
  const float* selection = scores;
  if (bias != nullptr) {
    ArrayMap sel(scratch.selection.data(), experts);
    if (settings.bias_mode == BiasMode::additive)
      sel = ConstArrayMap(scores, experts) + ConstArrayMap(bias, experts);
    else
      sel = ConstArrayMap(scores, experts) * ConstArrayMap(bias, experts);
    selection = scratch.selection.data();
  }

  // Step 3: group limit. Keeping the best n_limited_groups groups and scanning only their
  // experts below is exactly the -inf mask: k never exceeds the experts they hold (validated)
  // and their selection scores are finite, so no masked expert could be chosen.
  const int groups = settings.n_expert_groups;
  const int per_group = experts / groups;
  char* kept = scratch.group_kept.data();
  if (groups > 1 && settings.n_limited_groups < groups) {
    float* group_score = scratch.group_score.data();
    for (int g = 0; g < groups; ++g) {
      const float* v = selection + std::size_t(g) * per_group;
      if (bias == nullptr || per_group == 1) {
        group_score[g] = *std::max_element(v, v + per_group);  // first max: lower id on ties
      } else {
        // Sum of the two largest (DeepSeek-V3: scores.topk(2).sum()).
        float first = -std::numeric_limits<float>::infinity(), second = first;
        for (int j = 0; j < per_group; ++j) {
          const float x = v[j];
          if (x > first) {
            second = first;
            first = x;
          } else if (x > second) {
            second = x;
          }
        }
        group_score[g] = first + second;
      }
      kept[g] = 0;
    }
    // The n_limited_groups best groups; ties → lower group id (strict > keeps the earlier).
    for (int picked = 0; picked < settings.n_limited_groups; ++picked) {
      int best = -1;
      for (int g = 0; g < groups; ++g) {
        if (!kept[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
      }
      kept[best] = 1;
    }
  } else {
    std::fill(kept, kept + groups, char(1));
  }

  // Step 4: top-k by (selection desc, id asc). Candidates arrive in increasing id order, so a
  // candidate equal to a held value ranks after it: insert only when strictly greater.
  float top_value[kMaxTopk];
  std::int32_t top_id[kMaxTopk];
  int held = 0;
  for (int g = 0; g < groups; ++g) {
    if (!kept[g]) continue;
    const int e_end = (g + 1) * per_group;
    for (int e = g * per_group; e < e_end; ++e) {
      const float x = selection[e];
      if (held == k && !(x > top_value[k - 1])) continue;
      int pos = held < k ? held++ : k - 1;
      while (pos > 0 && x > top_value[pos - 1]) {
        top_value[pos] = top_value[pos - 1];
        top_id[pos] = top_id[pos - 1];
        --pos;
      }
      top_value[pos] = x;
      top_id[pos] = e;
    }
  }

  // Steps 5-6: weights are the unbiased scores, normalised if configured, times route_scale.
  float scale = float(settings.route_scale);
  if (settings.normalize) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += scores[top_id[j]];
    scale /= (sum + 1e-20f);
  }
  for (int j = 0; j < k; ++j) {
    ids[j] = top_id[j];
    weights[j] = scores[top_id[j]] * scale;
  }
}

/// Collects the first failing token of each thread's range; after the parallel region the
/// lowest one is reported, so the error names the same token whatever the thread count.
struct FirstFailure {
  std::vector<index_t> token;  // per team; -1: none
  std::vector<index_t> column;
  explicit FirstFailure(int teams)
      : token(std::size_t(teams), -1), column(std::size_t(teams), -1) {}
  void record(int team, index_t t, index_t c) {
    if (token[std::size_t(team)] < 0) {
      token[std::size_t(team)] = t;
      column[std::size_t(team)] = c;
    }
  }
  /// Throws NumericError naming the lowest failing token, if any.
  void throw_if_any(std::string_view fn) const {
    index_t worst = -1;
    for (std::size_t i = 0; i < token.size(); ++i)
      if (token[i] >= 0 && (worst < 0 || token[i] < token[std::size_t(worst)])) worst = index_t(i);
    if (worst >= 0) {
      throw NumericError(daedalus::detail::message(
          fn, ": token ", token[std::size_t(worst)],
          " has a non-finite logit (NaN or infinite) at expert ", column[std::size_t(worst)],
          "; expected finite logits (check x and the gate weight)"));
    }
  }
};

/// The first non-finite entry of a row (for the message).
inline index_t first_non_finite(const float* row, index_t n) {
  for (index_t i = 0; i < n; ++i)
    if (!std::isfinite(row[i])) return i;
  return -1;
}

/// Routes tokens [t0, t1) of `logits` into ids/weights (row stride k), recording a failure.
inline void route_rows(const GateSettings& settings, const float* logits, const float* bias,
                       index_t t0, index_t t1, index_t logits_row0, TokenScratch& scratch,
                       std::int32_t* ids, float* weights, FirstFailure& failure, int team) {
  const index_t experts = settings.n_routed_experts;
  const index_t k = settings.topk;
  for (index_t t = t0; t < t1; ++t) {
    const float* row = logits + (t - logits_row0) * experts;
    if (!token_scores(settings.score_func, row, experts, scratch.scores.data())) {
      failure.record(team, t, first_non_finite(row, experts));
      return;  // this range stops at its first failure; lower ranges report lower tokens
    }
    route_scored_token(settings, bias, scratch, ids + t * k, weights + t * k);
  }
}

}  // namespace daedalus::moe::cpu_gate

namespace daedalus::moe::detail {

template <>
struct GateImpl<CpuBackend> {
  static void route_logits(const CpuBackend& cpu, const GateSettings& settings,
                           HostView<const float, 2> logits, HostView<const float, 1> bias,
                           HostView<std::int32_t, 2> topk_ids, HostView<float, 2> topk_weights) {
    constexpr std::string_view fn = "daedalus::moe::route_logits";
    check_topk_limit(fn, settings);
    const index_t tokens = logits.extent(0);
    const index_t k = settings.topk;
    // Results go to scratch first and reach the outputs only when every token succeeded.
    std::vector<std::int32_t> ids(std::size_t(tokens * k));
    std::vector<float> weights(std::size_t(tokens * k));
    const float* b = bias.extent(0) ? bias.data() : nullptr;
    cpu_gate::FirstFailure failure(cpu.num_threads());
    cpu.parallel_ranges(tokens, [&](std::int64_t t0, std::int64_t t1, int team) {
      cpu_gate::TokenScratch scratch(settings);
      cpu_gate::route_rows(settings, logits.data(), b, t0, t1, 0, scratch, ids.data(),
                           weights.data(), failure, team);
    });
    failure.throw_if_any(fn);
    std::copy(ids.begin(), ids.end(), topk_ids.data());
    std::copy(weights.begin(), weights.end(), topk_weights.data());
  }

  static void route(const CpuBackend& cpu, const GateSettings& settings,
                    HostView<const float, 2> weight, HostView<const float, 1> bias,
                    HostView<const float, 2> x, HostView<std::int32_t, 2> topk_ids,
                    HostView<float, 2> topk_weights) {
    constexpr std::string_view fn = "daedalus::moe::route";
    check_topk_limit(fn, settings);
    const index_t tokens = x.extent(0);
    const index_t dim = x.extent(1);
    const index_t experts = settings.n_routed_experts;
    const index_t k = settings.topk;
    std::vector<std::int32_t> ids(std::size_t(tokens * k));
    std::vector<float> weights(std::size_t(tokens * k));
    const float* b = bias.extent(0) ? bias.data() : nullptr;
    cpu_gate::FirstFailure failure(cpu.num_threads());

    if (tokens < cpu_gate::kMinTokensPerThread * cpu.num_threads()) {
      // Few tokens: a GEMV-like product bound by reading W; split the experts so W is read
      // once in all, then route by tokens.
      std::vector<float> logits(std::size_t(tokens * experts));
      daedalus::cpu::linear(cpu, x.data(), tokens, dim, weight.data(), experts, logits.data());
      cpu.parallel_ranges(tokens, [&](std::int64_t t0, std::int64_t t1, int team) {
        cpu_gate::TokenScratch scratch(settings);
        cpu_gate::route_rows(settings, logits.data(), b, t0, t1, 0, scratch, ids.data(),
                             weights.data(), failure, team);
      });
    } else {
      cpu.parallel_ranges(tokens, [&](std::int64_t t0, std::int64_t t1, int team) {
        cpu_gate::TokenScratch scratch(settings);
        std::vector<float> logits(
            std::size_t(std::min<index_t>(cpu_gate::kChunkTokens, t1 - t0) * experts));
        const auto w = daedalus::cpu::map(weight.data(), experts, dim, dim);
        for (index_t c0 = t0; c0 < t1; c0 += cpu_gate::kChunkTokens) {
          const index_t n = std::min<index_t>(cpu_gate::kChunkTokens, t1 - c0);
          daedalus::cpu::map(logits.data(), n, experts, experts).noalias() =
              daedalus::cpu::map(x.data() + c0 * dim, n, dim, dim) * w.transpose();
          cpu_gate::route_rows(settings, logits.data(), b, c0, c0 + n, c0, scratch, ids.data(),
                               weights.data(), failure, team);
          if (failure.token[std::size_t(team)] >= 0) return;
        }
      });
    }
    failure.throw_if_any(fn);
    std::copy(ids.begin(), ids.end(), topk_ids.data());
    std::copy(weights.begin(), weights.end(), topk_weights.data());
  }

  static void compute_scores(const CpuBackend& cpu, ScoreFunc score_func,
                             HostView<const float, 2> logits, HostView<float, 2> scores) {
    constexpr std::string_view fn = "daedalus::moe::compute_scores";
    const index_t tokens = logits.extent(0);
    const index_t experts = logits.extent(1);
    // Scores go to scratch first so that a failure leaves `scores` unchanged (and aliasing
    // logits' storage is safe).
    std::vector<float> out(std::size_t(tokens * experts));
    cpu_gate::FirstFailure failure(cpu.num_threads());
    cpu.parallel_ranges(tokens, [&](std::int64_t t0, std::int64_t t1, int team) {
      for (index_t t = t0; t < t1; ++t) {
        const float* row = logits.data() + t * experts;
        if (!cpu_gate::token_scores(score_func, row, experts, out.data() + t * experts)) {
          failure.record(team, t, cpu_gate::first_non_finite(row, experts));
          return;
        }
      }
    });
    failure.throw_if_any(fn);
    std::copy(out.begin(), out.end(), scores.data());
  }

 private:
  static void check_topk_limit(std::string_view fn, const GateSettings& settings) {
    daedalus::detail::require<InvalidArgument>(
        settings.topk <= cpu_gate::kMaxTopk, fn, ": 'topk' is ", settings.topk,
        "; the CPU gate supports at most ", cpu_gate::kMaxTopk);
  }
};

}  // namespace daedalus::moe::detail
