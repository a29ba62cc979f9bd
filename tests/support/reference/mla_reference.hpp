// SPDX-License-Identifier: Apache-2.0
#pragma once

// An independent double-precision reference of DeepSeek's Multi-head Latent Attention forward,
// written from the DeepSeek-V2 paper (arXiv 2405.04434, section 2.1) and DeepSeek-V3's
// inference/model.py
// (`MLA.forward`, `precompute_freqs_cis`, `apply_rotary_emb`, `RMSNorm`), not from daedalus: it
// includes no daedalus header, takes plain row-major `[out, in]` weight arrays and a runtime struct
// of sizes, and is written for obviousness rather than speed (plain loops, everything in double).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numbers>
#include <utility>
#include <vector>

namespace mla_reference {

using Vec = std::vector<double>;

/// Sizes and RoPE/YaRN parameters of one MLA layer (DeepSeek's ModelArgs names).
struct Sizes {
  int dim;
  int n_heads;
  int q_lora_rank;  // 0: one `wq` projection (V2-Lite)
  int kv_lora_rank;
  int qk_nope_head_dim;
  int qk_rope_head_dim;
  int v_head_dim;
  int original_seq_len;
  double rope_theta;
  double rope_factor;
  double beta_fast;
  double beta_slow;
  double mscale;
  double norm_eps;
  bool yarn;         // YaRN frequency blend and softmax scale × mscale²
  bool interleaved;  // RoPE pairs (2i, 2i+1) as DeepSeek; false: (i, i + rope/2) as HF rotate_half

  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  int latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }
};

/// One layer's weights, `nn.Linear` layout [out, in], row-major. wq_a/q_norm/wq_b are empty when
/// q_lora_rank == 0, wq is empty otherwise.
struct Weights {
  Vec wq_a;     // [q_lora_rank, dim]
  Vec q_norm;   // [q_lora_rank]
  Vec wq_b;     // [n_heads * qk_head_dim, q_lora_rank]
  Vec wq;       // [n_heads * qk_head_dim, dim]
  Vec wkv_a;    // [kv_lora_rank + rope, dim]
  Vec kv_norm;  // [kv_lora_rank]
  Vec wkv_b;    // [n_heads * (nope + v_head_dim), kv_lora_rank]
  Vec wo;       // [dim, n_heads * v_head_dim]
};

/// y = x wᵀ: x [n, in], w [out, in] → y [n, out].
inline Vec linear(const Vec& x, int n, int in, const Vec& w, int out) {
  Vec y(std::size_t(n) * out, 0.0);
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) {
      double sum = 0.0;
      for (int i = 0; i < in; ++i) sum += x[std::size_t(t) * in + i] * w[std::size_t(o) * in + i];
      y[std::size_t(t) * out + o] = sum;
    }
  return y;
}

/// DeepSeek RMSNorm: x · 1/sqrt(mean(x²) + eps) · w, in place over `width` values.
inline void rms_norm(double* x, int width, const double* w, double eps) {
  double sum_sq = 0.0;
  for (int j = 0; j < width; ++j) sum_sq += x[j] * x[j];
  const double inv = 1.0 / std::sqrt(sum_sq / width + eps);
  for (int j = 0; j < width; ++j) x[j] = x[j] * inv * w[j];
}

/// YaRN's correction band: d(r) = rope · ln(L / (2π r)) / (2 ln θ); low = floor(d(beta_fast)),
/// high = ceil(d(beta_slow)), clamped to [0, rope - 1] (model.py `find_correction_range`).
inline std::pair<int, int> yarn_correction_range(const Sizes& s) {
  auto d = [&](double rotations) {
    return s.qk_rope_head_dim *
           std::log(s.original_seq_len / (2.0 * std::numbers::pi * rotations)) /
           (2.0 * std::log(s.rope_theta));
  };
  const int low = int(std::floor(d(s.beta_fast)));
  const int high = int(std::ceil(d(s.beta_slow)));
  return {std::max(low, 0), std::min(high, s.qk_rope_head_dim - 1)};
}

