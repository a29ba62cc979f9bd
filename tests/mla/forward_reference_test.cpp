// SPDX-License-Identifier: Apache-2.0
// MLA against the independent fp64 reference (tests/support/reference/mla_reference.hpp): the
// projections, the cache rows a prefill writes, and the layer output in both attention modes,
// for DeepSeek-V2-Lite's sizes and for the small test shapes (with and without query LoRA, both
// RoPE layouts, with and without YaRN). Also: the two RoPE layouts describe the same model once
// the rope rows of the weights are permuted.
#include <doctest/doctest.h>

#include <daedalus/daedalus.hpp>
#include <vector>

#include "support/mla_fixture.hpp"
#include "support/reference/mla_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::MlaShape;
using daedalus::mla::AttentionMode;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;

}  // namespace

#define DAEDALUS_REFERENCE_CONFIGS                                               \
  daedalus::Tiny, daedalus::TinyNoQLora, daedalus::DeepSeekV2Lite, dt::TinyHalf, \
      dt::TinyNoRopeScaling

TEST_CASE_TEMPLATE("project: q and the latent rows match the fp64 reference", C,
                   DAEDALUS_REFERENCE_CONFIGS) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = 11;
  const index_t start_pos = 60;  // non-zero: rotations at positions 60 .. 70
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 300);
  std::vector<float> q(std::size_t(tokens) * S::n_heads * S::qk_head_dim);
  std::vector<float> latent(std::size_t(tokens) * S::latent_dim);
  daedalus::mla::project(cpu, dt::SharedModel<C>::get().weights, start_pos,
                         HostView<const float, 2>(x.data(), {tokens, S::dim}),
                         HostView<float, 3>(q.data(), {tokens, S::n_heads, S::qk_head_dim}),
                         HostView<float, 2>(latent.data(), {tokens, S::latent_dim}));
  const mla_reference::Projection want =
      mla_reference::project(dt::reference_sizes<C>(), dt::SharedModel<C>::get().reference,
                             dt::widen(x), int(tokens), start_pos);
  const double bound = tol::fp32_vs_reference(dt::accumulation_length<C>(tokens));
  CHECK(tol::row_relative_error(q, want.q, S::qk_head_dim) <= bound);
  CHECK(tol::row_relative_error(latent, want.latent, S::latent_dim) <= bound);
  // k_pe alone (it is small next to the normed latent, so check it on its own scale).
  std::vector<float> k_pe;
  std::vector<double> want_k_pe;
  for (index_t t = 0; t < tokens; ++t)
    for (int j = 0; j < S::rope; ++j) {
      k_pe.push_back(latent[std::size_t(t * S::latent_dim + S::kv_lora_rank + j)]);
      want_k_pe.push_back(want.latent[std::size_t(t * S::latent_dim + S::kv_lora_rank + j)]);
    }
  CHECK(tol::row_relative_error(k_pe, want_k_pe, S::rope) <= bound);
}

TEST_CASE_TEMPLATE("prefill of a whole prompt matches the fp64 reference (naive and absorbed)", C,
                   DAEDALUS_REFERENCE_CONFIGS) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = dt::prompt_length<C>();
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 301);
  const mla_reference::Forward want = dt::reference_forward<C>(x, int(tokens));
  const double bound = tol::fp32_vs_reference(dt::accumulation_length<C>(tokens));
  for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
    CAPTURE(mode == AttentionMode::naive ? "naive" : "absorbed");
    const dt::PrefillResult got = dt::prefill_prompt<C>(cpu, x, mode);
    CHECK(tol::row_relative_error(got.out, want.out, S::dim) <= bound);
    CHECK(tol::row_relative_error(got.rows, want.latent, S::latent_dim) <= bound);
  }
}

TEST_CASE_TEMPLATE(
    "prefill against the reference: a wrong layout, YaRN or mscale is far outside the tolerance", C,
    daedalus::Tiny, daedalus::DeepSeekV2Lite) {
  // Guards the comparison itself: the reference with RoPE's layout swapped, without YaRN (no
  // blend and no m², the known real-world accuracy bug), or with another mscale must all be
  // told apart from the library's output by a wide margin.
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = 24;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 302);
  const dt::PrefillResult got = dt::prefill_prompt<C>(cpu, x, AttentionMode::absorbed);
  const double bound = tol::fp32_vs_reference(dt::accumulation_length<C>(tokens));
  auto error_against = [&](const mla_reference::Sizes& sizes) {
    const auto f = mla_reference::forward(sizes, dt::SharedModel<C>::get().reference, dt::widen(x),
                                          int(tokens));
    return tol::row_relative_error(got.out, f.out, S::dim);
  };
  CHECK(error_against(dt::reference_sizes<C>()) <= bound);
  mla_reference::Sizes wrong = dt::reference_sizes<C>();
  wrong.interleaved = false;
  CHECK(error_against(wrong) > 20 * bound);
  wrong = dt::reference_sizes<C>();
  wrong.yarn = false;
  CHECK(error_against(wrong) > 20 * bound);
  wrong = dt::reference_sizes<C>();
  wrong.mscale += 0.3;
  CHECK(error_against(wrong) > 20 * bound);
}

