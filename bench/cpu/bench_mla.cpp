// SPDX-License-Identifier: Apache-2.0
//
// CPU benchmarks of daedalus's MLA kernels (Google Benchmark).
//
// - BM_fma_peak, BM_bf16_dot_peak, BM_memory_read: the machine's roofs: the fp32 FMA rate (what
//   every peak_fraction divides by), the AVX512-BF16 dot-product rate (the roof of the bf16
//   kernels) and the rate one or two cores read memory at.
// - BM_absorbed_decode_core<C, Storage>: mla::absorbed_attention over a latent cache.
// - BM_naive_decode<C>: mla::naive_attention, which decompresses every cached latent, then MHA.
// - BM_mha_decode<C>: plain MHA decode over a full per-head fp32 K/V cache (what MLA replaces),
//   written here with Eigen and OpenMP.
// - BM_prefill<C>: a whole MLA layer (projections included) over a prompt.
//
// Every benchmark reports
//   FLOP/s         useful floating-point operations per second (an FMA counts 2)
//   peak_fraction  FLOP/s divided by the machine's fp32 FMA peak: DAEDALUS_PEAK_GFLOPS (GFLOP/s)
//                  when set, else 226 (the 2-core Zen 4 of bench/RESULTS.md); measure yours with
//                  --benchmark_filter=BM_fma_peak
//   kv_bytes       bytes of KV cache read per step, and bytes/s the rate they are read at
//
// Names containing "Tiny" run tiny shapes in milliseconds: CI's smoke pass uses
// --benchmark_filter=Tiny. Results and the commands behind them: bench/RESULTS.md.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bench_common.hpp"
#include "daedalus/daedalus.hpp"

namespace {

using namespace daedalus;  // so template arguments print as "DeepSeekV3", "bfloat16"
using daedalus::index_t;

// --------------------------------------------------------------------------------------------
// Shared helpers

using daedalus::bench::peak_flops;

using daedalus::bench::LoopTimer;

/// Sets the counters every benchmark reports, from the work of one step, the iterations run and
/// the real time they took. FLOP/s and bytes/s are rates over real time (every benchmark here
/// uses UseRealTime: the work runs on an OpenMP team, whose other threads' CPU time the main
/// thread's does not include).
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

/// `n` floats uniform in [-scale, scale] from a seeded stream (deterministic per seed).
std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

/// Fills `n` floats in parallel with a cheap hash of the index, uniform in [-1, 1): for the
/// gigabyte-sized MHA caches, where a serial generator would dominate the setup.
void hash_fill(float* data, std::size_t n, std::uint64_t seed) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < std::int64_t(n); ++i) {
    std::uint64_t z = seed + std::uint64_t(i) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    data[i] = float(double(z >> 40) * 0x1p-23 - 1.0);
  }
}

/// One set of random layer weights per config, built on first use and shared by the naive
/// decode and prefill benchmarks (DeepSeek-V3's take ~0.75 GB fp32 and a few seconds to draw).
template <class C>
const mla::MlaWeights<C>& layer_weights() {
  static const mla::MlaWeights<C> weights = mla::MlaWeights<C>::random(2024);
  return weights;
}

/// A latent cache holding `batch` sequences of `ctx` random rows each (as if a prompt of ctx
/// tokens had been prefilled), written in chunks so the fp32 staging buffer stays small.
template <class C, class Storage>
ContiguousLatentCache<C, CpuBackend, Storage> filled_cache(index_t batch, index_t ctx,
                                                           std::uint64_t seed) {
  constexpr index_t D = MlaShape<C>::latent_dim;
  ContiguousLatentCache<C, CpuBackend, Storage> cache(batch, ctx);
  constexpr index_t chunk = 1024;
  for (index_t b = 0; b < batch; ++b) {
    for (index_t t0 = 0; t0 < ctx; t0 += chunk) {
      const index_t n = std::min(chunk, ctx - t0);
      const std::vector<float> rows =
          random_floats(std::size_t(n * D), seed + std::uint64_t(b * ctx + t0));
      cache.write(b, t0, HostView<const float, 2>(rows.data(), {n, D}));
    }
  }
  return cache;
}

