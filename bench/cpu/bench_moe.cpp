// SPDX-License-Identifier: Apache-2.0
//
// CPU benchmarks of daedalus's Mixture-of-Experts (Google Benchmark).
//
// - BM_memcpy: the roof of the data movement below, measured in this binary: std::memcpy of a
//   buffer the size of the expert-ordered rows, split over the backend's threads in contiguous
//   ranges. bytes/s counts each byte twice (read and written).
// - BM_plan_dispatch_combine<C>/tokens: RoutingPlan::build + moe::dispatch + moe::combine for
//   random distinct top-k ids (DeepSeek-V3: 4096 tokens, 7168 wide, 256 experts, top-8).
//   Bytes per step = what the two passes must move at least: dispatch reads tokens·dim and
//   writes tokens·k·dim floats; combine reads tokens·k·dim and writes tokens·dim floats, so
//   2·(k + 1)·tokens·dim·4 bytes. memcpy_fraction = bytes/s ÷ BM_memcpy's rate for the same
//   buffer, measured once in this process (best of 5).
// - BM_plan<C>/tokens: RoutingPlan::build alone.
// - BM_moe_layer<C>/tokens: a whole MoeLayer forward (gate, plan, dispatch, routed experts,
//   shared experts, combine) with random weights; DeepSeek-V2-Lite: 64 experts, 1408 wide,
//   top-6, 2 shared. FLOP/s counts useful work only (MoeLayer::flops: the gate's logits, k
//   routed and the shared MLP, 3 products each); items_per_second = tokens/s; peak_fraction =
//   FLOP/s ÷ DAEDALUS_PEAK_GFLOPS (default 226, bench/RESULTS.md).
// - The gate's benchmarks come from moe_gate_benchmarks.hpp.
//
// Names containing "Tiny" run tiny shapes in milliseconds (CI's smoke pass).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "bench_common.hpp"
#include "daedalus/daedalus.hpp"
#include "moe_gate_benchmarks.hpp"

namespace moe_bench {

using namespace daedalus;  // so template arguments print as "DeepSeekV3", "Tiny"
using daedalus::index_t;

using daedalus::bench::peak_flops;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Copies `bytes` from src to dst, split over the backend's threads in contiguous ranges.
void threaded_memcpy(const CpuBackend& cpu, char* dst, const char* src, std::size_t bytes) {
  cpu.parallel_ranges(std::int64_t(bytes), [&](std::int64_t b0, std::int64_t b1, int) {
    std::memcpy(dst + b0, src + b0, std::size_t(b1 - b0));
  });
}

/// memcpy's rate (bytes read + written per second) for a buffer of `bytes` on `cpu`, best of 5,
/// measured once per size and thread count.
double memcpy_rate(const CpuBackend& cpu, std::size_t bytes) {
  static std::map<std::pair<std::size_t, int>, double> cache;
  const auto key = std::make_pair(bytes, cpu.num_threads());
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  std::vector<char> src(bytes, 1), dst(bytes, 2);
  threaded_memcpy(cpu, dst.data(), src.data(), bytes);  // warm: pages mapped
  double best = 0.0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    threaded_memcpy(cpu, dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    best = std::max(best, 2.0 * double(bytes) / seconds_since(start));
  }
  return cache[key] = best;
}

/// `n` floats uniform in [-1, 1] from a seeded stream.
std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

/// For each token, k distinct experts uniform at random, and weights uniform in (0, 1).
struct RandomRouting {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  RandomRouting(index_t tokens, int k, int experts, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<std::int32_t> pool(static_cast<std::size_t>(experts));
    for (index_t t = 0; t < tokens; ++t) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int j = 0; j < k; ++j) {  // partial Fisher-Yates
        std::uniform_int_distribution<int> pick(j, experts - 1);
        std::swap(pool[std::size_t(j)], pool[std::size_t(pick(rng))]);
        ids.push_back(pool[std::size_t(j)]);
      }
    }
    std::uniform_real_distribution<float> dist(0.01f, 1.0f);
    weights.resize(ids.size());
    for (float& w : weights) w = dist(rng);
  }
};

// --------------------------------------------------------------------------------------------
// BM_memcpy: the roof for dispatch and combine, at the size of V3's expert-ordered buffer
// (4096 tokens × 8 × 7168 floats = 0.94 GB) or Tiny's.

void BM_memcpy(benchmark::State& state) {
  const auto bytes = std::size_t(state.range(0));
  const CpuBackend cpu;
  std::vector<char> src(bytes, 1), dst(bytes, 2);
  for (auto _ : state) {
    threaded_memcpy(cpu, dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
  }
  state.counters["bytes/s"] = benchmark::Counter(2.0 * double(bytes) * double(state.iterations()),
                                                 benchmark::Counter::kIsRate);
}
BENCHMARK(BM_memcpy)
    ->Name("BM_memcpy/DeepSeekV3")
    ->Arg(std::int64_t(4096) * 8 * 7168 * 4)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_memcpy)
    ->Name("BM_memcpy/Tiny")
    ->Arg(std::int64_t(512) * 3 * 96 * 4)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// --------------------------------------------------------------------------------------------
