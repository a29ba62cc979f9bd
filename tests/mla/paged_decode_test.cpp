// SPDX-License-Identifier: Apache-2.0
// A whole MLA layer (projections, cache write, attention, output) over a PagedLatentCache against
// the same calls over a ContiguousLatentCache: chunked prefill and batched decode with the
// sequences' blocks interleaved and the free list shuffled, prefix sharing by fork (the shared
// partial block is copied on the first write), both attention modes, 1 and 2 threads. And bad
// input: the pool, its allocator and every sequence are unchanged after each typed error.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <span>
#include <vector>

#include "support/mla_fixture.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::BlockAllocator;
using daedalus::ContiguousLatentCache;
using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::MlaShape;
using daedalus::PagedLatentCache;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;
namespace mla = daedalus::mla;

using C = daedalus::Tiny;
using S = MlaShape<C>;
constexpr int kBlock = 16;
using Paged = PagedLatentCache<C, CpuBackend, float, kBlock>;
using Contiguous = ContiguousLatentCache<C, CpuBackend, float>;

/// Runs prefill of x [tokens, dim] at start_pos on a cache, returns out [tokens, dim].
template <class Cache>
std::vector<float> run_prefill(const CpuBackend& cpu, Cache& cache, index_t seq, index_t start_pos,
                               const std::vector<float>& x, mla::AttentionMode mode) {
  const index_t tokens = index_t(x.size()) / S::dim;
  std::vector<float> out(x.size());
  mla::prefill(cpu, dt::SharedModel<C>::get().weights, cache, seq, start_pos,
               HostView<const float, 2>(x.data(), {tokens, S::dim}),
               HostView<float, 2>(out.data(), {tokens, S::dim}), mode);
  return out;
}

/// Runs decode of x [batch, q_len, dim] on a cache, returns out [batch, q_len, dim].
template <class Cache>
std::vector<float> run_decode(const CpuBackend& cpu, Cache& cache, const std::vector<index_t>& seqs,
                              index_t q_len, const std::vector<float>& x, mla::AttentionMode mode) {
  const index_t batch = index_t(seqs.size());
  std::vector<float> out(x.size());
  mla::decode(cpu, dt::SharedModel<C>::get().weights, cache, std::span<const index_t>(seqs),
              HostView<const float, 3>(x.data(), {batch, q_len, S::dim}),
              HostView<float, 3>(out.data(), {batch, q_len, S::dim}), mode);
  return out;
}

/// The output of two fp32 paths that compute one layer with different summation orders.
double layer_bound(index_t tokens) { return tol::fp32_vs_fp32(dt::accumulation_length<C>(tokens)); }

/// Everything a failed call must leave alone: free blocks, each live sequence's length, block
/// list and rows, and the pool's bytes.
struct PagedSnapshot {
  index_t free_blocks;
  std::vector<index_t> seqs, lengths;
  std::vector<std::vector<std::int32_t>> blocks;
  std::vector<std::byte> pool;

  explicit PagedSnapshot(const Paged& cache)
      : free_blocks(cache.allocator().num_free_blocks()), seqs(cache.allocator().sequences()) {
    for (index_t s : seqs) {
      lengths.push_back(cache.length(s));
      const auto b = cache.allocator().blocks(s);
      blocks.emplace_back(b.begin(), b.end());
    }
    pool.assign(cache.pool_data(), cache.pool_data() + cache.bytes());
  }
  bool operator==(const PagedSnapshot& o) const {
    return free_blocks == o.free_blocks && seqs == o.seqs && lengths == o.lengths &&
           blocks == o.blocks && pool == o.pool;
  }
};

}  // namespace

