// SPDX-License-Identifier: Apache-2.0
// BlockAllocator and PagedLatentCache: block lists, prefix sharing by fork, copy on write in
// every registered pool, truncate and release, block tables, the exact batch capacity check,
// and that every rejected call names its problem and changes nothing (allocator and pools).
#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <daedalus/daedalus.hpp>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kv_cache/paged_support.hpp"
#include "support/random.hpp"

namespace {

using daedalus::BlockAllocator;
using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::Tiny;
using daedalus::testing::AllocatorSnapshot;
using daedalus::testing::contains;
using daedalus::testing::message_of;
using daedalus::testing::pool_bytes;
using daedalus::testing::Random;

constexpr int kBlock = 16;
constexpr index_t D = daedalus::MlaShape<Tiny>::latent_dim;
using Fp32Cache = daedalus::PagedLatentCache<Tiny, CpuBackend, float, kBlock>;
using Fp8Cache = daedalus::PagedLatentCache<Tiny, CpuBackend, daedalus::Fp8E4m3Latent, kBlock>;

HostView<const float, 2> view(const std::vector<float>& rows) {
  return {rows.data(), {index_t(rows.size()) / D, D}};
}
std::vector<std::int32_t> blocks_of(const BlockAllocator& allocator, index_t seq) {
  const auto b = allocator.blocks(seq);
  return {b.begin(), b.end()};
}

}  // namespace

TEST_CASE("BlockAllocator: sequences take blocks in order and give them back") {
  BlockAllocator allocator(8, kBlock);
  CHECK(allocator.num_free_blocks() == 8);
  const index_t a = allocator.add_sequence();
  const index_t b = allocator.add_sequence();
  CHECK(a != b);
  CHECK(allocator.length(a) == 0);
  CHECK(allocator.blocks(a).empty());
  allocator.append(a, 20);  // two blocks, the second partial
  CHECK(allocator.length(a) == 20);
  CHECK(blocks_of(allocator, a) == std::vector<std::int32_t>{0, 1});
  allocator.append(b, 16);
  CHECK(blocks_of(allocator, b) == std::vector<std::int32_t>{2});
  allocator.append(a, 12);  // fills block 1 exactly
  CHECK(blocks_of(allocator, a) == std::vector<std::int32_t>{0, 1});
  allocator.append(a, 1);
  CHECK(blocks_of(allocator, a) == std::vector<std::int32_t>{0, 1, 3});
  CHECK(allocator.num_free_blocks() == 4);
  allocator.truncate(a, 17);
  CHECK(blocks_of(allocator, a) == std::vector<std::int32_t>{0, 1});
  CHECK(allocator.ref_count(3) == 0);
  allocator.resize(a, 40);
  CHECK(allocator.length(a) == 40);
  CHECK(allocator.blocks(a).size() == 3);
  allocator.release(a);
  allocator.release(b);
  CHECK(allocator.num_free_blocks() == 8);
  CHECK(allocator.num_sequences() == 0);
  for (index_t k = 0; k < 8; ++k) CHECK(allocator.ref_count(k) == 0);
}

