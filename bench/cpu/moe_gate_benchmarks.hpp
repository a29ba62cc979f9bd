// SPDX-License-Identifier: Apache-2.0
//
// Benchmarks of the MoE gate, included by bench_moe.cpp (after <benchmark/benchmark.h> and
// "daedalus/daedalus.hpp"). Everything lives in namespace moe_gate_bench.
//
// - BM_gate<C>/tokens:N: moe::route, the whole gate: logits = x · Wᵀ (2·T·dim·E FLOPs) and the
//   routing. FLOP/s, peak_fraction (of DAEDALUS_PEAK_GFLOPS, default 226) and tokens/s.
// - BM_gate_routing<C>/tokens:N: moe::route_logits on precomputed logits: the routing part alone
//   (scores, selection bias, group limit, top-k, weights); ns_per_token.
// - BM_gate_routing_path<C>/vector:V/tokens:N: steps 2-6 alone (scores precomputed), one thread,
//   on the generic path (V = 0) or the AVX-512 vector path (V = 1); ns_per_token.
//
// DeepSeek-V3's shapes (7168 → 256 experts, 8 groups / 4, top-8) at 1, 64 and 4096 tokens; the
// same for Tiny (96 → 12 experts, 4 groups / 2, top-3) as the smoke set.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_common.hpp"
#include "daedalus/moe/balance.hpp"
#include "daedalus/moe/cpu/gate.hpp"
#include "daedalus/moe/gate.hpp"

namespace moe_gate_bench {

using namespace daedalus;  // so template arguments print as "DeepSeekV3", "Tiny"

using daedalus::bench::peak_flops;

inline std::vector<float> uniform(std::size_t n, std::uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

template <class C>
const moe::GateWeights<C>& gate_weights() {
  static const moe::GateWeights<C> gate = moe::GateWeights<C>::random(7);
  return gate;
}

template <class C>
void BM_gate(benchmark::State& state) {
  const index_t tokens = state.range(0);
  const auto& gate = gate_weights<C>();
  const std::vector<float> x = uniform(std::size_t(tokens) * C::dim, 11, 1.0f);
  const int k = C::n_activated_experts;
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());
  const CpuBackend cpu = state.range(1) > 0 ? CpuBackend(int(state.range(1))) : CpuBackend();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    moe::route(cpu, gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
               HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
               HostView<float, 2>(weights.data(), {tokens, k}));
    benchmark::DoNotOptimize(ids.data());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flops = 2.0 * double(tokens) * C::dim * C::n_routed_experts;
  const double steps = double(state.iterations());
  state.counters["FLOP/s"] = benchmark::Counter(flops * steps, benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(seconds > 0 ? flops * steps / seconds / peak_flops() : 0.0);
  state.SetItemsProcessed(state.iterations() * tokens);
}

template <class C>
void BM_gate_routing(benchmark::State& state) {
  const index_t tokens = state.range(0);
  const auto& gate = gate_weights<C>();
  const auto settings = moe::GateSettings::from_config<C>();
  const std::vector<float> logits = uniform(std::size_t(tokens) * C::n_routed_experts, 13, 2.0f);
  const int k = C::n_activated_experts;
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());
  const CpuBackend cpu = state.range(1) > 0 ? CpuBackend(int(state.range(1))) : CpuBackend();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    moe::route_logits(cpu, settings,
                      HostView<const float, 2>(logits.data(), {tokens, C::n_routed_experts}),
                      gate.bias(), HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                      HostView<float, 2>(weights.data(), {tokens, k}));
    benchmark::DoNotOptimize(ids.data());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  state.counters["ns_per_token"] =
      benchmark::Counter(seconds * 1e9 / (double(state.iterations()) * double(tokens)));
  state.SetItemsProcessed(state.iterations() * tokens);
}

/// The routing of one token after its scores, on one thread, by path: 0 = the generic path
/// (cpu_gate::route_scored_token_generic), 1 = the dispatching one (the AVX-512 vector path when
/// it covers the settings). Scores are computed once beforehand, so only steps 2-6 are timed.
template <class C>
void BM_gate_routing_path(benchmark::State& state) {
  const bool vector_path = state.range(0) != 0;
  const index_t tokens = state.range(1);
  const auto& gate = gate_weights<C>();
  const auto settings = moe::GateSettings::from_config<C>();
  const int experts = C::n_routed_experts, k = C::n_activated_experts;
  const std::vector<float> logits = uniform(std::size_t(tokens) * experts, 13, 2.0f);
  std::vector<moe::cpu_gate::TokenScratch> scratch;
  scratch.reserve(std::size_t(tokens));
  for (index_t t = 0; t < tokens; ++t) {
    scratch.emplace_back(settings);
    moe::cpu_gate::token_scores(settings.score_func, logits.data() + t * experts, experts,
                                scratch.back());
  }
  const float* bias = gate.has_bias() ? gate.bias().data() : nullptr;
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (index_t t = 0; t < tokens; ++t) {
      auto& s = scratch[std::size_t(t)];
      if (vector_path)
        moe::cpu_gate::route_scored_token(settings, bias, s, ids.data() + t * k,
                                          weights.data() + t * k);
      else
        moe::cpu_gate::route_scored_token_generic(settings, bias, s, ids.data() + t * k,
                                                  weights.data() + t * k);
    }
    benchmark::DoNotOptimize(ids.data());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  state.counters["ns_per_token"] =
      benchmark::Counter(seconds * 1e9 / (double(state.iterations()) * double(tokens)));
  state.SetItemsProcessed(state.iterations() * tokens);
}

// threads: 0 = the default backend (every thread OpenMP reports); 1 = one thread, whose CPU
// time column is the single-core cost even on a busy machine.
BENCHMARK_TEMPLATE(BM_gate, DeepSeekV3)
    ->ArgNames({"tokens", "threads"})
    ->Args({1, 0})
    ->Args({64, 0})
    ->Args({4096, 0})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gate_routing, DeepSeekV3)
    ->ArgNames({"tokens", "threads"})
    ->Args({1, 0})
    ->Args({64, 0})
    ->Args({4096, 0})
    ->Args({4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gate_routing_path, DeepSeekV3)
    ->ArgNames({"vector", "tokens"})
    ->Args({0, 4096})
    ->Args({1, 4096})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gate, Tiny)
    ->ArgNames({"tokens", "threads"})
    ->Args({1, 0})
    ->Args({64, 0})
    ->Args({4096, 0})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_gate_routing, Tiny)
    ->ArgNames({"tokens", "threads"})
    ->Args({1, 0})
    ->Args({64, 0})
    ->Args({4096, 0})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace moe_gate_bench
