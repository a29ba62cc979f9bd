// SPDX-License-Identifier: Apache-2.0
//
// CPU benchmarks of the latent KV cache containers (Google Benchmark).
//
// Decode over a paged cache (this file):
// - BM_decode_contiguous<C, Storage>/batch/ctx: mla::absorbed_attention over a
//   ContiguousLatentCache (the same benchmark as bench_mla's BM_absorbed_decode_core), the
//   baseline of the paged overhead.
// - BM_decode_paged<C, Storage>/batch/ctx: the same attention over a PagedLatentCache with 64-token
//   blocks whose order in the pool is shuffled (each sequence's blocks interleaved with blocks of
//   a released filler sequence), read through its block table (PagedLatentView). The attention
//   kernel is shared; a paged key block of 128 tokens is two runs of 64 rows instead of one run.
// - BM_decode_split<C, Storage>/threads/ctx: one sequence (batch 1) of 32K tokens in a paged
//   cache on 1 and on 2 threads. Split-KV cuts its key range into the same 32 pieces (merged by
//   log-sum-exp) on both: the speed-up is the ratio of the two times.
//
// Container operations (bench/cpu/kv_cache_ops_benchmarks.hpp): append throughput, fork cost, and
// the prefix copy a fork replaces.
//
// Decode counters: FLOP/s (an FMA counts 2; per step batch · heads · ctx · 2 · (576 + 512)),
// peak_fraction (FLOP/s over the fp32 FMA roof: DAEDALUS_PEAK_GFLOPS or 226), kv_bytes (cache
// bytes read per step) and bytes/s. Names containing "Tiny" are CI's smoke pass
// (--benchmark_filter=Tiny). Results and commands: bench/RESULTS.md.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#include "bench_common.hpp"
#include "daedalus/daedalus.hpp"
#include "kv_cache_ops_benchmarks.hpp"