TEST_CASE("paged prefill and decode equal contiguous prefill and decode") {
  const std::vector<index_t> prompt = {150, 37, 90};
  for (const auto mode : {mla::AttentionMode::absorbed, mla::AttentionMode::naive}) {
    for (int threads : {1, 2}) {
      CAPTURE(threads);
      CAPTURE(int(mode));
      const CpuBackend cpu(threads);
      BlockAllocator allocator(64, kBlock);
      Paged paged(allocator);
      Contiguous contiguous(3, 200);
      std::vector<index_t> ids;
      for (int s = 0; s < 3; ++s) ids.push_back(allocator.add_sequence());
      // A sequence that takes blocks and gives them back: the free list is no longer in order.
      const index_t filler = allocator.add_sequence();
      allocator.append(filler, 5 * kBlock);
      // Prefill in chunks of up to 40 tokens, taking turns, so the blocks of the three sequences
      // interleave in the pool.
      std::vector<index_t> done(3, 0);
      for (int round = 0; round < 4; ++round) {
        for (std::size_t s = 0; s < 3; ++s) {
          const index_t n = std::min<index_t>(40, prompt[s] - done[s]);
          if (n <= 0) continue;
          const std::vector<float> x =
              dt::random_tokens(std::size_t(n), S::dim, 700 + round * 3 + s);
          const auto got = run_prefill(cpu, paged, ids[s], done[s], x, mode);
          const auto want = run_prefill(cpu, contiguous, index_t(s), done[s], x, mode);
          CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(done[s] + n));
          done[s] += n;
        }
        if (round == 1) allocator.release(filler);
      }
      // Recompute the last 10 tokens of sequence 1 (a chunked-prefill rewrite truncates).
      {
        const std::vector<float> x = dt::random_tokens(10, S::dim, 720);
        const auto got = run_prefill(cpu, paged, ids[1], prompt[1] - 10, x, mode);
        const auto want = run_prefill(cpu, contiguous, 1, prompt[1] - 10, x, mode);
        CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(prompt[1]));
      }
      // Decode steps of the batch in shuffled order, q_len 1 then 2 (speculative).
      const std::vector<index_t> order = {2, 0, 1};
      std::vector<index_t> paged_seqs, contiguous_seqs;
      for (index_t s : order) {
        paged_seqs.push_back(ids[std::size_t(s)]);
        contiguous_seqs.push_back(s);
      }
      for (index_t q_len : {1, 2, 1}) {
        const std::vector<float> x =
            dt::random_tokens(std::size_t(3 * q_len), S::dim, 730 + std::uint64_t(q_len));
        const auto got = run_decode(cpu, paged, paged_seqs, q_len, x, mode);
        const auto want = run_decode(cpu, contiguous, contiguous_seqs, q_len, x, mode);
        CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(160));
      }
      for (std::size_t s = 0; s < 3; ++s) {
        CHECK(paged.length(ids[s]) == contiguous.length(index_t(s)));
        CHECK(tol::row_relative_error(paged.rows(ids[s]), dt::cached_rows(contiguous, index_t(s)),
                                      S::latent_dim) <= layer_bound(160));
      }
    }
  }
}

TEST_CASE("decode of forks that share a prompt equals decode of separate copies") {
  const CpuBackend cpu(2);
  BlockAllocator allocator(32, kBlock);
  Paged paged(allocator);
  Contiguous contiguous(3, 100);
  const index_t parent = allocator.add_sequence();
  const std::vector<float> prompt = dt::random_tokens(45, S::dim, 740);  // 2 full blocks + 13
  const auto p_out = run_prefill(cpu, paged, parent, 0, prompt, mla::AttentionMode::naive);
  for (index_t s = 0; s < 3; ++s)
    run_prefill(cpu, contiguous, s, 0, prompt, mla::AttentionMode::naive);
  const index_t child_a = allocator.fork(parent);
  const index_t child_b = allocator.fork(parent);
  const index_t used_before = allocator.num_used_blocks();
  CHECK(used_before == 3);  // the prompt's blocks, shared three ways
  // All three append into the shared partial block: the first two copy it (copy on write),
  // the last finds it no longer shared.
  const std::vector<index_t> seqs = {child_a, parent, child_b};
  const std::vector<index_t> cseqs = {0, 1, 2};
  for (int step = 0; step < 3; ++step) {  // 45 → 48 tokens: still 3 blocks each
    const std::vector<float> x = dt::random_tokens(3, S::dim, 741 + step);
    const auto got = run_decode(cpu, paged, seqs, 1, x, mla::AttentionMode::absorbed);
    const auto want = run_decode(cpu, contiguous, cseqs, 1, x, mla::AttentionMode::absorbed);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(50));
  }
  CHECK(allocator.num_used_blocks() == used_before + 2);
  for (std::size_t i = 0; i < 3; ++i)
    CHECK(tol::row_relative_error(paged.rows(seqs[i]), dt::cached_rows(contiguous, cseqs[i]),
                                  S::latent_dim) <= layer_bound(50));
}

