// SPDX-License-Identifier: Apache-2.0
#pragma once

// The CUDA test cases, run by daedalus_cuda_tests on a real GPU and by daedalus_emulated_tests
// under the emulation layer (included by exactly one translation unit of each).

#include "cuda/cases/kernel_checks.hpp"

// The test cases both binaries run.
TEST_SUITE("cuda") {
  using namespace daedalus::testing::cuda_checks;
  TEST_CASE("vector_add matches the host on a size that is not a multiple of the block") {
    check_vector_add(daedalus::CudaBackend{});
  }
  TEST_CASE("block_sum reduces through static shared memory with __syncthreads") {
    check_block_sum(daedalus::CudaBackend{});
  }
  TEST_CASE("100 KB of dynamic shared memory: launch opts in above 48 KiB") {
    check_large_dynamic_shared(daedalus::CudaBackend{});
  }
  TEST_CASE("warp shuffles (idx, up, down, xor) and votes (ballot, any, all)") {
    check_warp_ops(daedalus::CudaBackend{});
  }
  TEST_CASE("shuffles of width 16 in two half-warp groups with their own masks") {
    check_half_warp_sums(daedalus::CudaBackend{});
  }
  TEST_CASE("threadIdx, blockIdx, blockDim, gridDim of 3-D blocks; warps by linear index") {
    check_thread_layout(daedalus::CudaBackend{});
  }
  TEST_CASE("atomicAdd (int, float), atomicMax, atomicCAS across blocks") {
    check_atomics(daedalus::CudaBackend{});
  }
  TEST_CASE("mma_m16n8k16 fragment loads follow the PTX ISA layout") {
    check_fragment_layout(daedalus::CudaBackend{});
  }
  TEST_CASE("mma_m16n8k16 GEMM, bf16 inputs, against fp64 references") {
    check_mma_gemm<daedalus::bfloat16>(daedalus::CudaBackend{});
  }
  TEST_CASE("mma_m16n8k16 GEMM, fp16 inputs, against fp64 references") {
    check_mma_gemm<daedalus::half>(daedalus::CudaBackend{});
  }
  TEST_CASE("DeviceBuffer, to_device/to_host and copy: round trips, moves, bad input") {
    check_buffers_and_copies(daedalus::CudaBackend{});
  }
  TEST_CASE("thread_scratch: one buffer per thread and device, reused and grown") {
    check_thread_scratch(daedalus::CudaBackend{});
  }
  TEST_CASE("grow: device workspaces only grow, exactly or by doubling, and are never empty") {
    check_grow();
  }
  TEST_CASE("DAEDALUS_CUDA_CHECK and launch report failures as CudaError") {
    check_errors(daedalus::CudaBackend{});
  }
  TEST_CASE("CudaBackend.on(stream) runs kernels and copies on an owned stream") {
    check_streams();
  }
}