// BM_plan_dispatch_combine: one step's data movement.

template <class C>
void BM_plan_dispatch_combine(benchmark::State& state) {
  const index_t tokens = state.range(0);
  constexpr index_t dim = C::dim;
  constexpr int k = C::n_activated_experts;
  const CpuBackend cpu;
  const RandomRouting routing(tokens, k, C::n_routed_experts, 11);
  const std::vector<float> x = random_floats(std::size_t(tokens * dim), 12);
  const HostView<const std::int32_t, 2> ids(routing.ids.data(), {tokens, k});
  const HostView<const float, 2> weights(routing.weights.data(), {tokens, k});
  moe::RoutingPlan plan;
  plan.build(ids, weights, C::n_routed_experts);
  std::vector<float> rows(std::size_t(plan.rows() * dim)), out(std::size_t(tokens * dim));
  auto step = [&] {
    plan.build(ids, weights, C::n_routed_experts);
    const HostView<float, 2> rows_view(rows.data(), {plan.rows(), dim});
    moe::dispatch(cpu, plan, HostView<const float, 2>(x.data(), {tokens, dim}), rows_view);
    moe::combine(cpu, plan, HostView<const float, 2>(rows_view),
                 HostView<float, 2>(out.data(), {tokens, dim}));
  };
  step();  // pages mapped, caches warm
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(out.data());
  }
  const double seconds = seconds_since(start);
  const double bytes = 2.0 * double(k + 1) * double(tokens) * dim * sizeof(float);
  const double steps = double(state.iterations());
  state.counters["bytes/s"] = benchmark::Counter(bytes * steps, benchmark::Counter::kIsRate);
  const double copy = memcpy_rate(cpu, std::size_t(tokens) * k * dim * sizeof(float));
  state.counters["memcpy_bytes/s"] = benchmark::Counter(copy);
  state.counters["memcpy_fraction"] =
      benchmark::Counter(seconds > 0 ? bytes * steps / seconds / copy : 0.0);
}
BENCHMARK_TEMPLATE(BM_plan_dispatch_combine, DeepSeekV3)
    ->ArgName("tokens")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_plan_dispatch_combine, Tiny)
    ->ArgName("tokens")
    ->Arg(512)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

template <class C>
void BM_plan(benchmark::State& state) {
  const index_t tokens = state.range(0);
  constexpr int k = C::n_activated_experts;
  const RandomRouting routing(tokens, k, C::n_routed_experts, 11);
  const HostView<const std::int32_t, 2> ids(routing.ids.data(), {tokens, k});
  const HostView<const float, 2> weights(routing.weights.data(), {tokens, k});
  moe::RoutingPlan plan;
  for (auto _ : state) {
    plan.build(ids, weights, C::n_routed_experts);
    benchmark::DoNotOptimize(plan.rows());
  }
  state.counters["slots/s"] = benchmark::Counter(double(tokens * k) * double(state.iterations()),
                                                 benchmark::Counter::kIsRate);
}
BENCHMARK_TEMPLATE(BM_plan, DeepSeekV3)->ArgName("tokens")->Arg(4096)->UseRealTime();
BENCHMARK_TEMPLATE(BM_plan, Tiny)->ArgName("tokens")->Arg(512)->UseRealTime();

// --------------------------------------------------------------------------------------------
// BM_moe_layer: a whole layer forward.

template <class C>
moe::MoeLayer<C>& random_layer() {
  // DeepSeek-V2-Lite's experts are 2.2 GB in fp32 and take a few seconds to draw: built once.
  static moe::MoeLayer<C> layer = moe::MoeLayer<C>::random(2024);
  return layer;
}

template <class C>
void BM_moe_layer(benchmark::State& state) {
  const index_t tokens = state.range(0);
  const CpuBackend cpu;
  auto& layer = random_layer<C>();
  const std::vector<float> x = random_floats(std::size_t(tokens * C::dim), 13);
  std::vector<float> out(x.size());
  const HostView<const float, 2> x_view(x.data(), {tokens, C::dim});
  const HostView<float, 2> out_view(out.data(), {tokens, C::dim});
  layer.forward(cpu, x_view, out_view);  // workspaces sized, pages mapped
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    layer.forward(cpu, x_view, out_view);
    benchmark::DoNotOptimize(out.data());
  }
  const double seconds = seconds_since(start);
  const double flops = moe::MoeLayer<C>::flops(tokens);
  const double steps = double(state.iterations());
  state.SetItemsProcessed(std::int64_t(tokens) * state.iterations());
  state.counters["FLOP/s"] = benchmark::Counter(flops * steps, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(seconds > 0 ? flops * steps / seconds / peak_flops() : 0.0);
}
BENCHMARK_TEMPLATE(BM_moe_layer, DeepSeekV2Lite)
    ->ArgName("tokens")
    ->Arg(1)
    ->Arg(64)
    ->Arg(512)
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_moe_layer, Tiny)
    ->ArgName("tokens")
    ->Arg(1)
    ->Arg(64)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench

BENCHMARK_MAIN();
