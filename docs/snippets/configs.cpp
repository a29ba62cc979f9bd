// SPDX-License-Identifier: Apache-2.0
// Snippet of docs/mla.md: a config is a struct; derive from a preset to change a field.
#include <cmath>
#include <cstdio>

#include "daedalus/daedalus.hpp"

// [snippet:derive]
// HF checkpoints rotate k_pe / q_pe by halves (rotate_half), DeepSeek's by interleaved pairs.
struct V3HfLayout : daedalus::DeepSeekV3 {
  static constexpr auto rope_layout = daedalus::RopeLayout::half;
};
// YaRN off: plain RoPE, and the softmax scale loses its mscale² factor.
struct V3NoYarn : daedalus::DeepSeekV3 {
  static constexpr auto rope_scaling = daedalus::RopeScaling::none;
};
static_assert(daedalus::MlaConfig<V3HfLayout> && daedalus::MoeConfig<V3NoYarn>);
// [/snippet:derive]

int main() {
  const double yarn = daedalus::mla::softmax_scale<V3HfLayout>();
  const double plain = daedalus::mla::softmax_scale<V3NoYarn>();
  std::printf("softmax scale: %.6f with YaRN, %.6f without (192^-0.5 = %.6f)\n", yarn, plain,
              1.0 / std::sqrt(192.0));
  return std::abs(plain - 1.0 / std::sqrt(192.0)) < 1e-12 && yarn > plain ? 0 : 1;
}
