// SPDX-License-Identifier: Apache-2.0
// Bad input to prefill, decode and the attention cores: each throws the documented error with a
// message naming the argument, and leaves the cache exactly as it was (lengths and every stored
// row compared before and after).
#include <doctest/doctest.h>

#include <daedalus/daedalus.hpp>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/mla_fixture.hpp"

namespace {

using daedalus::ContiguousLatentCache;
using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::MlaShape;
using daedalus::mla::AttentionMode;
namespace dt = daedalus::testing;
namespace mla = daedalus::mla;

using daedalus::testing::contains;
using daedalus::testing::message_of;

/// A cache of three sequences with capacity 12, holding 5, 0 and 12 tokens of a model's output.
template <class C>
ContiguousLatentCache<C> filled_cache(const CpuBackend& cpu) {
  using S = MlaShape<C>;
  ContiguousLatentCache<C> cache(3, 12);
  for (index_t s : {0, 2}) {
    const index_t n = s == 0 ? 5 : 12;
    const std::vector<float> x = dt::random_tokens(n, S::dim, 600 + std::uint64_t(s));
    std::vector<float> out(x.size());
    mla::prefill(cpu, dt::SharedModel<C>::get().weights, cache, s, 0,
                 HostView<const float, 2>(x.data(), {n, S::dim}),
                 HostView<float, 2>(out.data(), {n, S::dim}));
  }
  return cache;
}

}  // namespace

TEST_CASE_TEMPLATE("prefill: bad input throws, names the problem and leaves the cache unchanged", C,
                   daedalus::Tiny, daedalus::TinyNoQLora) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  auto cache = filled_cache<C>(cpu);
  const dt::CacheSnapshot<ContiguousLatentCache<C>> before(cache);
  const auto& w = dt::SharedModel<C>::get().weights;
  std::vector<float> x = dt::random_tokens(4, S::dim + 1, 610);
  std::vector<float> out(x.size());
  auto run = [&](index_t seq, index_t start_pos, index_t tokens, index_t x_dim, index_t out_rows,
                 AttentionMode mode = AttentionMode::naive) {
    mla::prefill(cpu, w, cache, seq, start_pos, HostView<const float, 2>(x.data(), {tokens, x_dim}),
                 HostView<float, 2>(out.data(), {out_rows, S::dim}), mode);
  };

  SUBCASE("x of the wrong width: InvalidArgument naming 'x' and both extents") {
    const std::string what =
        message_of<daedalus::InvalidArgument>([&] { run(0, 5, 3, S::dim + 1, 3); });
    CHECK(contains(what, "daedalus::mla::prefill"));
    CHECK(contains(what, "'x' has extents [3," + std::to_string(S::dim + 1) + "]; expected [3," +
                             std::to_string(S::dim) + "]"));
  }
  SUBCASE("out with another token count than x: InvalidArgument naming 'out'") {
    const std::string what =
        message_of<daedalus::InvalidArgument>([&] { run(0, 5, 3, S::dim, 2); });
    CHECK(contains(what, "'out' has extents [2," + std::to_string(S::dim) + "]; expected [3,"));
  }
  SUBCASE("past capacity: CapacityError") {
    const std::string what = message_of<daedalus::CapacityError>([&] { run(0, 5, 8, S::dim, 8); });
    CHECK(contains(what, "capacity is 12"));
    CHECK_THROWS_AS(run(2, 12, 1, S::dim, 1), daedalus::CapacityError);
  }
  SUBCASE("start_pos beyond the cached length: OutOfRange naming start_pos") {
    const std::string what = message_of<daedalus::OutOfRange>([&] { run(0, 6, 1, S::dim, 1); });
    CHECK(contains(what, "'start_pos' is 6"));
    CHECK_THROWS_AS(run(1, 1, 1, S::dim, 1), daedalus::OutOfRange);
    CHECK_THROWS_AS(run(0, -1, 1, S::dim, 1), daedalus::OutOfRange);
  }
  SUBCASE("unknown sequence id: OutOfRange naming the sequence") {
    const std::string what = message_of<daedalus::OutOfRange>([&] { run(3, 0, 1, S::dim, 1); });
    CHECK(contains(what, "sequence 3"));
    CHECK_THROWS_AS(run(-1, 0, 1, S::dim, 1), daedalus::OutOfRange);
  }
  SUBCASE("NaN or infinity in x: NumericError naming 'x', row and column") {
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      for (AttentionMode mode : {AttentionMode::naive, AttentionMode::absorbed}) {
        x = dt::random_tokens(3, S::dim, 611);
        x[std::size_t(2 * S::dim + 4)] = bad;
        const std::string what =
            message_of<daedalus::NumericError>([&] { run(0, 5, 3, S::dim, 3, mode); });
        CHECK(contains(what, "'x'"));
        CHECK(contains(what, "row 2, column 4"));
        // Overwriting cached tokens (start_pos < length) must not have started either.
        CHECK_THROWS_AS(run(0, 1, 3, S::dim, 3, mode), daedalus::NumericError);
      }
    }
  }
  CHECK(before.unchanged(cache));
}

