// SPDX-License-Identifier: Apache-2.0
// The device latent caches under the emulation layer: the same bodies that daedalus_cuda_tests
// runs on a GPU (tests/cuda/cases/kv_cache_checks.hpp), then the finiteness scan with blocks on
// several OS threads at once (its atomicMin must still report the first bad value).
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA headers, as a .cu file would.
#include <daedalus/cuda.cuh>
#include <daedalus/kv_cache/cuda/contiguous.cuh>
#include <daedalus/kv_cache/cuda/paged.cuh>

#include "cuda/cases/kv_cache_checks.hpp"

TEST_SUITE("cuda emulation") {
  TEST_CASE("device cache finiteness scan with concurrent blocks reports the first bad value") {
    namespace emulation = daedalus::cuda_emulation;
    using namespace daedalus::testing::kv_cache_checks;
    for (const int threads : {2, 4}) {
      CAPTURE(threads);
      emulation::Options options;
      options.schedule = emulation::Schedule::shuffled;
      options.seed = 17;
      options.host_threads = threads;
      emulation::ScopedOptions scoped(options);
      const daedalus::CudaBackend cuda;
      constexpr int D = daedalus::MlaShape<daedalus::Tiny>::latent_dim;
      daedalus::testing::Random random(5501);
      std::vector<float> rows = random_rows(random, 200, D);  // 9600 values: 38 scan blocks
      for (const int i : {9000, 7777, 5000, 4242, 2049}) rows[std::size_t(i)] = std::nanf("");
      daedalus::cuda::DeviceBuffer<unsigned long long> flag(1);
      const auto staged = daedalus::cuda::to_device(cuda, rows);
      const auto bad = daedalus::cuda::first_non_finite(cuda, staged.data(),
                                                        daedalus::index_t(rows.size()), flag);
      REQUIRE(bad.has_value());
      CHECK(bad->first == 2049);
      CHECK(std::isnan(bad->second));
      // And the encoder, whose blocks write disjoint rows, gives the host cache's bytes.
      check_encode_rows_shared_blocks<daedalus::bfloat16>(cuda);
    }
  }

  TEST_CASE("encode_rows of a sequence listed twice keeps list order under every schedule") {
    // Within one launch, which of two rows aimed at the same pool row lands last depends on the
    // order threads run; the caches launch a repeated sequence's entries separately, so every
    // schedule must give the bytes of sequential writes.
    namespace emulation = daedalus::cuda_emulation;
    using namespace daedalus::testing::kv_cache_checks;
    for (const auto s : {emulation::Schedule::in_order, emulation::Schedule::reversed,
                         emulation::Schedule::shuffled}) {
      emulation::Options options;
      options.schedule = s;
      options.seed = 23;
      emulation::ScopedOptions scoped(options);
      const daedalus::CudaBackend cuda;
      check_encode_rows_shared_blocks<daedalus::half>(cuda);
      check_contiguous_matches_host<daedalus::Tiny, daedalus::bfloat16>(cuda, 5013);
    }
  }
}
