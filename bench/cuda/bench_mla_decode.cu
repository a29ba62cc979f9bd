// SPDX-License-Identifier: Apache-2.0
//
// GPU benchmarks of daedalus's absorbed MLA decode kernel (Google Benchmark, CUDA events).
//
// - BM_copy_bandwidth: cudaMemcpy device to device of 2 GiB; bytes/s counts bytes read plus
//   bytes written. The memory roof that copy_bw_fraction divides by.
// - BM_cublas_bf16_gemm: an 8192³ bf16 GEMM with fp32 accumulation (cublasGemmEx,
//   CUBLAS_COMPUTE_32F) on random data. The matrix roof that gemm_fraction divides by.
// - BM_mla_decode<Config>/batch:B/ctx:T/q_len:Q[/varlen]: mla::cuda::absorbed_decode over a bf16
//   paged pool ([blocks, 64, 576], FlashMLA's layout) of random rows, each batch entry's blocks
//   drawn from a shuffled permutation of the pool. FlashMLA's grid: batch 1/16/64/128, context
//   4K/16K, DeepSeek-V3 (128 heads) and DeepSeek-V2-Lite (16 heads), 1 and 2 query tokens, and
//   varlen batches whose lengths are drawn uniformly in [T/2, 3T/2] (sequence_lengths below; the
//   PyTorch baseline bench/gpu/torch_mla_decode.py draws the same lengths).
//
// Counters of the decode rows:
//   bytes          bytes one call must move: every cached latent row read once (576 bf16 values)
//                  plus the fp32 queries read and the fp32 latent outputs written
//   bytes/s        bytes over the measured time of one call
//   FLOP/s         Σ_b 2 · q_len · heads · seqlen_b · (576 + 512) per call (q·Kᵀ over the 576-wide
//                  latent, P·V over its first 512 columns; FlashMLA's count) over the time
//   copy_bw_fraction  bytes/s over the copy bandwidth measured at start in this process
//   gemm_fraction     FLOP/s over the bf16 GEMM rate measured at start in this process
//   heads, batch, ctx, q_len, varlen: the shape, for bench/gpu/table.py
// The two roofs are measured once when the binary starts (before any benchmark, whatever the
// filter) and written into the JSON context as copy_bytes_per_second and gemm_flops_per_second.
//
// Timing: each iteration flushes the L2 cache (a memset of max(256 MiB, 2 · L2) outside the
// timed region: the pools of the small shapes would otherwise be read from L2, as Triton's
// do_bench does), then times one call between two CUDA events (UseManualTime). Two untimed calls
// warm up first; the first one also checks that every output value was written and is finite
// (the output is poisoned with NaN before it). Each run is DAEDALUS_BENCH_ITERATIONS calls
// (default 10); pass --benchmark_repetitions=N and read the median aggregate.
//
// Names containing "Tiny" run tiny shapes (CI's smoke convention). Without a CUDA device the
// binary says so and exits 0, so a smoke call on a machine without a GPU is harmless; listing
// (--benchmark_list_tests) works without one.

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/mla/cuda/absorbed_decode.cuh"

namespace {

using namespace daedalus;  // so template arguments print as "DeepSeekV3"
namespace dcuda = daedalus::cuda;

using Bf16 = __nv_bfloat16;

constexpr int kBlockSize = 64;  // FlashMLA's page size
constexpr int kLatentDim = MlaShape<DeepSeekV3>::latent_dim;
constexpr int kRank = MlaShape<DeepSeekV3>::kv_lora_rank;
static_assert(MlaShape<DeepSeekV2Lite>::latent_dim == kLatentDim &&
                  MlaShape<DeepSeekV2Lite>::kv_lora_rank == kRank,
              "the benchmarks share one pool of latent rows between DeepSeek-V3 and V2-Lite");
constexpr std::size_t kRowBytes = std::size_t(kLatentDim) * sizeof(Bf16);

// --------------------------------------------------------------------------------------------
// Small device helpers

/// Throws CudaError naming the cuBLAS call when it did not succeed.
void check_cublas(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw CudaError(std::string("bench_cuda_mla_decode: ") + call +
                  " failed: " + cublasGetStatusString(status));
}
#define BENCH_CUBLAS_CHECK(call) check_cublas((call), #call)

/// SplitMix64 (Steele, Lea, Flood 2014): the hash behind the random values and the varlen
/// lengths (bench/gpu/torch_mla_decode.py has the same function, so both draw the same lengths).
__host__ __device__ inline std::uint64_t splitmix64(std::uint64_t x) {
  std::uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class T>
struct FillParams {
  T* data;
  std::size_t count;
  std::uint64_t seed;
};

/// data[i] = a value uniform in [-1, 1) from the hash of (seed, i), rounded to T: never zeros
/// (METHOD: zeros can run faster than real data).
template <class T>
__global__ void fill_uniform(FillParams<T> params) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < params.count;
       i += stride) {
    const std::uint64_t z = splitmix64(params.seed ^ (i * 0xD1B54A32D192ED03ull));
    const float u = float(z >> 40) * 0x1p-23f - 1.0f;
    params.data[i] = dcuda::from_float<T>(u);
  }
}

