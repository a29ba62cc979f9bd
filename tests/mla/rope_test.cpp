// SPDX-License-Identifier: Apache-2.0
// RoPE, YaRN and the softmax scale: the published constants, the frequency formula against the
// fp64 reference, and the rotation in both layouts.
#include <doctest/doctest.h>

#include <cmath>
#include <daedalus/daedalus.hpp>
#include <vector>

#include "support/mla_fixture.hpp"
#include "support/random.hpp"
#include "support/reference/mla_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::testing::reference_sizes;
using daedalus::testing::TinyHalf;
using daedalus::testing::TinyNoRopeScaling;
namespace mla = daedalus::mla;
namespace tol = daedalus::testing::tolerance;

}  // namespace

TEST_CASE("softmax_scale: DeepSeek-V3 0.135234, V2-Lite 0.114721, unscaled 192^-0.5") {
  // 192^-0.5 · m², m = 0.1 · mscale · ln 40 + 1 (YaRN, Peng et al. 2023; DeepSeek-V3
  // inference/model.py applies m² to the softmax scale).
  CHECK(std::abs(mla::softmax_scale<daedalus::DeepSeekV3>() - 0.135234) < 5e-7);
  CHECK(std::abs(mla::softmax_scale<daedalus::DeepSeekV2>() - 0.135234) < 5e-7);
  CHECK(std::abs(mla::softmax_scale<daedalus::DeepSeekV2Lite>() - 0.114721) < 5e-7);
  CHECK(std::abs(mla::softmax_scale<daedalus::testing::DeepSeekV3NoRopeScaling>() - 0.0721688) <
        5e-8);
  CHECK(mla::softmax_scale<daedalus::testing::DeepSeekV3NoRopeScaling>() ==
        doctest::Approx(1.0 / std::sqrt(192.0)).epsilon(1e-15));
  // Not the 576^-0.5 a FlashMLA-style kernel would default to.
  CHECK(std::abs(mla::softmax_scale<daedalus::DeepSeekV3>() - 1.0 / std::sqrt(576.0)) > 0.09);
}

TEST_CASE_TEMPLATE("softmax_scale matches the reference formula", C, daedalus::DeepSeekV3,
                   daedalus::DeepSeekV2Lite, daedalus::Tiny, TinyNoRopeScaling) {
  CHECK(mla::softmax_scale<C>() ==
        doctest::Approx(mla_reference::softmax_scale(reference_sizes<C>())).epsilon(1e-14));
}

TEST_CASE("yarn_correction_range: DeepSeek-V3 blends frequency indices 10 to 23") {
  const mla::YarnRange v3 = mla::yarn_correction_range<daedalus::DeepSeekV3>();
  CHECK(v3.low == 10);
  CHECK(v3.high == 23);
  const mla::YarnRange lite = mla::yarn_correction_range<daedalus::DeepSeekV2Lite>();
  CHECK(lite.low == 10);
  CHECK(lite.high == 23);
}

TEST_CASE_TEMPLATE(
    "yarn_correction_range matches the reference (floor/ceil, clamped to [0, rope-1])", C,
    daedalus::DeepSeekV3, daedalus::Tiny) {
  const auto [low, high] = mla_reference::yarn_correction_range(reference_sizes<C>());
  const mla::YarnRange r = mla::yarn_correction_range<C>();
  CHECK(r.low == low);
  CHECK(r.high == high);
  CHECK(r.low >= 0);
  CHECK(r.high <= C::qk_rope_head_dim - 1);
}

TEST_CASE("yarn_correction_range: Tiny's short original context clamps the band at 0") {
  // d(32) = 8 ln(64 / 64π) / (2 ln 10^4) < 0, so floor < 0 is clamped to 0; d(1) ≈ 1.008 → 2.
  const mla::YarnRange r = mla::yarn_correction_range<daedalus::Tiny>();
  CHECK(r.low == 0);
  CHECK(r.high == 2);
}

TEST_CASE_TEMPLATE("rope_frequencies match θ_i = theta^(-2i/rope) blended by the YaRN ramp", C,
                   daedalus::DeepSeekV3, daedalus::DeepSeekV2Lite, daedalus::Tiny,
                   TinyNoRopeScaling) {
  const auto got = mla::rope_frequencies<C>();
  const std::vector<double> want = mla_reference::rope_frequencies(reference_sizes<C>());
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-14));
  }
}

TEST_CASE(
    "rope_frequencies (V3): below the band unchanged, above it divided by 40, blended inside") {
  const auto f = mla::rope_frequencies<daedalus::DeepSeekV3>();
  auto theta = [](int i) { return std::pow(10000.0, -2.0 * i / 64.0); };
  for (int i = 0; i <= 10; ++i)
    CHECK(f[std::size_t(i)] == doctest::Approx(theta(i)).epsilon(1e-14));
  for (int i = 23; i < 32; ++i)
    CHECK(f[std::size_t(i)] == doctest::Approx(theta(i) / 40.0).epsilon(1e-14));
  // i = 16: ramp = 6/13.
  const double ramp = 6.0 / 13.0;
  CHECK(f[16] ==
        doctest::Approx(theta(16) / 40.0 * ramp + theta(16) * (1.0 - ramp)).epsilon(1e-14));
  // Without YaRN nothing is blended.
  const auto plain = mla::rope_frequencies<daedalus::testing::DeepSeekV3NoRopeScaling>();
  for (int i = 0; i < 32; ++i)
    CHECK(plain[std::size_t(i)] == doctest::Approx(theta(i)).epsilon(1e-14));
}