TEST_CASE("BlockAllocator: fork shares every block; a write copies only the block it touches") {
  BlockAllocator allocator(16, kBlock);
  Fp32Cache cache(allocator);
  Random random(901);
  const index_t parent = allocator.add_sequence();
  const std::vector<float> prompt = random.uniform(40 * D);
  cache.append(parent, view(prompt));  // blocks 0, 1 full, 2 holds 8 rows
  const index_t child = allocator.fork(parent);
  CHECK(blocks_of(allocator, child) == blocks_of(allocator, parent));
  for (const std::int32_t k : allocator.blocks(parent)) CHECK(allocator.ref_count(k) == 2);
  CHECK(allocator.num_free_blocks() == 13);  // sharing took no block

  const std::vector<float> more = random.uniform(3 * D);
  cache.append(child, view(more));
  // Full blocks stay shared; the partial last block was copied before the child wrote into it.
  CHECK(allocator.blocks(child)[0] == allocator.blocks(parent)[0]);
  CHECK(allocator.blocks(child)[1] == allocator.blocks(parent)[1]);
  CHECK(allocator.blocks(child)[2] != allocator.blocks(parent)[2]);
  CHECK(allocator.ref_count(allocator.blocks(parent)[2]) == 1);
  CHECK(allocator.ref_count(allocator.blocks(parent)[0]) == 2);
  CHECK(cache.rows(parent) == prompt);
  std::vector<float> expected = prompt;
  expected.insert(expected.end(), more.begin(), more.end());
  CHECK(cache.rows(child) == expected);

  // The parent appends after its partial block, which it now holds alone: no copy.
  const std::vector<std::int32_t> before = blocks_of(allocator, parent);
  cache.append(parent, view(random.uniform(2 * D)));
  CHECK(blocks_of(allocator, parent) == before);

  // Rewriting a full shared block copies it (rows before the write position survive).
  const std::vector<float> rewrite = random.uniform(2 * D);
  cache.write(child, 5, view(rewrite));
  CHECK(allocator.length(child) == 7);
  CHECK(allocator.blocks(child).size() == 1);
  CHECK(allocator.blocks(child)[0] != allocator.blocks(parent)[0]);
  std::vector<float> rewritten(prompt.begin(), prompt.begin() + 5 * D);
  rewritten.insert(rewritten.end(), rewrite.begin(), rewrite.end());
  CHECK(cache.rows(child) == rewritten);
  CHECK(std::equal(prompt.begin(), prompt.end(), cache.rows(parent).begin()));

  // A prefix fork shares only the blocks the prefix spans; truncating never copies.
  const index_t prefix = allocator.fork(parent, 17);
  CHECK(allocator.length(prefix) == 17);
  CHECK(blocks_of(allocator, prefix) ==
        std::vector<std::int32_t>(allocator.blocks(parent).begin(),
                                  allocator.blocks(parent).begin() + 2));
  const index_t free_before = allocator.num_free_blocks();
  allocator.truncate(prefix, 3);
  CHECK(allocator.num_free_blocks() == free_before);
  CHECK(allocator.blocks(prefix)[0] == allocator.blocks(parent)[0]);
  CHECK(allocator.ref_count(allocator.blocks(parent)[0]) == 2);
  CHECK(std::equal(prompt.begin(), prompt.begin() + 3 * D, cache.rows(prefix).begin()));

  for (const index_t seq : allocator.sequences()) allocator.release(seq);
  CHECK(allocator.num_free_blocks() == 16);
}

TEST_CASE("BlockAllocator: copy on write reaches every registered pool; moves re-register") {
  BlockAllocator allocator(6, kBlock);
  Random random(902);
  std::vector<Fp32Cache> fp32_layers;
  fp32_layers.emplace_back(allocator);
  fp32_layers.emplace_back(allocator);  // may move the first: it must stay registered
  Fp8Cache fp8_layer(allocator);
  CHECK(allocator.num_pools() == 3);
  const index_t parent = allocator.add_sequence();
  std::vector<std::vector<float>> rows;
  for (int layer = 0; layer < 3; ++layer) rows.push_back(random.uniform(20 * D));
  // Every layer writes the same positions; the length ends at 20 after each.
  fp32_layers[0].write(parent, 0, view(rows[0]));
  fp32_layers[1].write(parent, 0, view(rows[1]));
  fp8_layer.write(parent, 0, view(rows[2]));
  CHECK(allocator.length(parent) == 20);
  const std::vector<float> fp8_before = fp8_layer.rows(parent);

  const index_t child = allocator.fork(parent);
  const std::vector<float> token = random.uniform(D);
  fp32_layers[0].write(child, 20, view(token));  // copies block 1 in all three pools
  CHECK(allocator.length(child) == 21);
  fp32_layers[1].write(child, 20, view(token));  // later layers write the same position
  fp8_layer.write(child, 20, view(token));
  CHECK(std::equal(rows[0].begin(), rows[0].end(), fp32_layers[0].rows(child).begin()));
  CHECK(std::equal(rows[1].begin(), rows[1].end(), fp32_layers[1].rows(child).begin()));
  // The fp8 copy is a byte copy: the child reads back exactly what the parent holds.
  CHECK(std::equal(fp8_before.begin(), fp8_before.end(), fp8_layer.rows(child).begin()));
  CHECK(fp8_layer.rows(parent) == fp8_before);

  {
    Fp32Cache temporary(allocator);
    CHECK(allocator.num_pools() == 4);
  }
  CHECK(allocator.num_pools() == 3);
}