template <class T>
void fill_random(const CudaBackend& backend, T* data, std::size_t count, std::uint64_t seed) {
  if (count == 0) return;
  constexpr unsigned kThreads = 256;
  const std::size_t blocks = std::min<std::size_t>((count + kThreads - 1) / kThreads, 65536);
  dcuda::launch(backend, {dim3(unsigned(blocks)), dim3(kThreads)}, &fill_uniform<T>,
                FillParams<T>{data, count, seed});
}

/// A pair of CUDA events timing work issued between start() and stop() on one stream.
class EventTimer {
 public:
  EventTimer() {
    DAEDALUS_CUDA_CHECK(cudaEventCreate(&start_));
    DAEDALUS_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    static_cast<void>(cudaEventDestroy(start_));
    static_cast<void>(cudaEventDestroy(stop_));
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start(cudaStream_t stream) { DAEDALUS_CUDA_CHECK(cudaEventRecord(start_, stream)); }
  /// Records the stop event, waits for it and returns the seconds between the two events.
  double stop(cudaStream_t stream) {
    DAEDALUS_CUDA_CHECK(cudaEventRecord(stop_, stream));
    DAEDALUS_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.0f;
    DAEDALUS_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Calls per run of each benchmark: DAEDALUS_BENCH_ITERATIONS, else 10.
benchmark::IterationCount iterations_per_run() {
  const char* text = std::getenv("DAEDALUS_BENCH_ITERATIONS");
  const long value = text != nullptr ? std::atol(text) : 0;
  return value > 0 ? benchmark::IterationCount(value) : benchmark::IterationCount(10);
}

// --------------------------------------------------------------------------------------------
// Process-wide device state, created on first use (never without a device).

struct DeviceState {
  dcuda::Stream stream;
  CudaBackend backend{stream.get()};
  int l2_bytes = 0;
  dcuda::DeviceBuffer<unsigned char> l2_flush;
  dcuda::DeviceBuffer<Bf16> pool;  // [pool_blocks, kBlockSize, kLatentDim]
  std::int64_t pool_blocks = 0;
  double copy_bytes_per_second = 0.0;
  double gemm_flops_per_second = 0.0;
  int flushes = 0;

  DeviceState() {
    int device = 0;
    DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
    DAEDALUS_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    l2_flush = dcuda::DeviceBuffer<unsigned char>(
        std::max<std::size_t>(std::size_t(256) << 20, 2 * std::size_t(l2_bytes)));
  }

  /// Evicts the L2 cache by writing a buffer twice its size (not timed).
  void flush_l2() {
    DAEDALUS_CUDA_CHECK(
        cudaMemsetAsync(l2_flush.data(), flushes++ & 0xff, l2_flush.bytes(), stream.get()));
  }

  /// The pool of random bf16 latent rows, grown (and redrawn) to at least `blocks` blocks.
  const Bf16* latent_pool(std::int64_t blocks) {
    if (blocks > pool_blocks) {
      pool = dcuda::DeviceBuffer<Bf16>();  // free first: the pool is gigabytes
      const std::size_t count = std::size_t(blocks) * kBlockSize * kLatentDim;
      pool = dcuda::DeviceBuffer<Bf16>(count);
      fill_random(backend, pool.data(), count, 0x5eed0001);
      pool_blocks = blocks;
    }
    return pool.data();
  }
};

DeviceState& device_state() {
  static DeviceState state;
  return state;
}

// --------------------------------------------------------------------------------------------
// The two roofs

constexpr std::size_t kCopyBytes = std::size_t(2) << 30;  // 2 GiB each way
constexpr int kGemmSize = 8192;

class CopyProbe {
 public:
  explicit CopyProbe(DeviceState& dev)
      : dev_(dev), src_(kCopyBytes / sizeof(float)), dst_(kCopyBytes / sizeof(float)) {
    fill_random(dev_.backend, src_.data(), src_.size(), 0x5eed0002);
  }
  /// Seconds one 2 GiB device-to-device copy takes.
  double run() {
    timer_.start(dev_.stream.get());
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst_.data(), src_.data(), kCopyBytes,
                                        cudaMemcpyDeviceToDevice, dev_.stream.get()));
    return timer_.stop(dev_.stream.get());
  }
  static constexpr double bytes() { return 2.0 * double(kCopyBytes); }  // read + write

 private:
  DeviceState& dev_;
  dcuda::DeviceBuffer<float> src_, dst_;
  EventTimer timer_;
};

class GemmProbe {
 public:
  explicit GemmProbe(DeviceState& dev) : dev_(dev), a_(elements()), b_(elements()), c_(elements()) {
    fill_random(dev_.backend, a_.data(), a_.size(), 0x5eed0003);
    fill_random(dev_.backend, b_.data(), b_.size(), 0x5eed0004);
    BENCH_CUBLAS_CHECK(cublasCreate(&handle_));
    BENCH_CUBLAS_CHECK(cublasSetStream(handle_, dev_.stream.get()));
  }
  ~GemmProbe() { static_cast<void>(cublasDestroy(handle_)); }
  GemmProbe(const GemmProbe&) = delete;
  GemmProbe& operator=(const GemmProbe&) = delete;

