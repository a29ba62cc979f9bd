// SPDX-License-Identifier: Apache-2.0
//
// Random device data for the GPU benchmarks, drawn by a kernel from a hash of (seed, index), so
// that gigabytes of inputs cost no host work and no transfer. A header of its own (no Google
// Benchmark) so that the emulated tests run the kernel too (tests/emulated/bench_fill_test.cpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <daedalus/cuda.cuh>

namespace daedalus::bench {

namespace dcuda = daedalus::cuda;

/// SplitMix64 (Steele, Lea, Flood 2014): the hash behind the random values (the PyTorch
/// baselines in bench/gpu/ have the same function where they must draw the same numbers).
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
  float scale;
};

/// data[i] = scale · u_i rounded to T, where u_i is uniform in [-1, 1) on a grid of 2⁻²³ from the
/// hash of (seed, i): random data, since zeros and repeated values can run faster than real data.
template <class T>
__global__ void fill_uniform(FillParams<T> params) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < params.count;
       i += stride) {
    const std::uint64_t z = splitmix64(params.seed ^ (i * 0xD1B54A32D192ED03ull));
    const float u = float(z >> 40) * 0x1p-23f - 1.0f;
    params.data[i] = dcuda::from_float<T>(u * params.scale);
  }
}

template <class T>
void fill_random(const CudaBackend& backend, T* data, std::size_t count, std::uint64_t seed,
                 float scale = 1.0f) {
  if (count == 0) return;
  constexpr unsigned kThreads = 256;
  const std::size_t blocks = std::min<std::size_t>((count + kThreads - 1) / kThreads, 65536);
  dcuda::launch(backend, {dim3(unsigned(blocks)), dim3(kThreads)}, &fill_uniform<T>,
                FillParams<T>{data, count, seed, scale});
}

}  // namespace daedalus::bench