TEST_CASE("BlockAllocator: block tables list blocks in the order asked, padded with -1") {
  BlockAllocator allocator(10, kBlock);
  const index_t a = allocator.add_sequence();
  const index_t b = allocator.add_sequence();
  const index_t c = allocator.add_sequence();
  allocator.append(a, 33);  // 3 blocks
  allocator.append(b, 16);  // 1 block
  const std::array<index_t, 4> order{b, c, a, b};
  const daedalus::BlockTable table = allocator.block_table(order);
  CHECK(table.batch() == 4);
  CHECK(table.max_blocks == 3);
  CHECK(table.seqlens == std::vector<std::int32_t>{16, 0, 33, 16});
  CHECK(table.table == std::vector<std::int32_t>{3, -1, -1, -1, -1, -1, 0, 1, 2, 3, -1, -1});

  Fp32Cache cache(allocator);
  daedalus::BlockTable storage;
  const auto paged = cache.view(order, storage);
  CHECK(paged.pool == cache.pool_data());
  CHECK(paged.num_blocks == 10);
  CHECK(paged.batch() == 4);
  CHECK(paged.max_blocks() == 3);
  CHECK(paged.block_table(2, 1) == 1);
  CHECK(paged.cache_seqlens(0) == 16);
  paged.validate("test");
  CHECK(paged.row(2, 17) == cache.row_pointer(1, 1));

  // A block table pointing outside the pool is rejected before any kernel reads it; entries
  // past a sequence's blocks (-1) are not read and may hold anything.
  std::vector<std::int32_t> bad = storage.table;
  bad[2 * 3 + 1] = 10;  // sequence a's second block: one past the pool
  const daedalus::PagedLatentView<Tiny, float, kBlock> outside{
      cache.pool_data(), cache.num_blocks(), HostView<const std::int32_t, 2>(bad.data(), {4, 3}),
      HostView<const std::int32_t, 1>(storage.seqlens.data(), {4})};
  CHECK(contains(message_of<daedalus::OutOfRange>([&] { outside.validate("test"); }),
                 "'block_table[2,1]' is 10; expected a block id in [0, 10)"));
}

TEST_CASE("BlockAllocator::check_writes counts a batch's copies and new blocks exactly") {
  BlockAllocator allocator(4, kBlock);
  const index_t parent = allocator.add_sequence();
  allocator.append(parent, 20);  // blocks 0, 1 (partial)
  const index_t first = allocator.fork(parent);
  allocator.release(parent);  // block 1 now shared by the two forks only
  const index_t second = allocator.fork(first);
  allocator.release(first);
  const index_t third = allocator.fork(second);
  CHECK(allocator.ref_count(1) == 2);
  CHECK(allocator.num_free_blocks() == 2);
  // Each alone needs one copy of block 1; together too: after the first copies, the second
  // holds block 1 alone. Summing blocks_needed would say 2.
  const std::array<index_t, 2> seqs{second, third};
  const std::array<index_t, 2> starts{20, 20};
  CHECK(allocator.blocks_needed(second, 20, 1) + allocator.blocks_needed(third, 20, 1) == 2);
  CHECK_NOTHROW(allocator.check_writes("test", seqs, starts, 1));
  // 13 rows: the first fills block 1's copy and needs a new block; the second keeps block 1 and
  // needs a new one: 3 > 2 free.
  const AllocatorSnapshot before(allocator);
  const std::string message = message_of<daedalus::CapacityError>(
      [&] { allocator.check_writes("test", seqs, starts, 13); });
  CHECK(contains(message, "test: the block pool is exhausted"));
  CHECK(AllocatorSnapshot(allocator) == before);
  // Writing the same sequence twice in one batch: the second start is checked against the
  // length after the first write.
  const std::array<index_t, 2> same{second, second};
  const std::array<index_t, 2> same_starts{20, 21};
  CHECK_NOTHROW(allocator.check_writes("test", same, same_starts, 1));
  const std::array<index_t, 2> beyond{20, 22};
  CHECK(contains(
      message_of<daedalus::OutOfRange>([&] { allocator.check_writes("test", same, beyond, 1); }),
      "'starts[1]' is 22; expected a position in [0, 21]"));
  const std::array<index_t, 1> one{20};
  CHECK_THROWS_AS(allocator.check_writes("test", seqs, one, 1), daedalus::InvalidArgument);
}

