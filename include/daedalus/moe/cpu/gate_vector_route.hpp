// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/moe/gate.hpp"

/// The gate's routing steps 2-4 (gate.hpp: selection bias, group limit, top-k) for one token,
/// in AVX-512 registers and without a data-dependent branch in the common case. The scalar
/// routing of cpu/gate.hpp (`route_scored_token_generic`) remains the portable path and the
/// oracle: on the same scores both give the same ids in the same order, bit for bit, because
/// every value they compare is the same IEEE operation on the same operands (s + b or s · b per
/// expert; a group's top-two sum is first + second of the same multiset) and both order by the
/// same exact key, (value descending, id ascending), groups by (score descending, id ascending).
///
/// How (DeepSeek-V3 shapes: 256 experts, 8 groups of 32, 4 kept, top-8):
///  - selection scores s + b, 16 experts a vector, stored once;
///  - group scores for all groups at once: each lane keeps the (largest, second largest) pair of
///    its group's experts; the 8 groups' pair vectors are then merged pairwise with block
///    shuffles (a transposed reduction: 4 levels for 8 groups instead of 4 per group), so every
///    group's top-two sum, or max without a bias, lands in one vector;
///  - the kept groups by rank counting: rank(g) = #{h : score_h > score_g} + #{h < g : equal};
///  - top-k: the 16 lane-wise maxima over the kept groups are 16 distinct experts, so their k-th
///    largest τ bounds the answer from below; the experts ≥ τ (typically k plus a few) are
///    compressed out in id order and ranked by counting with the same tie rule; a rank is a slot.
///    More than 16 such candidates (exact ties, saturated scores) take an insertion sort.
namespace daedalus::moe::cpu_gate {

/// Inserts candidate (x, id) into the sorted list (top_value, top_id) of `held` ≤ k entries,
/// ordered by value descending. Candidates must arrive in increasing id order: one equal to a
/// held value ranks after it (ties → lower id), so it enters only when strictly greater.
inline void insert_ranked(float x, std::int32_t id, int k, float* top_value, std::int32_t* top_id,
                          int& held) {
  if (held == k && !(x > top_value[k - 1])) return;
  int pos = held < k ? held++ : k - 1;
  while (pos > 0 && x > top_value[pos - 1]) {
    top_value[pos] = top_value[pos - 1];
    top_id[pos] = top_id[pos - 1];
    --pos;
  }
  top_value[pos] = x;
  top_id[pos] = id;
}

/// Largest group count the vector path handles (one lane pair per group after the reduction).
inline constexpr int kVectorMaxGroups = 8;
/// Largest k the vector path handles (one rank per lane).
inline constexpr int kVectorMaxTopk = 16;

/// Whether `route_top_k_vector` is compiled in and covers these settings (k ≤ 16, ≤ 8 groups;
/// any expert count, group size, score function and bias mode).
inline bool vector_route_applies(const GateSettings& settings) {
#if defined(__AVX512F__)
  return settings.topk <= kVectorMaxTopk && settings.n_expert_groups <= kVectorMaxGroups;
#else
  (void)settings;
  return false;
#endif
}

#if defined(__AVX512F__)

namespace vector_route {

inline __m512 minus_inf() { return _mm512_set1_ps(-std::numeric_limits<float>::infinity()); }

/// Lanes [0, n) of 16, n in [0, 16].
inline __mmask16 first_lanes(int n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << unsigned(n)) - 1u);
}

/// A sorted pair per lane: hi ≥ lo, the two largest values a lane has seen (equal values count
/// twice, as in DeepSeek-V3's `topk(2).sum()`).
struct TopTwo {
  __m512 hi, lo;
};