TEST_CASE_TEMPLATE("decode: bad input throws, names the problem and leaves the cache unchanged", C,
                   daedalus::Tiny, daedalus::TinyNoQLora) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  auto cache = filled_cache<C>(cpu);
  const dt::CacheSnapshot<ContiguousLatentCache<C>> before(cache);
  const auto& w = dt::SharedModel<C>::get().weights;
  std::vector<float> x = dt::random_tokens(3 * 2, S::dim + 1, 620);
  std::vector<float> out(x.size());
  auto run = [&](std::vector<index_t> seqs, index_t q_len, index_t x_dim, index_t out_batch) {
    mla::decode(cpu, w, cache, std::span<const index_t>(seqs),
                HostView<const float, 3>(x.data(), {index_t(seqs.size()), q_len, x_dim}),
                HostView<float, 3>(out.data(), {out_batch, q_len, S::dim}));
  };

  SUBCASE("x of the wrong width: InvalidArgument naming 'x'") {
    const std::string what = message_of<daedalus::InvalidArgument>([&] {
      run({0, 1}, 1, S::dim + 1, 2);
    });
    CHECK(contains(what, "daedalus::mla::decode"));
    CHECK(contains(what, "'x' has extents [2,1," + std::to_string(S::dim + 1) + "]"));
  }
  SUBCASE("out with the wrong batch: InvalidArgument naming 'out'") {
    const std::string what = message_of<daedalus::InvalidArgument>([&] {
      run({0, 1}, 1, S::dim, 3);
    });
    CHECK(contains(what, "'out' has extents [3,1,"));
  }
  SUBCASE("a sequence past its capacity: CapacityError, even when others in the batch fit") {
    CHECK_THROWS_AS(run({0, 2}, 1, S::dim, 2), daedalus::CapacityError);  // seq 2 is full
    CHECK_THROWS_AS(run({1}, 13, S::dim, 1), daedalus::CapacityError);
  }
  SUBCASE("unknown sequence id: OutOfRange naming the entry") {
    const std::string what = message_of<daedalus::OutOfRange>([&] { run({0, 7}, 1, S::dim, 2); });
    CHECK(contains(what, "'seqs[1]' is 7"));
    CHECK_THROWS_AS(run({-1}, 1, S::dim, 1), daedalus::OutOfRange);
  }
  SUBCASE("a repeated sequence id: InvalidArgument naming both entries") {
    const std::string what = message_of<daedalus::InvalidArgument>([&] {
      run({0, 1, 0}, 1, S::dim, 3);
    });
    CHECK(contains(what, "sequence 0 twice (entries 0 and 2)"));
  }
  SUBCASE("NaN or infinity in x: NumericError naming 'x'") {
    x = dt::random_tokens(2 * 2, S::dim, 621);
    x[std::size_t(3 * S::dim + 1)] = -std::numeric_limits<float>::infinity();
    const std::string what = message_of<daedalus::NumericError>([&] { run({1, 0}, 2, S::dim, 2); });
    CHECK(contains(what, "'x'"));
    CHECK(contains(what, "row 3, column 1"));
  }
  CHECK(before.unchanged(cache));
}

