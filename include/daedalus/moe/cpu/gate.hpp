// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <string_view>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/math.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/cpu/gate_gemm.hpp"
#include "daedalus/moe/cpu/gate_vector_route.hpp"
#include "daedalus/moe/gate.hpp"

/// The CPU gate. Tokens are independent: the batch is cut into fixed chunks (their boundaries
/// depend on the batch size only) that the backend's threads share; each chunk's logits come
/// from the packed GEMM of cpu/gate_gemm.hpp and are routed while they are in cache (scores,
/// group limit, top-k). Up to kGemvMaxTokens tokens, W is read once as dot products instead.
/// Every result is bitwise independent of the thread count.
namespace daedalus::moe::cpu_gate {

using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;
// Scores are computed on buffers aligned to Eigen's packet size: Eigen peels unaligned heads
// with scalar code whose exp rounds differently from the vectorised one, which would make a
// token's scores depend on where its row happens to lie in memory (and so on the thread).
using AlignedArrayMap = Eigen::Map<Eigen::ArrayXf, Eigen::AlignedMax>;
using AlignedFloats = std::vector<float, Eigen::aligned_allocator<float>>;

/// Largest k the fixed-size top-k buffer of route_scored_token_generic holds.
inline constexpr int kMaxTopk = 64;
/// Largest n_expert_groups the fixed-size range buffer of route_scored_token_generic holds.
inline constexpr int kMaxGroups = 256;

/// Scratch one thread reuses across its tokens.
struct TokenScratch {
  AlignedFloats logits;     // [E]
  AlignedFloats scores;     // [E]
  AlignedFloats selection;  // [E]
  std::vector<float> group_score;
  std::vector<char> group_kept;
  std::vector<float> candidate_value;      // [E + 16]
  std::vector<std::int32_t> candidate_id;  // [E + 16]
  explicit TokenScratch(index_t experts, index_t groups = 1)
      : logits(static_cast<std::size_t>(experts)),
        scores(static_cast<std::size_t>(experts)),
        selection(static_cast<std::size_t>(experts)),
        group_score(static_cast<std::size_t>(groups)),
        group_kept(static_cast<std::size_t>(groups)),
        candidate_value(static_cast<std::size_t>(experts + 16)),
        candidate_id(static_cast<std::size_t>(experts + 16)) {}
  explicit TokenScratch(const GateSettings& s)
      : TokenScratch(s.n_routed_experts, s.n_expert_groups) {}
};

/// Computes the scores of one token into scratch.scores: sigmoid or softmax of `logits`, fp32,
/// with core/math.hpp's exp_f32 (16 lanes at a time with AVX-512, the same bits as the scalar
/// function) and the softmax sum in warp order (warp_order_sum): the operations of the CUDA gate,
/// so that both backends choose the same experts from the same logits. Returns false when a
/// logit is not finite (the scores are then unspecified).
inline bool token_scores(ScoreFunc score_func, const float* logits, index_t experts,
                         TokenScratch& scratch) {
  std::copy(logits, logits + experts, scratch.logits.data());
  AlignedArrayMap l(scratch.logits.data(), experts);
  // l·0 is 0 for finite l and NaN for ±inf or NaN; Eigen's vectorised sum propagates the NaN.
  if (!std::isfinite((l * 0.0f).sum())) return false;
  const float* in = scratch.logits.data();
  float* out = scratch.scores.data();
  const int n = int(experts);
  const float max = score_func == ScoreFunc::softmax ? l.maxCoeff() : 0.0f;
  int e = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(max);
  for (; e < n; e += 16) {
    const __mmask16 valid = __mmask16((1u << std::min(16, n - e)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(valid, in + e);
    const __m512 y = score_func == ScoreFunc::sigmoid
                         ? daedalus::detail::sigmoid_f32(x)
                         : daedalus::detail::exp_f32(_mm512_sub_ps(x, shift));
    _mm512_mask_storeu_ps(out + e, valid, y);
  }
#endif
  for (; e < n; ++e) {
    out[e] = score_func == ScoreFunc::sigmoid ? daedalus::detail::sigmoid_f32(in[e])
                                              : daedalus::detail::exp_f32(in[e] - max);
  }
  if (score_func == ScoreFunc::softmax) {
    const float inverse = 1.0f / daedalus::detail::warp_order_sum(out, n);
    AlignedArrayMap(out, experts) *= inverse;
  }
  return true;
}

/// A group's score: the max of its selection scores (no bias) or the sum of its two largest
/// (with a bias: DeepSeek-V3's `scores.topk(2).sum()`; equal values count twice).
inline float group_score_of(const float* v, int n, bool top2) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 m = _mm512_loadu_ps(v);
    for (int j = 16; j < n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(v + j));
    const float first = _mm512_reduce_max_ps(m);
    if (!top2) return first;
    // The second largest: the max after removing one occurrence of `first`; if `first` occurs
    // twice or more it is the second as well.
    int occurrences = 0;
    __m512 rest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 f = _mm512_set1_ps(first);
    for (int j = 0; j < n; j += 16) {
      const __m512 x = _mm512_loadu_ps(v + j);
      const __mmask16 eq = _mm512_cmp_ps_mask(x, f, _CMP_EQ_OQ);
      occurrences += __builtin_popcount(unsigned(eq));
      rest = _mm512_mask_max_ps(rest, __mmask16(~eq), rest, x);
    }
    return occurrences >= 2 ? first + first : first + _mm512_reduce_max_ps(rest);
  }
#endif
  if (!top2 || n == 1) return *std::max_element(v, v + n);
  float first = -std::numeric_limits<float>::infinity(), second = first;
  for (int j = 0; j < n; ++j) {
    const float x = v[j];
    if (x > first) {
      second = first;
      first = x;
    } else if (x > second) {
      second = x;
    }
  }
  return first + second;
}

/// The k largest selection scores of experts [e0, e1), merged into the sorted list
/// (top_value, top_id) of `held` entries: candidates arrive in increasing id order, so one equal
/// to a held value ranks after it (ties → lower id): insert only when strictly greater.
inline void top_k_scan(const float* selection, int e0, int e1, int k, float* top_value,
                       std::int32_t* top_id, int& held) {
  auto insert = [&](int e) { insert_ranked(selection[e], e, k, top_value, top_id, held); };
  int e = e0;
#if defined(__AVX512F__)
  // The same filter, scalar insertion (route_scored_token_generic takes top_k_threshold for k ≤
  // 16).
  for (; e < e1; e += 16) {
    const int n = std::min(16, e1 - e);
    const __mmask16 valid = __mmask16((1u << n) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(valid, selection + e);
    const float threshold = held == k ? top_value[k - 1] : -std::numeric_limits<float>::infinity();
    unsigned above =
        unsigned(_mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(threshold), _CMP_GT_OQ));
    if (held < k) above = valid;  // every candidate enters while the list is not full
    while (above) {
      insert(e + __builtin_ctz(above));
      above &= above - 1;
    }
  }
#endif
  for (; e < e1; ++e) insert(e);
}

/// Steps 5-6: the weights are the unbiased scores of the chosen experts, normalised if
/// configured, times route_scale.
inline void finish_token(const GateSettings& settings, const float* scores,
                         const std::int32_t* top_id, std::int32_t* ids, float* weights) {
  const int k = settings.topk;
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

#if defined(__AVX512F__)
/// The top k ≤ 16 of the selection scores over `ranges` (pairs [begin, end) of expert ids, in
/// increasing order), in two passes. (1) The lane-wise maxima of the candidates' 16-wide vectors
/// are min(16, candidates) ≥ k distinct candidates, so their k-th largest τ is at most the true
/// k-th largest: every chosen expert has a score ≥ τ. (2) The candidates ≥ τ (typically k plus a
/// few) are compressed out in id order and insertion-sorted by (score desc, id asc). Exact, with
/// the same tie rule as top_k_scan, and without a branch per candidate.
inline void top_k_threshold(const float* selection, const int* ranges, int n_ranges, int k,
                            float* cand_value, std::int32_t* cand_id, float* top_value,
                            std::int32_t* top_id) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 lane_max = minus_inf;
  for (int r = 0; r < n_ranges; ++r) {
    for (int e = ranges[std::ptrdiff_t{2} * r]; e < ranges[std::ptrdiff_t{2} * r + 1]; e += 16) {
      const __mmask16 valid =
          __mmask16((1u << std::min(16, ranges[std::ptrdiff_t{2} * r + 1] - e)) - 1u);
      lane_max = _mm512_max_ps(lane_max, _mm512_mask_loadu_ps(minus_inf, valid, selection + e));
    }
  }
  alignas(64) float maxima[16];
  _mm512_store_ps(maxima, lane_max);
  std::nth_element(maxima, maxima + (k - 1), maxima + 16, std::greater<>());
  const __m512 tau = _mm512_set1_ps(maxima[k - 1]);
  const __m512i lane_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int count = 0;
  for (int r = 0; r < n_ranges; ++r) {
    for (int e = ranges[std::ptrdiff_t{2} * r]; e < ranges[std::ptrdiff_t{2} * r + 1]; e += 16) {
      const __mmask16 valid =
          __mmask16((1u << std::min(16, ranges[std::ptrdiff_t{2} * r + 1] - e)) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(valid, selection + e);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, x, tau, _CMP_GE_OQ);
      // Register compress, then a full store (the buffers have 16 lanes of slack): Zen 4
      // microcodes the memory form of vcompressps.
      _mm512_storeu_ps(cand_value + count, _mm512_maskz_compress_ps(keep, x));
      _mm512_storeu_si512(
          cand_id + count,
          _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(lane_ids, _mm512_set1_epi32(e))));
      count += __builtin_popcount(unsigned(keep));
    }
  }
  int held = 0;
  for (int c = 0; c < count; ++c)
    insert_ranked(cand_value[c], cand_id[c], k, top_value, top_id, held);
}
#endif

