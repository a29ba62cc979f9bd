// SPDX-License-Identifier: Apache-2.0
// Memory accounting: bytes per token per layer of each storage type, the MHA / GQA-8 equivalents
// (DeepSeek-V2 paper, Table 1; V3 bf16: 1,152 B against 81,920 B), the report table, and pool
// sizing from a memory budget.
#include <doctest/doctest.h>

#include <daedalus/daedalus.hpp>
#include <string>

#include "kv_cache/paged_support.hpp"

using daedalus::DeepSeekV3;
using daedalus::testing::contains;

TEST_CASE("kv_memory_report: V3 per storage type, with MHA and GQA-8 equivalents") {
  const auto report = daedalus::kv_memory_report<DeepSeekV3>();
  REQUIRE(report.size() == 4);
  // fp32: 576·4; MHA: 128 heads · (192 + 128) values · 4 B; GQA-8: 8 · 320 · 4.
  CHECK(report[0].mla == 2304);
  CHECK(report[0].mha == 163840);
  CHECK(report[0].gqa8 == 10240);
  CHECK(report[1].mla == 1152);  // bf16
  CHECK(report[1].mha == 81920);
  CHECK(report[1].gqa8 == 5120);
  CHECK(report[1].mha_ratio() == doctest::Approx(81920.0 / 1152.0));
  CHECK(report[2].mla == 1152);  // fp16
  CHECK(report[3].mla == 656);   // fp8: 512 + 16 + 128
  CHECK(report[3].mha == 40960);
  CHECK(report[3].element_bytes == 1);
  // The older per-type struct agrees.
  CHECK(daedalus::KvBytesPerToken<DeepSeekV3>::mla == report[1].mla);
  CHECK(daedalus::KvBytesPerToken<DeepSeekV3>::mha == report[1].mha);
  const std::string table = daedalus::kv_memory_table<DeepSeekV3>();
  CHECK(contains(table, "| bf16 | 1152 | 81920 | 5120 | 71.1× | 4.4× |"));
  CHECK(contains(table, "| fp8 e4m3 (+bf16 k_pe) | 656 |"));
  // Tiny has 3 heads: GQA with 8 groups cannot have more groups than heads.
  const auto tiny = daedalus::kv_memory_report<daedalus::Tiny>();
  CHECK(tiny[0].gqa8 == tiny[0].mha);
}

TEST_CASE("pool_sizing: the largest pool of blocks for all layers within a budget") {
  // V3 bf16, 61 layers, 64-token blocks: one block id costs 61 · 64 · 1152 B = 4,497,408 B.
  const auto sizing = daedalus::pool_sizing<DeepSeekV3, daedalus::bfloat16>(std::size_t(80) << 30);
  CHECK(sizing.bytes_per_block == 4497408);
  CHECK(sizing.num_blocks == (std::size_t(80) << 30) / 4497408);
  CHECK(sizing.tokens == sizing.num_blocks * 64);
  CHECK(sizing.bytes <= std::size_t(80) << 30);
  CHECK(sizing.bytes + sizing.bytes_per_block > std::size_t(80) << 30);
  const auto fp8 = daedalus::pool_sizing<DeepSeekV3, daedalus::Fp8E4m3Latent, 32>(1 << 20, 2);
  CHECK(fp8.bytes_per_block == 2 * 32 * 656);
  CHECK(fp8.num_blocks == (1 << 20) / (2 * 32 * 656));
  CHECK(daedalus::pool_sizing<DeepSeekV3, float>(100, 1).num_blocks == 0);
  CHECK(contains(daedalus::testing::message_of<daedalus::InvalidArgument>(
                     [] { (void)daedalus::pool_sizing<DeepSeekV3, float>(1 << 20, 0); }),
                 "'n_layers' is 0; expected at least 1"));
}
