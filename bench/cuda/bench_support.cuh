// SPDX-License-Identifier: Apache-2.0
//
// What the GPU benchmarks (bench/cuda/bench_*.cu) share: random device data from a hash
// (random_fill.cuh), CUDA event timing, the L2 flush, the two roofs measured once per process (copy
// bandwidth and the cuBLAS bf16 GEMM rate, the denominators of the fraction counters), and a main()
// that exits 0 with a sentence where no device answers (so CI's smoke pass, which has no GPU, is
// harmless).
//
// Timing convention of every benchmark: each iteration times one call between two CUDA events
// (UseManualTime); DAEDALUS_BENCH_ITERATIONS calls (default 10) per run; pass
// --benchmark_repetitions=N and read the median aggregate.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <daedalus/cuda.cuh>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "random_fill.cuh"

namespace daedalus::bench {

using Bf16 = __nv_bfloat16;

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

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Calls per run of each benchmark: DAEDALUS_BENCH_ITERATIONS, else 10.
inline benchmark::IterationCount iterations_per_run() {
  const char* text = std::getenv("DAEDALUS_BENCH_ITERATIONS");
  const long value = text != nullptr ? std::atol(text) : 0;
  return value > 0 ? benchmark::IterationCount(value) : benchmark::IterationCount(10);
}

/// Times `call` once per iteration between two CUDA events on the device's stream, after one
/// untimed call, with the L2 cache flushed before each timed call (outside the timed region);
/// returns the seconds summed over the iterations. `Device` is BenchDevice (defined below).
template <class Device, class Call>
double time_flushed_calls(benchmark::State& state, Device& dev, Call&& call) {
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
  return seconds;
}

/// The first value that is NaN or infinite (outputs are poisoned with NaN before a first call, so
/// a value never written shows too), or -1.
inline std::int64_t first_non_finite(const std::vector<float>& values) {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i])) return std::int64_t(i);
  return -1;
}

/// The process's stream, an L2 flush buffer and the two measured roofs; created on first use
/// (never without a device).
struct BenchDevice {
  dcuda::Stream stream;
  CudaBackend backend{stream.get()};
  int l2_bytes = 0;
  dcuda::DeviceBuffer<unsigned char> l2_flush;
  double copy_bytes_per_second = 0.0;
  double gemm_flops_per_second = 0.0;
  int flushes = 0;

  BenchDevice() {
    int device = 0;
    DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
    DAEDALUS_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    l2_flush = dcuda::DeviceBuffer<unsigned char>(
        std::max<std::size_t>(std::size_t(256) << 20, 2 * std::size_t(l2_bytes)));
  }

  /// Evicts the L2 cache by writing a buffer twice its size (not timed): without it the small
  /// shapes would be read from L2, as Triton's do_bench also avoids.
  void flush_l2() {
    DAEDALUS_CUDA_CHECK(
        cudaMemsetAsync(l2_flush.data(), flushes++ & 0xff, l2_flush.bytes(), stream.get()));
  }
};

inline BenchDevice& bench_device() {
  static BenchDevice device;
  return device;
}

// --------------------------------------------------------------------------------------------
// The two roofs

inline constexpr std::size_t kCopyBytes = std::size_t(2) << 30;  // 2 GiB each way
inline constexpr int kGemmSize = 8192;

/// cudaMemcpy device to device of 2 GiB; bytes count what is read plus what is written.
class CopyProbe {
 public:
  explicit CopyProbe(BenchDevice& dev)
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
  BenchDevice& dev_;
  dcuda::DeviceBuffer<float> src_, dst_;
  EventTimer timer_;
};

/// An 8192³ bf16 GEMM with fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F) on random data.
class GemmProbe {
 public:
  explicit GemmProbe(BenchDevice& dev) : dev_(dev), a_(elements()), b_(elements()), c_(elements()) {
    fill_random(dev_.backend, a_.data(), a_.size(), 0x5eed0003);
    fill_random(dev_.backend, b_.data(), b_.size(), 0x5eed0004);
  }

