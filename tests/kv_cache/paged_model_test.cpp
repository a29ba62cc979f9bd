// SPDX-License-Identifier: Apache-2.0
// Model check of the paged cache: thousands of random add / append / rewrite / fork / truncate /
// release operations (and rejected ones) on a BlockAllocator with three layer pools (fp32, bf16,
// fp8), checked against a simple model, a vector of rows per sequence and layer. After every
// operation: lengths match, reference counts equal the number of sequences listing each block,
// the free count equals the unreferenced blocks, and a rejected operation changed nothing. The
// rows read back exactly (fp32) or within each storage type's bound, for the touched sequence
// after every operation and for all sequences every few operations. At the end every block is
// back in the pool.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/daedalus.hpp>
#include <map>
#include <set>
#include <vector>

#include "kv_cache/paged_support.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::BlockAllocator;
using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::Tiny;
using daedalus::testing::AllocatorSnapshot;
using daedalus::testing::pool_bytes;
using daedalus::testing::Random;
namespace tol = daedalus::testing::tolerance;

constexpr int kBlock = 16;
constexpr index_t kPoolBlocks = 24;
constexpr index_t D = daedalus::MlaShape<Tiny>::latent_dim;
constexpr index_t R = daedalus::MlaShape<Tiny>::kv_lora_rank;
constexpr int kLayers = 3;

using Fp32Layer = daedalus::PagedLatentCache<Tiny, CpuBackend, float, kBlock>;
using Bf16Layer = daedalus::PagedLatentCache<Tiny, CpuBackend, daedalus::bfloat16, kBlock>;
using Fp8Layer = daedalus::PagedLatentCache<Tiny, CpuBackend, daedalus::Fp8E4m3Latent, kBlock>;

/// The model: per live sequence, per layer, the fp32 rows written, row-major [length, D].
using Model = std::map<index_t, std::array<std::vector<float>, kLayers>>;

/// |read − x| within the fp8 row format's bound (storage.hpp), written from the documented
/// numbers: 2^-4·|x| + 2^-10·amax/448 (+ fp32 slack) for the latent, 2^-8·|x| for k_pe.
bool fp8_row_close(const float* read, const float* row) {
  double amax = 0.0;  // Tiny's 40-wide latent is one tile
  for (index_t i = 0; i < R; ++i) amax = std::max(amax, std::abs(double(row[i])));
  for (index_t i = 0; i < D; ++i) {
    const double x = row[i];
    const double bound = i < R
                             ? (0x1p-4 + 0x1p-21) * std::abs(x) + 0x1p-10 * amax / 448.0 * 1.000001
                             : 0x1p-8 * std::abs(x);
    if (!(std::abs(double(read[i]) - x) <= bound)) return false;
  }
  return true;
}

bool bf16_close(const std::vector<float>& read, const std::vector<float>& rows) {
  if (read.size() != rows.size()) return false;
  for (std::size_t i = 0; i < rows.size(); ++i)
    if (!(std::abs(double(read[i]) - double(rows[i])) <= tol::bf16_u * std::abs(double(rows[i]))))
      return false;
  return true;
}

struct Harness {
  BlockAllocator allocator{kPoolBlocks, kBlock};
  Fp32Layer fp32{allocator};
  Bf16Layer bf16{allocator};
  Fp8Layer fp8{allocator};
  Model model;
  std::vector<index_t> released;
  Random random;
  int rejected = 0, forks = 0, writes = 0, capacity_errors = 0;

  explicit Harness(std::uint64_t seed) : random(seed) {}

  index_t pick() {
    auto it = model.begin();
    std::advance(it, random.integer(0, index_t(model.size()) - 1));
    return it->first;
  }

  void check_contents(index_t seq) {
    const auto& expected = model.at(seq);
    CAPTURE(seq);
    REQUIRE(fp32.rows(seq) == expected[0]);
    REQUIRE(bf16_close(bf16.rows(seq), expected[1]));
    const std::vector<float> read = fp8.rows(seq);
    REQUIRE(read.size() == expected[2].size());
    for (std::size_t r = 0; r * D < read.size(); ++r)
      REQUIRE(fp8_row_close(read.data() + r * D, expected[2].data() + r * D));
  }

