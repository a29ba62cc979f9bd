// SPDX-License-Identifier: Apache-2.0
// A model of several MLA layers over paged caches that share one BlockAllocator, stepped with one
// SlotReservation per step: every layer writes exactly the reserved positions, lengths advance
// once per step (not once per layer), shared blocks are copied once, and the outputs equal each
// layer run on a contiguous cache of its own (and, bit for bit, the explicit-positions overload).
// And the traps closed: plain decode / append at the length refuse an allocator that serves
// several pools; stale reservations, reservations of another allocator, and bad shapes are typed
// errors that change nothing.
#include <doctest/doctest.h>

#include <cstring>
#include <daedalus/daedalus.hpp>
#include <span>
#include <vector>

#include "kv_cache/paged_support.hpp"
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
using daedalus::SlotReservation;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;
namespace mla = daedalus::mla;

using C = daedalus::Tiny;
using S = MlaShape<C>;
constexpr int kBlock = 16;
constexpr int kLayers = 3;
using Paged = PagedLatentCache<C, CpuBackend, float, kBlock>;
using Contiguous = ContiguousLatentCache<C, CpuBackend, float>;
using Weights = daedalus::mla::MlaWeights<C>;

std::vector<Weights> layer_weights() {
  std::vector<Weights> w;
  for (int l = 0; l < kLayers; ++l)
    w.push_back(dt::WeightArrays<C>::random(0x57E90u + std::uint64_t(l)).weights());
  return w;
}

double layer_bound(index_t tokens) {
  // kLayers chained layers, each within the two-path bound of the other model's.
  return kLayers * tol::fp32_vs_fp32(dt::accumulation_length<C>(tokens));
}

/// kLayers paged caches on one allocator, stepped with reservations.
struct PagedModel {
  BlockAllocator allocator{64, kBlock};
  std::vector<Paged> caches;
  PagedModel() {
    for (int l = 0; l < kLayers; ++l) caches.emplace_back(allocator);
  }

  std::vector<float> decode(const CpuBackend& cpu, const std::vector<Weights>& w,
                            const SlotReservation& step, const std::vector<float>& x) {
    const index_t batch = step.batch(), q_len = step.tokens();
    std::vector<float> in = x, out(x.size());
    for (int l = 0; l < kLayers; ++l) {
      mla::decode(cpu, w[std::size_t(l)], caches[std::size_t(l)], step,
                  HostView<const float, 3>(in.data(), {batch, q_len, S::dim}),
                  HostView<float, 3>(out.data(), {batch, q_len, S::dim}));
      std::swap(in, out);
    }
    return in;
  }
  std::vector<float> prefill(const CpuBackend& cpu, const std::vector<Weights>& w,
                             const SlotReservation& chunk, const std::vector<float>& x) {
    const index_t tokens = chunk.tokens();
    std::vector<float> in = x, out(x.size());
    for (int l = 0; l < kLayers; ++l) {
      mla::prefill(cpu, w[std::size_t(l)], caches[std::size_t(l)], chunk,
                   HostView<const float, 2>(in.data(), {tokens, S::dim}),
                   HostView<float, 2>(out.data(), {tokens, S::dim}));
      std::swap(in, out);
    }
    return in;
  }
};

/// kLayers contiguous caches, one per layer, each with its own lengths.
struct ContiguousModel {
  std::vector<Contiguous> caches;
  ContiguousModel() {
    for (int l = 0; l < kLayers; ++l) caches.emplace_back(3, 96);
  }
  std::vector<float> decode(const CpuBackend& cpu, const std::vector<Weights>& w,
                            const std::vector<index_t>& seqs, index_t q_len,
                            const std::vector<float>& x) {
    const index_t batch = index_t(seqs.size());
    std::vector<float> in = x, out(x.size());
    for (int l = 0; l < kLayers; ++l) {
      mla::decode(cpu, w[std::size_t(l)], caches[std::size_t(l)], std::span<const index_t>(seqs),
                  HostView<const float, 3>(in.data(), {batch, q_len, S::dim}),
                  HostView<float, 3>(out.data(), {batch, q_len, S::dim}));
      std::swap(in, out);
    }
    return in;
  }
  std::vector<float> prefill(const CpuBackend& cpu, const std::vector<Weights>& w, index_t seq,
                             const std::vector<float>& x) {
    const index_t tokens = index_t(x.size()) / S::dim;
    std::vector<float> in = x, out(x.size());
    for (int l = 0; l < kLayers; ++l) {
      auto& cache = caches[std::size_t(l)];
      mla::prefill(cpu, w[std::size_t(l)], cache, seq, cache.length(seq),
                   HostView<const float, 2>(in.data(), {tokens, S::dim}),
                   HostView<float, 2>(out.data(), {tokens, S::dim}));
      std::swap(in, out);
    }
    return in;
  }
};