std::vector<index_t> iota_ids(index_t n) {
  std::vector<index_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[std::size_t(i)] = i;
  return ids;
}

// --------------------------------------------------------------------------------------------
// BM_fma_peak: independent FMA chains, one OpenMP thread per core. Each chain's next FMA
// depends on its last, so kChains chains hide the FMA latency (4 cycles) on up to 4 pipes.

constexpr int kChains = 16;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
double fma_chains(std::int64_t loops, float seed) {
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(seed + float(j));
  const __m512 mul = _mm512_set1_ps(0.9999999f);
  const __m512 add = _mm512_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < loops; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], mul, add);
  }
  __m512 sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm512_add_ps(sum, acc[j]);
  // Stored and summed by hand: _mm512_reduce_add_ps trips a false -Wuninitialized in GCC 12.
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  double total = 0;
  for (float x : lanes) total += x;
  return total;
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
double fma_chains(std::int64_t loops, float seed) {
  __m256 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(seed + float(j));
  const __m256 mul = _mm256_set1_ps(0.9999999f);
  const __m256 add = _mm256_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < loops; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], mul, add);
  }
  alignas(32) float lanes[8];
  __m256 sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm256_add_ps(sum, acc[j]);
  _mm256_store_ps(lanes, sum);
  double total = 0;
  for (float x : lanes) total += x;
  return total;
}
#else
constexpr int kLanes = 1;
double fma_chains(std::int64_t loops, float seed) {
  float acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = seed + float(j);
  for (std::int64_t i = 0; i < loops; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = std::fma(acc[j], 0.9999999f, 1e-7f);
  double total = 0;
  for (float x : acc) total += x;
  return total;
}
#endif

void BM_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  // 16 Mi vector FMAs per thread: ~6 ms at 2.6 GHz and one zmm FMA per cycle (Zen 4).
  constexpr std::int64_t loops = 1 << 20;
  volatile float seed = 1.0f;
  const LoopTimer timer;
  for (auto _ : state) {
    double sink = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += fma_chains(loops, seed);
    benchmark::DoNotOptimize(sink);
  }
  const double flops = double(threads) * loops * kChains * kLanes * 2.0;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(flops * double(state.iterations()) / timer.seconds() / peak_flops());
  state.SetLabel(kLanes == 16 ? "AVX-512" : kLanes == 8 ? "AVX2" : "scalar");
}
BENCHMARK(BM_fma_peak)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime();

#if defined(__AVX512BF16__)
// BM_bf16_dot_peak: the same with AVX512-BF16 dot products (vdpbf16ps: 32 bf16 pairs multiplied
// and added into 16 fp32 lanes, 64 FLOPs), the roof of the bf16-cache kernels. Their FLOP/s are
// counted like the fp32 ones, so their peak_fraction may pass 1 where this roof is above the
// fp32 FMA one.
double bf16_dot_chains(std::int64_t loops, float seed) {
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(seed + float(j));
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(seed));
  for (std::int64_t i = 0; i < loops; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  }
  alignas(64) float lanes[16];
  __m512 sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = _mm512_add_ps(sum, acc[j]);
  _mm512_store_ps(lanes, sum);
  double total = 0;
  for (float x : lanes) total += x;
  return total;
}

void BM_bf16_dot_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  constexpr std::int64_t loops = 1 << 20;
  volatile float seed = 1.0f;
  const LoopTimer timer;
  for (auto _ : state) {
    double sink = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += bf16_dot_chains(loops, seed);
    benchmark::DoNotOptimize(sink);
  }
  const double flops = double(threads) * loops * kChains * 64.0;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["peak_fraction"] =
      benchmark::Counter(flops * double(state.iterations()) / timer.seconds() / peak_flops());
}
BENCHMARK(BM_bf16_dot_peak)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime();
#endif

