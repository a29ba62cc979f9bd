// SPDX-License-Identifier: Apache-2.0
// The GPU absorbed MLA decode under the emulation layer: the bodies of
// tests/cuda/cases/absorbed_decode_checks.hpp on shapes small enough to emulate (short contexts,
// few heads, one medium 512 + 64 case), and one case again under other thread schedules.
#include "cuda_emulation.hpp"
// The emulation layer comes first; then the library's CUDA umbrella, as a .cu file would.
#include <daedalus/cuda.cuh>

#include "cuda/cases/absorbed_decode_checks.hpp"

namespace {

namespace emulation = daedalus::cuda_emulation;
using Bf16 = daedalus::bfloat16;
using Fp16 = daedalus::half;
using daedalus::Tiny;
using namespace daedalus::testing::decode_checks;

}  // namespace

TEST_SUITE("cuda absorbed decode") {
  TEST_CASE("Tiny (40 + 8 latent), bf16, paged by 16: q_len 1 and 2, varlen, splits") {
    const daedalus::CudaBackend cuda;
    // A zero-length entry, entries shorter than q_len, block edges (64, 65), several key blocks.
    const std::vector<int> lengths{37, 0, 1, 130, 64, 2, 65};
    check_absorbed_decode<Tiny, Bf16, 16>(cuda, lengths, 1, 5, 1101);
    check_absorbed_decode<Tiny, Bf16, 16>(cuda, lengths, 2, 5, 1102);
  }

  TEST_CASE("Tiny, fp16, paged by 64 (FlashMLA's page): q_len 2, one long entry split 4 ways") {
    check_absorbed_decode<Tiny, Fp16, 64>(daedalus::CudaBackend{}, {300, 1, 0, 17}, 2, 4, 1103);
  }

  TEST_CASE("TinyWide (40 heads): 80 folded rows in two 64-row tiles, q_len 2 and 3") {
    const daedalus::CudaBackend cuda;
    check_absorbed_decode<TinyWide, Bf16, 32>(cuda, {70, 1, 0, 129}, 2, 3, 1104);
    check_absorbed_decode<TinyWide, Fp16, 32>(cuda, {5, 66, 2}, 3, 2, 1105);
  }

  TEST_CASE("512 + 64 latent, 16 heads, bf16: q_len 1 (16 rows) and 2 (32 rows)") {
    const daedalus::CudaBackend cuda;
    check_absorbed_decode<Latent576Heads16, Bf16, 64>(cuda, {150, 0, 1, 40}, 1, 3, 1106);
    check_absorbed_decode<Latent576Heads16, Bf16, 64>(cuda, {130, 1}, 2, 3, 1107);
  }

  TEST_CASE("512 + 64 latent, 16 heads, q_len 3: 48 rows in one 64-row tile (V3's kernel form)") {
    check_absorbed_decode<Latent576Heads16, Fp16, 64>(daedalus::CudaBackend{}, {70, 0, 2}, 3, 3,
                                                      1109);
  }

  TEST_CASE("the Tiny case under reversed and shuffled schedules, blocks on 2 OS threads") {
    for (const auto schedule : {emulation::Schedule::reversed, emulation::Schedule::shuffled}) {
      emulation::Options options;
      options.schedule = schedule;
      options.seed = 21;
      options.host_threads = 2;
      emulation::ScopedOptions scoped(options);
      check_absorbed_decode<Tiny, Bf16, 16>(daedalus::CudaBackend{}, {37, 0, 1, 130}, 2, 3, 1108);
    }
  }

  TEST_CASE("ldmatrix fragment loaders agree with the per-lane loaders (bf16, fp16)") {
    check_ldmatrix_loaders<Bf16>(daedalus::CudaBackend{});
    check_ldmatrix_loaders<Fp16>(daedalus::CudaBackend{});
  }

  TEST_CASE("validate_on_device names the first bad entry as the host check does") {
    check_validate_on_device<Tiny, Bf16, 16>(daedalus::CudaBackend{});
  }

  TEST_CASE("absorbed_decode refuses bad arguments with typed errors, output untouched") {
    check_decode_bad_arguments<Tiny, Bf16, 16>(daedalus::CudaBackend{});
  }
}
