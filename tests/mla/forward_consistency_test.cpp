// SPDX-License-Identifier: Apache-2.0
// MLA's paths agree with each other: absorbed == naive, a prompt in chunks == in one call,
// decode after prefill == prefill of the whole sequence (q_len 1 and 2), a varlen decode batch ==
// each sequence decoded alone, the same bits for any thread count, and a bf16/fp16 cache stays
// within the bound its rounding allows of the fp32 cache.
#include <doctest/doctest.h>

#include <algorithm>
#include <daedalus/daedalus.hpp>
#include <type_traits>
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
using daedalus::mla::AttentionMode;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;
namespace mla = daedalus::mla;

const char* mode_name(AttentionMode mode) {
  return mode == AttentionMode::naive ? "naive" : "absorbed";
}

template <class C>
double fp32_pair_bound(index_t tokens) {
  return tol::fp32_vs_fp32(dt::accumulation_length<C>(tokens));
}

/// Prefills `x` into sequence `seq` of `cache` in chunks of the given sizes, returning the
/// outputs of all chunks concatenated.
template <class C, class Storage>
std::vector<float> prefill_chunks(const CpuBackend& cpu,
                                  ContiguousLatentCache<C, CpuBackend, Storage>& cache, index_t seq,
                                  const std::vector<float>& x, const std::vector<index_t>& chunks,
                                  AttentionMode mode) {
  constexpr index_t dim = MlaShape<C>::dim;
  std::vector<float> out(x.size());
  index_t pos = 0;
  for (index_t n : chunks) {
    mla::prefill(cpu, dt::SharedModel<C>::get().weights, cache, seq, pos,
                 HostView<const float, 2>(x.data() + pos * dim, {n, dim}),
                 HostView<float, 2>(out.data() + pos * dim, {n, dim}), mode);
    pos += n;
  }
  return out;
}

}  // namespace

#define DAEDALUS_MLA_CONFIGS daedalus::Tiny, daedalus::TinyNoQLora, daedalus::DeepSeekV2Lite

TEST_CASE_TEMPLATE("absorbed and naive attention give the same prefill", C, DAEDALUS_MLA_CONFIGS) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = dt::prompt_length<C>();
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 400);
  const dt::PrefillResult naive = dt::prefill_prompt<C>(cpu, x, AttentionMode::naive);
  const dt::PrefillResult absorbed = dt::prefill_prompt<C>(cpu, x, AttentionMode::absorbed);
  CHECK(tol::row_relative_error(absorbed.out, naive.out, S::dim) <= fp32_pair_bound<C>(tokens));
  CHECK(absorbed.rows == naive.rows);  // the projections do not depend on the mode
}

TEST_CASE_TEMPLATE("chunked prefill (7 + 5 + 1 tokens) equals one-shot prefill", C,
                   DAEDALUS_MLA_CONFIGS) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = 13;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 401);
  for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
    CAPTURE(mode_name(mode));
    const dt::PrefillResult whole = dt::prefill_prompt<C>(cpu, x, mode);
    ContiguousLatentCache<C> cache(2, tokens + 3);  // sequence 1, not 0, and spare capacity
    const std::vector<float> out = prefill_chunks(cpu, cache, 1, x, {7, 5, 1}, mode);
    CHECK(cache.length(1) == tokens);
    CHECK(cache.length(0) == 0);
    CHECK(tol::row_relative_error(out, whole.out, S::dim) <= fp32_pair_bound<C>(tokens));
    CHECK(tol::row_relative_error(dt::cached_rows(cache, 1), whole.rows, S::latent_dim) <=
          fp32_pair_bound<C>(tokens));
  }
}