TEST_CASE("BlockAllocator and PagedLatentCache: bad input throws a typed error, changes nothing") {
  CHECK(contains(message_of<daedalus::InvalidArgument>([] { BlockAllocator(-1, 16); }),
                 "'num_blocks' is -1"));
  CHECK(contains(message_of<daedalus::InvalidArgument>([] { BlockAllocator(4, 0); }),
                 "'block_size' is 0; expected at least 1"));
  BlockAllocator wrong_size(4, 8);
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] { Fp32Cache cache(wrong_size); }),
                 "the allocator's block_size is 8; expected 16"));
  CHECK(wrong_size.num_pools() == 0);

  BlockAllocator allocator(4, kBlock);
  Fp32Cache cache(allocator);
  Fp8Cache fp8(allocator);
  Random random(903);
  const index_t a = allocator.add_sequence();
  cache.write(a, 0, view(random.uniform(40 * D)));  // 3 of 4 blocks
  fp8.write(a, 0, view(random.uniform(40 * D)));
  const index_t released = allocator.add_sequence();
  allocator.release(released);
  const index_t shared = allocator.fork(a);

  const AllocatorSnapshot before(allocator);
  const auto bytes = pool_bytes(cache);
  const auto fp8_bytes = pool_bytes(fp8);
  const auto unchanged = [&] {
    return AllocatorSnapshot(allocator) == before && pool_bytes(cache) == bytes &&
           pool_bytes(fp8) == fp8_bytes;
  };

  // Pool exhausted: 40 + 30 tokens need 5 blocks.
  CHECK(contains(message_of<daedalus::CapacityError>(
                     [&] { cache.write(a, 40, view(random.uniform(30 * D))); }),
                 "daedalus::PagedLatentCache::write: the block pool is exhausted: sequence 0 "
                 "needs 3 free blocks (2 new, 1 copy-on-write copies of shared blocks) to hold 70 "
                 "tokens; 1 of the pool's 4 blocks of 16 tokens are free"));
  CHECK(unchanged());
  // A write into the shared partial block needs a copy and a new block: only one is free.
  CHECK_THROWS_AS(cache.write(shared, 40, view(random.uniform(9 * D))), daedalus::CapacityError);
  CHECK(unchanged());
  CHECK_THROWS_AS(allocator.append(a, 100), daedalus::CapacityError);
  CHECK_THROWS_AS(allocator.resize(shared, 100), daedalus::CapacityError);
  CHECK(unchanged());
  // Released and unknown sequences.
  CHECK(contains(
      message_of<daedalus::OutOfRange>([&] { cache.append(released, view(random.uniform(D))); }),
      "daedalus::PagedLatentCache::append: sequence 1 was released; expected a live "
      "sequence id"));
  CHECK(contains(message_of<daedalus::OutOfRange>([&] { allocator.fork(99); }),
                 "daedalus::BlockAllocator::fork: sequence 99 was never added"));
  CHECK_THROWS_AS(allocator.fork(released), daedalus::OutOfRange);
  CHECK_THROWS_AS(allocator.append(released, 1), daedalus::OutOfRange);
  CHECK_THROWS_AS(allocator.release(released), daedalus::OutOfRange);
  CHECK_THROWS_AS(allocator.truncate(-3, 0), daedalus::OutOfRange);
  CHECK_THROWS_AS((void)allocator.length(99), daedalus::OutOfRange);
  CHECK_THROWS_AS((void)allocator.block_table(std::array<index_t, 2>{a, 99}), daedalus::OutOfRange);
  CHECK(unchanged());
  // Lengths and positions.
  CHECK(contains(message_of<daedalus::OutOfRange>([&] { allocator.fork(a, 41); }),
                 "'prefix_length' is 41; expected a length in [0, 40]"));
  CHECK(contains(message_of<daedalus::OutOfRange>([&] { allocator.truncate(a, 41); }),
                 "'new_length' is 41; expected a length in [0, 40]"));
  CHECK_THROWS_AS(allocator.resize(a, -1), daedalus::OutOfRange);
  CHECK_THROWS_AS(allocator.append(a, -1), daedalus::InvalidArgument);
  CHECK(contains(
      message_of<daedalus::OutOfRange>([&] { cache.write(a, 41, view(random.uniform(D))); }),
      "'start_pos' is 41; expected a position in [0, 40]"));
  CHECK_THROWS_AS((void)allocator.ref_count(4), daedalus::OutOfRange);
  CHECK(unchanged());
  // Shapes and values.
  std::vector<float> wide = random.uniform(2 * (D + 1));
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] {
                   cache.write(a, 0, HostView<const float, 2>(wide.data(), {2, D + 1}));
                 }),
                 "'rows' has extents [2,49]; expected [2,48]"));
  std::vector<float> poisoned = random.uniform(3 * D);
  poisoned[D + 7] = std::numeric_limits<float>::quiet_NaN();
  CHECK(contains(message_of<daedalus::NumericError>([&] { fp8.write(a, 38, view(poisoned)); }),
                 "non-finite value (nan) at row 1, column 7"));
  poisoned[D + 7] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(cache.write(shared, 10, view(poisoned)), daedalus::NumericError);
  std::vector<float> out(2 * D);
  CHECK_THROWS_AS(cache.read(a, 39, HostView<float, 2>(out.data(), {2, D})), daedalus::OutOfRange);
  CHECK(unchanged());
}