namespace {

/// The half-layout weights equal to an interleaved model: half-layout rope dimension j holds
/// interleaved dimension perm(j) = 2j for j < rope/2 and 2(j - rope/2) + 1 above, so the rope
/// rows of the query projection (per head) and of wkv_a are permuted that way. Pairs (j, j +
/// rope/2) of the half layout then are pairs (2j, 2j+1) of the interleaved one, rotated by the
/// same θ_j, and q_pe·k_pe is unchanged.
template <class C>
int interleaved_dim(int half_dim) {
  constexpr int half = MlaShape<C>::rope / 2;
  return half_dim < half ? 2 * half_dim : 2 * (half_dim - half) + 1;
}

template <class C>
dt::WeightArrays<C> permuted_to_half_layout(const dt::WeightArrays<C>& w) {
  using S = MlaShape<C>;
  dt::WeightArrays<C> p = w;
  auto permute_rows = [](std::vector<float>& m, const std::vector<float>& src, std::size_t first,
                         std::size_t in) {
    for (int j = 0; j < S::rope; ++j)
      std::copy_n(src.begin() + std::ptrdiff_t((first + std::size_t(interleaved_dim<C>(j))) * in),
                  in, m.begin() + std::ptrdiff_t((first + std::size_t(j)) * in));
  };
  std::vector<float>& wq = S::has_q_lora ? p.wq_b : p.wq;
  const std::vector<float>& wq_src = S::has_q_lora ? w.wq_b : w.wq;
  const std::size_t q_in = S::has_q_lora ? S::q_lora_rank : S::dim;
  for (int h = 0; h < S::n_heads; ++h)
    permute_rows(wq, wq_src, std::size_t(h) * S::qk_head_dim + S::nope, q_in);
  permute_rows(p.wkv_a, w.wkv_a, S::kv_lora_rank, S::dim);
  return p;
}

template <class Interleaved, class Half>
void check_layouts_agree() {
  using S = MlaShape<Interleaved>;
  const CpuBackend cpu(2);
  const index_t tokens = 90;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 303);
  const dt::WeightArrays<Interleaved> w = dt::WeightArrays<Interleaved>::random(304);
  const dt::WeightArrays<Interleaved> permuted = permuted_to_half_layout<Interleaved>(w);
  const auto weights = w.weights();
  const auto weights_half = daedalus::mla::MlaWeights<Half>::from_arrays(permuted.arrays());
  for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
    daedalus::ContiguousLatentCache<Interleaved> cache(1, tokens);
    daedalus::ContiguousLatentCache<Half> cache_half(1, tokens);
    std::vector<float> out(x.size()), out_half(x.size());
    daedalus::mla::prefill(cpu, weights, cache, 0, 0,
                           HostView<const float, 2>(x.data(), {tokens, S::dim}),
                           HostView<float, 2>(out.data(), {tokens, S::dim}), mode);
    daedalus::mla::prefill(cpu, weights_half, cache_half, 0, 0,
                           HostView<const float, 2>(x.data(), {tokens, S::dim}),
                           HostView<float, 2>(out_half.data(), {tokens, S::dim}), mode);
    CHECK(tol::row_relative_error(out_half, out, S::dim) <=
          tol::fp32_vs_fp32(dt::accumulation_length<Interleaved>(tokens)));
    // The cached k_pe of the half model is the interleaved one, permuted.
    const std::vector<float> rows = dt::cached_rows(cache, 0);
    const std::vector<float> rows_half = dt::cached_rows(cache_half, 0);
    std::vector<float> unpermuted = rows_half;
    for (index_t t = 0; t < tokens; ++t) {
      const std::size_t k_pe = std::size_t(t * S::latent_dim + S::kv_lora_rank);
      for (int j = 0; j < S::rope; ++j)
        unpermuted[k_pe + std::size_t(interleaved_dim<Interleaved>(j))] =
            rows_half[k_pe + std::size_t(j)];
    }
    CHECK(tol::row_relative_error(unpermuted, rows, S::latent_dim) <=
          tol::fp32_vs_fp32(dt::accumulation_length<Interleaved>(tokens)));
  }
}

}  // namespace

TEST_CASE(
    "RoPE layouts: a half-layout model with permuted rope rows equals the interleaved model") {
  SUBCASE("with query LoRA") { check_layouts_agree<daedalus::Tiny, dt::TinyHalf>(); }
  SUBCASE("without query LoRA") {
    check_layouts_agree<daedalus::TinyNoQLora, dt::TinyNoQLoraHalf>();
  }
}