/// Routes one token whose scores are in scratch.scores (gate.hpp, steps 2-6), for any settings
/// and any CPU: the portable path, and the oracle of the vector path (`route_scored_token`).
/// Writes k ids and weights.
inline void route_scored_token_generic(const GateSettings& settings, const float* bias,
                                       TokenScratch& scratch, std::int32_t* ids, float* weights) {
  const int experts = settings.n_routed_experts;
  const int k = settings.topk;
  const float* scores = scratch.scores.data();

  // Step 2: selection scores (the scores themselves without a bias).
  const float* selection = scores;
  if (bias != nullptr) {
    AlignedArrayMap sel(scratch.selection.data(), experts);
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
      group_score[g] =
          group_score_of(selection + std::size_t(g) * per_group, per_group, bias != nullptr);
    }
    // The n_limited_groups best groups; ties → lower group id. A group's rank is the number of
    // groups ahead of it (counted without branches: the comparisons are unpredictable).
    for (int g = 0; g < groups; ++g) {
      int rank = 0;
      for (int h = 0; h < groups; ++h)
        rank +=
            int(group_score[h] > group_score[g]) + int(h < g && group_score[h] == group_score[g]);
      kept[g] = char(rank < settings.n_limited_groups);
    }
  } else {
    std::fill(kept, kept + groups, char(1));
  }

  // Step 4: top-k by (selection desc, id asc), over the kept groups in increasing id order.
  float top_value[kMaxTopk];
  std::int32_t top_id[kMaxTopk];
