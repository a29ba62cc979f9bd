// SPDX-License-Identifier: Apache-2.0
#pragma once

// What the MLA tests share: random models for a config (fp32 arrays for daedalus, the same values
// widened to fp64 for the reference), the config → reference-sizes bridge, test configs derived
// from the presets, and small helpers to snapshot and compare caches.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <span>
#include <vector>

#include "support/random.hpp"
#include "support/reference/mla_reference.hpp"
#include "support/tolerance.hpp"

namespace daedalus::testing {

/// Tiny with HF's rotate_half RoPE layout.
struct TinyHalf : daedalus::Tiny {
  static constexpr const char* name = "TinyHalf";
  static constexpr auto rope_layout = daedalus::RopeLayout::half;
};

/// Tiny with plain RoPE: no YaRN blend, softmax scale qk_head_dim^-0.5.
struct TinyNoRopeScaling : daedalus::Tiny {
  static constexpr const char* name = "TinyNoRopeScaling";
  static constexpr auto rope_scaling = daedalus::RopeScaling::none;
};

/// TinyNoQLora with HF's rotate_half RoPE layout.
struct TinyNoQLoraHalf : daedalus::TinyNoQLora {
  static constexpr const char* name = "TinyNoQLoraHalf";
  static constexpr auto rope_layout = daedalus::RopeLayout::half;
};

/// V3's attention sizes without YaRN (for the softmax-scale check).
struct DeepSeekV3NoRopeScaling : daedalus::DeepSeekV3 {
  static constexpr auto rope_scaling = daedalus::RopeScaling::none;
};

/// The reference's runtime description of config C.
template <MlaConfig C>
mla_reference::Sizes reference_sizes() {
  return {C::dim,
          C::n_heads,
          C::q_lora_rank,
          C::kv_lora_rank,
          C::qk_nope_head_dim,
          C::qk_rope_head_dim,
          C::v_head_dim,
          C::original_seq_len,
          double(C::rope_theta),
          double(C::rope_factor),
          double(C::beta_fast),
          double(C::beta_slow),
          double(C::mscale),
          double(C::norm_eps),
          C::rope_scaling == RopeScaling::yarn,
          C::rope_layout == RopeLayout::interleaved};
}

/// The longest fp32 accumulation in one MLA layer of config C over `tokens` cached tokens
/// (what tolerance::fp32_vs_reference is derived from).
template <MlaConfig C>
std::int64_t accumulation_length(std::int64_t tokens) {
  using S = MlaShape<C>;
  return std::max<std::int64_t>(
      {S::dim, S::q_lora_rank, S::latent_dim, std::int64_t(S::n_heads) * S::v_head_dim, tokens});
}

/// One layer's weights as plain fp32 arrays, random: projections uniform in ±1/sqrt(in) as
/// `nn.Linear` initialises them, the query projection with a gain of 4 so that the attention
/// scores spread over a few units and the softmax is far from uniform (a flat softmax would
/// hide masking and position errors), norm weights in [0.5, 1.5].
template <MlaConfig C>
struct WeightArrays {
  using S = MlaShape<C>;
  std::vector<float> wq_a, q_norm, wq_b, wq, wkv_a, kv_norm, wkv_b, wo;

  static WeightArrays random(std::uint64_t offset) {
    Random rng(offset);
    auto linear = [&](std::size_t out, std::size_t in, double gain = 1.0) {
      return rng.uniform(out * in, gain / std::sqrt(double(in)));
    };
    WeightArrays a;
    const std::size_t q_rows = std::size_t(S::n_heads) * S::qk_head_dim;
    if constexpr (S::has_q_lora) {
      a.wq_a = linear(S::q_lora_rank, S::dim);
      a.q_norm = rng.uniform_in(S::q_lora_rank, 0.5, 1.5);
      a.wq_b = linear(q_rows, S::q_lora_rank, 4.0);
    } else {
      a.wq = linear(q_rows, S::dim, 4.0);
    }
    a.wkv_a = linear(S::latent_dim, S::dim);
    a.kv_norm = rng.uniform_in(S::kv_lora_rank, 0.5, 1.5);
    a.wkv_b = linear(std::size_t(S::n_heads) * S::kv_b_rows_per_head, S::kv_lora_rank);
    a.wo = linear(S::dim, std::size_t(S::n_heads) * S::v_head_dim);
    return a;
  }

  mla::MlaWeightArrays arrays() const {
    return {wq_a, q_norm, wq_b, wq, wkv_a, kv_norm, wkv_b, wo};
  }
  mla::MlaWeights<C> weights() const { return mla::MlaWeights<C>::from_arrays(arrays()); }
  mla_reference::Weights reference() const {
    return {widen(wq_a),  widen(q_norm),  widen(wq_b),  widen(wq),
            widen(wkv_a), widen(kv_norm), widen(wkv_b), widen(wo)};
  }
};

/// A model of config C shared by the tests of one binary run (V2-Lite's weights are 14M values;
/// generating them once keeps the suite fast). Deterministic for the run's seed.
template <MlaConfig C>
struct SharedModel {
  WeightArrays<C> arrays;
  mla::MlaWeights<C> weights;
  mla_reference::Weights reference;

