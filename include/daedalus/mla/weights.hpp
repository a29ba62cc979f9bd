// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus::mla {

/// Plain arrays holding one MLA layer's weights in DeepSeek's `nn.Linear` layout, `[out, in]`
/// row-major, as they come out of a checkpoint (HF names in brackets). Leave `wq_a`, `q_norm`,
/// `wq_b` empty for a config without query LoRA (V2-Lite) and `wq` empty otherwise.
struct MlaWeightArrays {
  std::span<const float> wq_a;     ///< [q_lora_rank, dim]                      (q_a_proj)
  std::span<const float> q_norm;   ///< [q_lora_rank]                           (q_a_layernorm)
  std::span<const float> wq_b;     ///< [n_heads * qk_head_dim, q_lora_rank]    (q_b_proj)
  std::span<const float> wq;       ///< [n_heads * qk_head_dim, dim]            (q_proj)
  std::span<const float> wkv_a;    ///< [kv_lora_rank + rope, dim]              (kv_a_proj_with_mqa)
  std::span<const float> kv_norm;  ///< [kv_lora_rank]                          (kv_a_layernorm)
  std::span<const float> wkv_b;    ///< [n_heads * (nope + v_head_dim), kv_lora_rank] (kv_b_proj)
  std::span<const float> wo;       ///< [dim, n_heads * v_head_dim]             (o_proj)
};

/// One MLA layer's weights, owned, in fp32 on the host, `[out, in]` row-major. The absorbed
/// form needs no extra storage: `wkv_b` viewed as [n_heads, nope + v, kv_lora_rank] holds W_UK[h]
/// (its first `nope` rows) and W_UV[h] (the last `v_head_dim` rows) for each head h
/// (DeepSeek-V2 paper, section 2.1.2, eqs. 9-11 and the absorption remark after them).
template <MlaConfig C>
class MlaWeights {
 public:
  using Shape = MlaShape<C>;
  using config = C;
  /// Where the arrays live: the fronts take these weights with a host backend (CpuBackend).
  using memory_space = HostMemory;

  /// Copies the arrays, checking that each has the size its role requires.
  /// @throws InvalidArgument naming the first array whose size is wrong.
  static MlaWeights from_arrays(const MlaWeightArrays& arrays) {
    MlaWeights w;
    constexpr std::string_view fn = "daedalus::mla::MlaWeights::from_arrays";
    auto take = [&](std::vector<float>& dst, std::span<const float> src, std::string_view name,
                    std::size_t expected) {
      if (src.size() != expected) {
        throw InvalidArgument(detail::message(fn, ": '", name, "' has ", src.size(),
                                              " values; expected ", expected, " for ",
                                              config_name<C>()));
      }
      dst.assign(src.begin(), src.end());
    };
    if constexpr (Shape::has_q_lora) {
      take(w.wq_a_, arrays.wq_a, "wq_a", sz(Shape::q_lora_rank) * Shape::dim);
      take(w.q_norm_, arrays.q_norm, "q_norm", sz(Shape::q_lora_rank));
      take(w.wq_b_, arrays.wq_b, "wq_b",
           sz(Shape::n_heads) * Shape::qk_head_dim * Shape::q_lora_rank);
      take(w.wq_, arrays.wq, "wq", 0);
    } else {
      take(w.wq_a_, arrays.wq_a, "wq_a", 0);
      take(w.q_norm_, arrays.q_norm, "q_norm", 0);
      take(w.wq_b_, arrays.wq_b, "wq_b", 0);
      take(w.wq_, arrays.wq, "wq", sz(Shape::n_heads) * Shape::qk_head_dim * Shape::dim);
    }
    take(w.wkv_a_, arrays.wkv_a, "wkv_a", sz(Shape::latent_dim) * Shape::dim);
    take(w.kv_norm_, arrays.kv_norm, "kv_norm", sz(Shape::kv_lora_rank));
    take(w.wkv_b_, arrays.wkv_b, "wkv_b",
         sz(Shape::n_heads) * Shape::kv_b_rows_per_head * Shape::kv_lora_rank);
    take(w.wo_, arrays.wo, "wo", sz(Shape::dim) * Shape::n_heads * Shape::v_head_dim);
    return w;
  }

