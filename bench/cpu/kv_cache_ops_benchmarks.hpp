// SPDX-License-Identifier: Apache-2.0
#pragma once
//
// Benchmarks of the paged cache's container operations (Google Benchmark), included by
// bench_kv_cache.cpp:
//
// - BM_paged_append<C, Storage>/rows: PagedLatentCache::append of `rows` fp32 rows (1: a decode
//   step, 64: a prefill chunk) into one sequence, converting to the storage format (fp8: tile
//   amax, scale, e4m3 rounding). The sequence is truncated to empty when it reaches 4,096 tokens
//   (a truncation copies nothing and is counted in the time).
// - BM_paged_fork<C, Storage>/tokens: fork a sequence holding `tokens` tokens (prefix sharing),
//   append one token to the fork (which copies the shared partial last block, the only copy a
//   fork ever costs), release the fork.
// - BM_prefix_copy<C, Storage>/tokens: what the fork replaces without prefix sharing: a new
//   sequence that copies the `tokens` rows (read back and written again), then releases.
//
// Counters: rows/s (rows written, or forks per second for fork), bytes/s (bytes written to the
// pool) and mem_fraction (bytes/s over the machine's memory-read roof: DAEDALUS_MEMORY_GBS GB/s
// when set, else 31.5, the 2-core figure of bench/RESULTS.md; a write roof is of the same order).
// Names containing "Tiny" run Tiny shapes and are what CI's smoke pass runs.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace daedalus::bench_kv_ops {

/// The memory roof in bytes/s: DAEDALUS_MEMORY_GBS (GB/s) or 31.5.
inline double memory_roof() {
  static const double roof = [] {
    const char* env = std::getenv("DAEDALUS_MEMORY_GBS");
    const double gbs = env ? std::atof(env) : 0.0;
    return (gbs > 0.0 ? gbs : 31.5) * 1e9;
  }();
  return roof;
}

inline std::vector<float> random_rows(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline void set_counters(benchmark::State& state, double seconds, double rows_per_iteration,
                         double bytes_per_iteration) {
  const double iterations = double(state.iterations());
  state.counters["rows/s"] =
      benchmark::Counter(rows_per_iteration * iterations, benchmark::Counter::kIsRate);
  state.counters["bytes/s"] =
      benchmark::Counter(bytes_per_iteration * iterations, benchmark::Counter::kIsRate);
  state.counters["mem_fraction"] = benchmark::Counter(
      seconds > 0 ? bytes_per_iteration * iterations / seconds / memory_roof() : 0.0);
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

constexpr int kBlockSize = 64;
constexpr index_t kMaxTokens = 4096;

template <class C, class Storage>
void BM_paged_append(benchmark::State& state) {
  using Cache = PagedLatentCache<C, CpuBackend, Storage, kBlockSize>;
  const index_t rows = state.range(0);
  constexpr index_t D = MlaShape<C>::latent_dim;
  BlockAllocator allocator(kMaxTokens / kBlockSize + 1, kBlockSize);
  Cache cache(allocator);
  const index_t seq = allocator.add_sequence();
  const std::vector<float> data = random_rows(std::size_t(rows * D), 31);
  const HostView<const float, 2> chunk(data.data(), {rows, D});
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (cache.length(seq) + rows > kMaxTokens) allocator.truncate(seq, 0);
    cache.append(seq, chunk);
    benchmark::DoNotOptimize(cache.pool_data());
  }
  set_counters(state, seconds_since(start), double(rows), double(rows) * Cache::row_bytes);
}

template <class C, class Storage>
void BM_paged_fork(benchmark::State& state) {
  using Cache = PagedLatentCache<C, CpuBackend, Storage, kBlockSize>;
  const index_t tokens = state.range(0);
  constexpr index_t D = MlaShape<C>::latent_dim;
  BlockAllocator allocator(2 * (tokens / kBlockSize + 2), kBlockSize);
  Cache cache(allocator);
  const index_t parent = allocator.add_sequence();
  const std::vector<float> prompt = random_rows(std::size_t(tokens * D), 32);
  cache.append(parent, HostView<const float, 2>(prompt.data(), {tokens, D}));
  const std::vector<float> token = random_rows(std::size_t(D), 33);
  const HostView<const float, 2> one(token.data(), {1, D});
  // Bytes the fork's first write copies: the rows of the shared partial last block.
  const double copied = double(tokens % kBlockSize) * double(Cache::row_bytes);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const index_t child = allocator.fork(parent);
    cache.append(child, one);
    allocator.release(child);
  }
  set_counters(state, seconds_since(start), 1.0, copied + double(Cache::row_bytes));
}

template <class C, class Storage>
void BM_prefix_copy(benchmark::State& state) {
  using Cache = PagedLatentCache<C, CpuBackend, Storage, kBlockSize>;
  const index_t tokens = state.range(0);
  constexpr index_t D = MlaShape<C>::latent_dim;
  BlockAllocator allocator(2 * (tokens / kBlockSize + 2), kBlockSize);
  Cache cache(allocator);
  const index_t parent = allocator.add_sequence();
  const std::vector<float> prompt = random_rows(std::size_t(tokens * D), 34);
  cache.append(parent, HostView<const float, 2>(prompt.data(), {tokens, D}));
  std::vector<float> rows(prompt.size());
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const index_t copy = allocator.add_sequence();
    cache.read(parent, 0, HostView<float, 2>(rows.data(), {tokens, D}));
    cache.append(copy, HostView<const float, 2>(rows.data(), {tokens, D}));
    allocator.release(copy);
  }
  set_counters(state, seconds_since(start), double(tokens), double(tokens) * Cache::row_bytes);
}

// Tiny: the CI smoke pass. DeepSeekV3: 576-wide rows (656 bytes in fp8).
BENCHMARK_TEMPLATE(BM_paged_append, Tiny, float)->Arg(1)->Arg(64)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_append, Tiny, Fp8E4m3Latent)->Arg(1)->Arg(64)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_append, DeepSeekV3, float)->Arg(1)->Arg(64)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_append, DeepSeekV3, bfloat16)->Arg(1)->Arg(64)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_append, DeepSeekV3, half)->Arg(1)->Arg(64)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_append, DeepSeekV3, Fp8E4m3Latent)->Arg(1)->Arg(64)->UseRealTime();

BENCHMARK_TEMPLATE(BM_paged_fork, Tiny, float)->Arg(1000)->UseRealTime();
BENCHMARK_TEMPLATE(BM_prefix_copy, Tiny, float)->Arg(1000)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_fork, DeepSeekV3, bfloat16)->Arg(1000)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_prefix_copy, DeepSeekV3, bfloat16)->Arg(1000)->Arg(32768)->UseRealTime();
BENCHMARK_TEMPLATE(BM_paged_fork, DeepSeekV3, Fp8E4m3Latent)->Arg(1000)->UseRealTime();

}  // namespace daedalus::bench_kv_ops