TEST_CASE("a batch of forks fits a pool with exactly the copies it needs") {
  // Three sequences share a partial block; appending to all three copies it twice (the third
  // then holds it alone), so 2 free blocks suffice and 1 does not.
  for (index_t spare : {2, 1}) {
    CAPTURE(spare);
    const CpuBackend cpu(2);
    BlockAllocator allocator(2 + spare, kBlock);
    Paged paged(allocator);
    const index_t parent = allocator.add_sequence();
    run_prefill(cpu, paged, parent, 0, dt::random_tokens(kBlock + 4, S::dim, 745),
                mla::AttentionMode::absorbed);
    const std::vector<index_t> seqs = {allocator.fork(parent), parent, allocator.fork(parent)};
    const std::vector<float> x = dt::random_tokens(3, S::dim, 746);
    if (spare == 2) {
      run_decode(cpu, paged, seqs, 1, x, mla::AttentionMode::absorbed);
      CHECK(allocator.num_free_blocks() == 0);
    } else {
      const PagedSnapshot before(paged);
      CHECK_THROWS_AS(run_decode(cpu, paged, seqs, 1, x, mla::AttentionMode::absorbed),
                      daedalus::CapacityError);
      CHECK(PagedSnapshot(paged) == before);
    }
  }
}

TEST_CASE("paged decode and prefill refuse bad input and change nothing") {
  const CpuBackend cpu(2);
  BlockAllocator allocator(6, kBlock);
  Paged paged(allocator);
  const index_t a = allocator.add_sequence();
  const index_t b = allocator.add_sequence();
  run_prefill(cpu, paged, a, 0, dt::random_tokens(2 * kBlock, S::dim, 750),
              mla::AttentionMode::naive);  // a: 2 full blocks
  run_prefill(cpu, paged, b, 0, dt::random_tokens(3 * kBlock, S::dim, 751),
              mla::AttentionMode::naive);  // b: 3 full blocks; 1 block free
  const index_t released = allocator.add_sequence();
  allocator.release(released);
  const PagedSnapshot before(paged);
  const std::vector<float> x2 = dt::random_tokens(2, S::dim, 752);
  const std::vector<float> x1 = dt::random_tokens(1, S::dim, 753);
  const auto decode = [&](std::vector<index_t> seqs, const std::vector<float>& x) {
    run_decode(cpu, paged, seqs, 1, x, mla::AttentionMode::absorbed);
  };
  // Each of a and b needs a new block for its next token; the pool has one.
  CHECK_THROWS_WITH_AS(decode({a, b}, x2), doctest::Contains("need at least 2 free blocks"),
                       daedalus::CapacityError);
  CHECK(PagedSnapshot(paged) == before);
  CHECK_THROWS_AS(decode({a, released}, x2), daedalus::OutOfRange);
  CHECK_THROWS_AS(decode({a, 99}, x2), daedalus::OutOfRange);
  CHECK_THROWS_AS(decode({a, a}, x2), daedalus::InvalidArgument);
  std::vector<float> bad = x1;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(decode({a}, bad), daedalus::NumericError);
  CHECK(PagedSnapshot(paged) == before);
  const std::vector<float> chunk = dt::random_tokens(2 * kBlock + 1, S::dim, 754);
  CHECK_THROWS_AS(run_prefill(cpu, paged, a, 2 * kBlock, chunk, mla::AttentionMode::naive),
                  daedalus::CapacityError);  // 3 more blocks
  CHECK_THROWS_AS(run_prefill(cpu, paged, a, 2 * kBlock + 1, x1, mla::AttentionMode::naive),
                  daedalus::OutOfRange);  // past the end
  CHECK_THROWS_AS(run_prefill(cpu, paged, released, 0, x1, mla::AttentionMode::naive),
                  daedalus::OutOfRange);
  CHECK(PagedSnapshot(paged) == before);
  // What fits still runs: one sequence takes the last block.
  decode({b}, x1);
  CHECK(allocator.num_free_blocks() == 0);
  CHECK(paged.length(b) == 3 * kBlock + 1);
}

