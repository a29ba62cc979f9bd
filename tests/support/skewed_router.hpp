// SPDX-License-Identifier: Apache-2.0
// The skewed router of the balancing simulations (tests/moe/balance_test.cpp on the CPU,
// tests/cuda/cases/moe_balance_checks.hpp on the device): the gate's settings, the selection
// bias and the batch of logits of each step, drawn from one splitmix64 stream, so that the two
// backends route the same fp32 logits step by step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <daedalus/moe/gate.hpp>
#include <vector>

namespace daedalus::testing {

/// 16 experts in 4 groups (2 kept), top-4, sigmoid scores, normalised, an additive selection
/// bias starting at 0 (V3's gate at a small size). Each token's logits are uniform in [-2, 2]
/// plus +1.5 for experts 0-3 and +0.75 for experts 4-5: without balancing, experts 0-3 take
/// most tokens (MaxVio ≈ 2.5).
struct SkewedRouter {
  static constexpr int experts = 16, k = 4;
  int tokens;
  moe::GateSettings settings;
  std::vector<float> bias = std::vector<float>(experts, 0.0f);
  std::vector<float> logits;
  std::uint64_t state;

  /// @param tokens tokens a step (the CPU simulation uses 4096)
  SkewedRouter(std::uint64_t seed, int tokens_per_step)
      : tokens(tokens_per_step), logits(std::size_t(tokens_per_step) * experts), state(seed) {
    settings.score_func = ScoreFunc::sigmoid;
    settings.n_routed_experts = experts;
    settings.n_expert_groups = 4;
    settings.n_limited_groups = 2;
    settings.topk = k;
    settings.normalize = true;
  }

  /// A fast uniform in [-1, 1) (splitmix64): the simulation draws 65,536 logits a step.
  float uniform() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(double(z >> 40) * 0x1p-23 - 1.0);
  }

  /// Draws the next step's logits [tokens, experts] into `logits`.
  const std::vector<float>& draw() {
    for (int t = 0; t < tokens; ++t)
      for (int e = 0; e < experts; ++e)
        logits[std::size_t(t) * experts + e] =
            2.0f * uniform() + (e < 4 ? 1.5f : (e < 6 ? 0.75f : 0.0f));
    return logits;
  }
};

}  // namespace daedalus::testing
