// SPDX-License-Identifier: Apache-2.0
// CpuBackend: thread-count validation (with its message), and that parallel_ranges and
// parallel_for visit every index of [0, n) exactly once, for counts around the thread count.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <daedalus/core/backend.hpp>
#include <daedalus/core/dtype.hpp>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/tolerance.hpp"

using daedalus::CpuBackend;

TEST_CASE("CpuBackend: rejects 0 and negative thread counts with a message naming the argument") {
  CHECK_THROWS_WITH_AS(CpuBackend(0),
                       "daedalus::CpuBackend: 'num_threads' is 0; expected at least 1",
                       daedalus::InvalidArgument);
  CHECK_THROWS_AS(CpuBackend(-3), daedalus::InvalidArgument);
  CHECK(CpuBackend(1).num_threads() == 1);
  CHECK(CpuBackend(3).num_threads() == 3);
  CHECK(CpuBackend().num_threads() >= 1);
  static_assert(daedalus::Backend<CpuBackend>);
  static_assert(std::is_same_v<CpuBackend::memory_space, daedalus::HostMemory>);
}

TEST_CASE("CpuBackend::parallel_ranges covers [0, n) exactly once with ordered, disjoint ranges") {
  for (int threads : {1, 2, 3, 8}) {
    const CpuBackend cpu(threads);
    for (std::int64_t n : {0, 1, 2, 3, 7, 8, 9, 100, 1001}) {
      CAPTURE(threads);
      CAPTURE(n);
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<int> calls{0};
      std::atomic<bool> bad_range{false};
      cpu.parallel_ranges(n, [&](std::int64_t begin, std::int64_t end, int team) {
        ++calls;
        if (begin < 0 || end > n || begin >= end || team < 0 || team >= threads) bad_range = true;
        for (std::int64_t i = begin; i < end; ++i) ++hits[std::size_t(i)];
      });
      CHECK_FALSE(bad_range.load());
      CHECK(calls.load() <= threads);
      if (n > 0) CHECK(calls.load() >= 1);
      int wrong = 0;
      for (auto& h : hits) wrong += h.load() != 1;
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("CpuBackend::parallel_ranges partitions the same way every time (reproducible)") {
  const CpuBackend cpu(3);
  auto partition = [&] {
    std::mutex m;
    std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
    cpu.parallel_ranges(50, [&](std::int64_t b, std::int64_t e, int) {
      std::lock_guard lock(m);
      ranges.emplace_back(b, e);
    });
    std::sort(ranges.begin(), ranges.end());
    return ranges;
  };
  CHECK(partition() == partition());
}

TEST_CASE("CpuBackend::parallel_for visits every index of [0, n) exactly once") {
  for (int threads : {1, 2, 5}) {
    const CpuBackend cpu(threads);
    for (std::int64_t n : {0, 1, 4, 5, 6, 333}) {
      CAPTURE(threads);
      CAPTURE(n);
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<bool> bad{false};
      cpu.parallel_for(n, [&](std::int64_t i, int thread) {
        if (i < 0 || i >= n || thread < 0 || thread >= threads)
          bad = true;
        else
          ++hits[std::size_t(i)];
      });
      CHECK_FALSE(bad.load());
      int wrong = 0;
      for (auto& h : hits) wrong += h.load() != 1;
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("StorageTraits: unit roundoffs agree with the tests' own and with a real rounding") {
  namespace tol = daedalus::testing::tolerance;
  CHECK(daedalus::StorageTraits<float>::unit_roundoff == tol::fp32_u);
  CHECK(daedalus::StorageTraits<daedalus::bfloat16>::unit_roundoff == tol::bf16_u);
  CHECK(daedalus::StorageTraits<daedalus::half>::unit_roundoff == tol::fp16_u);
  CHECK(daedalus::StorageTraits<daedalus::bfloat16>::bytes == 2);
  CHECK(daedalus::StorageTraits<daedalus::half>::bytes == 2);
  // 1 + u is the midpoint between 1 and the next value: it rounds to even (1); 1 + 1.5u rounds up.
  CHECK(daedalus::to_float(daedalus::from_float<daedalus::bfloat16>(1.0f + 0x1p-8f)) == 1.0f);
  CHECK(daedalus::to_float(daedalus::from_float<daedalus::bfloat16>(1.0f + 0x1.8p-8f)) ==
        1.0f + 0x1p-7f);
  CHECK(daedalus::to_float(daedalus::from_float<daedalus::half>(1.0f + 0x1.8p-11f)) ==
        1.0f + 0x1p-10f);
}