TEST_CASE("two layers sharing one allocator decode at explicit positions like separate caches") {
  // A two-layer model: each layer has its own weights and pool, both pools share one allocator
  // (one block table per sequence). Every step reads the lengths once and passes them to both
  // layers; the result must equal each layer run on a contiguous cache of its own. A fork makes
  // the first layer's write copy a shared block in both pools.
  const CpuBackend cpu(2);
  const auto layer0 = dt::SharedModel<C>::get().weights;
  const auto layer1 = dt::WeightArrays<C>::random(0xA11CEu).weights();
  BlockAllocator allocator(32, kBlock);
  Paged paged0(allocator);
  Paged paged1(allocator);
  Contiguous contiguous0(2, 80);
  Contiguous contiguous1(2, 80);

  const auto run_layers_paged = [&](const std::vector<index_t>& seqs,
                                    const std::vector<index_t>& starts, index_t q_len,
                                    const std::vector<float>& x) {
    const index_t batch = index_t(seqs.size());
    std::vector<float> hidden(x.size()), out(x.size());
    mla::decode(cpu, layer0, paged0, std::span<const index_t>(seqs),
                std::span<const index_t>(starts),
                HostView<const float, 3>(x.data(), {batch, q_len, S::dim}),
                HostView<float, 3>(hidden.data(), {batch, q_len, S::dim}));
    mla::decode(cpu, layer1, paged1, std::span<const index_t>(seqs),
                std::span<const index_t>(starts),
                HostView<const float, 3>(hidden.data(), {batch, q_len, S::dim}),
                HostView<float, 3>(out.data(), {batch, q_len, S::dim}));
    return out;
  };
  const auto run_layers_contiguous = [&](const std::vector<index_t>& seqs, index_t q_len,
                                         const std::vector<float>& x) {
    const index_t batch = index_t(seqs.size());
    std::vector<float> hidden(x.size()), out(x.size());
    mla::decode(cpu, layer0, contiguous0, std::span<const index_t>(seqs),
                HostView<const float, 3>(x.data(), {batch, q_len, S::dim}),
                HostView<float, 3>(hidden.data(), {batch, q_len, S::dim}));
    mla::decode(cpu, layer1, contiguous1, std::span<const index_t>(seqs),
                HostView<const float, 3>(hidden.data(), {batch, q_len, S::dim}),
                HostView<float, 3>(out.data(), {batch, q_len, S::dim}));
    return out;
  };

  // A 21-token prompt for sequence a, token by token (the partial last block is then shared by
  // the fork b, whose first write copies it in both pools).
  const index_t a = allocator.add_sequence();
  for (index_t t = 0; t < 21; ++t) {
    const std::vector<float> x = dt::random_tokens(1, S::dim, 900 + std::uint64_t(t));
    const auto got = run_layers_paged({a}, {allocator.length(a)}, 1, x);
    const auto want = run_layers_contiguous({0}, 1, x);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(t + 1));
  }
  const index_t b = allocator.fork(a);
  {
    // The contiguous model of the fork: copy sequence 0's rows of both layers into sequence 1.
    const auto rows0 = dt::cached_rows(contiguous0, 0);
    const auto rows1 = dt::cached_rows(contiguous1, 0);
    contiguous0.write(1, 0, HostView<const float, 2>(rows0.data(), {21, S::latent_dim}));
    contiguous1.write(1, 0, HostView<const float, 2>(rows1.data(), {21, S::latent_dim}));
  }
  const index_t free_before = allocator.num_free_blocks();
  for (index_t q_len : {1, 2, 1}) {
    const std::vector<float> x =
        dt::random_tokens(std::size_t(2 * q_len), S::dim, 950 + std::uint64_t(q_len));
    const std::vector<index_t> starts = {allocator.length(b), allocator.length(a)};
    const auto got = run_layers_paged({b, a}, starts, q_len, x);
    const auto want = run_layers_contiguous({1, 0}, q_len, x);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(30));
    CHECK(allocator.length(a) == contiguous0.length(0));
    CHECK(allocator.length(b) == contiguous0.length(1));
  }
  // The fork's first write copied the shared partial block once (not once per layer).
  CHECK(allocator.num_free_blocks() == free_before - 1);
  for (index_t s : {a, b}) {
    const index_t c = s == a ? 0 : 1;
    CHECK(tol::row_relative_error(paged0.rows(s), dt::cached_rows(contiguous0, c), S::latent_dim) <=
          layer_bound(30));
    CHECK(tol::row_relative_error(paged1.rows(s), dt::cached_rows(contiguous1, c), S::latent_dim) <=
          layer_bound(30));
  }

  // A start position past the sequence's length is refused, and nothing changes.
  const PagedSnapshot before(paged1);
  const std::vector<float> x = dt::random_tokens(1, S::dim, 990);
  std::vector<float> out(x.size());
  const std::vector<index_t> seqs = {a};
  const std::vector<index_t> bad_start = {allocator.length(a) + 1};
  CHECK_THROWS_WITH_AS(mla::decode(cpu, layer1, paged1, std::span<const index_t>(seqs),
                                   std::span<const index_t>(bad_start),
                                   HostView<const float, 3>(x.data(), {1, 1, S::dim}),
                                   HostView<float, 3>(out.data(), {1, 1, S::dim})),
                       doctest::Contains("'start_positions[0]'"), daedalus::OutOfRange);
  const std::vector<index_t> two_starts = {0, 0};
  CHECK_THROWS_AS(mla::decode(cpu, layer1, paged1, std::span<const index_t>(seqs),
                              std::span<const index_t>(two_starts),
                              HostView<const float, 3>(x.data(), {1, 1, S::dim}),
                              HostView<float, 3>(out.data(), {1, 1, S::dim})),
                  daedalus::InvalidArgument);
  CHECK(PagedSnapshot(paged1) == before);
}
