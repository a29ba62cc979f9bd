// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "daedalus/config/concepts.hpp"

/// Model presets. Field names and values are DeepSeek's (`deepseek-ai/DeepSeek-V3`,
/// inference/model.py `ModelArgs` and inference/configs/config_{16B,236B,671B}.json). To define a
/// variant, derive and shadow a field:
///   struct MyV3 : daedalus::DeepSeekV3 { static constexpr auto rope_layout = RopeLayout::half; };
namespace daedalus {

/// Settings shared by every DeepSeek-V2/V3 model: RoPE base, YaRN parameters, norm epsilon.
struct DeepSeekYarnDefaults {
  static constexpr int original_seq_len = 4096;
  static constexpr double rope_theta = 10000.0;
  static constexpr double rope_factor = 40.0;
  static constexpr double beta_fast = 32.0;
  static constexpr double beta_slow = 1.0;
  static constexpr double norm_eps = 1e-6;
  /// The reference code's default max_seq_len (16384) exceeds original_seq_len, so YaRN is on.
  static constexpr RopeScaling rope_scaling = RopeScaling::yarn;
  static constexpr RopeLayout rope_layout = RopeLayout::interleaved;
  static constexpr int qk_nope_head_dim = 128;
  static constexpr int qk_rope_head_dim = 64;
  static constexpr int v_head_dim = 128;
  static constexpr int kv_lora_rank = 512;
};

/// DeepSeek-V2-Lite (16B total, 2.4B active): no query LoRA, 16 heads, softmax router.
struct DeepSeekV2Lite : DeepSeekYarnDefaults {
  static constexpr const char* name = "DeepSeek-V2-Lite";
  static constexpr int vocab_size = 102400;
  static constexpr int dim = 2048;
  static constexpr int inter_dim = 10944;
  static constexpr int moe_inter_dim = 1408;
  static constexpr int n_layers = 27;
  static constexpr int n_dense_layers = 1;
  static constexpr int n_heads = 16;
  static constexpr int n_routed_experts = 64;
  static constexpr int n_shared_experts = 2;
  static constexpr int n_activated_experts = 6;
  static constexpr int n_expert_groups = 1;
  static constexpr int n_limited_groups = 1;
  static constexpr ScoreFunc score_func = ScoreFunc::softmax;
  static constexpr double route_scale = 1.0;
  static constexpr int q_lora_rank = 0;
  static constexpr double mscale = 0.707;
};

/// DeepSeek-V2 (236B total, 21B active).
struct DeepSeekV2 : DeepSeekYarnDefaults {
  static constexpr const char* name = "DeepSeek-V2";
  static constexpr int vocab_size = 102400;
  static constexpr int dim = 5120;
  static constexpr int inter_dim = 12288;
  static constexpr int moe_inter_dim = 1536;
  static constexpr int n_layers = 60;
  static constexpr int n_dense_layers = 1;
  static constexpr int n_heads = 128;
  static constexpr int n_routed_experts = 160;
  static constexpr int n_shared_experts = 2;
  static constexpr int n_activated_experts = 6;
  static constexpr int n_expert_groups = 8;
  static constexpr int n_limited_groups = 3;
  static constexpr ScoreFunc score_func = ScoreFunc::softmax;
  static constexpr double route_scale = 16.0;
  static constexpr int q_lora_rank = 1536;
  static constexpr double mscale = 1.0;
};

/// DeepSeek-V3 (671B total, 37B active): sigmoid router with selection bias.
struct DeepSeekV3 : DeepSeekYarnDefaults {
  static constexpr const char* name = "DeepSeek-V3";
  static constexpr int vocab_size = 129280;
  static constexpr int dim = 7168;
  static constexpr int inter_dim = 18432;
  static constexpr int moe_inter_dim = 2048;
  static constexpr int n_layers = 61;
  static constexpr int n_dense_layers = 3;
  static constexpr int n_heads = 128;
  static constexpr int n_routed_experts = 256;
  static constexpr int n_shared_experts = 1;
  static constexpr int n_activated_experts = 8;
  static constexpr int n_expert_groups = 8;
  static constexpr int n_limited_groups = 4;
  static constexpr ScoreFunc score_func = ScoreFunc::sigmoid;
  static constexpr double route_scale = 2.5;
  static constexpr int q_lora_rank = 1536;
  static constexpr double mscale = 1.0;
};

/// A small test shape whose sizes are multiples of no tile size (odd head count, latent 40,
/// rope 8, nope 12, v 10), so kernels' edge handling is exercised. YaRN on, with a short
/// original_seq_len so the frequency blend affects positions the tests reach.
struct Tiny : DeepSeekYarnDefaults {
  static constexpr const char* name = "Tiny";
  static constexpr int dim = 96;
  static constexpr int n_heads = 3;
  static constexpr int q_lora_rank = 24;
  static constexpr int kv_lora_rank = 40;
  static constexpr int qk_nope_head_dim = 12;
  static constexpr int qk_rope_head_dim = 8;
  static constexpr int v_head_dim = 10;
  static constexpr int original_seq_len = 64;
  static constexpr double mscale = 1.0;
  static constexpr int inter_dim = 80;
  static constexpr int moe_inter_dim = 20;
  static constexpr int n_routed_experts = 12;
  static constexpr int n_shared_experts = 1;
  static constexpr int n_activated_experts = 3;
  static constexpr int n_expert_groups = 4;
  static constexpr int n_limited_groups = 2;
  static constexpr ScoreFunc score_func = ScoreFunc::sigmoid;
  static constexpr double route_scale = 2.5;
};

/// Tiny without query LoRA (the V2-Lite code path at test size).
struct TinyNoQLora : Tiny {
  static constexpr const char* name = "TinyNoQLora";
  static constexpr int q_lora_rank = 0;
};

static_assert(MlaConfig<DeepSeekV2Lite> && MoeConfig<DeepSeekV2Lite>);
static_assert(MlaConfig<DeepSeekV2> && MoeConfig<DeepSeekV2>);
static_assert(MlaConfig<DeepSeekV3> && MoeConfig<DeepSeekV3>);
static_assert(MlaConfig<Tiny> && MoeConfig<Tiny>);
static_assert(MlaShape<DeepSeekV3>::latent_dim == 576 && MlaShape<DeepSeekV3>::qk_head_dim == 192);

}  // namespace daedalus
