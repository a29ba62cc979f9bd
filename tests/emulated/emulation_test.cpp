// SPDX-License-Identifier: Apache-2.0
// Tests of the CUDA emulation layer itself (emulation/): that threads really interleave, that
// faults a GPU would hang on or leave undefined are reported, that the runtime emulation checks
// pointers. (tests/emulated/kernel_cases_test.cpp shows that a missing __syncthreads gives wrong
// results.)
#include "cuda_emulation.hpp"
// The emulation layer comes first.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <daedalus/cuda.cuh>
#include <string>
#include <vector>

namespace {

namespace emulation = daedalus::cuda_emulation;
/// Records, for each thread, the global order in which it passed two points, with or without a
/// barrier between them.
template <bool kBarrier>
__global__ void stamp(int* counter, int* first, int* second) {
  const int t = static_cast<int>(threadIdx.x);
  first[t] = atomicAdd(counter, 1);
  if constexpr (kBarrier) __syncthreads();
  second[t] = atomicAdd(counter, 1);
}

__global__ void read_dynamic_shared(float* out) {
  out[threadIdx.x] = daedalus::cuda::dynamic_shared_memory<float>()[threadIdx.x];
}

/// Lanes exchange values through shared memory, warp-synchronously: lane l reads what lane
/// 31 - l wrote. Correct only with the __syncwarp between the store and the load.
template <bool kSyncwarp>
__global__ void exchange_in_warp(float* out) {
  float* staged = daedalus::cuda::dynamic_shared_memory<float>();  // [32]
  const int lane = static_cast<int>(threadIdx.x);
  staged[lane] = static_cast<float>(2 * lane + 1);
  if constexpr (kSyncwarp) __syncwarp();
  out[lane] = staged[31 - lane];
}

// Lane 0 waits at the block barrier while lanes 1..31 wait for it in a shuffle: a hang on a GPU.
__global__ void barrier_against_shuffle(float* out) {
  float v = 1.0f;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_sync(0xffffffffu, v, 0);
  }
  out[threadIdx.x] = v;
}

// The last lane has returned when the others shuffle with the full mask: undefined on a GPU.
__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Even lanes vote while odd lanes shuffle, with the same full mask.
__global__ void divergent_collectives(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = static_cast<float>(__ballot_sync(0xffffffffu, 1));
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
  }
}

// A mask that leaves out the calling lane.
__global__ void mask_without_self(float* out) { out[threadIdx.x] = __shfl_sync(0x1u, 1.0f, 0); }

// A full mask in a block of 40 threads: lanes 8..31 of the second warp do not exist.
__global__ void full_mask_in_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

template <class Kernel>
std::string launch_failure(Kernel kernel, unsigned threads) {
  std::vector<float> out(64, 0.0f);
  try {
    emulation::launch(kernel, dim3(1), dim3(threads), 0, out.data());
  } catch (const emulation::LaunchError& e) {
    return e.what();
  }
  return "no failure";
}

}  // namespace

TEST_SUITE("cuda emulation") {
  TEST_CASE("threads of a block interleave: each runs ahead to its next barrier") {
    // Thread order, whatever DAEDALUS_EMULATION_SCHEDULE says: the expectations below are its.
    emulation::ScopedOptions in_order{emulation::Options{}};
    constexpr int n = 64;
    for (const bool barrier : {true, false}) {
      CAPTURE(barrier);
      int counter = 0;
      std::vector<int> first(n, -1), second(n, -1);
      if (barrier) {
        emulation::launch(&stamp<true>, dim3(1), dim3(n), 0, &counter, first.data(), second.data());
      } else {
        emulation::launch(&stamp<false>, dim3(1), dim3(n), 0, &counter, first.data(),
                          second.data());
      }
      CHECK(counter == 2 * n);
      if (barrier) {
        // Every thread passed the first point before any passed the second.
        CHECK(*std::max_element(first.begin(), first.end()) <
              *std::min_element(second.begin(), second.end()));
      } else {
        // Without the barrier thread 0 runs to the end before thread 1 starts.
        CHECK(first[0] == 0);
        CHECK(second[0] == 1);
        CHECK(first[1] == 2);
      }
    }
  }

  TEST_CASE("warp-synchronous code needs its __syncwarp") {
    emulation::ScopedOptions in_order{emulation::Options{}};
    std::vector<float> out(32, 0.0f);
    emulation::launch(&exchange_in_warp<true>, dim3(1), dim3(32), 32 * sizeof(float), out.data());
    for (int lane = 0; lane < 32; ++lane) CHECK(out[lane] == float(2 * (31 - lane) + 1));
    // Without it, lane 0 reads lane 31's slot before lane 31 has run: the NaN shared memory
    // starts with. (Lanes of a warp are not implicitly synchronous since sm_70 either.)
    emulation::launch(&exchange_in_warp<false>, dim3(1), dim3(32), 32 * sizeof(float), out.data());
    CHECK(std::isnan(out[0]));
  }

  TEST_CASE("dynamic shared memory starts as NaN in every block") {
    std::vector<float> out(32, 0.0f);
    emulation::launch(&read_dynamic_shared, dim3(1), dim3(32), 32 * sizeof(float), out.data());
    for (float v : out) CHECK(std::isnan(v));
  }

  TEST_CASE("faults a GPU would hang on or leave undefined are reported") {
    CHECK(launch_failure(&barrier_against_shuffle, 32).find("deadlock") != std::string::npos);
    CHECK(launch_failure(&shuffle_after_exit, 32).find("has exited") != std::string::npos);
    CHECK(launch_failure(&divergent_collectives, 32).find("divergent warp collectives") !=
          std::string::npos);
    CHECK(launch_failure(&mask_without_self, 32).find("does not name its own lane") !=
          std::string::npos);
    CHECK(launch_failure(&full_mask_in_partial_warp, 40).find("no such thread") !=
          std::string::npos);
    CHECK(launch_failure(&read_dynamic_shared, 1025).find("invalid launch configuration") !=
          std::string::npos);
    // More than 48 KiB of dynamic shared memory without opting in, as a GPU refuses it.
    std::vector<float> out(32);
    CHECK_THROWS_WITH_AS(
        emulation::launch(&read_dynamic_shared, dim3(1), dim3(32), 64 * 1024, out.data()),
        doctest::Contains("needs cudaFuncSetAttribute"), emulation::LaunchError);
  }

  TEST_CASE("the runtime emulation checks pointers and copy directions") {
    float host[4] = {1, 2, 3, 4};
    float* device = nullptr;
    REQUIRE(cudaMalloc(&device, sizeof(host)) == cudaSuccess);
    // Host to device with the pointers swapped, and past the end of the allocation.
    CHECK_THROWS_AS(
        DAEDALUS_CUDA_CHECK(cudaMemcpy(host, device, sizeof(host), cudaMemcpyHostToDevice)),
        daedalus::CudaError);
    float larger[8] = {};
    CHECK_THROWS_AS(
        DAEDALUS_CUDA_CHECK(cudaMemcpy(larger, device, sizeof(larger), cudaMemcpyDeviceToHost)),
        daedalus::CudaError);
    // Memory cudaMalloc did not return.
    void* not_device = std::malloc(16);
    CHECK_THROWS_AS(DAEDALUS_CUDA_CHECK(cudaFree(not_device)), daedalus::CudaError);
    std::free(not_device);
    CHECK(cudaGetLastError() == cudaSuccess);  // consumed by the checks
    DAEDALUS_CUDA_CHECK(cudaFree(device));
  }
}