  /// Allocator invariants, derived from its public state independently of how it keeps it.
  void check_invariants() {
    REQUIRE(allocator.num_sequences() == index_t(model.size()));
    std::vector<int> references(kPoolBlocks, 0);
    for (const auto& [seq, rows] : model) {
      REQUIRE(allocator.contains(seq));
      const index_t length = index_t(rows[0].size()) / D;
      REQUIRE(allocator.length(seq) == length);
      const auto blocks = allocator.blocks(seq);
      REQUIRE(index_t(blocks.size()) == (length + kBlock - 1) / kBlock);
      std::set<std::int32_t> distinct(blocks.begin(), blocks.end());
      REQUIRE(distinct.size() == blocks.size());
      for (const std::int32_t b : blocks) {
        REQUIRE(b >= 0);
        REQUIRE(b < kPoolBlocks);
        ++references[std::size_t(b)];
      }
    }
    index_t unreferenced = 0;
    for (index_t b = 0; b < kPoolBlocks; ++b) {
      CAPTURE(b);
      REQUIRE(allocator.ref_count(b) == references[std::size_t(b)]);
      unreferenced += references[std::size_t(b)] == 0;
    }
    REQUIRE(allocator.num_free_blocks() == unreferenced);
    for (const index_t seq : released) REQUIRE_FALSE(allocator.contains(seq));
  }

  /// Blocks a write of rows [start, start + n) into `seq` must take, counted from public state:
  /// the missing blocks plus a copy of each shared block among those it writes, less nothing
  /// (a truncating write frees blocks only past the new end, counted in `freed`).
  bool write_fits(index_t seq, index_t start, index_t n) {
    const auto blocks = allocator.blocks(seq);
    const index_t end = start + n;
    const index_t keep = (end + kBlock - 1) / kBlock;
    index_t need = std::max<index_t>(0, keep - index_t(blocks.size())), freed = 0;
    for (index_t j = 0; j < index_t(blocks.size()); ++j) {
      const bool written = n > 0 && j >= start / kBlock && j < keep;
      const int refs = allocator.ref_count(blocks[std::size_t(j)]);
      if (written && refs > 1) ++need;
      if (j >= keep && refs == 1) ++freed;
    }
    return need <= allocator.num_free_blocks() + freed;
  }

  void write(index_t seq, index_t start, index_t n) {
    std::array<std::vector<float>, kLayers> rows;
    for (auto& layer : rows) {
      layer = random.uniform(std::size_t(n * D), 2.0);
      // Vary the scale per row so fp8 tiles differ by orders of magnitude.
      for (index_t r = 0; r < n; ++r) {
        const float s = float(std::exp2(random.next(-6.0, 6.0)));
        for (index_t i = 0; i < D; ++i) layer[std::size_t(r * D + i)] *= s;
      }
    }
    const bool fits = write_fits(seq, start, n);
    const AllocatorSnapshot before(allocator);
    const auto bytes = pool_bytes(fp32);
    try {
      fp32.write(seq, start, HostView<const float, 2>(rows[0].data(), {n, D}));
    } catch (const daedalus::CapacityError&) {
      REQUIRE_FALSE(fits);
      REQUIRE(AllocatorSnapshot(allocator) == before);
      REQUIRE(pool_bytes(fp32) == bytes);
      ++capacity_errors;
      return;
    }
    REQUIRE(fits);
    // The other layers write the same positions; no further blocks are needed.
    const index_t free_after_first = allocator.num_free_blocks();
    bf16.write(seq, start, HostView<const float, 2>(rows[1].data(), {n, D}));
    fp8.write(seq, start, HostView<const float, 2>(rows[2].data(), {n, D}));
    REQUIRE(allocator.num_free_blocks() == free_after_first);
    for (int l = 0; l < kLayers; ++l) {
      auto& expected = model.at(seq)[std::size_t(l)];
      expected.resize(std::size_t(start * D));
      expected.insert(expected.end(), rows[std::size_t(l)].begin(), rows[std::size_t(l)].end());
    }
    ++writes;
  }

