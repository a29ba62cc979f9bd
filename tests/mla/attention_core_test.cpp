// SPDX-License-Identifier: Apache-2.0
// The attention cores on their own, with random queries and random cache rows (not produced by
// a model): `absorbed_attention` against a direct fp64 MQA over the latent rows, and
// `naive_attention` against the fp64 up-projection, for a varlen batch in shuffled order with
// q_len 1 and 2 (bottom-right causal), lengths around the CPU key block (128), and 1-4 threads.
#include <doctest/doctest.h>

#include <daedalus/daedalus.hpp>
#include <span>
#include <vector>

#include "support/mla_fixture.hpp"
#include "support/reference/mla_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::ContiguousLatentCache;
using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::MlaShape;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;
namespace mla = daedalus::mla;

/// A cache of 4 sequences filled with random rows: lengths 130 (past one key block), 2 (just the
/// q_len = 2 queries), 300 (several blocks: split across threads) and 128 (exactly one block).
template <class C, class Storage>
ContiguousLatentCache<C, CpuBackend, Storage> random_cache(std::uint64_t offset) {
  constexpr index_t D = MlaShape<C>::latent_dim;
  const std::vector<index_t> lengths = {130, 2, 300, 128};
  ContiguousLatentCache<C, CpuBackend, Storage> cache(4, 300);
  dt::Random rng(offset);
  for (index_t s = 0; s < 4; ++s) {
    const std::vector<float> rows = rng.uniform(std::size_t(lengths[std::size_t(s)] * D));
    cache.append(s, HostView<const float, 2>(rows.data(), {lengths[std::size_t(s)], D}));
  }
  return cache;
}

}  // namespace

TEST_CASE_TEMPLATE("absorbed_attention matches a direct fp64 computation over the cached rows", C,
                   daedalus::Tiny, daedalus::DeepSeekV2Lite) {
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const auto cache = random_cache<C, float>(500);
  const std::vector<index_t> seqs = {2, 0, 3, 1};  // shuffled, every length in one batch
  const index_t batch = index_t(seqs.size());
  const double scale = mla::softmax_scale<C>();
  for (index_t q_len : {1, 2}) {
    // Queries scaled so that scores spread over a few units (a peaked softmax).
    const std::vector<float> q =
        dt::Random(501 + std::uint64_t(q_len))
            .uniform(std::size_t(batch * q_len * H * D), 12.0 / std::sqrt(double(D)));
    for (int threads : {1, 2, 4}) {
      CAPTURE(q_len);
      CAPTURE(threads);
      std::vector<float> out(std::size_t(batch * q_len * H * R), -1.0f);
      mla::absorbed_attention(CpuBackend(threads), cache, std::span<const index_t>(seqs),
                              HostView<const float, 4>(q.data(), {batch, q_len, H, D}), scale,
                              HostView<float, 4>(out.data(), {batch, q_len, H, R}));
      for (index_t b = 0; b < batch; ++b) {
        const index_t seq = seqs[std::size_t(b)];
        CAPTURE(seq);
        const index_t len = cache.length(seq);
        const std::vector<double> want = mla_reference::latent_attention(
            H, R, D, dt::widen(dt::slice_rows(q, b * q_len * H, (b + 1) * q_len * H, D)),
            int(q_len), dt::widen(dt::cached_rows(cache, seq)), int(len), scale);
        CHECK(tol::row_relative_error(dt::slice_rows(out, b * q_len * H, (b + 1) * q_len * H, R),
                                      want, R) <= tol::fp32_vs_reference(std::max(D, len)));
      }
    }
  }
}