  /// Seconds one C = A·B (bf16 in and out, fp32 accumulation) takes.
  double run() {
    const float alpha = 1.0f, beta = 0.0f;
    timer_.start(dev_.stream.get());
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, kGemmSize, kGemmSize,
                                    kGemmSize, &alpha, a_.data(), CUDA_R_16BF, kGemmSize, b_.data(),
                                    CUDA_R_16BF, kGemmSize, &beta, c_.data(), CUDA_R_16BF,
                                    kGemmSize, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return timer_.stop(dev_.stream.get());
  }
  static constexpr double flops() { return 2.0 * double(kGemmSize) * kGemmSize * kGemmSize; }

 private:
  static std::size_t elements() { return std::size_t(kGemmSize) * kGemmSize; }
  DeviceState& dev_;
  dcuda::DeviceBuffer<Bf16> a_, b_, c_;
  cublasHandle_t handle_ = nullptr;
  EventTimer timer_;
};

/// Median of `timed` runs after `warmup` untimed ones.
template <class Probe>
double median_seconds(Probe& probe, int warmup, int timed) {
  for (int i = 0; i < warmup; ++i) probe.run();
  std::vector<double> seconds;
  for (int i = 0; i < timed; ++i) seconds.push_back(probe.run());
  return median(seconds);
}

/// Measures both roofs once (median of 15 copies and of 10 GEMMs), for the fraction counters.
void measure_roofs() {
  DeviceState& dev = device_state();
  {
    CopyProbe copy(dev);
    dev.copy_bytes_per_second = CopyProbe::bytes() / median_seconds(copy, 3, 15);
  }
  {
    GemmProbe gemm(dev);
    dev.gemm_flops_per_second = GemmProbe::flops() / median_seconds(gemm, 3, 10);
  }
}

void BM_copy_bandwidth(benchmark::State& state) {
  try {
    CopyProbe probe(device_state());
    probe.run();
    for (auto _ : state) state.SetIterationTime(probe.run());
    state.counters["bytes/s"] =
        benchmark::Counter(CopyProbe::bytes(), benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_cublas_bf16_gemm(benchmark::State& state) {
  try {
    GemmProbe probe(device_state());
    probe.run();
    for (auto _ : state) state.SetIterationTime(probe.run());
    state.counters["FLOP/s"] =
        benchmark::Counter(GemmProbe::flops(), benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// --------------------------------------------------------------------------------------------
// The decode benchmarks

struct DecodeShape {
  int batch;
  int ctx;  // every entry's length, or the mean length when varlen
  int q_len;
  bool varlen;
};

/// Cached tokens of each batch entry: `ctx`, or for varlen ctx/2 + (splitmix64(b) mod (ctx+1)),
/// uniform in [ctx/2, 3·ctx/2] around the mean (bench/gpu/torch_mla_decode.py: the same lengths).
std::vector<std::int32_t> sequence_lengths(const DecodeShape& shape) {
  std::vector<std::int32_t> lengths(std::size_t(shape.batch), shape.ctx);
  if (shape.varlen) {
    for (int b = 0; b < shape.batch; ++b) {
      const std::uint64_t draw = splitmix64(std::uint64_t(b)) % std::uint64_t(shape.ctx + 1);
      lengths[std::size_t(b)] = std::max(shape.ctx / 2 + std::int32_t(draw), shape.q_len);
    }
  }
  return lengths;
}

/// A block table [batch, max_blocks] giving each entry its blocks from a shuffled permutation of
/// all `pool_blocks` blocks of the pool (entries past an entry's length hold block 0, never read).
std::vector<std::int32_t> shuffled_block_table(const std::vector<std::int32_t>& lengths,
                                               std::int64_t pool_blocks, int max_blocks,
                                               std::uint64_t seed) {
  std::vector<std::int32_t> permutation(std::size_t(pool_blocks), 0);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::vector<std::int32_t> table(lengths.size() * std::size_t(max_blocks), 0);
  std::size_t next = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const int used = (lengths[b] + kBlockSize - 1) / kBlockSize;
    for (int j = 0; j < used; ++j)
      table[b * std::size_t(max_blocks) + std::size_t(j)] = permutation[next++];
  }
  return table;
}

/// NaN or never written (the output was poisoned with NaN before the first call): the index of
/// the first bad value, or -1.
std::int64_t first_non_finite(const std::vector<float>& values) {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i])) return std::int64_t(i);
  return -1;
}

template <class C>
void BM_mla_decode(benchmark::State& state, DecodeShape shape) {
  using S = MlaShape<C>;
  try {
    DeviceState& dev = device_state();
    const std::vector<std::int32_t> lengths = sequence_lengths(shape);
    int max_blocks = 0;
    std::int64_t needed_blocks = 0;
    double rows_read = 0.0;
    for (const std::int32_t length : lengths) {
      const int blocks = (length + kBlockSize - 1) / kBlockSize;
      max_blocks = std::max(max_blocks, blocks);
      needed_blocks += blocks;
      rows_read += double(length);
    }
    const Bf16* pool = dev.latent_pool(needed_blocks);
    const std::vector<std::int32_t> table = shuffled_block_table(
        lengths, dev.pool_blocks, max_blocks, 0x5eed0100 + std::uint64_t(shape.batch));

    const std::size_t q_count =
        std::size_t(shape.batch) * std::size_t(shape.q_len) * S::n_heads * S::latent_dim;
    const std::size_t out_count =
        std::size_t(shape.batch) * std::size_t(shape.q_len) * S::n_heads * S::kv_lora_rank;
    dcuda::DeviceBuffer<std::int32_t> device_table =
        dcuda::to_device(dev.backend, std::span<const std::int32_t>(table));
    dcuda::DeviceBuffer<std::int32_t> device_lengths =
        dcuda::to_device(dev.backend, std::span<const std::int32_t>(lengths));
    dcuda::DeviceBuffer<float> q(q_count), out(out_count);
    fill_random(dev.backend, q.data(), q_count, 0x5eed0200);

    const dcuda::DeviceLatentBatch<dcuda::PagedRowAddress> cache{
        reinterpret_cast<const std::byte*>(pool), kRowBytes,
        dcuda::PagedRowAddress{device_table.data(), max_blocks, kBlockSize}, device_lengths.data(),
        shape.batch};
    mla::cuda::AbsorbedDecodeWorkspace workspace;
    const float scale = float(mla::softmax_scale<C>());
    const auto call = [&] {
      mla::cuda::absorbed_decode<C, bfloat16>(dev.backend, cache, shape.q_len, q.data(), scale,
                                              out.data(), workspace);
    };

    // Warm-up; the first call's output must be complete and finite.
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xff, out.bytes(), dev.stream.get()));
    call();
    const std::int64_t bad = first_non_finite(dcuda::to_host(dev.backend, out));
    if (bad >= 0) {
      state.SkipWithError(
          ("absorbed_decode left output value " + std::to_string(bad) + " unwritten or non-finite")
              .c_str());
      return;
    }
    call();

    EventTimer timer;
    double seconds = 0.0;
    for (auto _ : state) {
      dev.flush_l2();
      timer.start(dev.stream.get());
      call();
      const double elapsed = timer.stop(dev.stream.get());
      state.SetIterationTime(elapsed);
      seconds += elapsed;
    }

    const double calls = double(state.iterations());
    const double bytes =
        rows_read * double(kRowBytes) + double(q_count + out_count) * double(sizeof(float));
    const double flops =
        2.0 * shape.q_len * S::n_heads * rows_read * (S::latent_dim + S::kv_lora_rank);
    const double bytes_per_second = seconds > 0 ? bytes * calls / seconds : 0.0;
    const double flops_per_second = seconds > 0 ? flops * calls / seconds : 0.0;
    state.counters["bytes"] = bytes;
    state.counters["bytes/s"] = bytes_per_second;
    state.counters["FLOP/s"] = flops_per_second;
    state.counters["copy_bw_fraction"] =
        dev.copy_bytes_per_second > 0 ? bytes_per_second / dev.copy_bytes_per_second : 0.0;
    state.counters["gemm_fraction"] =
        dev.gemm_flops_per_second > 0 ? flops_per_second / dev.gemm_flops_per_second : 0.0;
    state.counters["heads"] = S::n_heads;
    state.counters["batch"] = shape.batch;
    state.counters["ctx"] = shape.ctx;
    state.counters["q_len"] = shape.q_len;
    state.counters["varlen"] = shape.varlen ? 1 : 0;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class C>
void register_decode(const char* config, const DecodeShape& shape, bool tiny) {
  std::string name = std::string(tiny ? "BM_mla_decode_Tiny<" : "BM_mla_decode<") + config +
                     ">/batch:" + std::to_string(shape.batch) +
                     "/ctx:" + std::to_string(shape.ctx) + "/q_len:" + std::to_string(shape.q_len) +
                     (shape.varlen ? "/varlen" : "");
  benchmark::RegisterBenchmark(name.c_str(), &BM_mla_decode<C>, shape)
      ->UseManualTime()
      ->Iterations(iterations_per_run())
      ->Unit(benchmark::kMicrosecond);
}

void register_benchmarks() {
  benchmark::RegisterBenchmark("BM_copy_bandwidth", &BM_copy_bandwidth)
      ->UseManualTime()
      ->Iterations(iterations_per_run())
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("BM_cublas_bf16_gemm", &BM_cublas_bf16_gemm)
      ->UseManualTime()
      ->Iterations(iterations_per_run())
      ->Unit(benchmark::kMicrosecond);

  // Tiny: a few hundred tokens, lengths off the 64-token block size.
  register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {3, 300, 1, false}, true);
  register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {3, 300, 2, true}, true);
  register_decode<DeepSeekV3>("DeepSeekV3", {2, 130, 2, false}, true);

  // FlashMLA's grid.
  for (const int ctx : {4096, 16384}) {
    for (const int batch : {1, 16, 64, 128}) {
      for (const int q_len : {1, 2}) {
        register_decode<DeepSeekV3>("DeepSeekV3", {batch, ctx, q_len, false}, false);
        register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {batch, ctx, q_len, false}, false);
      }
    }
    for (const int batch : {64, 128}) {
      register_decode<DeepSeekV3>("DeepSeekV3", {batch, ctx, 1, true}, false);
      register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {batch, ctx, 1, true}, false);
    }
  }
}