// BM_memory_read: the rate `threads` cores read a 1 GiB fp32 array (far past the L3), summing
// it with SIMD adds: the roof of the memory-bound rows (bytes/s).

void BM_memory_read(benchmark::State& state) {
  const int threads = int(state.range(0));
  static std::vector<float> data = [] {
    std::vector<float> v(std::size_t(1) << 28);
    hash_fill(v.data(), v.size(), 9);
    return v;
  }();
  const std::int64_t n = std::int64_t(data.size());
  for (auto _ : state) {
    float sink = 0.0f;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+ : sink)
    for (std::int64_t i = 0; i < n; ++i) sink += data[std::size_t(i)];
    benchmark::DoNotOptimize(sink);
  }
  const double bytes = double(n) * sizeof(float);
  state.counters["bytes/s"] =
      benchmark::Counter(bytes * double(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_memory_read)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// --------------------------------------------------------------------------------------------
// BM_absorbed_decode_core: the MQA core of absorbed MLA decode (FlashMLA's shape): batch
// sequences of ctx cached tokens, q_len = 1 query token, n_heads query rows per sequence, one
// 576-wide key per token whose first 512 columns are the value.
// FLOPs per step: batch · heads · q_len · ctx · 2 · (576 + 512).

template <class C, class Storage>
void BM_absorbed_decode_core(benchmark::State& state) {
  using S = MlaShape<C>;
  const index_t batch = state.range(0);
  const index_t ctx = state.range(1);
  constexpr index_t q_len = 1;
  const CpuBackend cpu;
  const auto cache = filled_cache<C, Storage>(batch, ctx, 1);
  const std::vector<index_t> seqs = iota_ids(batch);
  const std::vector<float> q =
      random_floats(std::size_t(batch * q_len * S::n_heads * S::latent_dim), 2);
  std::vector<float> out(std::size_t(batch * q_len * S::n_heads * S::kv_lora_rank));
  const HostView<const float, 4> q_view(q.data(), {batch, q_len, S::n_heads, S::latent_dim});
  const HostView<float, 4> out_view(out.data(), {batch, q_len, S::n_heads, S::kv_lora_rank});
  const double scale = mla::softmax_scale<C>();
  const LoopTimer timer;
  for (auto _ : state) {
    mla::absorbed_attention(cpu, cache, std::span<const index_t>(seqs), q_view, scale, out_view);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double flops =
      double(batch) * S::n_heads * q_len * double(ctx) * 2.0 * (S::latent_dim + S::kv_lora_rank);
  set_counters(state, timer.seconds(), flops,
               double(batch) * double(ctx) * double(cache.bytes_per_token()));
}

void decode_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "ctx"});
  for (int batch : {1, 4})
    for (int ctx : {1024, 4096, 16384}) b->Args({batch, ctx});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void tiny_decode_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "ctx"})->Args({1, 100})->Args({4, 100})->UseRealTime();
}

BENCHMARK_TEMPLATE(BM_absorbed_decode_core, DeepSeekV3, float)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_absorbed_decode_core, DeepSeekV3, bfloat16)->Apply(decode_shapes);
BENCHMARK_TEMPLATE(BM_absorbed_decode_core, Tiny, float)->Apply(tiny_decode_shapes);
BENCHMARK_TEMPLATE(BM_absorbed_decode_core, Tiny, bfloat16)->Apply(tiny_decode_shapes);

// --------------------------------------------------------------------------------------------
// BM_naive_decode: the same decode step without absorption: every cached latent is
// up-projected through wkv_b into 128 heads × [k_nope 128 ; v 128] at every step, then
// ordinary MHA with d_qk = 192, d_v = 128. ~50x the absorbed FLOPs: the reason decode absorbs.
// FLOPs per step: ctx · 2 · H · 256 · 512 (decompression) + ctx · 2 · H · (192 + 128).