TEST_CASE_TEMPLATE(
    "a chunk straddling a key block, split across 8 threads, equals one-shot prefill", C,
    DAEDALUS_MLA_CONFIGS) {
  // The second chunk's query tile spans positions on both sides of key 128: with 8 threads its
  // key range is split at 128, and its early queries see nothing of the last piece (the merge
  // must skip an empty piece, not average it in).
  using S = MlaShape<C>;
  const index_t tile_tokens = std::max<index_t>(1, 128 / S::n_heads);
  const index_t first = 128 - tile_tokens / 2;
  const index_t tokens = first + tile_tokens;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 404);
  for (AttentionMode mode : {AttentionMode::absorbed, AttentionMode::naive}) {
    CAPTURE(mode_name(mode));
    const dt::PrefillResult whole = dt::prefill_prompt<C>(CpuBackend(1), x, mode);
    ContiguousLatentCache<C> cache(1, tokens);
    const std::vector<float> out =
        prefill_chunks(CpuBackend(8), cache, 0, x, {first, tile_tokens}, mode);
    CHECK(tol::row_relative_error(out, whole.out, S::dim) <= fp32_pair_bound<C>(tokens));
    CHECK(tol::row_relative_error(dt::cached_rows(cache, 0), whole.rows, S::latent_dim) <=
          fp32_pair_bound<C>(tokens));
  }
}

TEST_CASE_TEMPLATE("prefill at start_pos < length recomputes the chunk and truncates the rest", C,
                   daedalus::Tiny, daedalus::TinyNoQLora) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t tokens = 20;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 402);
  ContiguousLatentCache<C> cache(1, tokens);
  const std::vector<float> first = prefill_chunks(cpu, cache, 0, x, {tokens}, AttentionMode::naive);
  const std::vector<float> rows = dt::cached_rows(cache, 0);
  // Re-run tokens 12 .. 15 at start_pos 12: the same outputs, and the sequence now ends at 16.
  std::vector<float> out(4 * S::dim);
  mla::prefill(cpu, dt::SharedModel<C>::get().weights, cache, 0, 12,
               HostView<const float, 2>(x.data() + 12 * S::dim, {4, S::dim}),
               HostView<float, 2>(out.data(), {4, S::dim}));
  CHECK(cache.length(0) == 16);
  CHECK(tol::row_relative_error(out, dt::slice_rows(first, 12, 16, S::dim), S::dim) <=
        fp32_pair_bound<C>(tokens));
  CHECK(tol::row_relative_error(dt::cached_rows(cache, 0),
                                dt::slice_rows(rows, 0, 16, S::latent_dim),
                                S::latent_dim) <= fp32_pair_bound<C>(tokens));
}

TEST_CASE("prefill of zero tokens at start_pos truncates the sequence to start_pos, like write") {
  // prefill's contract: the chunk is written at start_pos and the length becomes start_pos +
  // tokens (ContiguousLatentCache::write of zero rows truncates the same way).
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const std::vector<float> x = dt::random_tokens(10, S::dim, 405);
  ContiguousLatentCache<C> cache(1, 10);
  prefill_chunks(cpu, cache, 0, x, {10}, AttentionMode::naive);
  const std::vector<float> rows = dt::cached_rows(cache, 0);
  std::vector<float> none;
  mla::prefill(cpu, dt::SharedModel<C>::get().weights, cache, 0, 4,
               HostView<const float, 2>(x.data(), {0, S::dim}),
               HostView<float, 2>(none.data(), {0, S::dim}));
  CHECK(cache.length(0) == 4);
  CHECK(dt::cached_rows(cache, 0) == dt::slice_rows(rows, 0, 4, S::latent_dim));
}

