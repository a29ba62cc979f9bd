// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/dtype.hpp"

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

}  // namespace daedalus