template <class C>
void BM_naive_decode(benchmark::State& state) {
  using S = MlaShape<C>;
  const index_t batch = state.range(0);
  const index_t ctx = state.range(1);
  constexpr index_t q_len = 1;
  const CpuBackend cpu;
  const auto& weights = layer_weights<C>();
  const auto cache = filled_cache<C, float>(batch, ctx, 3);
  const std::vector<index_t> seqs = iota_ids(batch);
  const std::vector<float> q =
      random_floats(std::size_t(batch * q_len * S::n_heads * S::qk_head_dim), 4);
  std::vector<float> out(std::size_t(batch * q_len * S::n_heads * S::v_head_dim));
  const HostView<const float, 4> q_view(q.data(), {batch, q_len, S::n_heads, S::qk_head_dim});
  const HostView<float, 4> out_view(out.data(), {batch, q_len, S::n_heads, S::v_head_dim});
  const double scale = mla::softmax_scale<C>();
  const LoopTimer timer;
  for (auto _ : state) {
    mla::naive_attention(cpu, weights, cache, std::span<const index_t>(seqs), q_view, scale,
                         out_view);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double tokens = double(batch) * double(ctx);
  const double flops = tokens * 2.0 * S::n_heads * S::kv_b_rows_per_head * S::kv_lora_rank +
                       tokens * q_len * 2.0 * S::n_heads * (S::qk_head_dim + S::v_head_dim);
  set_counters(state, timer.seconds(), flops, tokens * double(cache.bytes_per_token()));
}

BENCHMARK_TEMPLATE(BM_naive_decode, DeepSeekV3)
    ->ArgNames({"batch", "ctx"})
    ->Args({1, 1024})
    ->Args({1, 4096})
    ->Iterations(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_naive_decode, Tiny)->Apply(tiny_decode_shapes);

// --------------------------------------------------------------------------------------------
// BM_mha_decode: the cache MLA replaces. Standard multi-head attention decode for one query
// token over full per-head keys [ctx, H, 192] and values [ctx, H, 128] in fp32 (the token-major
// layout of vLLM's and llama.cpp's caches). Each OpenMP thread takes a range of heads and walks
// the tokens in order, so it streams one contiguous slice of every cached row: scores for all
// its heads, softmax, then o = Σ_t p_t v_t. Memory-bound: it reads ctx · H · 320 · 4 bytes per
// step (2.7 GB at 16K for DeepSeek-V3's 128 heads; MLA's latent cache: 38 MB fp32, 19 MB bf16).

template <class C>
void BM_mha_decode(benchmark::State& state) {
  using S = MlaShape<C>;
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Rows = Eigen::Map<const RowMatrix>;
  constexpr index_t H = S::n_heads;
  constexpr index_t QK = S::qk_head_dim;
  constexpr index_t VD = S::v_head_dim;
  const index_t ctx = state.range(0);
  std::vector<float> k(std::size_t(ctx * H * QK));  // [ctx, H, qk_head_dim]
  std::vector<float> v(std::size_t(ctx * H * VD));  // [ctx, H, v_head_dim]
  hash_fill(k.data(), k.size(), 5);
  hash_fill(v.data(), v.size(), 6);
  const std::vector<float> q = random_floats(std::size_t(H * QK), 7);  // [H, qk_head_dim]
  std::vector<float> out(std::size_t(H * VD));                         // [H, v_head_dim]
  const float scale = float(mla::softmax_scale<C>());
  const LoopTimer timer;
  for (auto _ : state) {
#pragma omp parallel
    {
#if defined(_OPENMP)
      const index_t threads = omp_get_num_threads();
      const index_t team = omp_get_thread_num();
#else
      const index_t threads = 1;
      const index_t team = 0;
#endif
      const index_t h0 = H * team / threads;
      const index_t nh = H * (team + 1) / threads - h0;
      if (nh > 0) {
        const Rows q_heads(q.data() + h0 * QK, nh, QK);
        // scores[h][t] for this thread's heads, one column per token.
        Eigen::MatrixXf scores(nh, ctx);
        for (index_t t = 0; t < ctx; ++t) {
          const Rows k_t(k.data() + (t * H + h0) * QK, nh, QK);
          scores.col(t) = k_t.cwiseProduct(q_heads).rowwise().sum();
        }
        const Eigen::VectorXf row_max = scores.rowwise().maxCoeff() * scale;
        scores = ((scores * scale).colwise() - row_max).array().exp().matrix();
        const Eigen::ArrayXf inv_sum = scores.rowwise().sum().array().inverse();
        RowMatrix o = RowMatrix::Zero(nh, VD);
        for (index_t t = 0; t < ctx; ++t) {
          const Rows v_t(v.data() + (t * H + h0) * VD, nh, VD);
          o.array() += v_t.array().colwise() * scores.col(t).array();
        }
        Eigen::Map<RowMatrix>(out.data() + h0 * VD, nh, VD) = o.array().colwise() * inv_sum;
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double flops = double(ctx) * 2.0 * H * (QK + VD);
  set_counters(state, timer.seconds(), flops, double(ctx) * H * (QK + VD) * sizeof(float));
}

BENCHMARK_TEMPLATE(BM_mha_decode, DeepSeekV3)
    ->ArgName("ctx")
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(16384)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_mha_decode, Tiny)->ArgName("ctx")->Arg(100)->UseRealTime();

// --------------------------------------------------------------------------------------------
// BM_prefill: one whole MLA layer over a prompt in one call (mla::prefill, naive attention as
// vLLM and ik_llama.cpp do for long chunks): projections, RoPE, norms, cache write, causal
// attention, output projection. items_per_second = prompt tokens per second.
// FLOPs: the projections (2 · weights per token), the decompression of every cached latent
// (2 · H · 256 · 512 per token), and the causal half of the attention products
// (2 · H · (192 + 128) per visible query-key pair, T(T+1)/2 pairs).

template <class C>
void BM_prefill(benchmark::State& state) {
  using S = MlaShape<C>;
  const index_t tokens = state.range(0);
  const CpuBackend cpu;
  const auto& weights = layer_weights<C>();
  ContiguousLatentCache<C, CpuBackend, float> cache(1, tokens);
  const std::vector<float> x = random_floats(std::size_t(tokens * S::dim), 8);
  std::vector<float> out(std::size_t(tokens * S::dim));
  const HostView<const float, 2> x_view(x.data(), {tokens, S::dim});
  const HostView<float, 2> out_view(out.data(), {tokens, S::dim});
  const LoopTimer timer;
  for (auto _ : state) {
    cache.clear();
    mla::prefill(cpu, weights, cache, 0, 0, x_view, out_view, mla::AttentionMode::naive);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double q_weights = S::has_q_lora ? double(S::dim) * S::q_lora_rank +
                                               double(S::q_lora_rank) * S::n_heads * S::qk_head_dim
                                         : double(S::dim) * S::n_heads * S::qk_head_dim;
  const double projection_weights =
      q_weights + double(S::dim) * S::latent_dim + double(S::n_heads) * S::v_head_dim * S::dim;
  const double t = double(tokens);
  const double flops = t * 2.0 * projection_weights +
                       t * 2.0 * S::n_heads * S::kv_b_rows_per_head * S::kv_lora_rank +
                       t * (t + 1.0) / 2.0 * 2.0 * S::n_heads * (S::qk_head_dim + S::v_head_dim);
  set_counters(state, timer.seconds(), flops, t * double(cache.bytes_per_token()));
  state.SetItemsProcessed(state.iterations() * tokens);
}

BENCHMARK_TEMPLATE(BM_prefill, DeepSeekV2Lite)
    ->ArgName("tokens")
    ->Arg(2048)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_prefill, DeepSeekV3)
    ->ArgName("tokens")
    ->Arg(2048)
    ->Iterations(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_prefill, Tiny)->ArgName("tokens")->Arg(64)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
