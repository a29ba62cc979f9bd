// SPDX-License-Identifier: Apache-2.0
// The GPU absorbed MLA decode on a real device: the bodies that daedalus_emulated_tests runs on
// the CPU (tests/cuda/cases/absorbed_decode_checks.hpp), plus shapes too large to emulate:
// DeepSeek-V3's 128 heads and contexts of several thousand tokens.
#include <daedalus/cuda.cuh>

#include "cuda/cases/absorbed_decode_checks.hpp"

namespace {

using Bf16 = daedalus::bfloat16;
using daedalus::DeepSeekV3;
using Fp16 = daedalus::half;
using daedalus::Tiny;
using namespace daedalus::testing::decode_checks;

}  // namespace

TEST_SUITE("cuda absorbed decode") {
  TEST_CASE("Tiny (40 + 8 latent), bf16, paged by 16: q_len 1 and 2, varlen, splits") {
    const daedalus::CudaBackend cuda;
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

  TEST_CASE("512 + 64 latent, 16 heads, long contexts: one 8K sequence over many SMs") {
    const daedalus::CudaBackend cuda;
    check_absorbed_decode<Latent576Heads16, Bf16, 64>(cuda, {8192}, 1, 37, 1201);
    check_absorbed_decode<Latent576Heads16, Fp16, 64>(cuda, {4096, 0, 1, 2500, 63}, 2, 20, 1202);
  }

  TEST_CASE("DeepSeek-V3 (128 heads), bf16: q_len 1 and 2, varlen up to 4K") {
    const daedalus::CudaBackend cuda;
    check_absorbed_decode<DeepSeekV3, Bf16, 64>(cuda, {1000, 4096, 0, 1, 333}, 1, 16, 1203);
    check_absorbed_decode<DeepSeekV3, Bf16, 64>(cuda, {2049, 2, 700}, 2, 9, 1204);
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
