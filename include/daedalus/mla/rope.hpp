// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <numbers>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/macros.hpp"
#include "daedalus/core/tensor_view.hpp"

/// Rotary position embedding with YaRN scaling, exactly as DeepSeek's reference computes it
/// (inference/model.py, `precompute_freqs_cis`, `apply_rotary_emb`; YaRN: Peng et al.,
/// arXiv 2309.00071, section 3.2 "NTK-by-parts" and 3.4 "YaRN").
namespace daedalus::mla {

/// The dimension index at which a RoPE frequency makes `rotations` full turns over
/// `original_seq_len` positions: d(r) = dim · ln(L / (2π r)) / (2 ln θ) (YaRN eq. 17).
inline double yarn_correction_dim(double rotations, int rope_dim, double theta,
                                  int original_seq_len) {
  return rope_dim * std::log(original_seq_len / (rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(theta));
}

/// The [low, high] band of frequency indices that YaRN blends: low = floor(d(beta_fast)),
/// high = ceil(d(beta_slow)), clamped to [0, rope_dim - 1]. For DeepSeek-V3: 10 and 23.
struct YarnRange {
  int low;
  int high;
};

template <MlaConfig C>
YarnRange yarn_correction_range() {
  const int dim = C::qk_rope_head_dim;
  const int low = static_cast<int>(
      std::floor(yarn_correction_dim(C::beta_fast, dim, C::rope_theta, C::original_seq_len)));
  const int high = static_cast<int>(
      std::ceil(yarn_correction_dim(C::beta_slow, dim, C::rope_theta, C::original_seq_len)));
  return {std::max(low, 0), std::min(high, dim - 1)};
}

/// The rotation frequency θ_i of each pair i = 0 .. rope/2 - 1, in double precision:
/// θ_i = theta^(-2i/rope); with YaRN, θ'_i = θ_i / factor · ramp_i + θ_i · (1 - ramp_i), where
/// ramp_i = clamp((i - low) / (high - low), 0, 1): pairs below `low` (high frequencies, many turns
/// over the original context) keep θ_i, pairs above `high` are interpolated by 1/factor. YaRN
/// applies no amplitude scaling to cos/sin here; its attention temperature goes into the softmax
/// scale instead (see `softmax_scale`).
template <MlaConfig C>
std::array<double, C::qk_rope_head_dim / 2> rope_frequencies() {
  constexpr int dim = C::qk_rope_head_dim;
  std::array<double, dim / 2> freqs{};
  for (int i = 0; i < dim / 2; ++i) freqs[i] = std::pow(C::rope_theta, -2.0 * i / dim);
  if constexpr (C::rope_scaling == RopeScaling::yarn) {
    const YarnRange range = yarn_correction_range<C>();
    // DeepSeek's linear_ramp_factor nudges max by 0.001 when the band is empty.
    const double span = range.high == range.low ? 0.001 : double(range.high - range.low);
    for (int i = 0; i < dim / 2; ++i) {
      const double ramp = std::clamp((i - range.low) / span, 0.0, 1.0);
      freqs[i] = freqs[i] / C::rope_factor * ramp + freqs[i] * (1.0 - ramp);
    }
  }
  return freqs;
}

/// The attention softmax scale: qk_head_dim^-0.5 (192^-0.5 in DeepSeek, in both the naive and the
/// absorbed form — not latent_dim^-0.5), times m² with m = 0.1 · mscale · ln(rope_factor) + 1
/// when YaRN is active (YaRN eq. 22; DeepSeek-V3 MLA.__init__). V3: 0.135234, V2-Lite: 0.114721.
template <MlaConfig C>
double softmax_scale() {
  double scale = 1.0 / std::sqrt(double(C::qk_nope_head_dim + C::qk_rope_head_dim));
  if constexpr (C::rope_scaling == RopeScaling::yarn) {
    const double m = 0.1 * C::mscale * std::log(C::rope_factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

/// Precomputed cos/sin of position · θ_i for positions [0, max_positions), fp32, computed in
/// double so long positions keep their accuracy. Cheap to build; a model keeps one.
template <MlaConfig C>
class RopeTable {
 public:
  static constexpr int pairs = C::qk_rope_head_dim / 2;

  RopeTable() : frequencies_(rope_frequencies<C>()) {}

  const std::array<double, pairs>& frequencies() const { return frequencies_; }

  /// cos and sin of position · θ_i for each pair i (`pairs` values each), computed in double
  /// so that long positions keep their accuracy, then rounded to fp32.
  void angles(index_t pos, float* cos_out, float* sin_out) const {
    for (int i = 0; i < pairs; ++i) {
      const double angle = double(pos) * frequencies_[i];
      cos_out[i] = static_cast<float>(std::cos(angle));
      sin_out[i] = static_cast<float>(std::sin(angle));
    }
  }

  /// Rotates `x` (qk_rope_head_dim values) in place by precomputed angles, in the config's
  /// layout: interleaved pairs (x[2i], x[2i+1]) as DeepSeek's `apply_rotary_emb` (a complex
  /// multiply), or halves (x[i], x[i + rope/2]) as HF's `rotate_half`.
  static void apply(float* x, const float* cos_in, const float* sin_in) {
    for (int i = 0; i < pairs; ++i) {
      const int a = C::rope_layout == RopeLayout::interleaved ? 2 * i : i;
      const int b = C::rope_layout == RopeLayout::interleaved ? 2 * i + 1 : i + pairs;
      const float xa = x[a];
      const float xb = x[b];
      x[a] = xa * cos_in[i] - xb * sin_in[i];
      x[b] = xa * sin_in[i] + xb * cos_in[i];
    }
  }

  /// Rotates `x` (qk_rope_head_dim values) in place to position `pos`.
  void rotate(float* x, index_t pos) const {
    float c[pairs];
    float s[pairs];
    angles(pos, c, s);
    apply(x, c, s);
  }

 private:
  std::array<double, pairs> frequencies_;
};

}  // namespace daedalus::mla