  /// Seconds one C = A·B (bf16 in and out, fp32 accumulation) takes.
  double run() {
    const float alpha = 1.0f, beta = 0.0f;
    cublasHandle_t handle = dcuda::blas_handle(dev_.backend);
    timer_.start(dev_.stream.get());
    DAEDALUS_CUBLAS_CHECK(
        cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, kGemmSize, kGemmSize, kGemmSize, &alpha,
                     a_.data(), CUDA_R_16BF, kGemmSize, b_.data(), CUDA_R_16BF, kGemmSize, &beta,
                     c_.data(), CUDA_R_16BF, kGemmSize, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return timer_.stop(dev_.stream.get());
  }
  static constexpr double flops() { return 2.0 * double(kGemmSize) * kGemmSize * kGemmSize; }

 private:
  static std::size_t elements() { return std::size_t(kGemmSize) * kGemmSize; }
  BenchDevice& dev_;
  dcuda::DeviceBuffer<Bf16> a_, b_, c_;
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
inline void measure_roofs() {
  BenchDevice& dev = bench_device();
  {
    CopyProbe copy(dev);
    dev.copy_bytes_per_second = CopyProbe::bytes() / median_seconds(copy, 3, 15);
  }
  {
    GemmProbe gemm(dev);
    dev.gemm_flops_per_second = GemmProbe::flops() / median_seconds(gemm, 3, 10);
  }
}

template <class Probe>
void probe_benchmark(benchmark::State& state, const char* counter, double amount) {
  try {
    Probe probe(bench_device());
    probe.run();
    for (auto _ : state) state.SetIterationTime(probe.run());
    state.counters[counter] =
        benchmark::Counter(amount, benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

inline void BM_copy_bandwidth(benchmark::State& state) {
  probe_benchmark<CopyProbe>(state, "bytes/s", CopyProbe::bytes());
}

inline void BM_cublas_bf16_gemm(benchmark::State& state) {
  probe_benchmark<GemmProbe>(state, "FLOP/s", GemmProbe::flops());
}

/// Registers a benchmark the way every GPU benchmark runs: manual (event) time, a fixed number
/// of calls per run, microseconds.
template <class... Args>
benchmark::internal::Benchmark* register_timed(const std::string& name, Args&&... args) {
  return benchmark::RegisterBenchmark(name.c_str(), std::forward<Args>(args)...)
      ->UseManualTime()
      ->Iterations(iterations_per_run())
      ->Unit(benchmark::kMicrosecond);
}

/// BM_copy_bandwidth and BM_cublas_bf16_gemm, the rows that show the roofs in the table.
inline void register_roof_benchmarks() {
  register_timed("BM_copy_bandwidth", &BM_copy_bandwidth);
  register_timed("BM_cublas_bf16_gemm", &BM_cublas_bf16_gemm);
}

/// True when the command line asks only for the list of benchmarks (no device needed).
inline bool listing_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg(argv[i]);
    if (arg == "--benchmark_list_tests" || arg == "--benchmark_list_tests=true" ||
        arg == "--benchmark_list_tests=1")
      return true;
  }
  return false;
}

/// The main() of a GPU benchmark binary named `program`: registers (through `register_all`),
/// then, unless only listing, exits 0 with a sentence when no device answers, else measures the
/// roofs and writes them into the JSON context (copy_bytes_per_second, gemm_flops_per_second,
/// device) before running the benchmarks.
template <class Register>
int run_benchmarks(const char* program, int argc, char** argv, Register register_all) {
  const bool listing = listing_only(argc, argv);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!listing) {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0) {
      std::printf(
          "%s: no CUDA device answered (%s); nothing was measured (exit 0). "
          "Run bench/gpu/check.sh on a machine with a GPU.\n",
          program,
          status != cudaSuccess ? cudaGetErrorString(status)
                                : "cudaGetDeviceCount reported 0 devices");
      return 0;
    }
    try {
      measure_roofs();
      const BenchDevice& dev = bench_device();
      cudaDeviceProp props{};
      DAEDALUS_CUDA_CHECK(cudaGetDeviceProperties(&props, 0));
      benchmark::AddCustomContext("device", props.name);
      benchmark::AddCustomContext("copy_bytes_per_second",
                                  std::to_string(dev.copy_bytes_per_second));
      benchmark::AddCustomContext("gemm_flops_per_second",
                                  std::to_string(dev.gemm_flops_per_second));
      std::printf(
          "%s: %s; measured copy bandwidth %.1f GB/s (read + write), bf16 GEMM %.1f TFLOP/s\n",
          program, props.name, dev.copy_bytes_per_second * 1e-9, dev.gemm_flops_per_second * 1e-12);
      std::fflush(stdout);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: measuring the roofs failed: %s\n", program, e.what());
      return 1;
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace daedalus::bench
