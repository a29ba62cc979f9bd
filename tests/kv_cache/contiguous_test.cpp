// SPDX-License-Identifier: Apache-2.0
// ContiguousLatentCache: append / write / truncate / clear, per-sequence capacities, read-back
// accuracy per storage type, and that every rejected call names its problem and leaves the
// cache exactly as it was.
#include <doctest/doctest.h>

#include <cmath>
#include <daedalus/daedalus.hpp>
#include <limits>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/mla_fixture.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::HostView;
using daedalus::index_t;
using daedalus::Tiny;
using daedalus::testing::cached_rows;
using daedalus::testing::CacheSnapshot;
using daedalus::testing::Random;
namespace tol = daedalus::testing::tolerance;

template <class Storage>
using Cache = daedalus::ContiguousLatentCache<Tiny, daedalus::CpuBackend, Storage>;
constexpr index_t D = daedalus::MlaShape<Tiny>::latent_dim;

HostView<const float, 2> view(const std::vector<float>& rows) {
  return {rows.data(), {index_t(rows.size()) / D, D}};
}

/// True when every read-back value is within the storage type's round-trip bound of what was
/// written (exact for fp32).
template <class Storage>
bool round_trips(const std::vector<float>& read, const std::vector<float>& written) {
  constexpr tol::RoundTrip bound = tol::round_trip<Storage>();
  if (read.size() != written.size()) return false;
  for (std::size_t i = 0; i < read.size(); ++i) {
    const double err = std::abs(double(read[i]) - double(written[i]));
    if (err > bound.relative * std::abs(double(written[i])) + bound.absolute) return false;
  }
  return true;
}

using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("ContiguousLatentCache: a new cache is empty with the capacities asked for",
                   Storage, float, daedalus::bfloat16, daedalus::half) {
  const Cache<Storage> cache(3, 17);
  CHECK(cache.num_sequences() == 3);
  for (index_t s = 0; s < 3; ++s) {
    CHECK(cache.capacity(s) == 17);
    CHECK(cache.length(s) == 0);
    CHECK(cache.rows(s).extents() == std::array<index_t, 2>{0, D});
  }
  CHECK(Cache<Storage>::latent_dim == 48);
  CHECK(Cache<Storage>::bytes_per_token() == 48 * sizeof(Storage));
  CHECK(cache.bytes() == 3 * 17 * 48 * sizeof(Storage));

  const Cache<Storage> varied(std::vector<index_t>{4, 0, 9});
  CHECK(varied.num_sequences() == 3);
  CHECK(varied.capacity(0) == 4);
  CHECK(varied.capacity(1) == 0);
  CHECK(varied.capacity(2) == 9);
  CHECK(varied.bytes() == 13 * 48 * sizeof(Storage));
}

TEST_CASE_TEMPLATE(
    "ContiguousLatentCache: append and write read back exactly (fp32) or within one rounding",
    Storage, float, daedalus::bfloat16, daedalus::half) {
  Random rng(101);
  Cache<Storage> cache(std::vector<index_t>{10, 6, 8});
  const std::vector<float> a = rng.uniform(4 * D);
  const std::vector<float> b = rng.uniform(3 * D);
  const std::vector<float> c = rng.uniform(6 * D);
  cache.append(0, view(a));
  cache.append(0, view(b));  // after a
  cache.append(1, view(c));  // fills sequence 1 exactly
  CHECK(cache.length(0) == 7);
  CHECK(cache.length(1) == 6);
  CHECK(cache.length(2) == 0);

  std::vector<float> ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  CHECK(round_trips<Storage>(cached_rows(cache, 0), ab));
  CHECK(round_trips<Storage>(cached_rows(cache, 1), c));
  if constexpr (std::is_same_v<Storage, float>) {
    CHECK(cached_rows(cache, 0) == ab);  // fp32 stores the values themselves
  }
  // Sequences do not overlap: sequence 1's rows are untouched by sequence 0's appends.
  cache.append(2, view(b));
  CHECK(round_trips<Storage>(cached_rows(cache, 1), c));
  CHECK(round_trips<Storage>(cached_rows(cache, 2), b));

  SUBCASE("write at start_pos overwrites from there and sets the length to start_pos + n") {
    const std::vector<float> d = rng.uniform(2 * D);
    cache.write(0, 3, view(d));
    CHECK(cache.length(0) == 5);
    std::vector<float> expected(a.begin(), a.begin() + 3 * D);
    expected.insert(expected.end(), d.begin(), d.end());
    CHECK(round_trips<Storage>(cached_rows(cache, 0), expected));
    // Writing at the current length is an append.
    cache.write(0, 5, view(d));
    CHECK(cache.length(0) == 7);
  }
  SUBCASE("write of zero rows at start_pos truncates to start_pos") {
    cache.write(0, 2, HostView<const float, 2>(a.data(), {0, D}));
    CHECK(cache.length(0) == 2);
    CHECK(round_trips<Storage>(cached_rows(cache, 0),
                               std::vector<float>(a.begin(), a.begin() + 2 * D)));
  }
  SUBCASE("truncate keeps the first rows; clear empties one sequence or all") {
    cache.truncate(0, 5);
    CHECK(cache.length(0) == 5);
    CHECK(round_trips<Storage>(cached_rows(cache, 0),
                               std::vector<float>(ab.begin(), ab.begin() + 5 * D)));
    cache.truncate(0, 5);  // to the current length: no change
    CHECK(cache.length(0) == 5);
    cache.clear(1);
    CHECK(cache.length(1) == 0);
    CHECK(cache.length(0) == 5);
    CHECK(cache.capacity(1) == 6);  // capacity stays reserved
    cache.append(1, view(c));       // and can be filled again
    CHECK(round_trips<Storage>(cached_rows(cache, 1), c));
    cache.clear();
    for (index_t s = 0; s < 3; ++s) CHECK(cache.length(s) == 0);
  }
}

