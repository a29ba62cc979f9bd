// SPDX-License-Identifier: Apache-2.0
// The CUDA test cases under the emulation layer: the same bodies that daedalus_cuda_tests runs
// on a GPU (tests/cuda/cases/kernel_cases.hpp), compiled by the host compiler; then the same
// checks under other schedules and with concurrent blocks, and the kernels without their
// barriers, which must give wrong results.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/kernel_cases.hpp"

namespace {

namespace emulation = daedalus::cuda_emulation;
using daedalus::testing::cuda_checks::block_sum_error_ratio;
using daedalus::testing::cuda_checks::mma_gemm_error_ratios;

emulation::Options schedule(emulation::Schedule s, std::uint64_t seed = 1, int host_threads = 1) {
  emulation::Options options;
  options.schedule = s;
  options.seed = seed;
  options.host_threads = host_threads;
  return options;
}

}  // namespace

TEST_SUITE("cuda emulation") {
  TEST_CASE("a missing __syncthreads makes the shared-memory reduction wrong") {
    const daedalus::CudaBackend cuda;
    // Synchronised: right under every schedule.
    for (const auto s : {emulation::Schedule::in_order, emulation::Schedule::reversed,
                         emulation::Schedule::shuffled}) {
      emulation::ScopedOptions options(schedule(s, 7));
      CHECK(block_sum_error_ratio<true>(cuda, 5000, 3, 601) <= 1.0);
    }
    // Unsynchronised: thread 0 reads partial sums nobody has written yet. The error ratio is
    // relative to a rigorous bound, so a correct kernel never exceeds 1; 10 leaves no doubt.
    // (Reversed thread order happens to be a valid serial order for this particular tree, which is
    // why it is not the default schedule.)
    {
      emulation::ScopedOptions options(schedule(emulation::Schedule::in_order));
      CHECK(block_sum_error_ratio<false>(cuda, 5000, 3, 601) > 10.0);
    }
    for (std::uint64_t seed = 1; seed <= 5; ++seed) {
      CAPTURE(seed);
      emulation::ScopedOptions options(schedule(emulation::Schedule::shuffled, seed));
      CHECK(block_sum_error_ratio<false>(cuda, 5000, 3, 601) > 10.0);
    }
  }

  TEST_CASE("a missing __syncthreads makes the mma GEMM wrong under every schedule") {
    const daedalus::CudaBackend cuda;
    for (const auto s : {emulation::Schedule::in_order, emulation::Schedule::reversed,
                         emulation::Schedule::shuffled}) {
      emulation::ScopedOptions options(schedule(s, 3));
      const auto [rounded, storage] =
          mma_gemm_error_ratios<daedalus::bfloat16, false>(cuda, 77, 45, 100, 602);
      CHECK(rounded > 10.0);
      CHECK(storage > 10.0);
    }
  }

  TEST_CASE("every shared kernel check passes under reversed and shuffled schedules") {
    using namespace daedalus::testing::cuda_checks;
    const daedalus::CudaBackend cuda;
    for (const auto& options :
         {schedule(emulation::Schedule::reversed), schedule(emulation::Schedule::shuffled, 11),
          schedule(emulation::Schedule::shuffled, 12, 2)}) {
      emulation::ScopedOptions scoped(options);
      check_vector_add(cuda);
      check_block_sum(cuda);
      check_large_dynamic_shared(cuda);
      check_warp_ops(cuda);
      check_half_warp_sums(cuda);
      check_thread_layout(cuda);
      check_fragment_layout(cuda);
      check_mma_gemm<daedalus::bfloat16>(cuda);
      check_mma_gemm<daedalus::half>(cuda);
    }
  }

  TEST_CASE("atomics hold with blocks running on several OS threads at once") {
    using namespace daedalus::testing::cuda_checks;
    for (int threads : {2, 4}) {
      CAPTURE(threads);
      emulation::ScopedOptions scoped(schedule(emulation::Schedule::shuffled, 13, threads));
      check_atomics(daedalus::CudaBackend{});
    }
  }
}