/// True when the command line asks only for the list of benchmarks (no device needed).
bool listing_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg(argv[i]);
    if (arg == "--benchmark_list_tests" || arg == "--benchmark_list_tests=true" ||
        arg == "--benchmark_list_tests=1")
      return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool listing = listing_only(argc, argv);
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!listing) {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0) {
      std::printf(
          "bench_cuda_mla_decode: no CUDA device answered (%s); nothing was measured (exit 0). "
          "Run bench/gpu/check.sh on a machine with a GPU.\n",
          status != cudaSuccess ? cudaGetErrorString(status)
                                : "cudaGetDeviceCount reported 0 devices");
      return 0;
    }
    try {
      measure_roofs();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_cuda_mla_decode: measuring the roofs failed: %s\n", e.what());
      return 1;
    }
    const DeviceState& dev = device_state();
    cudaDeviceProp props{};
    DAEDALUS_CUDA_CHECK(cudaGetDeviceProperties(&props, 0));
    benchmark::AddCustomContext("device", props.name);
    benchmark::AddCustomContext("copy_bytes_per_second", std::to_string(dev.copy_bytes_per_second));
    benchmark::AddCustomContext("gemm_flops_per_second", std::to_string(dev.gemm_flops_per_second));
    std::printf(
        "bench_cuda_mla_decode: %s; measured copy bandwidth %.1f GB/s (read + write), "
        "bf16 GEMM %.1f TFLOP/s\n",
        props.name, dev.copy_bytes_per_second * 1e-9, dev.gemm_flops_per_second * 1e-12);
    std::fflush(stdout);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