bool same_pools(const PagedModel& a, const PagedModel& b) {
  for (int l = 0; l < kLayers; ++l) {
    const Paged& x = a.caches[std::size_t(l)];
    const Paged& y = b.caches[std::size_t(l)];
    if (x.bytes() != y.bytes() || std::memcmp(x.pool_data(), y.pool_data(), x.bytes()) != 0)
      return false;
  }
  return true;
}

}  // namespace

TEST_CASE("a multi-layer model stepped with one reservation per step equals separate caches") {
  const CpuBackend cpu(2);
  const std::vector<Weights> w = layer_weights();
  PagedModel paged;
  ContiguousModel contiguous;
  BlockAllocator& allocator = paged.allocator;

  // Prompts in chunks (21 + 5 tokens for a, 9 for c), each chunk reserved once for all layers.
  const index_t a = allocator.add_sequence();
  const index_t c = allocator.add_sequence();
  index_t done = 0;
  for (index_t chunk : {21, 5}) {
    const std::vector<float> x = dt::random_tokens(chunk, S::dim, 1000 + std::uint64_t(chunk));
    const index_t seqs[] = {a};
    const SlotReservation slots = allocator.reserve(seqs, chunk);
    CHECK(slots.start_positions()[0] == done);
    CHECK(allocator.length(a) == done + chunk);  // set once, by the reservation
    const auto got = paged.prefill(cpu, w, slots, x);
    CHECK(allocator.length(a) == done + chunk);  // and no layer moved it
    const auto want = contiguous.prefill(cpu, w, 0, x);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(done + chunk));
    done += chunk;
  }
  {
    const std::vector<float> x = dt::random_tokens(9, S::dim, 1010);
    const index_t seqs[] = {c};
    const auto got = paged.prefill(cpu, w, allocator.reserve(seqs, 9), x);
    const auto want = contiguous.prefill(cpu, w, 2, x);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(9));
  }

  // A fork b of a shares a's partial last block: its first step copies it once, in every pool.
  const index_t b = allocator.fork(a);
  for (int l = 0; l < kLayers; ++l) {
    const auto rows = dt::cached_rows(contiguous.caches[std::size_t(l)], 0);
    contiguous.caches[std::size_t(l)].write(
        1, 0, HostView<const float, 2>(rows.data(), {26, S::latent_dim}));
  }
  const index_t free_before = allocator.num_free_blocks();
  index_t steps = 0;
  for (index_t q_len : {1, 2, 1, 1}) {
    const std::vector<index_t> seqs = {b, c, a};
    const std::vector<float> x =
        dt::random_tokens(std::size_t(3 * q_len), S::dim, 1020 + std::uint64_t(steps));
    const SlotReservation step = allocator.reserve(seqs, q_len);
    const auto got = paged.decode(cpu, w, step, x);
    const auto want = contiguous.decode(cpu, w, {1, 2, 0}, q_len, x);
    CHECK(tol::row_relative_error(got, want, S::dim) <= layer_bound(40));
    CHECK(allocator.length(a) == contiguous.caches[0].length(0));
    CHECK(allocator.length(b) == contiguous.caches[0].length(1));
    CHECK(allocator.length(c) == contiguous.caches[0].length(2));
    ++steps;
  }
  CHECK(allocator.length(a) == 26 + 5);
  CHECK(allocator.length(c) == 9 + 5);
  // One copy of the shared block for b's first write, and no block taken twice: 26 + 5 = 31
  // tokens fit a's two blocks, b's 31 tokens its copy and the shared first block.
  CHECK(allocator.num_free_blocks() == free_before - 1);
  for (int l = 0; l < kLayers; ++l) {
    CAPTURE(l);
    const auto& cache = paged.caches[std::size_t(l)];
    const auto& ref = contiguous.caches[std::size_t(l)];
    CHECK(tol::row_relative_error(cache.rows(a), dt::cached_rows(ref, 0), S::latent_dim) <=
          layer_bound(40));
    CHECK(tol::row_relative_error(cache.rows(b), dt::cached_rows(ref, 1), S::latent_dim) <=
          layer_bound(40));
  }
}

