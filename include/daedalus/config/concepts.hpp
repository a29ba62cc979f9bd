// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <concepts>
#include <cstdint>

namespace daedalus {

/// How the 64 rotary dimensions of q_pe and k_pe are paired.
enum class RopeLayout {
  /// DeepSeek's reference code: adjacent pairs (x[2i], x[2i+1]) rotate together as one complex
  /// number (`apply_rotary_emb` with `view_as_complex`). The default.
  interleaved,
  /// HF transformers' `rotate_half`: x[i] pairs with x[i + d/2]. The same rotation on permuted
  /// dimensions: checkpoints converted for HF have their wq_b / wkv_a rope rows permuted to match.
  half,
};

/// When YaRN frequency scaling (and the matching mscale² on the softmax scale) is active.
/// DeepSeek's reference turns it on only when `max_seq_len > original_seq_len`; HF turns it on
/// whenever `rope_scaling` is present. daedalus makes it an explicit choice of the config.
enum class RopeScaling {
  none,  ///< plain RoPE, softmax scale qk_head_dim^-0.5
  yarn,  ///< YaRN frequency blend (beta_fast/beta_slow) and softmax scale × mscale²
};

/// MoE router scoring function, named as in DeepSeek's `ModelArgs.score_func`.
enum class ScoreFunc { softmax, sigmoid };

/// The fields a Multi-head Latent Attention configuration must have, named exactly as DeepSeek's
/// `ModelArgs` (inference/model.py) names them. Runtime sizes (batch, lengths) are never here.
template <class C>
concept MlaConfig = requires {
  { C::dim } -> std::convertible_to<int>;
  { C::n_heads } -> std::convertible_to<int>;
  { C::q_lora_rank } -> std::convertible_to<int>;
  { C::kv_lora_rank } -> std::convertible_to<int>;
  { C::qk_nope_head_dim } -> std::convertible_to<int>;
  { C::qk_rope_head_dim } -> std::convertible_to<int>;
  { C::v_head_dim } -> std::convertible_to<int>;
  { C::original_seq_len } -> std::convertible_to<int>;
  { C::rope_theta } -> std::convertible_to<double>;
  { C::rope_factor } -> std::convertible_to<double>;
  { C::beta_fast } -> std::convertible_to<double>;
  { C::beta_slow } -> std::convertible_to<double>;
  { C::mscale } -> std::convertible_to<double>;
  { C::norm_eps } -> std::convertible_to<double>;
  { C::rope_scaling } -> std::convertible_to<RopeScaling>;
  { C::rope_layout } -> std::convertible_to<RopeLayout>;
};

/// The fields a DeepSeek MoE configuration must have (DeepSeek's `ModelArgs` names).
template <class C>
concept MoeConfig = requires {
  { C::dim } -> std::convertible_to<int>;
  { C::moe_inter_dim } -> std::convertible_to<int>;
  { C::n_routed_experts } -> std::convertible_to<int>;
  { C::n_shared_experts } -> std::convertible_to<int>;
  { C::n_activated_experts } -> std::convertible_to<int>;
  { C::n_expert_groups } -> std::convertible_to<int>;
  { C::n_limited_groups } -> std::convertible_to<int>;
  { C::score_func } -> std::convertible_to<ScoreFunc>;
  { C::route_scale } -> std::convertible_to<double>;
};

/// The display name of a configuration for error messages: its optional `name` member (every
/// preset has one), or a generic phrase for a user's config without one.
template <class C>
constexpr const char* config_name() {
  if constexpr (requires {
                  { C::name } -> std::convertible_to<const char*>;
                }) {
    return C::name;
  } else {
    return "this configuration";
  }
}

/// Sizes derived from an MLA config, computed in this one place.
template <MlaConfig C>
struct MlaShape {
  static constexpr int dim = C::dim;
  static constexpr int n_heads = C::n_heads;
  static constexpr int q_lora_rank = C::q_lora_rank;
  static constexpr int kv_lora_rank = C::kv_lora_rank;
  static constexpr int nope = C::qk_nope_head_dim;
  static constexpr int rope = C::qk_rope_head_dim;
  static constexpr int v_head_dim = C::v_head_dim;
  /// Width of one query/key head: the no-position part then the rotary part (192 in DeepSeek).
  static constexpr int qk_head_dim = nope + rope;
  /// Width of one cached token: the normed latent then the rotated k_pe (576 in DeepSeek).
  static constexpr int latent_dim = kv_lora_rank + rope;
  /// Rows of wkv_b per head: W_UK (nope rows) then W_UV (v rows).
  static constexpr int kv_b_rows_per_head = nope + v_head_dim;
  static constexpr bool has_q_lora = q_lora_rank > 0;

  static_assert(C::dim > 0, "MlaConfig: 'dim' must be positive");
  static_assert(C::n_heads > 0, "MlaConfig: 'n_heads' must be positive");
  static_assert(C::q_lora_rank >= 0,
                "MlaConfig: 'q_lora_rank' must be 0 (one wq projection) or positive");
  static_assert(C::kv_lora_rank > 0,
                "MlaConfig: 'kv_lora_rank' must be positive: MLA caches a compressed latent of "
                "that width");
  static_assert(C::qk_nope_head_dim > 0, "MlaConfig: 'qk_nope_head_dim' must be positive");
  static_assert(C::qk_rope_head_dim > 0 && C::qk_rope_head_dim % 2 == 0,
                "MlaConfig: 'qk_rope_head_dim' must be positive and even: RoPE rotates pairs");
  static_assert(C::v_head_dim > 0, "MlaConfig: 'v_head_dim' must be positive");
  static_assert(C::original_seq_len > 0, "MlaConfig: 'original_seq_len' must be positive");
  static_assert(C::rope_theta > 1.0, "MlaConfig: 'rope_theta' must be greater than 1");
  static_assert(C::rope_factor >= 1.0, "MlaConfig: 'rope_factor' must be at least 1");
  static_assert(C::beta_fast > C::beta_slow && C::beta_slow > 0,
                "MlaConfig: YaRN needs beta_fast > beta_slow > 0");
  static_assert(C::norm_eps > 0.0, "MlaConfig: 'norm_eps' (RMSNorm epsilon) must be positive");
};

/// Sizes derived from an MoE config, with its checks.
template <MoeConfig C>
struct MoeShape {
  static constexpr int experts_per_group = C::n_routed_experts / C::n_expert_groups;

  static_assert(C::n_routed_experts > 0, "MoeConfig: 'n_routed_experts' must be positive");
  static_assert(C::n_expert_groups > 0 && C::n_routed_experts % C::n_expert_groups == 0,
                "MoeConfig: 'n_routed_experts' must be a multiple of 'n_expert_groups'");
  static_assert(C::n_limited_groups > 0 && C::n_limited_groups <= C::n_expert_groups,
                "MoeConfig: 'n_limited_groups' must lie in [1, n_expert_groups]");
  static_assert(C::n_activated_experts > 0 &&
                    C::n_activated_experts <= C::n_limited_groups * experts_per_group,
                "MoeConfig: 'n_activated_experts' must be at most the experts in the "
                "n_limited_groups groups a token may use");
};

}  // namespace daedalus