TEST_CASE_TEMPLATE("decode after prefill equals prefill of the whole sequence (q_len 1 and 2)", C,
                   DAEDALUS_MLA_CONFIGS) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t prompt = 9;
  const index_t tokens = prompt + 6;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 403);
  const dt::PrefillResult whole = dt::prefill_prompt<C>(cpu, x, AttentionMode::naive);
  const auto& weights = dt::SharedModel<C>::get().weights;
  for (index_t q_len : {1, 2}) {
    for (AttentionMode mode : {AttentionMode::absorbed, AttentionMode::naive}) {
      CAPTURE(q_len);
      CAPTURE(mode_name(mode));
      ContiguousLatentCache<C> cache(1, tokens);
      std::vector<float> out(x.size());
      mla::prefill(cpu, weights, cache, 0, 0, HostView<const float, 2>(x.data(), {prompt, S::dim}),
                   HostView<float, 2>(out.data(), {prompt, S::dim}));
      const index_t seq = 0;
      for (index_t pos = prompt; pos < tokens; pos += q_len) {
        mla::decode(cpu, weights, cache, std::span<const index_t>(&seq, 1),
                    HostView<const float, 3>(x.data() + pos * S::dim, {1, q_len, S::dim}),
                    HostView<float, 3>(out.data() + pos * S::dim, {1, q_len, S::dim}), mode);
        CHECK(cache.length(0) == pos + q_len);
      }
      CHECK(tol::row_relative_error(dt::slice_rows(out, prompt, tokens, S::dim),
                                    dt::slice_rows(whole.out, prompt, tokens, S::dim),
                                    S::dim) <= fp32_pair_bound<C>(tokens));
      CHECK(tol::row_relative_error(dt::cached_rows(cache, 0), whole.rows, S::latent_dim) <=
            fp32_pair_bound<C>(tokens));
    }
  }
}

namespace {

/// Prefills three sequences of different lengths, then decodes `q_len` more tokens for all of
/// them in one call (batch order 2, 0, 1) and for each alone, and checks outputs and caches agree.
template <class C>
void check_varlen_batch(const CpuBackend& cpu, index_t q_len, AttentionMode mode) {
  using S = MlaShape<C>;
  const auto& weights = dt::SharedModel<C>::get().weights;
  const std::vector<index_t> lengths = {S::dim >= 1024 ? index_t(23) : index_t(131), 1, 9};
  const index_t capacity = lengths[0] + q_len;
  ContiguousLatentCache<C> batched(3, capacity);
  std::vector<ContiguousLatentCache<C>> alone;
  std::vector<std::vector<float>> prompts;
  for (index_t s = 0; s < 3; ++s) {
    prompts.push_back(dt::random_tokens(lengths[std::size_t(s)], S::dim, 410 + std::uint64_t(s)));
    alone.emplace_back(1, capacity);
    prefill_chunks(cpu, batched, s, prompts.back(), {lengths[std::size_t(s)]},
                   AttentionMode::naive);
    prefill_chunks(cpu, alone.back(), 0, prompts.back(), {lengths[std::size_t(s)]},
                   AttentionMode::naive);
  }
  const std::vector<index_t> order = {2, 0, 1};
  const std::vector<float> x = dt::random_tokens(3 * q_len, S::dim, 420);  // [batch, q_len, dim]
  std::vector<float> out(x.size());
  mla::decode(cpu, weights, batched, order, HostView<const float, 3>(x.data(), {3, q_len, S::dim}),
              HostView<float, 3>(out.data(), {3, q_len, S::dim}), mode);
  const index_t zero = 0;
  for (index_t b = 0; b < 3; ++b) {
    const index_t s = order[std::size_t(b)];
    CAPTURE(s);
    std::vector<float> single(std::size_t(q_len) * S::dim);
    mla::decode(cpu, weights, alone[std::size_t(s)], std::span<const index_t>(&zero, 1),
                HostView<const float, 3>(x.data() + b * q_len * S::dim, {1, q_len, S::dim}),
                HostView<float, 3>(single.data(), {1, q_len, S::dim}), mode);
    CHECK(batched.length(s) == lengths[std::size_t(s)] + q_len);
    CHECK(tol::row_relative_error(dt::slice_rows(out, b * q_len, (b + 1) * q_len, S::dim), single,
                                  S::dim) <= fp32_pair_bound<C>(capacity));
    CHECK(tol::row_relative_error(dt::cached_rows(batched, s),
                                  dt::cached_rows(alone[std::size_t(s)], 0),
                                  S::latent_dim) <= fp32_pair_bound<C>(capacity));
  }
}

}  // namespace