TEST_CASE_TEMPLATE("RopeTable::rotate matches the reference rotation in both layouts", C,
                   daedalus::Tiny, TinyHalf, daedalus::DeepSeekV3) {
  constexpr int R = C::qk_rope_head_dim;
  const mla::RopeTable<C> table;
  const mla_reference::Sizes sizes = reference_sizes<C>();
  const std::vector<double> freqs = mla_reference::rope_frequencies(sizes);
  daedalus::testing::Random rng(201);
  for (long long pos : {0LL, 1LL, 7LL, 63LL, 4095LL, 100000LL}) {
    CAPTURE(pos);
    std::vector<float> x = rng.uniform(R);
    std::vector<double> want = daedalus::testing::widen(x);
    table.rotate(x.data(), pos);
    mla_reference::rotate(want.data(), sizes, freqs, pos);
    // One fp32 rotation: cos/sin rounded once (u each) and a two-term sum (2u): 4u with room.
    CHECK(tol::row_relative_error(x, want, R) <= 8 * tol::fp32_u);
  }
}

TEST_CASE("RopeTable: interleaved pairs (2i, 2i+1), half layout pairs (i, i + rope/2)") {
  // A vector with only x[1] set: interleaved mixes it with x[0]; half layout with x[1 + 4].
  std::vector<float> x(8, 0.0f);
  x[1] = 1.0f;
  std::vector<float> y = x;
  const mla::RopeTable<daedalus::Tiny> interleaved;
  const mla::RopeTable<TinyHalf> half;
  interleaved.rotate(x.data(), 5);
  half.rotate(y.data(), 5);
  const auto f = mla::rope_frequencies<daedalus::Tiny>();
  CHECK(x[0] == doctest::Approx(-std::sin(5 * f[0])));
  CHECK(x[1] == doctest::Approx(std::cos(5 * f[0])));
  for (int j : {2, 3, 4, 5, 6, 7}) CHECK(x[std::size_t(j)] == 0.0f);
  CHECK(y[1] == doctest::Approx(std::cos(5 * f[1])));
  CHECK(y[5] == doctest::Approx(std::sin(5 * f[1])));
  for (int j : {0, 2, 3, 4, 6, 7}) CHECK(y[std::size_t(j)] == 0.0f);
}

// --- The reference checks itself where the algebra gives an exact answer (in fp64) ----------

TEST_CASE("reference: RoPE keeps norms and makes q·k depend only on the position difference") {
  const mla_reference::Sizes s = reference_sizes<daedalus::DeepSeekV3>();
  const std::vector<double> freqs = mla_reference::rope_frequencies(s);
  daedalus::testing::Random rng(202);
  for (bool interleaved : {true, false}) {
    mla_reference::Sizes sz = s;
    sz.interleaved = interleaved;
    const std::vector<double> q0 = daedalus::testing::widen(rng.uniform(64));
    const std::vector<double> k0 = daedalus::testing::widen(rng.uniform(64));
    auto dot_at = [&](long long m, long long n) {
      std::vector<double> q = q0, k = k0;
      mla_reference::rotate(q.data(), sz, freqs, m);
      mla_reference::rotate(k.data(), sz, freqs, n);
      double d = 0.0;
      for (int j = 0; j < 64; ++j) d += q[std::size_t(j)] * k[std::size_t(j)];
      return d;
    };
    CHECK(dot_at(10, 3) == doctest::Approx(dot_at(1007, 1000)).epsilon(1e-10));
    CHECK(dot_at(3, 3) == doctest::Approx(dot_at(0, 0)).epsilon(1e-12));
  }
}

TEST_CASE("reference: the absorbed form equals the naive form (fp64)") {
  using C = daedalus::Tiny;
  using S = daedalus::MlaShape<C>;
  const mla_reference::Sizes s = reference_sizes<C>();
  const auto& model = daedalus::testing::SharedModel<C>::get();
  const int n = 9;
  const std::vector<double> x =
      daedalus::testing::widen(daedalus::testing::random_tokens(n, S::dim, 203));
  const mla_reference::Projection p = mla_reference::project(s, model.reference, x, n, 0);
  const double scale = mla_reference::softmax_scale(s);
  const std::vector<double> naive =
      mla_reference::naive_attention(s, model.reference, p.q, n, p.latent, n, scale);
  // q_abs[h] = [q_nope[h] · W_UK[h] ; q_pe[h]], then o[h] = W_UV[h] · o_lat[h].
  const int H = S::n_heads, R = S::kv_lora_rank, D = S::latent_dim, QK = S::qk_head_dim;
  std::vector<double> q_abs(std::size_t(n) * H * D, 0.0);
  const std::vector<double>& wkv_b = model.reference.wkv_b;
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h) {
      const double* q = &p.q[(std::size_t(t) * H + h) * QK];
      double* qa = &q_abs[(std::size_t(t) * H + h) * D];
      for (int j = 0; j < R; ++j)
        for (int d = 0; d < S::nope; ++d)
          qa[j] += q[d] * wkv_b[(std::size_t(h) * S::kv_b_rows_per_head + d) * R + j];
      for (int d = 0; d < S::rope; ++d) qa[R + d] = q[S::nope + d];
    }
  const std::vector<double> o_lat =
      mla_reference::latent_attention(H, R, D, q_abs, n, p.latent, n, scale);
  std::vector<double> absorbed(std::size_t(n) * H * S::v_head_dim, 0.0);
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < H; ++h)
      for (int v = 0; v < S::v_head_dim; ++v)
        for (int j = 0; j < R; ++j)
          absorbed[(std::size_t(t) * H + h) * S::v_head_dim + v] +=
              wkv_b[(std::size_t(h) * S::kv_b_rows_per_head + S::nope + v) * R + j] *
              o_lat[(std::size_t(t) * H + h) * R + j];
  CHECK(tol::row_relative_error(absorbed, naive, S::v_head_dim) < 1e-12);
}
