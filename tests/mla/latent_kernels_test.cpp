// SPDX-License-Identifier: Apache-2.0
// The absorbed attention's inner products (mla/cpu/latent_gemm*.hpp) against a double-precision
// loop, on every path compiled in (portable Eigen, AVX-512 fp32, AVX512-BF16), for tile and block
// sizes that are not multiples of the kernels' 6-row and 64-column blocking.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <daedalus/daedalus.hpp>
#include <vector>

#include "support/random.hpp"

namespace {

using daedalus::index_t;
namespace kernels = daedalus::mla::cpu_kernels;

/// scoresᵀ[t][r] = Σ_d keys[t][d] q[r][d] in double.
std::vector<double> reference_scores(const std::vector<float>& q, index_t rows, index_t width,
                                     const std::vector<float>& keys, index_t n) {
  std::vector<double> s(std::size_t(n * rows));
  for (index_t t = 0; t < n; ++t)
    for (index_t r = 0; r < rows; ++r) {
      double acc = 0.0;
      for (index_t d = 0; d < width; ++d) acc += double(keys[t * width + d]) * q[r * width + d];
      s[std::size_t(t * rows + r)] = acc;
    }
  return s;
}

/// Σ_d |keys[t][d] q[r][d]| in double: the scale a dot product's rounding error is measured on.
std::vector<double> reference_abs_scores(const std::vector<float>& q, index_t rows, index_t width,
                                         const std::vector<float>& keys, index_t n) {
  std::vector<double> s(std::size_t(n * rows));
  for (index_t t = 0; t < n; ++t)
    for (index_t r = 0; r < rows; ++r) {
      double acc = 0.0;
      for (index_t d = 0; d < width; ++d)
        acc += std::abs(double(keys[t * width + d]) * q[r * width + d]);
      s[std::size_t(t * rows + r)] = acc;
    }
  return s;
}

/// acc[r][j] + Σ_t p_t[t][r] keys[t][j] in double.
std::vector<double> reference_accumulate(const std::vector<float>& p_t, index_t rows, index_t n,
                                         index_t pt_stride, const std::vector<float>& keys,
                                         index_t width, index_t values,
                                         const std::vector<float>& acc) {
  std::vector<double> out(acc.begin(), acc.end());
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < values; ++j)
      for (index_t t = 0; t < n; ++t)
        out[std::size_t(r * values + j)] += double(p_t[t * pt_stride + r]) * keys[t * width + j];
  return out;
}

/// Largest |got - want| over the largest |want|.
template <class Got>
double relative_error(const Got& got, index_t got_stride, const std::vector<double>& want,
                      index_t rows, index_t cols) {
  double max_diff = 0.0, max_want = 0.0;
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      max_diff = std::max(max_diff, std::abs(double(got[i * got_stride + j]) - want[i * cols + j]));
      max_want = std::max(max_want, std::abs(want[i * cols + j]));
    }
  return max_diff / max_want;
}

// A dot product of `width` fp32 terms: within width·u of its exact value relative to the sum of
// the terms' magnitudes, which for random-signed data is about sqrt(width) times the result's
// typical size (Higham, eq. 3.5). 4·width·u leaves room for the max-normalisation above.
double fp32_bound(index_t terms) { return 4.0 * double(terms) * 0x1p-24; }

constexpr index_t kWidth = 576;   // DeepSeek's latent_dim
constexpr index_t kValues = 512;  // kv_lora_rank

}  // namespace