namespace {

using namespace daedalus;  // so template arguments print as "DeepSeekV3", "bfloat16"
using daedalus::index_t;

constexpr int kBlock = 64;  // FlashMLA's page size

using daedalus::bench::peak_flops;

using daedalus::bench::LoopTimer;

template <class C>
double decode_flops(index_t batch, index_t ctx) {
  using S = MlaShape<C>;
  return double(batch) * S::n_heads * double(ctx) * 2.0 * (S::latent_dim + S::kv_lora_rank);
}

void set_counters(benchmark::State& state, double seconds, double flops_per_step,
                  double kv_bytes_per_step) {
  const double steps = double(state.iterations());
  state.counters["FLOP/s"] =
      benchmark::Counter(flops_per_step * steps, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(seconds > 0 ? flops_per_step * steps / seconds / peak_flops() : 0.0);
  state.counters["kv_bytes"] = benchmark::Counter(kv_bytes_per_step);
  state.counters["bytes/s"] =
      benchmark::Counter(kv_bytes_per_step * steps, benchmark::Counter::kIsRate);
}

/// Rows [t0, t0 + n) of sequence b's random rows: the same values whichever cache holds them.
std::vector<float> rows_of(index_t b, index_t t0, index_t n, index_t width) {
  std::mt19937_64 rng(std::uint64_t(b) * 1000003u + std::uint64_t(t0));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(std::size_t(n * width));
  for (float& x : v) x = dist(rng);
  return v;
}

template <class C>
std::vector<float> queries(index_t batch) {
  using S = MlaShape<C>;
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> q(std::size_t(batch * S::n_heads * S::latent_dim));
  for (float& x : q) x = dist(rng);
  return q;
}

/// `batch` sequences of `ctx` tokens in a contiguous cache.
template <class C, class Storage>
ContiguousLatentCache<C, CpuBackend, Storage> contiguous_cache(index_t batch, index_t ctx) {
  constexpr index_t D = MlaShape<C>::latent_dim;
  ContiguousLatentCache<C, CpuBackend, Storage> cache(batch, ctx);
  for (index_t b = 0; b < batch; ++b)
    for (index_t t0 = 0; t0 < ctx; t0 += kBlock) {
      const index_t n = std::min<index_t>(kBlock, ctx - t0);
      const std::vector<float> rows = rows_of(b, t0, n, D);
      cache.append(b, HostView<const float, 2>(rows.data(), {n, D}));
    }
  return cache;
}

/// `batch` sequences of `ctx` tokens in a paged cache, their blocks scattered over the pool: a
/// filler sequence takes a block between about every other block of the batch's and is released
/// at the end, leaving holes (the layout a serving engine's pool drifts to).
template <class C, class Storage>
struct PagedSetup {
  using Cache = PagedLatentCache<C, CpuBackend, Storage, kBlock>;
  BlockAllocator allocator;
  Cache cache;
  std::vector<index_t> seqs;

  PagedSetup(index_t batch, index_t ctx)
      : allocator(2 * batch * ((ctx + kBlock - 1) / kBlock) + 1, kBlock), cache(allocator) {
    constexpr index_t D = MlaShape<C>::latent_dim;
    for (index_t b = 0; b < batch; ++b) seqs.push_back(allocator.add_sequence());
    const index_t filler = allocator.add_sequence();
    std::mt19937_64 rng(5);
    for (index_t t0 = 0; t0 < ctx; t0 += kBlock) {
      for (index_t b = 0; b < batch; ++b) {
        const index_t n = std::min<index_t>(kBlock, ctx - t0);
        const std::vector<float> rows = rows_of(b, t0, n, D);
        cache.append(seqs[std::size_t(b)], HostView<const float, 2>(rows.data(), {n, D}));
        if (rng() % 2 == 0) allocator.append(filler, kBlock);
      }
    }
    allocator.release(filler);
  }
};

template <class C, class Storage>
void BM_decode_contiguous(benchmark::State& state) {
  using S = MlaShape<C>;
  const index_t batch = state.range(0), ctx = state.range(1);
  const CpuBackend cpu;
  const auto cache = contiguous_cache<C, Storage>(batch, ctx);
  std::vector<index_t> seqs(static_cast<std::size_t>(batch));
  for (index_t b = 0; b < batch; ++b) seqs[std::size_t(b)] = b;
  const std::vector<float> q = queries<C>(batch);
  std::vector<float> out(std::size_t(batch * S::n_heads * S::kv_lora_rank));
  const HostView<const float, 4> q_view(q.data(), {batch, 1, S::n_heads, S::latent_dim});
  const HostView<float, 4> out_view(out.data(), {batch, 1, S::n_heads, S::kv_lora_rank});
  const LoopTimer timer;
  for (auto _ : state) {
    mla::absorbed_attention(cpu, cache, std::span<const index_t>(seqs), q_view,
                            mla::softmax_scale<C>(), out_view);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, timer.seconds(), decode_flops<C>(batch, ctx),
               double(batch * ctx) * double(cache.bytes_per_token()));
}

/// Paged decode at `threads` threads (0: the backend's default, every core).
template <class C, class Storage>
void run_paged_decode(benchmark::State& state, index_t batch, index_t ctx, int threads) {
  using S = MlaShape<C>;
  const CpuBackend cpu = threads > 0 ? CpuBackend(threads) : CpuBackend();
  const PagedSetup<C, Storage> setup(batch, ctx);
  const std::vector<float> q = queries<C>(batch);
  std::vector<float> out(std::size_t(batch * S::n_heads * S::kv_lora_rank));
  const HostView<const float, 4> q_view(q.data(), {batch, 1, S::n_heads, S::latent_dim});
  const HostView<float, 4> out_view(out.data(), {batch, 1, S::n_heads, S::kv_lora_rank});
  BlockTable table;
  const LoopTimer timer;
  for (auto _ : state) {
    // The block table is rebuilt every step, as a serving loop does after its appends.
    setup.allocator.block_table(std::span<const index_t>(setup.seqs), table);
    const PagedLatentView<C, Storage, kBlock> view{
        setup.cache.pool_data(), setup.cache.num_blocks(),
        HostView<const std::int32_t, 2>(table.table.data(), {batch, table.max_blocks}),
        HostView<const std::int32_t, 1>(table.seqlens.data(), {batch})};
    mla::absorbed_attention(cpu, view, q_view, mla::softmax_scale<C>(), out_view);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, timer.seconds(), decode_flops<C>(batch, ctx),
               double(batch * ctx) * double(setup.cache.bytes_per_token()));
}

template <class C, class Storage>
void BM_decode_paged(benchmark::State& state) {
  run_paged_decode<C, Storage>(state, state.range(0), state.range(1), 0);
}

template <class C, class Storage>
void BM_decode_split(benchmark::State& state) {
  run_paged_decode<C, Storage>(state, 1, state.range(1), int(state.range(0)));
}

void decode_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "ctx"})->Args({1, 4096})->Args({4, 4096})->Args({1, 16384});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void tiny_decode_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "ctx"})->Args({1, 100})->Args({4, 100})->UseRealTime();
}
void split_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "ctx"})->Args({1, 32768})->Args({2, 32768});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void tiny_split_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "ctx"})->Args({1, 1000})->Args({2, 1000})->UseRealTime();
}

BENCHMARK_TEMPLATE(BM_decode_contiguous, DeepSeekV3, float)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, DeepSeekV3, float)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_contiguous, DeepSeekV3, bfloat16)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, DeepSeekV3, bfloat16)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_contiguous, DeepSeekV3, half)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, DeepSeekV3, half)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, DeepSeekV3, Fp8E4m3Latent)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_split, DeepSeekV3, float)->Apply(split_shapes);
BENCHMARK_TEMPLATE(BM_decode_split, DeepSeekV3, bfloat16)->Apply(split_shapes);

BENCHMARK_TEMPLATE(BM_decode_contiguous, Tiny, float)->Apply(tiny_decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, Tiny, float)->Apply(tiny_decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, Tiny, bfloat16)->Apply(tiny_decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_paged, Tiny, Fp8E4m3Latent)->Apply(tiny_decode_shapes);
BENCHMARK_TEMPLATE(BM_decode_split, Tiny, float)->Apply(tiny_split_shapes);

}  // namespace

BENCHMARK_MAIN();
