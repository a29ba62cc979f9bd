// SPDX-License-Identifier: Apache-2.0
// What every CPU benchmark binary shares: the machine's fp32 FMA roof that `peak_fraction`
// counters divide by, and a wall-clock timer for the timed loop.
#pragma once

#include <chrono>
#include <cstdlib>

namespace daedalus::bench {

/// The fp32 FMA peak of the machine in FLOP/s: DAEDALUS_PEAK_GFLOPS (GFLOP/s) or 226, the
/// 2-thread BM_fma_peak measured on the development machine (bench/RESULTS.md, "Machine").
inline double peak_flops() {
  static const double peak = [] {
    const char* env = std::getenv("DAEDALUS_PEAK_GFLOPS");
    const double gflops = env ? std::atof(env) : 0.0;
    return (gflops > 0.0 ? gflops : 226.0) * 1e9;
  }();
  return peak;
}

/// Real time spent in a benchmark's timed loop: `peak_fraction` must be a plain ratio, and
/// Google Benchmark only divides counters by the elapsed time as rates (printed with "/s").
class LoopTimer {
 public:
  LoopTimer() : start_(std::chrono::steady_clock::now()) {}
  [[nodiscard]] double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace daedalus::bench