TEST_CASE("a reserved step computes the same bits as decode at explicit positions") {
  const CpuBackend cpu(3);
  const std::vector<Weights> w = layer_weights();
  PagedModel reserved, explicit_positions;
  const std::vector<float> prompt = dt::random_tokens(37, S::dim, 1100);
  for (PagedModel* model : {&reserved, &explicit_positions}) {
    const index_t s = model->allocator.add_sequence();
    const index_t seqs[] = {s};
    model->prefill(cpu, w, model->allocator.reserve(seqs, 37), prompt);
    model->allocator.fork(s, 20);
  }
  for (int step = 0; step < 3; ++step) {
    const std::vector<index_t> seqs = {1, 0};
    const std::vector<float> x = dt::random_tokens(2, S::dim, 1110 + std::uint64_t(step));
    const auto got = reserved.decode(cpu, w, reserved.allocator.reserve(seqs, 1), x);
    const std::vector<index_t> starts = {explicit_positions.allocator.length(1),
                                         explicit_positions.allocator.length(0)};
    std::vector<float> in = x, out(x.size());
    for (int l = 0; l < kLayers; ++l) {
      mla::decode(cpu, w[std::size_t(l)], explicit_positions.caches[std::size_t(l)],
                  std::span<const index_t>(seqs), std::span<const index_t>(starts),
                  HostView<const float, 3>(in.data(), {2, 1, S::dim}),
                  HostView<float, 3>(out.data(), {2, 1, S::dim}));
      std::swap(in, out);
    }
    CHECK(dt::same_bits(got, in));
  }
  CHECK(dt::AllocatorSnapshot(reserved.allocator) ==
        dt::AllocatorSnapshot(explicit_positions.allocator));
  CHECK(same_pools(reserved, explicit_positions));
}

TEST_CASE("appending at the length refuses an allocator that serves several pools") {
  const CpuBackend cpu(1);
  const std::vector<Weights> w = layer_weights();
  PagedModel model;
  const index_t s = model.allocator.add_sequence();
  const index_t seqs[] = {s};
  model.prefill(cpu, w, model.allocator.reserve(seqs, 5), dt::random_tokens(5, S::dim, 1200));
  const dt::AllocatorSnapshot before(model.allocator);
  const std::vector<float> x = dt::random_tokens(1, S::dim, 1201);
  std::vector<float> out(x.size());
  const std::string decode_error = dt::message_of<daedalus::InvalidArgument>([&] {
    mla::decode(cpu, w[0], model.caches[0], std::span<const index_t>(seqs),
                HostView<const float, 3>(x.data(), {1, 1, S::dim}),
                HostView<float, 3>(out.data(), {1, 1, S::dim}));
  });
  CHECK(dt::contains(decode_error, "daedalus::mla::decode"));
  CHECK(dt::contains(decode_error, "serves 3 layer pools"));
  CHECK(dt::contains(decode_error, "BlockAllocator::reserve"));
  const std::vector<float> row = dt::random_tokens(1, S::latent_dim, 1202);
  const std::string append_error = dt::message_of<daedalus::InvalidArgument>([&] {
    model.caches[1].append(s, HostView<const float, 2>(row.data(), {1, S::latent_dim}));
  });
  CHECK(dt::contains(append_error, "daedalus::PagedLatentCache::append"));
  CHECK(dt::AllocatorSnapshot(model.allocator) == before);

  // With one pool the allocator's lengths are that layer's alone: appending is still right.
  BlockAllocator single(8, kBlock);
  Paged only(single);
  const index_t t = single.add_sequence();
  const index_t one[] = {t};
  mla::decode(cpu, w[0], only, std::span<const index_t>(one),
              HostView<const float, 3>(x.data(), {1, 1, S::dim}),
              HostView<float, 3>(out.data(), {1, 1, S::dim}));
  only.append(t, HostView<const float, 2>(row.data(), {1, S::latent_dim}));
  CHECK(single.length(t) == 2);
}