TEST_CASE("BlockAllocator::check_writes agrees with applying the writes one by one") {
  Random random(904);
  int passed = 0, refused = 0;
  for (int trial = 0; trial < 300; ++trial) {
    BlockAllocator allocator(12, 8);
    // A random family of sequences sharing blocks: a root, forks of forks, some releases.
    std::vector<index_t> live{allocator.add_sequence()};
    allocator.append(live[0], random.integer(0, 70));
    for (int k = 0; k < 6; ++k) {
      const index_t parent = live[std::size_t(random.integer(0, index_t(live.size()) - 1))];
      live.push_back(allocator.fork(parent, random.integer(0, allocator.length(parent))));
      if (random.integer(0, 3) == 0 && live.size() > 2) {
        allocator.release(live.front());
        live.erase(live.begin());
      }
    }
    // A batch: some sequences (maybe repeated), each written at a start within its length as
    // it will be when its turn comes.
    const index_t n = random.integer(0, 20);
    std::vector<index_t> seqs, starts;
    std::vector<index_t> lengths(live.size());
    for (std::size_t i = 0; i < live.size(); ++i) lengths[i] = allocator.length(live[i]);
    for (index_t b = random.integer(1, 5); b > 0; --b) {
      const std::size_t i = std::size_t(random.integer(0, index_t(live.size()) - 1));
      seqs.push_back(live[i]);
      starts.push_back(random.integer(0, 1) ? lengths[i] : random.integer(0, lengths[i]));
      lengths[i] = starts.back() + n;
    }
    bool predicted = true;
    try {
      allocator.check_writes("test", seqs, starts, n);
    } catch (const daedalus::CapacityError&) {
      predicted = false;
    }
    bool applied = true;
    for (std::size_t b = 0; b < seqs.size() && applied; ++b) {
      try {
        allocator.prepare_write("test", seqs[b], starts[b], n);
      } catch (const daedalus::CapacityError&) {
        applied = false;
      }
    }
    CAPTURE(trial);
    REQUIRE(predicted == applied);
    (predicted ? passed : refused) += 1;
  }
  // Both outcomes occur, so the agreement means something.
  CHECK(passed > 30);
  CHECK(refused > 30);
}

