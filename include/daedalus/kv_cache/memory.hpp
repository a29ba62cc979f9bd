// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus {

/// Bytes of KV cache one token takes in one layer, for MLA and for the attention variants it
/// replaces, with the same head sizes (DeepSeek-V2 paper, section 2.1.4, Table 1).
template <MlaConfig C, StorageType Storage = bfloat16>
struct KvBytesPerToken {
  using S = MlaShape<C>;
  static constexpr std::size_t element = StorageTraits<Storage>::bytes;
  /// MLA: the latent and the shared k_pe, kv_lora_rank + rope values (576 → 1,152 B in bf16).
  static constexpr std::size_t mla = std::size_t(S::latent_dim) * element;
  /// MHA: every head keeps a qk_head_dim key and a v_head_dim value (V3: 81,920 B in bf16).
  static constexpr std::size_t mha =
      std::size_t(S::n_heads) * (S::qk_head_dim + S::v_head_dim) * element;
  /// GQA with `groups` key/value heads of the same sizes (GQA-8: 5,120 B in bf16).
  static constexpr std::size_t gqa(int groups) {
    return std::size_t(groups) * (S::qk_head_dim + S::v_head_dim) * element;
  }
};

/// One row of the memory report: what one token costs in one layer with a given storage type.
struct KvMemoryRow {
  const char* storage;        ///< the row format's name ("bf16", "fp8 e4m3 (+bf16 k_pe)", ...)
  std::size_t element_bytes;  ///< bytes per value of the MHA / GQA equivalents (1 for fp8)
  std::size_t mla;            ///< the latent cache row: LatentRowFormat<C, Storage>::row_bytes
  std::size_t mha;            ///< MHA with the config's heads, keys and values at element_bytes
  std::size_t gqa8;           ///< GQA with 8 key/value heads of the same sizes

  [[nodiscard]] double mha_ratio() const { return double(mha) / double(mla); }
  [[nodiscard]] double gqa8_ratio() const { return double(gqa8) / double(mla); }
};

/// The report row of storage type `Storage` for config C. For fp8 the MHA / GQA equivalents
/// count one byte per value (their scales left out), the latent row its 656 bytes with scales.
template <MlaConfig C, LatentStorage Storage>
constexpr KvMemoryRow kv_memory_row() {
  using S = MlaShape<C>;
  constexpr std::size_t element = PlainLatentStorage<Storage> ? sizeof(Storage) : 1;
  constexpr std::size_t per_head = std::size_t(S::qk_head_dim + S::v_head_dim) * element;
  return {LatentRowFormat<C, Storage>::name, element, LatentRowFormat<C, Storage>::row_bytes,
          std::size_t(S::n_heads) * per_head, std::size_t(std::min(8, S::n_heads)) * per_head};
}

/// Bytes per token per layer of each storage type (fp32, bf16, fp16, fp8) for config C, with
/// the MHA and GQA-8 equivalents: the numbers of the README's memory table.
template <MlaConfig C>
std::vector<KvMemoryRow> kv_memory_report() {
  return {kv_memory_row<C, float>(), kv_memory_row<C, bfloat16>(), kv_memory_row<C, half>(),
          kv_memory_row<C, Fp8E4m3Latent>()};
}

/// The report as a Markdown table, one line per storage type.
template <MlaConfig C>
std::string kv_memory_table() {
  std::ostringstream out;
  out << "| " << config_name<C>()
      << " storage | MLA B/token/layer | MHA B/token/layer | GQA-8 B/token/layer | MHA / MLA "
         "| GQA-8 / MLA |\n"
      << "|---|---:|---:|---:|---:|---:|\n";
  out << std::fixed << std::setprecision(1);
  for (const KvMemoryRow& row : kv_memory_report<C>()) {
    out << "| " << row.storage << " | " << row.mla << " | " << row.mha << " | " << row.gqa8 << " | "
        << row.mha_ratio() << "× | " << row.gqa8_ratio() << "× |\n";
  }
  return out.str();
}

/// How big a paged pool fits a memory budget (PoolSizing from pool_sizing).
struct PoolSizing {
  index_t num_blocks;           ///< blocks to give the BlockAllocator
  index_t tokens;               ///< num_blocks · block_size: tokens the pool holds in all
  std::size_t bytes_per_block;  ///< one block id in every layer: n_layers · BlockSize · row
  std::size_t bytes;            ///< num_blocks · bytes_per_block (≤ the budget)
};

/// The largest pool of `BlockSize`-token blocks for `n_layers` layers (one PagedLatentCache per
/// layer, all sharing one allocator, so a block id costs n_layers · BlockSize · row_bytes) within
/// `budget_bytes`.
/// @throws InvalidArgument when n_layers < 1.
template <MlaConfig C, LatentStorage Storage, int BlockSize = 64>
PoolSizing pool_sizing(std::size_t budget_bytes, index_t n_layers) {
  detail::require<InvalidArgument>(n_layers >= 1, "daedalus::pool_sizing: 'n_layers' is ", n_layers,
                                   "; expected at least 1");
  static_assert(BlockSize >= 1, "daedalus::pool_sizing: BlockSize must be at least 1");
  const std::size_t per_block =
      std::size_t(n_layers) * std::size_t(BlockSize) * LatentRowFormat<C, Storage>::row_bytes;
  const index_t blocks = index_t(std::min<std::size_t>(
      budget_bytes / per_block, std::size_t(std::numeric_limits<std::int32_t>::max())));
  return {blocks, blocks * BlockSize, per_block, std::size_t(blocks) * per_block};
}

/// pool_sizing for every layer of a preset (C::n_layers).
template <MlaConfig C, LatentStorage Storage, int BlockSize = 64>
requires requires { C::n_layers; }
PoolSizing pool_sizing(std::size_t budget_bytes) {
  return pool_sizing<C, Storage, BlockSize>(budget_bytes, C::n_layers);
}

}  // namespace daedalus