/// Merges two sorted pairs lane by lane: the largest of {a.hi, a.lo, b.hi, b.lo} and the second.
/// With a.hi ≥ b.hi the second is max(a.lo, b.hi) = max(a.lo, min(a.hi, b.hi)); b.lo ≤ b.hi
/// cannot exceed it. Symmetric otherwise.
template <bool Top2>
inline TopTwo merge(TopTwo a, TopTwo b) {
  if constexpr (Top2) {
    return {_mm512_max_ps(a.hi, b.hi),
            _mm512_max_ps(_mm512_min_ps(a.hi, b.hi), _mm512_max_ps(a.lo, b.lo))};
  } else {
    return {_mm512_max_ps(a.hi, b.hi), a.lo};
  }
}

/// Applies one shuffle to both halves of a pair.
template <class Shuffle>
inline TopTwo shuffled(TopTwo a, Shuffle&& shuffle) {
  return {shuffle(a.hi), shuffle(a.lo)};
}

/// Group scores of up to 8 groups: `pair[g]` holds group g's per-lane pairs (groups past the
/// real ones hold -inf). Returns a vector whose lane g (g < 8) is group g's max (hi) + second
/// (lo), or its max alone without Top2.
template <bool Top2>
inline __m512 reduce_groups(TopTwo pair[8]) {
  // Level 1 (8 → 4 vectors): lanes 0-7 of w[i] reduce group 2i's 16 lanes to 8, lanes 8-15
  // group 2i+1's.
  TopTwo w[4];
  for (int i = 0; i < 4; ++i) {
    const TopTwo a = pair[std::ptrdiff_t{2} * i], b = pair[std::ptrdiff_t{2} * i + 1];
    const TopTwo low_halves = {_mm512_shuffle_f32x4(a.hi, b.hi, _MM_SHUFFLE(3, 2, 1, 0)),
                               _mm512_shuffle_f32x4(a.lo, b.lo, _MM_SHUFFLE(3, 2, 1, 0))};
    const TopTwo high_halves = {_mm512_shuffle_f32x4(a.hi, b.hi, _MM_SHUFFLE(1, 0, 3, 2)),
                                _mm512_shuffle_f32x4(a.lo, b.lo, _MM_SHUFFLE(1, 0, 3, 2))};
    w[i] = merge<Top2>(low_halves, high_halves);
  }
  // Level 2 (4 → 2): 128-bit block j of u[i] holds group 4i + j, 4 lanes.
  TopTwo u[2];
  for (int i = 0; i < 2; ++i) {
    const TopTwo a = w[std::ptrdiff_t{2} * i], b = w[std::ptrdiff_t{2} * i + 1];
    const TopTwo even = {_mm512_shuffle_f32x4(a.hi, b.hi, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a.lo, b.lo, _MM_SHUFFLE(2, 0, 2, 0))};
    const TopTwo odd = {_mm512_shuffle_f32x4(a.hi, b.hi, _MM_SHUFFLE(3, 1, 3, 1)),
                        _mm512_shuffle_f32x4(a.lo, b.lo, _MM_SHUFFLE(3, 1, 3, 1))};
    u[i] = merge<Top2>(even, odd);
  }
  // Level 3 (2 → 1): in block j, lanes 0-1 hold group j and lanes 2-3 group j + 4.
  const TopTwo first = {_mm512_shuffle_ps(u[0].hi, u[1].hi, _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_ps(u[0].lo, u[1].lo, _MM_SHUFFLE(1, 0, 1, 0))};
  const TopTwo second = {_mm512_shuffle_ps(u[0].hi, u[1].hi, _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_ps(u[0].lo, u[1].lo, _MM_SHUFFLE(3, 2, 3, 2))};
  const TopTwo t = merge<Top2>(first, second);
  // Level 4: neighbouring lanes; then lane 4j holds group j and lane 4j + 2 group j + 4.
  const TopTwo r = merge<Top2>(
      t, shuffled(t, [](__m512 v) { return _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)); }));
  const __m512 score = Top2 ? _mm512_add_ps(r.hi, r.lo) : r.hi;
  const __m512i order = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 10, 6, 2, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, score);
}