/// θ_i = theta^(-2i/rope), i < rope/2; with YaRN θ'_i = θ_i/factor · ramp_i + θ_i · (1 - ramp_i),
/// ramp_i = clamp((i - low)/(high - low), 0, 1) (`linear_ramp_factor` adds 0.001 to an empty band).
inline Vec rope_frequencies(const Sizes& s) {
  const int pairs = s.qk_rope_head_dim / 2;
  Vec freqs(static_cast<std::size_t>(pairs), 0.0);
  for (int i = 0; i < pairs; ++i)
    freqs[std::size_t(i)] = 1.0 / std::pow(s.rope_theta, 2.0 * i / s.qk_rope_head_dim);
  if (s.yarn) {
    const auto [low, high] = yarn_correction_range(s);
    const double top = high == low ? high + 0.001 : double(high);
    for (int i = 0; i < pairs; ++i) {
      const double ramp = std::clamp((i - low) / (top - low), 0.0, 1.0);
      double& f = freqs[std::size_t(i)];
      f = f / s.rope_factor * ramp + f * (1.0 - ramp);
    }
  }
  return freqs;
}

/// (qk_nope + qk_rope)^-0.5, times m² with m = 0.1 · mscale · ln(factor) + 1 under YaRN.
inline double softmax_scale(const Sizes& s) {
  double scale = 1.0 / std::sqrt(double(s.qk_head_dim()));
  if (s.yarn) {
    const double m = 0.1 * s.mscale * std::log(s.rope_factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

/// Rotates qk_rope_head_dim values in place to position `pos`: pair i = (x[a], x[b]) becomes the
/// complex product (x[a] + i x[b]) · e^{i pos θ_i}.
inline void rotate(double* x, const Sizes& s, const Vec& freqs, long long pos) {
  const int pairs = s.qk_rope_head_dim / 2;
  for (int i = 0; i < pairs; ++i) {
    const int a = s.interleaved ? 2 * i : i;
    const int b = s.interleaved ? 2 * i + 1 : i + pairs;
    const double angle = double(pos) * freqs[std::size_t(i)];
    const double c = std::cos(angle), sn = std::sin(angle);
    const double xa = x[a], xb = x[b];
    x[a] = xa * c - xb * sn;
    x[b] = xa * sn + xb * c;
  }
}

/// MLA.forward steps 1-3 for n tokens at positions start_pos .. start_pos + n - 1.
struct Projection {
  Vec q;       // [n, n_heads, qk_head_dim]: q_nope then rotated q_pe per head
  Vec latent;  // [n, kv_lora_rank + rope]: normed latent c then rotated k_pe (the cache rows)
};

inline Projection project(const Sizes& s, const Weights& w, const Vec& x, int n,
                          long long start_pos) {
  const int H = s.n_heads, QK = s.qk_head_dim(), D = s.latent_dim();
  const Vec freqs = rope_frequencies(s);
  Projection p;
  if (s.q_lora_rank > 0) {
    Vec q_a = linear(x, n, s.dim, w.wq_a, s.q_lora_rank);
    for (int t = 0; t < n; ++t)
      rms_norm(&q_a[std::size_t(t) * s.q_lora_rank], s.q_lora_rank, w.q_norm.data(), s.norm_eps);
    p.q = linear(q_a, n, s.q_lora_rank, w.wq_b, H * QK);
  } else {
    p.q = linear(x, n, s.dim, w.wq, H * QK);
  }
  p.latent = linear(x, n, s.dim, w.wkv_a, D);
  for (int t = 0; t < n; ++t) {
    double* row = &p.latent[std::size_t(t) * D];
    rms_norm(row, s.kv_lora_rank, w.kv_norm.data(), s.norm_eps);  // only the latent is normed
    rotate(row + s.kv_lora_rank, s, freqs, start_pos + t);        // k_pe: rotated, never normed
    for (int h = 0; h < H; ++h)
      rotate(&p.q[(std::size_t(t) * H + h) * QK + s.qk_nope_head_dim], s, freqs, start_pos + t);
  }
  return p;
}

/// Softmax of scores[0..n) in place.
inline void softmax(double* scores, int n) {
  const double mx = *std::max_element(scores, scores + n);
  double sum = 0.0;
  for (int t = 0; t < n; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
  for (int t = 0; t < n; ++t) scores[t] /= sum;
}

/// Naive MLA attention: every cached latent is up-projected through wkv_b into per-head
/// [k_nope ; v], the key gets the shared k_pe, and query i (position len - q_len + i) attends to
/// keys t ≤ len - q_len + i.
/// q [q_len, n_heads, qk_head_dim]; latent [len, latent_dim] → o [q_len, n_heads, v_head_dim].
inline Vec naive_attention(const Sizes& s, const Weights& w, const Vec& q, int q_len,
                           const Vec& latent, int len, double scale) {
  const int H = s.n_heads, QK = s.qk_head_dim(), D = s.latent_dim(), R = s.kv_lora_rank;
  const int NOPE = s.qk_nope_head_dim, VD = s.v_head_dim, KVB = NOPE + VD;
  // kv [len, H, nope + v] = wkv_b(c)
  Vec c(std::size_t(len) * R);
  for (int t = 0; t < len; ++t)
    for (int j = 0; j < R; ++j) c[std::size_t(t) * R + j] = latent[std::size_t(t) * D + j];
  const Vec kv = linear(c, len, R, w.wkv_b, H * KVB);
  Vec o(std::size_t(q_len) * H * VD, 0.0);
  Vec scores(static_cast<std::size_t>(len), 0.0);
  for (int i = 0; i < q_len; ++i) {
    const int visible = len - q_len + i + 1;
    for (int h = 0; h < H; ++h) {
      const double* qh = &q[(std::size_t(i) * H + h) * QK];
      for (int t = 0; t < visible; ++t) {
        const double* k_nope = &kv[(std::size_t(t) * H + h) * KVB];
        const double* k_pe = &latent[std::size_t(t) * D + R];
        double dot = 0.0;
        for (int j = 0; j < NOPE; ++j) dot += qh[j] * k_nope[j];
        for (int j = 0; j < s.qk_rope_head_dim; ++j) dot += qh[NOPE + j] * k_pe[j];
        scores[std::size_t(t)] = dot * scale;
      }
      softmax(scores.data(), visible);
      for (int t = 0; t < visible; ++t) {
        const double* v = &kv[(std::size_t(t) * H + h) * KVB + NOPE];
        for (int j = 0; j < VD; ++j)
          o[(std::size_t(i) * H + h) * VD + j] += scores[std::size_t(t)] * v[j];
      }
    }
  }
  return o;
}

/// The absorbed core, computed directly: MQA over 576-wide (latent_dim) keys whose first
/// kv_lora_rank columns are the values. q [q_len, n_heads, latent_dim]; rows [len, latent_dim]
/// → o_lat [q_len, n_heads, kv_lora_rank]; query i sees keys t ≤ len - q_len + i.
inline Vec latent_attention(int n_heads, int kv_lora_rank, int latent_dim, const Vec& q, int q_len,
                            const Vec& rows, int len, double scale) {
  Vec o(std::size_t(q_len) * n_heads * kv_lora_rank, 0.0);
  Vec scores(static_cast<std::size_t>(len), 0.0);
  for (int i = 0; i < q_len; ++i) {
    const int visible = len - q_len + i + 1;
    for (int h = 0; h < n_heads; ++h) {
      const double* qh = &q[(std::size_t(i) * n_heads + h) * latent_dim];
      for (int t = 0; t < visible; ++t) {
        double dot = 0.0;
        for (int j = 0; j < latent_dim; ++j) dot += qh[j] * rows[std::size_t(t) * latent_dim + j];
        scores[std::size_t(t)] = dot * scale;
      }
      softmax(scores.data(), visible);
      for (int t = 0; t < visible; ++t)
        for (int j = 0; j < kv_lora_rank; ++j)
          o[(std::size_t(i) * n_heads + h) * kv_lora_rank + j] +=
              scores[std::size_t(t)] * rows[std::size_t(t) * latent_dim + j];
    }
  }
  return o;
}

/// The whole layer for one sequence of n tokens at positions 0 .. n-1 (MLA.forward with a
/// fresh cache, attn_impl = "naive").
struct Forward {
  Vec q;       // [n, n_heads, qk_head_dim]
  Vec latent;  // [n, latent_dim]: the cache rows
  Vec out;     // [n, dim]
};

inline Forward forward(const Sizes& s, const Weights& w, const Vec& x, int n) {
  Projection p = project(s, w, x, n, 0);
  const Vec o = naive_attention(s, w, p.q, n, p.latent, n, softmax_scale(s));
  Forward f{std::move(p.q), std::move(p.latent), {}};
  f.out = linear(o, n, s.n_heads * s.v_head_dim, w.wo, s.dim);
  return f;
}

}  // namespace mla_reference