TEST_CASE_TEMPLATE("a varlen decode batch equals each sequence decoded alone", C,
                   DAEDALUS_MLA_CONFIGS) {
  for (index_t q_len : {1, 2}) {
    for (AttentionMode mode : {AttentionMode::absorbed, AttentionMode::naive}) {
      CAPTURE(q_len);
      CAPTURE(mode_name(mode));
      check_varlen_batch<C>(CpuBackend(2), q_len, mode);
    }
  }
}

TEST_CASE_TEMPLATE("1, 2, 3, 5 and 8 threads give the same bits", C, DAEDALUS_MLA_CONFIGS) {
  using S = MlaShape<C>;
  const index_t tokens = dt::prompt_length<C>();
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 430);
  for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
    CAPTURE(mode_name(mode));
    const dt::PrefillResult one = dt::prefill_prompt<C>(CpuBackend(1), x, mode);
    for (int threads : {2, 3, 5, 8}) {
      CAPTURE(threads);
      const dt::PrefillResult many = dt::prefill_prompt<C>(CpuBackend(threads), x, mode);
      CHECK(dt::same_bits(many.out, one.out));
      CHECK(dt::same_bits(many.rows, one.rows));
    }
  }
  // A varlen decode batch on several thread counts still equals each sequence decoded alone.
  for (int threads : {1, 3, 8}) {
    for (index_t q_len : {1, 2}) {
      CAPTURE(threads);
      CAPTURE(q_len);
      check_varlen_batch<C>(CpuBackend(threads), q_len, AttentionMode::absorbed);
    }
  }
}

TEST_CASE("a varlen decode batch split across threads gives the same bits for any thread count") {
  // Long enough (past 4 key blocks of 128) that the absorbed kernel splits the longest sequence
  // into pieces merged by log-sum-exp, with lengths that are multiples of no tile.
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const auto& weights = dt::SharedModel<C>::get().weights;
  const std::vector<index_t> lengths = {901, 3, 517};
  const index_t q_len = 2;
  const std::vector<float> x = dt::random_tokens(3 * q_len, S::dim, 450);
  auto run = [&](int threads, AttentionMode mode) {
    const CpuBackend cpu(threads);
    ContiguousLatentCache<C> cache(3, 1024);
    for (index_t s = 0; s < 3; ++s) {
      const std::vector<float> prompt =
          dt::random_tokens(lengths[std::size_t(s)], S::dim, 451 + std::uint64_t(s));
      std::vector<float> out(prompt.size());
      mla::prefill(cpu, weights, cache, s, 0,
                   HostView<const float, 2>(prompt.data(), {lengths[std::size_t(s)], S::dim}),
                   HostView<float, 2>(out.data(), {lengths[std::size_t(s)], S::dim}));
    }
    const std::vector<index_t> seqs = {1, 0, 2};
    std::vector<float> out(x.size());
    mla::decode(cpu, weights, cache, seqs, HostView<const float, 3>(x.data(), {3, q_len, S::dim}),
                HostView<float, 3>(out.data(), {3, q_len, S::dim}), mode);
    return out;
  };
  for (AttentionMode mode : {AttentionMode::absorbed, AttentionMode::naive}) {
    CAPTURE(mode_name(mode));
    const std::vector<float> one = run(1, mode);
    for (int threads : {2, 3, 5}) {
      CAPTURE(threads);
      CHECK(dt::same_bits(run(threads, mode), one));
    }
  }
}