TEST_CASE("latent score and value products match a double loop for odd tile and block sizes") {
  daedalus::testing::Random rng(0x1a7e);
  for (index_t rows : {1, 7, 70, 128, 131}) {
    for (index_t n : {1, 5, 64, 100, 128}) {
      CAPTURE(rows);
      CAPTURE(n);
      const std::vector<float> q = rng.uniform(std::size_t(rows * kWidth));
      const std::vector<float> keys = rng.uniform(std::size_t(n * kWidth));
      const index_t stride = kernels::padded_rows(rows);
      std::vector<float> packed, scores(std::size_t(n * stride));
      const auto want = reference_scores(q, rows, kWidth, keys, n);

      const kernels::QueryTile tile = kernels::prepare_query_tile(q.data(), rows, kWidth, packed);
      kernels::latent_scores(tile, keys.data(), n, kWidth, scores.data(), stride);
      CHECK(relative_error(scores, stride, want, n, rows) < fp32_bound(kWidth));

      std::vector<float> portable(std::size_t(n * stride));
      kernels::scores_portable(tile, keys.data(), n, kWidth, portable.data(), stride);
      CHECK(relative_error(portable, stride, want, n, rows) < fp32_bound(kWidth));

      // Probabilities in (0, 1], the accumulator already holding earlier blocks.
      const std::vector<float> p_t = rng.uniform_in(std::size_t(n * stride), 0.0, 1.0);
      const std::vector<float> acc0 = rng.uniform(std::size_t(rows * kValues));
      const auto want_acc = reference_accumulate(p_t, rows, n, stride, keys, kWidth, kValues, acc0);
      std::vector<float> acc = acc0;
      kernels::latent_accumulate(p_t.data(), rows, n, stride, keys.data(), kWidth, kValues,
                                 acc.data());
      CHECK(relative_error(acc, kValues, want_acc, rows, kValues) < fp32_bound(n + 1));
      std::vector<float> acc_portable = acc0;
      kernels::accumulate_portable(p_t.data(), rows, n, stride, keys.data(), kWidth, kValues,
                                   acc_portable.data());
      CHECK(relative_error(acc_portable, kValues, want_acc, rows, kValues) < fp32_bound(n + 1));
    }
  }
}

#if defined(__AVX512BF16__)
TEST_CASE("AVX512-BF16 latent products match a double loop on the bf16-rounded operands") {
  // The kernels round q and p to bf16 and read the keys as stored, then accumulate exactly in
  // fp32. Against the double product of the *rounded* operands only fp32 accumulation error
  // remains; against the unrounded q each product term also carries up to 2^-8 relative error.
  daedalus::testing::Random rng(0xbf16);
  for (index_t rows : {1, 7, 128, 131}) {
    for (index_t n : {1, 5, 64, 101, 128}) {
      CAPTURE(rows);
      CAPTURE(n);
      auto round_bf16 = [](std::vector<float> v) {
        for (float& x : v) x = float(daedalus::bfloat16(x));
        return v;
      };
      const std::vector<float> q = rng.uniform(std::size_t(rows * kWidth));
      const std::vector<float> keys_f = round_bf16(rng.uniform(std::size_t(n * kWidth)));
      std::vector<daedalus::bfloat16> keys(keys_f.size());
      for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = daedalus::bfloat16(keys_f[i]);
      const index_t stride = kernels::padded_rows(rows);

      std::vector<std::uint32_t> q_pairs;
      const auto tile = kernels::prepare_query_tile_bf16(q.data(), rows, kWidth, q_pairs);
      std::vector<float> scores(std::size_t(n * stride));
      kernels::scores_bf16(tile, keys.data(), n, kWidth, scores.data(), stride);
      const auto want_rounded = reference_scores(round_bf16(q), rows, kWidth, keys_f, n);
      CHECK(relative_error(scores, stride, want_rounded, n, rows) < fp32_bound(kWidth));
      // Against the unrounded q, entry by entry: rounding q_d to bf16 moves each term q_d·k_d
      // by at most 2^-8 of itself, so the score moves by at most 2^-8·Σ|q_d·k_d| (plus fp32
      // accumulation). Measured against Σ|q_d·k_d|, not the score, which may cancel to ~0.
      const auto want_exact = reference_scores(q, rows, kWidth, keys_f, n);
      const auto magnitude = reference_abs_scores(q, rows, kWidth, keys_f, n);
      double worst = 0.0;
      for (index_t t = 0; t < n; ++t)
        for (index_t r = 0; r < rows; ++r) {
          const std::size_t i = std::size_t(t * rows + r);
          worst = std::max(
              worst,
              std::abs(double(scores[std::size_t(t * stride + r)]) - want_exact[i]) / magnitude[i]);
        }
      CHECK(worst <= 0x1p-8 + fp32_bound(kWidth));

      const std::vector<float> p_t = rng.uniform_in(std::size_t(n * stride), 0.0, 1.0);
      const std::vector<float> acc0 = rng.uniform(std::size_t(rows * kValues));
      std::vector<std::uint32_t> p_pairs, v_pairs;
      kernels::pack_probabilities_bf16(p_t.data(), n, rows, stride, p_pairs);
      kernels::pack_values_bf16(keys.data(), n, kWidth, kValues, v_pairs);
      std::vector<float> acc = acc0;
      kernels::accumulate_bf16(p_pairs.data(), rows, (n + 1) / 2, v_pairs.data(), kValues,
                               acc.data());
      const auto want_acc =
          reference_accumulate(round_bf16(p_t), rows, n, stride, keys_f, kWidth, kValues, acc0);
      CHECK(relative_error(acc, kValues, want_acc, rows, kValues) < fp32_bound(n + 1));
    }
  }
}
#endif