#if defined(__AVX512F__)
  if (k <= 16) {
    int ranges[2 * kMaxGroups];
    int n_ranges = 0;
    for (int g = 0; g < groups;) {
      if (!kept[g]) {
        ++g;
        continue;
      }
      int g_end = g + 1;  // merge runs of kept groups into one range
      while (g_end < groups && kept[g_end]) ++g_end;
      ranges[std::ptrdiff_t{2} * n_ranges] = g * per_group;
      ranges[std::ptrdiff_t{2} * n_ranges + 1] = g_end * per_group;
      ++n_ranges;
      g = g_end;
    }
    top_k_threshold(selection, ranges, n_ranges, k, scratch.candidate_value.data(),
                    scratch.candidate_id.data(), top_value, top_id);
    finish_token(settings, scores, top_id, ids, weights);
    return;
  }
#endif
  int held = 0;
  for (int g = 0; g < groups;) {
    if (!kept[g]) {
      ++g;
      continue;
    }
    int g_end = g + 1;  // merge runs of kept groups into one range
    while (g_end < groups && kept[g_end]) ++g_end;
    top_k_scan(selection, g * per_group, g_end * per_group, k, top_value, top_id, held);
    g = g_end;
  }

  finish_token(settings, scores, top_id, ids, weights);
}

/// Routes one token whose scores are in scratch.scores (gate.hpp, steps 2-6) on the AVX-512
/// vector path (cpu/gate_vector_route.hpp) when it covers the settings, else on the generic
/// path; both give the same ids and weights, bit for bit.
inline void route_scored_token(const GateSettings& settings, const float* bias,
                               TokenScratch& scratch, std::int32_t* ids, float* weights) {
#if defined(__AVX512F__)
  if (vector_route_applies(settings)) {
    std::int32_t top_id[kVectorMaxTopk];
    route_top_k_vector(settings, scratch.scores.data(), bias, scratch.selection.data(),
                       scratch.candidate_value.data(), scratch.candidate_id.data(), top_id);
    finish_token(settings, scratch.scores.data(), top_id, ids, weights);
    return;
  }
#endif
  route_scored_token_generic(settings, bias, scratch, ids, weights);
}