  static const SharedModel& get() {
    static const SharedModel model = [] {
      WeightArrays<C> a =
          WeightArrays<C>::random(0x5EED0000u + MlaShape<C>::dim * 7u + MlaShape<C>::n_heads);
      mla::MlaWeights<C> w = a.weights();
      mla_reference::Weights r = a.reference();
      return SharedModel{std::move(a), std::move(w), std::move(r)};
    }();
    return model;
  }
};

/// The fp64 reference forward of `tokens` tokens x [tokens, dim] through the shared model.
template <MlaConfig C>
mla_reference::Forward reference_forward(const std::vector<float>& x, int tokens) {
  return mla_reference::forward(reference_sizes<C>(), SharedModel<C>::get().reference, widen(x),
                                tokens);
}

/// Token embeddings: uniform in [-1, 1], never zero.
inline std::vector<float> random_tokens(std::size_t tokens, std::size_t dim, std::uint64_t offset) {
  return Random(offset).uniform(tokens * dim);
}

/// The valid rows of one cached sequence, widened to fp32.
template <class Cache>
std::vector<float> cached_rows(const Cache& cache, index_t seq) {
  const auto rows = cache.rows(seq);
  std::vector<float> out(std::size_t(rows.size()));
  for (index_t i = 0; i < rows.size(); ++i)
    out[std::size_t(i)] = static_cast<float>(rows.data()[i]);
  return out;
}

/// Everything a cache holds that a failed call must leave alone: each sequence's length and
/// valid rows (bit patterns).
template <class Cache>
struct CacheSnapshot {
  std::vector<index_t> lengths;
  std::vector<std::vector<typename Cache::storage_type>> rows;

  explicit CacheSnapshot(const Cache& cache) {
    for (index_t s = 0; s < cache.num_sequences(); ++s) {
      lengths.push_back(cache.length(s));
      const auto r = cache.rows(s);
      rows.emplace_back(r.data(), r.data() + r.size());
    }
  }

  /// True when `cache` holds exactly what it held when the snapshot was taken.
  bool unchanged(const Cache& cache) const {
    const CacheSnapshot now(cache);
    if (now.lengths != lengths) return false;
    for (std::size_t s = 0; s < rows.size(); ++s) {
      if (now.rows[s].size() != rows[s].size()) return false;
      if (!std::equal(rows[s].begin(), rows[s].end(), now.rows[s].begin(),
                      [](auto a, auto b) { return std::memcmp(&a, &b, sizeof a) == 0; }))
        return false;
    }
    return true;
  }
};

/// Prompt length the MLA tests use for config C: past Tiny's original_seq_len (64, so YaRN's
/// interpolated frequencies matter) and past one CPU key block (128, so blocks and flash-decoding
/// splits are crossed); V2-Lite (dim 2048, 16 heads) is kept at 40 tokens for speed.
template <MlaConfig C>
constexpr index_t prompt_length() {
  return MlaShape<C>::dim >= 1024 ? 40 : 150;
}

/// What one prefill of a whole prompt into a fresh single-sequence cache produced.
struct PrefillResult {
  std::vector<float> out;   // [tokens, dim]
  std::vector<float> rows;  // [tokens, latent_dim], the cache contents widened to fp32
};

/// Prefills x [tokens, dim] of the shared model into a fresh cache of `capacity` tokens.
template <MlaConfig C, class Storage = float>
PrefillResult prefill_prompt(const CpuBackend& cpu, const std::vector<float>& x,
                             mla::AttentionMode mode, index_t capacity = -1) {
  const index_t tokens = index_t(x.size()) / MlaShape<C>::dim;
  ContiguousLatentCache<C, CpuBackend, Storage> cache(1, capacity < 0 ? tokens : capacity);
  PrefillResult r{std::vector<float>(x.size()), {}};
  mla::prefill(cpu, SharedModel<C>::get().weights, cache, 0, 0,
               HostView<const float, 2>(x.data(), {tokens, MlaShape<C>::dim}),
               HostView<float, 2>(r.out.data(), {tokens, MlaShape<C>::dim}), mode);
  r.rows = cached_rows(cache, 0);
  return r;
}

/// True when two float arrays hold the same bit patterns (what "independent of the thread count"
/// means; a tolerance would hide a partition that depends on it).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// Rows [begin, end) of a row-major array of rows `width` wide.
template <class T>
std::vector<T> slice_rows(const std::vector<T>& v, index_t begin, index_t end, index_t width) {
  return std::vector<T>(v.begin() + begin * width, v.begin() + end * width);
}

}  // namespace daedalus::testing