TEST_CASE("stale, foreign or mis-shaped reservations are typed errors that change nothing") {
  const CpuBackend cpu(1);
  const std::vector<Weights> w = layer_weights();
  PagedModel model;
  BlockAllocator& allocator = model.allocator;
  const index_t a = allocator.add_sequence();
  const index_t c = allocator.add_sequence();
  const index_t seq_a[] = {a};
  const index_t seq_c[] = {c};
  model.prefill(cpu, w, allocator.reserve(seq_a, 17), dt::random_tokens(17, S::dim, 1300));
  const std::vector<float> x = dt::random_tokens(1, S::dim, 1301);
  std::vector<float> out(x.size());
  const auto decode_layer = [&](int l, const SlotReservation& slots) {
    mla::decode(cpu, w[std::size_t(l)], model.caches[std::size_t(l)], slots,
                HostView<const float, 3>(x.data(), {1, 1, S::dim}),
                HostView<float, 3>(out.data(), {1, 1, S::dim}));
  };

  SUBCASE("a reservation of another sequence in the same step does not stale this one") {
    const SlotReservation step = allocator.reserve(seq_a, 1);
    const SlotReservation chunk = allocator.reserve(seq_c, 4);
    const std::vector<float> prompt = dt::random_tokens(4, S::dim, 1302);
    std::vector<float> chunk_out(prompt.size());
    for (int l = 0; l < kLayers; ++l) {
      decode_layer(l, step);
      mla::prefill(cpu, w[std::size_t(l)], model.caches[std::size_t(l)], chunk,
                   HostView<const float, 2>(prompt.data(), {4, S::dim}),
                   HostView<float, 2>(chunk_out.data(), {4, S::dim}));
    }
    CHECK(allocator.length(a) == 18);
    CHECK(allocator.length(c) == 4);
  }
  SUBCASE("a reservation is stale once its sequence changes again") {
    const SlotReservation step = allocator.reserve(seq_a, 1);
    decode_layer(0, step);
    SUBCASE("appended") { allocator.append(a, 1); }
    SUBCASE("reserved again") { (void)allocator.reserve(seq_a, 1); }
    SUBCASE("truncated") { allocator.truncate(a, 3); }
    SUBCASE("forked (its blocks are shared now)") { (void)allocator.fork(a); }
    const dt::AllocatorSnapshot before(allocator);
    const auto pool = dt::pool_bytes(model.caches[1]);
    const std::string error =
        dt::message_of<daedalus::InvalidArgument>([&] { decode_layer(1, step); });
    CHECK(dt::contains(error, "daedalus::mla::decode: 'slots' is stale: sequence 0 changed"));
    CHECK(dt::AllocatorSnapshot(allocator) == before);
    CHECK(dt::pool_bytes(model.caches[1]) == pool);
  }
  SUBCASE("a released sequence") {
    const SlotReservation step = allocator.reserve(seq_a, 1);
    allocator.release(a);
    CHECK_THROWS_WITH_AS(decode_layer(0, step), doctest::Contains("sequence 0 was released"),
                         daedalus::OutOfRange);
  }
  SUBCASE("another allocator's reservation") {
    BlockAllocator other(8, kBlock);
    const index_t s = other.add_sequence();
    const index_t seqs[] = {s};
    const SlotReservation foreign = other.reserve(seqs, 1);
    const dt::AllocatorSnapshot before(allocator);
    CHECK_THROWS_WITH_AS(decode_layer(0, foreign),
                         doctest::Contains("'slots' was reserved on another BlockAllocator"),
                         daedalus::InvalidArgument);
    CHECK(dt::AllocatorSnapshot(allocator) == before);
  }
  SUBCASE("activations that do not match the reservation") {
    const SlotReservation step = allocator.reserve(seq_a, 2);
    const dt::AllocatorSnapshot before(allocator);
    CHECK_THROWS_WITH_AS(decode_layer(0, step), doctest::Contains("'x' has extents [1,1,"),
                         daedalus::InvalidArgument);
    CHECK(dt::AllocatorSnapshot(allocator) == before);
    const index_t both[] = {a, c};
    const SlotReservation pair = allocator.reserve(both, 1);
    const std::vector<float> two = dt::random_tokens(1, S::dim, 1303);
    std::vector<float> two_out(two.size());
    CHECK_THROWS_WITH_AS(mla::prefill(cpu, w[0], model.caches[0], pair,
                                      HostView<const float, 2>(two.data(), {1, S::dim}),
                                      HostView<float, 2>(two_out.data(), {1, S::dim})),
                         doctest::Contains("'slots' reserves 2 sequences; expected 1"),
                         daedalus::InvalidArgument);
  }
  SUBCASE("reserve checks the whole batch before it changes anything") {
    const dt::AllocatorSnapshot before(allocator);
    const index_t twice[] = {a, c, a};
    CHECK_THROWS_WITH_AS((void)allocator.reserve(twice, 1),
                         doctest::Contains("daedalus::BlockAllocator::reserve: 'seqs' names "
                                           "sequence 0 twice (entries 0 and 2)"),
                         daedalus::InvalidArgument);
    const index_t unknown[] = {c, 7};
    CHECK_THROWS_WITH_AS((void)allocator.reserve(unknown, 1),
                         doctest::Contains("sequence 7 was never added"), daedalus::OutOfRange);
    // 64 blocks of 16: a and c together cannot take 40 blocks each.
    const index_t both[] = {a, c};
    CHECK_THROWS_AS((void)allocator.reserve(both, 40 * kBlock), daedalus::CapacityError);
    const index_t starts[] = {18, 0};
    CHECK_THROWS_WITH_AS((void)allocator.reserve(both, starts, 1),
                         doctest::Contains("'starts[0]' is 18"), daedalus::OutOfRange);
    CHECK(dt::AllocatorSnapshot(allocator) == before);
  }
}
