// SPDX-License-Identifier: Apache-2.0
// The GPU benchmarks' random fill kernel (bench/cuda/random_fill.cuh) under the emulation layer:
// every element written, each equal to the hash formula evaluated on the host, in range, and
// different seeds giving different data.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <set>
#include <vector>

#include "../../bench/cuda/random_fill.cuh"
#include "doctest/doctest.h"

namespace {

/// The value the kernel must write at index i, computed on the host from the same hash.
float expected_value(std::uint64_t seed, std::size_t i, float scale) {
  const std::uint64_t z = daedalus::bench::splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
  return (float(z >> 40) * 0x1p-23f - 1.0f) * scale;
}

}  // namespace

TEST_CASE("bench random fill: every element is the hash of (seed, index), in [-scale, scale)") {
  namespace dcuda = daedalus::cuda;
  const daedalus::CudaBackend backend;
  // Not a multiple of the 256-thread block, so the last block's bounds check is exercised.
  constexpr std::size_t count = 1000;
  constexpr float scale = 0.25f;
  dcuda::DeviceBuffer<float> values(count);
  dcuda::DeviceBuffer<float> other(count);
  daedalus::bench::fill_random(backend, values.data(), count, 17, scale);
  daedalus::bench::fill_random(backend, other.data(), count, 18, scale);
  const std::vector<float> host = dcuda::to_host(backend, values);
  const std::vector<float> host_other = dcuda::to_host(backend, other);
  std::set<float> distinct;
  std::size_t same_as_other_seed = 0;
  for (std::size_t i = 0; i < count; ++i) {
    CAPTURE(i);
    CHECK(host[i] == expected_value(17, i, scale));
    CHECK(host[i] >= -scale);
    CHECK(host[i] < scale);
    distinct.insert(host[i]);
    same_as_other_seed += host[i] == host_other[i] ? 1 : 0;
  }
  // 1000 draws from 2^24 grid points: a repeat is possible but rare; many would mean a broken
  // hash or index.
  CHECK(distinct.size() > count - 5);
  CHECK(same_as_other_seed < 5);
}

TEST_CASE("bench random fill: bf16 values are the fp32 values rounded to nearest even") {
  namespace dcuda = daedalus::cuda;
  const daedalus::CudaBackend backend;
  constexpr std::size_t count = 777;
  dcuda::DeviceBuffer<__nv_bfloat16> values(count);
  daedalus::bench::fill_random(backend, values.data(), count, 5);
  const auto host = dcuda::to_host(backend, values);
  for (std::size_t i = 0; i < count; ++i) {
    CAPTURE(i);
    CHECK(float(host[i]) == float(daedalus::bfloat16(expected_value(5, i, 1.0f))));
  }
}