TEST_CASE("absorbed_attention: with q_len 2 the first query does not see the last key") {
  // Sequence of 2 tokens, q_len 2: query 0 sees key 0 only, so its output is exactly row 0's
  // value part, whatever the scores.
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const auto cache = random_cache<C, float>(502);
  const std::vector<float> q = dt::Random(503).uniform(std::size_t(2 * H * D));
  std::vector<float> out(std::size_t(2 * H * R));
  const index_t seq = 1;  // length 2
  mla::absorbed_attention(CpuBackend(2), cache, std::span<const index_t>(&seq, 1),
                          HostView<const float, 4>(q.data(), {1, 2, H, D}), mla::softmax_scale<C>(),
                          HostView<float, 4>(out.data(), {1, 2, H, R}));
  const std::vector<float> rows = dt::cached_rows(cache, 1);
  for (index_t h = 0; h < H; ++h)
    for (index_t j = 0; j < R; ++j)
      CHECK(out[std::size_t(h * R + j)] == doctest::Approx(rows[std::size_t(j)]).epsilon(1e-6));
}

TEST_CASE_TEMPLATE("absorbed_attention reads a bf16 or fp16 cache like the fp32 values it holds",
                   Storage, daedalus::bfloat16, daedalus::half) {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const auto cache = random_cache<C, Storage>(504);
  const std::vector<index_t> seqs = {0, 2};
  const std::vector<float> q =
      dt::Random(505).uniform(std::size_t(2 * H * D), 12.0 / std::sqrt(double(D)));
  std::vector<float> out(std::size_t(2 * H * R));
  mla::absorbed_attention(CpuBackend(2), cache, std::span<const index_t>(seqs),
                          HostView<const float, 4>(q.data(), {2, 1, H, D}), mla::softmax_scale<C>(),
                          HostView<float, 4>(out.data(), {2, 1, H, R}));
  for (index_t b = 0; b < 2; ++b) {
    const index_t seq = seqs[std::size_t(b)];
    // The reference reads the stored (rounded) values, widened: only fp32 arithmetic differs.
    const std::vector<double> want = mla_reference::latent_attention(
        H, R, D, dt::widen(dt::slice_rows(q, b * H, (b + 1) * H, D)), 1,
        dt::widen(dt::cached_rows(cache, seq)), int(cache.length(seq)), mla::softmax_scale<C>());
    CHECK(tol::row_relative_error(dt::slice_rows(out, b * H, (b + 1) * H, R), want, R) <=
          tol::fp32_vs_reference(std::max(D, cache.length(seq))));
  }
}

TEST_CASE_TEMPLATE("naive_attention matches the fp64 up-projection over the cached rows", C,
                   daedalus::Tiny, daedalus::DeepSeekV2Lite) {
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, QK = S::qk_head_dim, VD = S::v_head_dim;
  const auto cache = random_cache<C, float>(506);
  const std::vector<index_t> seqs = {3, 1, 0};
  const index_t batch = index_t(seqs.size());
  const double scale = mla::softmax_scale<C>();
  const auto& model = dt::SharedModel<C>::get();
  for (index_t q_len : {1, 2}) {
    const std::vector<float> q =
        dt::Random(507 + std::uint64_t(q_len)).uniform(std::size_t(batch * q_len * H * QK), 4.0);
    std::vector<float> out(std::size_t(batch * q_len * H * VD), -1.0f);
    mla::naive_attention(CpuBackend(2), model.weights, cache, std::span<const index_t>(seqs),
                         HostView<const float, 4>(q.data(), {batch, q_len, H, QK}), scale,
                         HostView<float, 4>(out.data(), {batch, q_len, H, VD}));
    for (index_t b = 0; b < batch; ++b) {
      const index_t seq = seqs[std::size_t(b)];
      CAPTURE(q_len);
      CAPTURE(seq);
      const std::vector<double> want = mla_reference::naive_attention(
          dt::reference_sizes<C>(), model.reference,
          dt::widen(dt::slice_rows(q, b * q_len * H, (b + 1) * q_len * H, QK)), int(q_len),
          dt::widen(dt::cached_rows(cache, seq)), int(cache.length(seq)), scale);
      CHECK(tol::row_relative_error(dt::slice_rows(out, b * q_len * H, (b + 1) * q_len * H, VD),
                                    want, VD) <=
            tol::fp32_vs_reference(std::max<index_t>(S::latent_dim, cache.length(seq))));
    }
  }
}