TEST_CASE("attention cores: wrong q or output extents and unknown sequences are rejected") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  auto cache = filled_cache<C>(cpu);
  const dt::CacheSnapshot<ContiguousLatentCache<C>> before(cache);
  const std::vector<index_t> seqs = {0, 2};
  std::vector<float> q(std::size_t(2 * 2 * S::n_heads * S::latent_dim), 0.5f);
  std::vector<float> out(q.size());
  auto absorbed = [&](std::vector<index_t> ids, index_t q_len, index_t q_width, index_t out_width) {
    mla::absorbed_attention(
        cpu, cache, std::span<const index_t>(ids),
        HostView<const float, 4>(q.data(), {index_t(ids.size()), q_len, S::n_heads, q_width}),
        mla::softmax_scale<C>(),
        HostView<float, 4>(out.data(), {index_t(ids.size()), q_len, S::n_heads, out_width}));
  };
  std::string what = message_of<daedalus::InvalidArgument>(
      [&] { absorbed(seqs, 1, S::qk_head_dim, S::kv_lora_rank); });
  CHECK(contains(
      what, "daedalus::mla::absorbed_attention: 'q' has extents [2,1,3,20]; expected [2,1,3,48]"));
  what = message_of<daedalus::InvalidArgument>(
      [&] { absorbed(seqs, 1, S::latent_dim, S::latent_dim); });
  CHECK(contains(what, "'out_latent' has extents [2,1,3,48]; expected [2,1,3,40]"));
  what = message_of<daedalus::OutOfRange>([&] {
    absorbed({0, 3}, 1, S::latent_dim, S::kv_lora_rank);
  });
  CHECK(contains(what, "'seqs[1]' is 3"));
  // Sequence 1 is empty: it cannot hold the query token.
  CHECK_THROWS_AS(absorbed({1}, 1, S::latent_dim, S::kv_lora_rank), daedalus::OutOfRange);

  const auto& w = dt::SharedModel<C>::get().weights;
  what = message_of<daedalus::InvalidArgument>([&] {
    mla::naive_attention(cpu, w, cache, std::span<const index_t>(seqs),
                         HostView<const float, 4>(q.data(), {2, 1, S::n_heads, S::latent_dim}),
                         mla::softmax_scale<C>(),
                         HostView<float, 4>(out.data(), {2, 1, S::n_heads, S::v_head_dim}));
  });
  CHECK(contains(
      what, "daedalus::mla::naive_attention: 'q' has extents [2,1,3,48]; expected [2,1,3,20]"));
  CHECK(before.unchanged(cache));
}

TEST_CASE("project: wrong extents, a negative start_pos and non-finite x are rejected") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const auto& w = dt::SharedModel<C>::get().weights;
  std::vector<float> x = dt::random_tokens(2, S::dim, 630);
  std::vector<float> q(std::size_t(2 * S::n_heads * S::qk_head_dim));
  std::vector<float> latent(std::size_t(2 * S::latent_dim));
  auto run = [&](index_t start_pos, index_t latent_width) {
    mla::project(cpu, w, start_pos, HostView<const float, 2>(x.data(), {2, S::dim}),
                 HostView<float, 3>(q.data(), {2, S::n_heads, S::qk_head_dim}),
                 HostView<float, 2>(latent.data(), {2, latent_width}));
  };
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] { run(0, S::latent_dim - 1); }),
                 "'latent' has extents [2,47]; expected [2,48]"));
  CHECK_THROWS_AS(run(-1, S::latent_dim), daedalus::OutOfRange);
  x[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(run(0, S::latent_dim), daedalus::NumericError);
}