TEST_CASE("BlockAllocator: pools keep their allocator alive, so either may be destroyed first") {
  // An engine's struct that declares its pools before the allocator destroys the allocator
  // first. Each pool holds a handle of the allocator's state: it keeps working and unregisters
  // cleanly (under AddressSanitizer a pool reaching a freed allocator is a reported error).
  Random rng(71);
  const std::vector<float> rows = rng.uniform(std::size_t(20) * D);
  std::vector<Fp32Cache> pools;
  index_t seq = -1;
  {
    BlockAllocator allocator(8, kBlock);
    pools.emplace_back(allocator);
    pools.emplace_back(allocator);
    seq = allocator.add_sequence();
    CHECK(pools[0].allocator() == allocator);
    CHECK(allocator.num_pools() == 2);
  }
  pools[0].write(seq, 0, view(rows));
  pools[1].write(seq, 0, view(rows));
  BlockAllocator allocator = pools[0].allocator();
  CHECK(allocator == pools[1].allocator());
  CHECK(allocator.length(seq) == 20);
  const index_t child = allocator.fork(seq, 10);
  // The write copies the shared block in both pools (the 10 rows before it), then writes pool 1.
  pools[1].write(child, 10, view(std::vector<float>(rows.begin() + 10 * D, rows.begin() + 12 * D)));
  CHECK(pools[1].rows(child) == std::vector<float>(rows.begin(), rows.begin() + 12 * D));
  const std::vector<float> copied = pools[0].rows(child);
  CHECK(std::vector<float>(copied.begin(), copied.begin() + 10 * D) ==
        std::vector<float>(rows.begin(), rows.begin() + 10 * D));
  CHECK(pools[0].rows(seq) == rows);
  pools.pop_back();
  CHECK(allocator.num_pools() == 1);
  pools.clear();
  CHECK(allocator.num_pools() == 0);
  CHECK(allocator.length(child) == 12);
}

TEST_CASE("BlockAllocator: a pool made from a temporary handle shares the allocator") {
  std::vector<Fp32Cache> pools;
  pools.emplace_back(BlockAllocator(4, kBlock));
  BlockAllocator allocator = pools[0].allocator();
  CHECK(allocator.num_pools() == 1);
  const index_t seq = allocator.add_sequence();
  Random rng(72);
  pools[0].write(seq, 0, view(rng.uniform(std::size_t(3) * D)));
  CHECK(pools[0].length(seq) == 3);
  CHECK(allocator.num_free_blocks() == 3);
}

TEST_CASE("Contiguous and paged caches name and list their sequences the same way") {
  // Generic code walks either cache by num_sequences / contains / sequences and reads each
  // sequence by its id.
  const auto listing = [](const auto& cache) {
    std::vector<std::pair<index_t, index_t>> out;
    for (const index_t seq : cache.sequences()) {
      CHECK(cache.contains(seq));
      out.emplace_back(seq, cache.length(seq));
    }
    CHECK(index_t(out.size()) == cache.num_sequences());
    return out;
  };
  Random random(73);
  daedalus::ContiguousLatentCache<Tiny> contiguous(3, 40);
  BlockAllocator allocator = Fp32Cache::make_allocator(8);
  CHECK(allocator.block_size() == kBlock);  // stated once, in the cache type
  Fp32Cache paged(allocator);
  for (index_t s = 0; s < 3; ++s) CHECK(allocator.add_sequence() == s);
  for (index_t s = 0; s < 3; ++s) {
    const std::vector<float> rows = random.uniform(std::size_t(5 + s) * D);
    contiguous.write(s, 0, view(rows));
    paged.write(s, 0, view(rows));
  }
  CHECK(listing(contiguous) == listing(paged));
  CHECK_FALSE(contiguous.contains(3));
  CHECK_FALSE(paged.contains(3));
  allocator.release(1);
  CHECK_FALSE(paged.contains(1));
  CHECK(paged.sequences() == std::vector<index_t>{0, 2});
}