  /// Random weights for examples, benchmarks and tests: projections uniform in ±1/sqrt(in)
  /// (`nn.Linear`'s default range), norm weights uniform in [0.5, 1.5] so that a wrong norm
  /// weight is visible. Deterministic for a given seed.
  static MlaWeights random(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto fill = [&](std::size_t rows, std::size_t in) {
      std::vector<float> v(rows * in);
      std::uniform_real_distribution<float> dist(-1.0f / std::sqrt(float(in)),
                                                 1.0f / std::sqrt(float(in)));
      for (float& x : v) x = dist(rng);
      return v;
    };
    auto norm = [&](std::size_t n) {
      std::vector<float> v(n);
      std::uniform_real_distribution<float> dist(0.5f, 1.5f);
      for (float& x : v) x = dist(rng);
      return v;
    };
    std::vector<float> wq_a, q_norm, wq_b, wq;
    if constexpr (Shape::has_q_lora) {
      wq_a = fill(Shape::q_lora_rank, Shape::dim);
      q_norm = norm(Shape::q_lora_rank);
      wq_b = fill(sz(Shape::n_heads) * Shape::qk_head_dim, Shape::q_lora_rank);
    } else {
      wq = fill(sz(Shape::n_heads) * Shape::qk_head_dim, Shape::dim);
    }
    std::vector<float> wkv_a = fill(Shape::latent_dim, Shape::dim);
    std::vector<float> kv_norm = norm(Shape::kv_lora_rank);
    std::vector<float> wkv_b =
        fill(sz(Shape::n_heads) * Shape::kv_b_rows_per_head, Shape::kv_lora_rank);
    std::vector<float> wo = fill(Shape::dim, sz(Shape::n_heads) * Shape::v_head_dim);
    return from_arrays({wq_a, q_norm, wq_b, wq, wkv_a, kv_norm, wkv_b, wo});
  }

  // [q_lora_rank, dim]; empty without query LoRA
  HostView<const float, 2> wq_a() const { return view(wq_a_, Shape::q_lora_rank, Shape::dim); }
  // [q_lora_rank]
  HostView<const float, 1> q_norm() const { return {q_norm_.data(), {index_t(q_norm_.size())}}; }
  // [n_heads * qk_head_dim, q_lora_rank]
  HostView<const float, 2> wq_b() const {
    return view(wq_b_, Shape::n_heads * Shape::qk_head_dim, Shape::q_lora_rank);
  }
  // [n_heads * qk_head_dim, dim]; empty with query LoRA
  HostView<const float, 2> wq() const {
    return view(wq_, Shape::has_q_lora ? 0 : Shape::n_heads * Shape::qk_head_dim, Shape::dim);
  }
  // [kv_lora_rank + rope, dim]
  HostView<const float, 2> wkv_a() const { return view(wkv_a_, Shape::latent_dim, Shape::dim); }
  // [kv_lora_rank]
  HostView<const float, 1> kv_norm() const { return {kv_norm_.data(), {Shape::kv_lora_rank}}; }
  // [n_heads * (nope + v), kv_lora_rank]
  HostView<const float, 2> wkv_b() const {
    return view(wkv_b_, Shape::n_heads * Shape::kv_b_rows_per_head, Shape::kv_lora_rank);
  }
  // [nope, kv_lora_rank]: maps head h's no-position key from the latent (W_UK[h]).
  HostView<const float, 2> w_uk(int head) const {
    return {wkv_b_.data() + std::size_t(head) * Shape::kv_b_rows_per_head * Shape::kv_lora_rank,
            {Shape::nope, Shape::kv_lora_rank}};
  }
  // [v_head_dim, kv_lora_rank]: maps the latent to head h's value (W_UV[h]).
  HostView<const float, 2> w_uv(int head) const {
    return {wkv_b_.data() +
                (std::size_t(head) * Shape::kv_b_rows_per_head + Shape::nope) * Shape::kv_lora_rank,
            {Shape::v_head_dim, Shape::kv_lora_rank}};
  }
  // [dim, n_heads * v_head_dim]
  HostView<const float, 2> wo() const {
    return view(wo_, Shape::dim, Shape::n_heads * Shape::v_head_dim);
  }

 private:
  static std::size_t sz(int n) { return static_cast<std::size_t>(n); }
  static HostView<const float, 2> view(const std::vector<float>& v, index_t rows, index_t cols) {
    return {v.data(), {v.empty() ? 0 : rows, cols}};
  }

  std::vector<float> wq_a_, q_norm_, wq_b_, wq_, wkv_a_, kv_norm_, wkv_b_, wo_;
};

}  // namespace daedalus::mla