TEST_CASE_TEMPLATE(
    "a bf16 or fp16 cache: prefill equals the fp64 reference over the rows it stored", Storage,
    daedalus::bfloat16, daedalus::half) {
  const CpuBackend cpu(2);
  auto check_config = [&]<class C>() {
    using S = MlaShape<C>;
    CAPTURE(C::name);
    const index_t tokens = dt::prompt_length<C>();
    const std::vector<float> x = dt::random_tokens(tokens, S::dim, 440);
    const mla_reference::Sizes sizes = dt::reference_sizes<C>();
    const mla_reference::Weights& ref_w = dt::SharedModel<C>::get().reference;
    const mla_reference::Projection ref =
        mla_reference::project(sizes, ref_w, dt::widen(x), int(tokens), 0);
    const double bound = tol::fp32_vs_reference(dt::accumulation_length<C>(tokens));
    for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
      CAPTURE(mode_name(mode));
      const dt::PrefillResult fp32 = dt::prefill_prompt<C>(cpu, x, mode);
      const dt::PrefillResult low = dt::prefill_prompt<C, Storage>(cpu, x, mode);
      // The stored rows are the exact rows, each rounded once to Storage.
      CHECK(tol::row_relative_error(low.rows, ref.latent, S::latent_dim) <=
            tol::round_trip<Storage>().relative + bound);
      // The layer over exactly those stored rows, in fp64: only fp32 arithmetic may differ.
      const std::vector<double> o =
          mla_reference::naive_attention(sizes, ref_w, ref.q, int(tokens), dt::widen(low.rows),
                                         int(tokens), mla_reference::softmax_scale(sizes));
      const std::vector<double> want =
          mla_reference::linear(o, int(tokens), S::n_heads * S::v_head_dim, ref_w.wo, S::dim);
      // The absorbed path with a bf16 cache may compute in bf16: with AVX512-BF16 the CPU
      // backend rounds q and the probabilities to bf16 and multiplies them with the stored rows
      // in `vdpbf16ps` (accumulating in fp32, as FlashMLA's bf16 kernels do). That adds bf16
      // rounding of the other operand, whose effect is bounded like the cache's own.
      const bool bf16_arithmetic =
          std::is_same_v<Storage, daedalus::bfloat16> && mode == AttentionMode::absorbed;
      CHECK(tol::row_relative_error(low.out, want, S::dim) <=
            bound + (bf16_arithmetic ? tol::cache_effect<Storage>() : 0.0));
      // Against the fp32 cache: within the rounding's effect, and not identical (the rounding
      // happened: this is not fp32 compared with itself).
      const double err = tol::row_relative_error(low.out, fp32.out, S::dim);
      CHECK(err <= tol::cache_effect<Storage>());
      CHECK(err > 0.0);
    }
  };
  check_config.template operator()<daedalus::Tiny>();
  check_config.template operator()<daedalus::DeepSeekV2Lite>();
}

TEST_CASE("decode with a bf16 cache follows prefill with a bf16 cache") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const index_t prompt = 30, tokens = 34;
  const std::vector<float> x = dt::random_tokens(tokens, S::dim, 441);
  const dt::PrefillResult whole =
      dt::prefill_prompt<C, daedalus::bfloat16>(cpu, x, AttentionMode::absorbed);
  ContiguousLatentCache<C, CpuBackend, daedalus::bfloat16> cache(1, tokens);
  std::vector<float> out(x.size());
  const auto& weights = dt::SharedModel<C>::get().weights;
  mla::prefill(cpu, weights, cache, 0, 0, HostView<const float, 2>(x.data(), {prompt, S::dim}),
               HostView<float, 2>(out.data(), {prompt, S::dim}));
  const index_t seq = 0;
  for (index_t pos = prompt; pos < tokens; ++pos) {
    mla::decode(cpu, weights, cache, std::span<const index_t>(&seq, 1),
                HostView<const float, 3>(x.data() + pos * S::dim, {1, 1, S::dim}),
                HostView<float, 3>(out.data() + pos * S::dim, {1, 1, S::dim}));
  }
  // Both paths round their own fp32 rows to bf16; where those differ in the last fp32 bits a
  // value can round to a neighbouring bf16, so the bound is the bf16 cache's, not fp32's.
  CHECK(tol::row_relative_error(out, whole.out, S::dim) <=
        tol::cache_effect<daedalus::bfloat16>() + fp32_pair_bound<C>(tokens));
}