/// rank(lane) = #{j < n : v_j > v_lane} + #{j < lane, j < n : v_j == v_lane}: the position of
/// each lane in the order (value descending, lane ascending) among lanes [0, n). Lanes ≥ n with
/// -inf values rank after the finite ones (all at n when n < 16 lanes are compared).
inline __m512i rank_lanes(__m512 v, int n) {
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < n; ++j) {
    // The zero-masking form (all lanes kept): the plain one makes GCC 12 warn about its
    // undefined pass-through operand inside this loop.
    const __m512 vj = _mm512_maskz_permutexvar_ps(__mmask16(0xFFFF), _mm512_set1_epi32(j), v);
    const __mmask16 later = __mmask16(0xFFFFu << unsigned(j + 1));
    rank = _mm512_mask_add_epi32(rank, _mm512_cmp_ps_mask(vj, v, _CMP_GT_OQ), rank, one);
    rank =
        _mm512_mask_add_epi32(rank, _mm512_mask_cmp_ps_mask(later, vj, v, _CMP_EQ_OQ), rank, one);
  }
  return rank;
}

}  // namespace vector_route

/// Steps 2-4 for one token with scores `scores` [E] (finite): the k chosen expert ids into
/// top_id[0, k), by decreasing selection score, ties → lower id. `selection` [E] is scratch
/// (written when a bias is given); cand_value / cand_id need E + 16 entries.
/// Requires vector_route_applies(settings).
inline void route_top_k_vector(const GateSettings& settings, const float* scores, const float* bias,
                               float* selection, float* cand_value, std::int32_t* cand_id,
                               std::int32_t* top_id) {
  using namespace vector_route;
  const int experts = settings.n_routed_experts;
  const int groups = settings.n_expert_groups;
  const int per_group = experts / groups;
  const int k = settings.topk;
  const __m512 neg_inf = minus_inf();

  // Step 2: selection scores, the same fp32 operation per expert as the generic path.
  const float* sel = scores;
  if (bias != nullptr) {
    const bool additive = settings.bias_mode == BiasMode::additive;
    for (int e = 0; e < experts; e += 16) {
      const __mmask16 valid = first_lanes(experts - e);
      const __m512 s = _mm512_maskz_loadu_ps(valid, scores + e);
      const __m512 b = _mm512_maskz_loadu_ps(valid, bias + e);
      _mm512_mask_storeu_ps(selection + e, valid,
                            additive ? _mm512_add_ps(s, b) : _mm512_mul_ps(s, b));
    }
    sel = selection;
  }

  // Step 3: the kept groups, a bit mask. Limiting to all groups keeps all.
  const int vectors_per_group = (per_group + 15) / 16;
  unsigned kept = (1u << unsigned(groups)) - 1u;
  if (groups > 1 && settings.n_limited_groups < groups) {
    // A group of one expert scores that expert alone (the generic path's rule).
    const bool top2 = bias != nullptr && per_group > 1;
    TopTwo pair[kVectorMaxGroups];
    for (TopTwo& p : pair) p = {neg_inf, neg_inf};
    for (int g = 0; g < groups; ++g) {
      const float* group = sel + std::ptrdiff_t{g} * per_group;
      TopTwo p = {neg_inf, neg_inf};
      for (int v = 0; v < vectors_per_group; ++v) {
        const __m512 x = _mm512_mask_loadu_ps(neg_inf, first_lanes(per_group - 16 * v),
                                              group + std::ptrdiff_t{16} * v);
        p.lo = _mm512_max_ps(p.lo, _mm512_min_ps(p.hi, x));
        p.hi = _mm512_max_ps(p.hi, x);
      }
      pair[g] = p;
    }
    const __m512 group_score = top2 ? reduce_groups<true>(pair) : reduce_groups<false>(pair);
    // Only lanes [0, groups) are real groups: rank_lanes compares against those alone, and the
    // other lanes' ranks are masked off.
    const __m512i rank = rank_lanes(group_score, groups);
    kept = unsigned(_mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(settings.n_limited_groups))) &
           ((1u << unsigned(groups)) - 1u);
  }

  // Step 4a: τ = the k-th largest lane-wise maximum over the kept groups' experts.
  __m512 lane_max = neg_inf;
  for (unsigned m = kept; m != 0; m &= m - 1) {
    const float* group = sel + std::ptrdiff_t{__builtin_ctz(m)} * per_group;
    for (int v = 0; v < vectors_per_group; ++v) {
      const __mmask16 valid = first_lanes(per_group - 16 * v);
      lane_max = _mm512_mask_max_ps(lane_max, valid, lane_max,
                                    _mm512_maskz_loadu_ps(valid, group + std::ptrdiff_t{16} * v));
    }
  }
  const __m512i lane_rank = rank_lanes(lane_max, 16);
  const __m512 tau = _mm512_set1_ps(_mm512_cvtss_f32(_mm512_maskz_compress_ps(
      _mm512_cmpeq_epi32_mask(lane_rank, _mm512_set1_epi32(k - 1)), lane_max)));

  // Step 4b: the candidates ≥ τ in increasing id order, gathered into registers (the first 16:
  // each vector's compressed candidates are expanded into the lanes after the previous ones) and
  // into memory for the fallback below. Register compress, then a full store (16 lanes of
  // slack): Zen 4 microcodes the memory form of vcompressps.
  const __m512i lane_ids = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 first_values = neg_inf;
  __m512i first_ids = _mm512_setzero_si512();
  int count = 0;
  for (unsigned m = kept; m != 0; m &= m - 1) {
    const int first_expert = __builtin_ctz(m) * per_group;
    for (int v = 0; v < vectors_per_group; ++v) {
      const int e = first_expert + 16 * v;
      const __mmask16 valid = first_lanes(per_group - 16 * v);
      const __m512 x = _mm512_maskz_loadu_ps(valid, sel + e);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, x, tau, _CMP_GE_OQ);
      const __m512 values = _mm512_maskz_compress_ps(keep, x);
      const __m512i ids =
          _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(lane_ids, _mm512_set1_epi32(e)));
      _mm512_storeu_ps(cand_value + count, values);
      _mm512_storeu_si512(cand_id + count, ids);
      const int kept_here = __builtin_popcount(unsigned(keep));
      // Lanes [count, count + kept_here) of 16; none once count reaches 16 (count can pass 31
      // when many values tie at τ, so the shift is guarded, not left to wrap).
      const __mmask16 into = count >= 16
                                 ? __mmask16(0)
                                 : __mmask16(((1u << unsigned(kept_here)) - 1u) << unsigned(count));
      first_values = _mm512_mask_expand_ps(first_values, into, values);
      first_ids = _mm512_mask_expand_epi32(first_ids, into, ids);
      count += kept_here;
    }
  }

  // Step 4c: order them. Up to 16: ranks by counting, each rank the slot of its candidate (lanes
  // past `count` are -inf and all rank `count`, a slot past the k read).
  if (count <= 16) {
    alignas(64) std::int32_t rank[16];
    alignas(64) std::int32_t id[16];
    _mm512_store_si512(rank, rank_lanes(first_values, count));
    _mm512_store_si512(id, first_ids);
    std::int32_t slot_id[17];
    for (int i = 0; i < 16; ++i) slot_id[rank[i]] = id[i];
    for (int j = 0; j < k; ++j) top_id[j] = slot_id[j];
    return;
  }
  // Many candidates (ties at τ): an insertion sort by (value desc, id asc); they arrive in
  // increasing id order, so an equal value ranks after the held one.
  float top_value[kVectorMaxTopk];
  int held = 0;
  for (int c = 0; c < count; ++c)
    insert_ranked(cand_value[c], cand_id[c], k, top_value, top_id, held);
}

#endif  // __AVX512F__

}  // namespace daedalus::moe::cpu_gate