TEST_CASE("absorbed attention over a bf16 cache agrees with the fp32 cache on DeepSeek shapes") {
  // DeepSeek-V2-Lite's latent (512 + 64) takes the AVX512-BF16 kernels where they exist. Both
  // caches hold the same bf16-rounded rows, so the difference is the kernels' rounding of q and
  // p to bf16: each is 2^-9 relative per term, and the output is a convex combination of cache
  // rows, so 4·2^-8 of the output scale bounds it.
  using C = daedalus::DeepSeekV2Lite;
  using S = daedalus::MlaShape<C>;
  daedalus::CpuBackend cpu(2);
  daedalus::testing::Random rng(0xcafe);
  const index_t len = 300, q_len = 2;
  std::vector<float> rows = rng.uniform(std::size_t(len * S::latent_dim));
  for (float& x : rows) x = float(daedalus::bfloat16(x));
  daedalus::ContiguousLatentCache<C, daedalus::CpuBackend, float> cache32(1, len);
  daedalus::ContiguousLatentCache<C, daedalus::CpuBackend, daedalus::bfloat16> cache16(1, len);
  cache32.write(0, 0, daedalus::HostView<const float, 2>(rows.data(), {len, S::latent_dim}));
  cache16.write(0, 0, daedalus::HostView<const float, 2>(rows.data(), {len, S::latent_dim}));
  const std::vector<float> q = rng.uniform(std::size_t(q_len * S::n_heads * S::latent_dim), 0.3);
  std::vector<float> out32(std::size_t(q_len * S::n_heads * S::kv_lora_rank));
  std::vector<float> out16(out32.size());
  const std::vector<index_t> seqs{0};
  const double scale = daedalus::mla::softmax_scale<C>();
  daedalus::HostView<const float, 4> qv(q.data(), {1, q_len, S::n_heads, S::latent_dim});
  daedalus::mla::absorbed_attention(
      cpu, cache32, seqs, qv, scale,
      daedalus::HostView<float, 4>(out32.data(), {1, q_len, S::n_heads, S::kv_lora_rank}));
  daedalus::mla::absorbed_attention(
      cpu, cache16, seqs, qv, scale,
      daedalus::HostView<float, 4>(out16.data(), {1, q_len, S::n_heads, S::kv_lora_rank}));
  double max_diff = 0.0, max_ref = 0.0;
  for (std::size_t i = 0; i < out32.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(out32[i] - out16[i])));
    max_ref = std::max(max_ref, double(std::abs(out32[i])));
  }
  CHECK(max_diff / max_ref < 4.0 * 0x1p-8);
  if (daedalus::mla::cpu_kernels::has_avx512_bf16_kernels) CHECK(max_diff > 0.0);
}