  void step() {
    const index_t op = model.empty() ? 0 : random.integer(0, 99);
    if (op < 8) {  // add
      if (model.size() >= 10) return;
      const index_t seq = allocator.add_sequence();
      REQUIRE_FALSE(model.count(seq));
      model[seq];
    } else if (op < 45) {  // append a chunk (prefill) or one token (decode)
      const index_t seq = pick();
      const index_t n = random.integer(0, 3) == 0 ? random.integer(0, 64) : 1;
      write(seq, allocator.length(seq), n);
      check_contents(seq);
    } else if (op < 55) {  // rewrite from an earlier position (chunked prefill recomputed)
      const index_t seq = pick();
      const index_t start = random.integer(0, allocator.length(seq));
      write(seq, start, random.integer(0, 24));
      check_contents(seq);
    } else if (op < 70) {  // fork, whole or a prefix
      if (model.size() >= 12) return;
      const index_t parent = pick();
      const index_t length = allocator.length(parent);
      const index_t prefix = random.integer(0, 1) ? length : random.integer(0, length);
      const index_t free_before = allocator.num_free_blocks();
      const index_t child = allocator.fork(parent, prefix);
      REQUIRE(allocator.num_free_blocks() == free_before);  // sharing takes no block
      auto rows = model.at(parent);
      for (auto& layer : rows) layer.resize(std::size_t(prefix * D));
      model[child] = rows;
      ++forks;
      check_contents(child);
    } else if (op < 82) {  // truncate
      const index_t seq = pick();
      const index_t length = random.integer(0, allocator.length(seq));
      const index_t free_before = allocator.num_free_blocks();
      allocator.truncate(seq, length);
      REQUIRE(allocator.num_free_blocks() >= free_before);  // never copies
      for (auto& layer : model.at(seq)) layer.resize(std::size_t(length * D));
      check_contents(seq);
    } else if (op < 92) {  // release
      const index_t seq = pick();
      allocator.release(seq);
      model.erase(seq);
      released.push_back(seq);
    } else {  // a rejected operation: nothing may change
      const AllocatorSnapshot before(allocator);
      const auto bytes = pool_bytes(fp8);
      std::vector<float> row = random.uniform(std::size_t(D));
      const HostView<const float, 2> one(row.data(), {1, D});
      const index_t seq = pick();
      switch (random.integer(0, 4)) {
        case 0:
          if (released.empty()) return;
          REQUIRE_THROWS_AS(
              fp8.append(released[std::size_t(random.integer(0, index_t(released.size()) - 1))],
                         one),
              daedalus::OutOfRange);
          break;
        case 1:
          REQUIRE_THROWS_AS(allocator.fork(seq + 1000), daedalus::OutOfRange);
          break;
        case 2:
          REQUIRE_THROWS_AS(allocator.truncate(seq, allocator.length(seq) + 1),
                            daedalus::OutOfRange);
          break;
        case 3:
          REQUIRE_THROWS_AS(fp32.write(seq, allocator.length(seq) + 1, one), daedalus::OutOfRange);
          break;
        default:
          row[std::size_t(random.integer(0, D - 1))] = std::nanf("");
          // Capacity is checked before values: a full pool reports that first.
          if (write_fits(seq, allocator.length(seq), 1))
            REQUIRE_THROWS_AS(fp8.write(seq, allocator.length(seq), one), daedalus::NumericError);
          else
            REQUIRE_THROWS_AS(fp8.write(seq, allocator.length(seq), one), daedalus::CapacityError);
          break;
      }
      REQUIRE(AllocatorSnapshot(allocator) == before);
      REQUIRE(pool_bytes(fp8) == bytes);
      ++rejected;
    }
  }
};

}  // namespace

TEST_CASE("PagedLatentCache: random operations against a vector-of-rows model") {
  for (std::uint64_t run = 0; run < 2; ++run) {
    Harness harness(950 + run);
    constexpr int kOperations = 2500;
    for (int i = 0; i < kOperations; ++i) {
      CAPTURE(run);
      CAPTURE(i);
      harness.step();
      harness.check_invariants();
      if (i % 25 == 0)
        for (const auto& [seq, rows] : harness.model) harness.check_contents(seq);
    }
    for (const auto& [seq, rows] : harness.model) harness.check_contents(seq);
    // The run exercised what it claims to: sharing, writes, exhaustion and rejected calls.
    CHECK(harness.forks > 100);
    CHECK(harness.writes > 500);
    CHECK(harness.capacity_errors > 0);
    CHECK(harness.rejected > 50);
    for (const auto& [seq, rows] : harness.model) harness.allocator.release(seq);
    harness.model.clear();
    CHECK(harness.allocator.num_free_blocks() == kPoolBlocks);
    for (index_t b = 0; b < kPoolBlocks; ++b) CHECK(harness.allocator.ref_count(b) == 0);
  }
}