/// Collects the lowest failing token of each thread; after the parallel region the lowest of
/// all is reported, so the error names the same token whatever the thread count.
struct FirstFailure {
  std::vector<index_t> token;  // per team; -1: none
  std::vector<index_t> column;
  explicit FirstFailure(int teams)
      : token(static_cast<std::size_t>(teams), -1), column(static_cast<std::size_t>(teams), -1) {}
  void record(int team, index_t t, index_t c) {
    const std::size_t i = std::size_t(team);
    if (token[i] < 0 || t < token[i]) {
      token[i] = t;
      column[i] = c;
    }
  }
  [[nodiscard]] bool any(int team) const { return token[std::size_t(team)] >= 0; }
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

/// Routes tokens [t0, t1) whose logits are rows of `logits` (row stride logits_stride, row 0 =
/// token logits_row0) into ids/weights (row stride k), recording a failure.
inline void route_rows(const GateSettings& settings, const float* logits, index_t logits_stride,
                       const float* bias, index_t t0, index_t t1, index_t logits_row0,
                       TokenScratch& scratch, std::int32_t* ids, float* weights,
                       FirstFailure& failure, int team) {
  const index_t experts = settings.n_routed_experts;
  const index_t k = settings.topk;
  for (index_t t = t0; t < t1; ++t) {
    const float* row = logits + (t - logits_row0) * logits_stride;
    if (!token_scores(settings.score_func, row, experts, scratch)) {
      failure.record(team, t, first_non_finite(row, experts));
      return;  // a range stops at its first failure; the lowest failing token is reported
    }
    route_scored_token(settings, bias, scratch, ids + t * k, weights + t * k);
  }
}

/// Tokens per chunk of the fused path, a function of the batch only (never of the thread
/// count): 192 for large batches (the x depth block, 192 × 512 × 4 B = 384 KiB, and a 128 KiB
/// panel block share the 1 MiB L2), down to 6 so that small batches still spread over threads.
inline index_t chunk_tokens(index_t tokens) {
  const index_t wanted = (tokens + 15) / 16;
  const index_t rounded = (wanted + kTileRows - 1) / kTileRows * kTileRows;
  return std::clamp<index_t>(rounded, kTileRows, 192);
}

/// A backend with at most as many threads as the work keeps busy: `work` units, at least
/// `min_per_thread` each. An OpenMP team on tiny work costs more in wake-ups and barriers than
/// it saves, and far more when another process holds a core (bench/RESULTS.md, "Small work").
inline CpuBackend team_for(const CpuBackend& cpu, double work, double min_per_thread) {
  const double useful = std::max(1.0, work / min_per_thread);
  return CpuBackend(int(std::min<double>(cpu.num_threads(), useful)));
}

/// At most this many tokens: the logits are dot products of each W row with every token (W is
/// read once, x stays in L1), split over fixed blocks of experts.
inline constexpr index_t kGemvMaxTokens = 4;

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
    // ~16 experts' routing work per microsecond: at least 64 tokens of V3 per thread.
    const CpuBackend team_cpu =
        cpu_gate::team_for(cpu, double(tokens) * settings.n_routed_experts, 16384.0);
    cpu_gate::FirstFailure failure(team_cpu.num_threads());
    team_cpu.parallel_ranges(tokens, [&](std::int64_t t0, std::int64_t t1, int team) {
      cpu_gate::TokenScratch scratch(settings);
      cpu_gate::route_rows(settings, logits.data(), settings.n_routed_experts, b, t0, t1, 0,
                           scratch, ids.data(), weights.data(), failure, team);
    });
    failure.throw_if_any(fn);
    std::copy(ids.begin(), ids.end(), topk_ids.data());
    std::copy(weights.begin(), weights.end(), topk_weights.data());
  }

  /// `weight` [E, dim] and the same weight packed (`packed_weight`, GateWeights' panel layout).
  static void route(const CpuBackend& cpu, const GateSettings& settings,
                    HostView<const float, 2> weight, HostView<const float, 2> packed_weight,
                    HostView<const float, 1> bias, HostView<const float, 2> x,
                    HostView<std::int32_t, 2> topk_ids, HostView<float, 2> topk_weights) {
    constexpr std::string_view fn = "daedalus::moe::route";
    check_topk_limit(fn, settings);
    const index_t tokens = x.extent(0);
    const index_t dim = x.extent(1);
    const index_t experts = settings.n_routed_experts;
    const index_t k = settings.topk;
    std::vector<std::int32_t> ids(std::size_t(tokens * k));
    std::vector<float> weights(std::size_t(tokens * k));
    const float* b = bias.extent(0) ? bias.data() : nullptr;
    // At least 2^21 multiply-adds (~20 µs) per thread.
    const CpuBackend team_cpu =
        cpu_gate::team_for(cpu, double(tokens) * double(dim) * double(experts), 2097152.0);
    cpu_gate::FirstFailure failure(team_cpu.num_threads());

    if (tokens <= cpu_gate::kGemvMaxTokens) {
      // A few tokens: bound by reading W. Fixed blocks of 16 experts over the threads, each W
      // row dotted with every token (Eigen's dot: a fixed order for a given length).
      std::vector<float> logits(std::size_t(tokens * experts));
      const index_t blocks = (experts + 15) / 16;
      team_cpu.parallel_for(blocks, [&](std::int64_t block, int) {
        for (index_t e = block * 16; e < std::min(experts, (block + 1) * 16); ++e) {
          const Eigen::Map<const Eigen::VectorXf> w(weight.data() + e * dim, dim);
          for (index_t t = 0; t < tokens; ++t)
            logits[std::size_t(t * experts + e)] =
                Eigen::Map<const Eigen::VectorXf>(x.data() + t * dim, dim).dot(w);
        }
      });
      cpu_gate::TokenScratch scratch(settings);
      cpu_gate::route_rows(settings, logits.data(), experts, b, 0, tokens, 0, scratch, ids.data(),
                           weights.data(), failure, 0);
    } else {
      // Fixed token chunks (boundaries depend on the batch only) shared dynamically by the
      // threads; each chunk's logits are routed while they are in cache.
      const index_t chunk = cpu_gate::chunk_tokens(tokens);
      const index_t chunks = (tokens + chunk - 1) / chunk;
      const index_t stride = cpu_gate::padded_experts(experts);
      std::vector<std::vector<float>> logits(std::size_t(team_cpu.num_threads()));
      std::vector<cpu_gate::TokenScratch> scratch(std::size_t(team_cpu.num_threads()),
                                                  cpu_gate::TokenScratch(settings));
      team_cpu.parallel_for(chunks, [&](std::int64_t c, int team) {
        const index_t c0 = c * chunk, n = std::min(chunk, tokens - c0);
        std::vector<float>& l = logits[std::size_t(team)];
        if (l.size() < std::size_t(chunk * stride)) l.resize(std::size_t(chunk * stride));
        compute_chunk_logits(x.data() + c0 * dim, n, dim, weight.data(), packed_weight.data(),
                             experts, l.data(), stride);
        cpu_gate::route_rows(settings, l.data(), stride, b, c0, c0 + n, c0,
                             scratch[std::size_t(team)], ids.data(), weights.data(), failure, team);
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
      cpu_gate::TokenScratch scratch(experts);
      for (index_t t = t0; t < t1; ++t) {
        const float* row = logits.data() + t * experts;
        if (!cpu_gate::token_scores(score_func, row, experts, scratch)) {
          failure.record(team, t, cpu_gate::first_non_finite(row, experts));
          return;
        }
        std::copy(scratch.scores.begin(), scratch.scores.end(), out.begin() + t * experts);
      }
    });
    failure.throw_if_any(fn);
    std::copy(out.begin(), out.end(), scores.data());
  }

 private:
  /// logits [n, stride] of one chunk, on the packed AVX-512 kernel or Eigen's GEMM.
  static void compute_chunk_logits(const float* x, index_t n, index_t dim, const float* w,
                                   [[maybe_unused]] const float* packed, index_t experts,
                                   float* logits, index_t stride) {
#if defined(__AVX512F__)
    (void)w;
    cpu_gate::chunk_logits(x, n, dim, packed, experts, logits, stride);
#else
    daedalus::cpu::map(logits, n, experts, stride).noalias() =
        daedalus::cpu::map(x, n, dim, dim) * daedalus::cpu::map(w, experts, dim, dim).transpose();
#endif
  }

  static void check_topk_limit(std::string_view fn, const GateSettings& settings) {
    daedalus::detail::require<InvalidArgument>(
        settings.topk <= cpu_gate::kMaxTopk, fn, ": 'topk' is ", settings.topk,
        "; the CPU gate supports at most ", cpu_gate::kMaxTopk);
    daedalus::detail::require<InvalidArgument>(
        settings.n_expert_groups <= cpu_gate::kMaxGroups, fn, ": 'n_expert_groups' is ",
        settings.n_expert_groups, "; the CPU gate supports at most ", cpu_gate::kMaxGroups);
  }
};

}  // namespace daedalus::moe::detail