TEST_CASE("ContiguousLatentCache: bf16 and fp16 round to nearest, not truncate") {
  // 1 + 3·2^-9 lies 3/4 of the way from 1 to the next bf16 (1 + 2^-7): nearest is 1 + 2^-7.
  std::vector<float> row(D, 1.0f + 3.0f * 0x1p-9f);
  Cache<daedalus::bfloat16> bf(1, 1);
  bf.append(0, view(row));
  CHECK(cached_rows(bf, 0)[0] == 1.0f + 0x1p-7f);
  std::vector<float> row16(D, 1.0f + 3.0f * 0x1p-12f);
  Cache<daedalus::half> fp(1, 1);
  fp.append(0, view(row16));
  CHECK(cached_rows(fp, 0)[0] == 1.0f + 0x1p-10f);
}

TEST_CASE_TEMPLATE(
    "ContiguousLatentCache: rejected calls throw the documented error and change nothing", Storage,
    float, daedalus::bfloat16, daedalus::half) {
  Random rng(102);
  Cache<Storage> cache(std::vector<index_t>{5, 3});
  const std::vector<float> three = rng.uniform(3 * D);
  cache.append(0, view(three));
  cache.append(1, HostView<const float, 2>(three.data(), {2, D}));
  const CacheSnapshot<Cache<Storage>> before(cache);

  SUBCASE("unknown sequence: OutOfRange naming the sequence") {
    const std::string what =
        message_of<daedalus::OutOfRange>([&] { cache.append(2, view(three)); });
    CHECK(contains(what, "daedalus::ContiguousLatentCache"));
    CHECK(contains(what, "sequence 2 is not in [0, 2)"));
    CHECK_THROWS_AS(cache.write(-1, 0, view(three)), daedalus::OutOfRange);
    CHECK_THROWS_AS((void)cache.length(7), daedalus::OutOfRange);
    CHECK_THROWS_AS((void)cache.rows(-1), daedalus::OutOfRange);
    CHECK_THROWS_AS(cache.clear(2), daedalus::OutOfRange);
    CHECK_THROWS_AS(cache.truncate(5, 0), daedalus::OutOfRange);
  }
  SUBCASE("past capacity: CapacityError naming the length it would reach and the capacity") {
    const std::string what =
        message_of<daedalus::CapacityError>([&] { cache.append(0, view(three)); });
    CHECK(contains(what, "would hold 6 tokens; its capacity is 5"));
    CHECK_THROWS_AS(cache.write(1, 1, view(three)), daedalus::CapacityError);
  }
  SUBCASE("start_pos beyond the cached length: OutOfRange naming start_pos") {
    const std::vector<float> one = rng.uniform(D);
    const std::string what =
        message_of<daedalus::OutOfRange>([&] { cache.write(0, 4, view(one)); });
    CHECK(contains(what, "'start_pos' is 4"));
    CHECK(contains(what, "[0, 3]"));
    CHECK_THROWS_AS(cache.write(0, -1, view(one)), daedalus::OutOfRange);
  }
  SUBCASE("truncate to more than the length: OutOfRange") {
    CHECK_THROWS_AS(cache.truncate(0, 4), daedalus::OutOfRange);
    CHECK_THROWS_AS(cache.truncate(0, -1), daedalus::OutOfRange);
  }
  SUBCASE("wrong row width: InvalidArgument naming 'rows' and both extents") {
    const std::vector<float> wide = rng.uniform(2 * (D + 1));
    const std::string what = message_of<daedalus::InvalidArgument>([&] {
      cache.append(0, HostView<const float, 2>(wide.data(), {2, D + 1}));
    });
    CHECK(contains(what, "'rows' has extents [2,49]; expected [2,48]"));
  }
  SUBCASE("non-finite rows: NumericError naming row and column, nothing written") {
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      std::vector<float> rows = rng.uniform(2 * D);
      rows[D + 7] = bad;  // row 1, column 7: row 0 is valid and must not be written either
      const std::string what =
          message_of<daedalus::NumericError>([&] { cache.append(0, view(rows)); });
      CHECK(contains(what, "row 1, column 7"));
    }
  }
  CHECK(before.unchanged(cache));
}

TEST_CASE("ContiguousLatentCache: negative sizes are rejected at construction") {
  CHECK_THROWS_AS(Cache<float>(-1, 4), daedalus::InvalidArgument);
  CHECK_THROWS_AS(Cache<float>(std::vector<index_t>{3, -2}), daedalus::InvalidArgument);
  CHECK_THROWS_AS(Cache<float>(2, -1), daedalus::InvalidArgument);
}

TEST_CASE(
    "KvBytesPerToken: MLA's 576 bf16 values per token against MHA and GQA (V2 paper, Table 1)") {
  using V3 = daedalus::KvBytesPerToken<daedalus::DeepSeekV3>;
  CHECK(V3::mla == 1152);
  CHECK(V3::mha == 81920);
  CHECK(V3::gqa(8) == 5120);
  CHECK(daedalus::KvBytesPerToken<daedalus::DeepSeekV3, float>::mla == 2304);
}
