// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus {

/// A non-owning view of a batch of sequences in a paged latent pool, in the form FlashMLA's
/// `flash_mla_with_kvcache` takes it (and vLLM's PagedAttention before it):
///
///   pool          [num_blocks, BlockSize, row_bytes] bytes: block k holds BlockSize cached tokens,
///                 each one row of LatentRowFormat<C, Storage> (the normed latent then the rotated
///                 k_pe; 576 values for DeepSeek, 656 bytes in FlashMLA's fp8 form)
///   block_table   [batch, max_blocks] int32: token t of sequence b lies in row t % BlockSize of
///                 block block_table(b, t / BlockSize); entries past the sequence's last block are
///                 not read (PagedLatentCache writes -1 there)
///   cache_seqlens [batch] int32: the number of cached tokens of each sequence (0 allowed)
///
/// Blocks may be listed in any order and shared between sequences (prefix sharing). A user with
/// a pool and block table of their own (e.g. FlashMLA's tensors copied to the host) builds one
/// directly and hands it to `mla::absorbed_attention`; `validate` checks it first.
///
/// @tparam C         an MlaConfig
/// @tparam Storage   float, bfloat16, half or Fp8E4m3Latent (the row format of the pool)
/// @tparam BlockSize tokens per block (FlashMLA uses 64)
/// @tparam Space     where the pool and tables live
template <MlaConfig C, class Storage, int BlockSize, class Space = HostMemory>
struct PagedLatentView {
  static_assert(BlockSize >= 1, "daedalus::PagedLatentView: BlockSize must be at least 1");
  static_assert(LatentStorage<Storage>,
                "daedalus::PagedLatentView: Storage must be float, bfloat16, half or "
                "Fp8E4m3Latent");

  using config = C;
  using storage_type = Storage;
  using memory_space = Space;
  using format = LatentRowFormat<C, Storage>;
  static constexpr int block_size = BlockSize;
  static constexpr std::size_t row_bytes = format::row_bytes;

  const std::byte* pool = nullptr;                         // [num_blocks, BlockSize, row_bytes]
  index_t num_blocks = 0;                                  // blocks in the pool
  TensorView<const std::int32_t, 2, Space> block_table;    // [batch, max_blocks]
  TensorView<const std::int32_t, 1, Space> cache_seqlens;  // [batch]

  [[nodiscard]] index_t batch() const { return cache_seqlens.extent(0); }
  [[nodiscard]] index_t max_blocks() const { return block_table.extent(1); }

  /// Cached tokens of batch entry b (no checks: `validate` first).
  [[nodiscard]] index_t length(index_t b) const { return cache_seqlens(b); }

  /// The stored row of token `pos` of batch entry b (no checks: `validate` first).
  [[nodiscard]] const std::byte* row(index_t b, index_t pos) const {
    const index_t block = block_table(b, pos / BlockSize);
    return pool + (std::size_t(block) * BlockSize + std::size_t(pos % BlockSize)) * row_bytes;
  }

  /// Checks everything a kernel relies on, so that no kernel ever reads outside the pool.
  /// Messages start with `caller`, the public function the user called.
  /// @throws InvalidArgument when block_table's first extent differs from cache_seqlens', when
  ///         num_blocks is negative, or when the pool pointer is null but blocks are used;
  ///         OutOfRange when a seqlen is negative or exceeds max_blocks · BlockSize, or when a
  ///         block-table entry that a sequence uses (the first ceil(seqlen / BlockSize) of its
  ///         row) is outside [0, num_blocks).
  void validate(std::string_view caller) const {
    detail::require<InvalidArgument>(
        block_table.extent(0) == cache_seqlens.extent(0), caller, ": 'block_table' has extents ",
        detail::format_extents<index_t>(block_table.extents()), "; expected [",
        cache_seqlens.extent(0), ",max_blocks] (one row per entry of ",
        "'cache_seqlens', which has ", cache_seqlens.extent(0), ")");
    detail::require<InvalidArgument>(num_blocks >= 0, caller, ": 'num_blocks' is ", num_blocks,
                                     "; expected at least 0");
    if constexpr (std::same_as<Space, HostMemory>) {
      bool any_used = false;
      for (index_t b = 0; b < batch(); ++b) {
        const index_t len = cache_seqlens(b);
        detail::require<OutOfRange>(
            len >= 0 && len <= max_blocks() * BlockSize, caller, ": 'cache_seqlens[", b, "]' is ",
            len, "; expected a length in [0, ", max_blocks() * BlockSize, "] (max_blocks ",
            max_blocks(), " x block size ", BlockSize, ")");
        const index_t used = (len + BlockSize - 1) / BlockSize;
        any_used = any_used || used > 0;
        for (index_t j = 0; j < used; ++j) {
          const index_t block = block_table(b, j);
          detail::require<OutOfRange>(block >= 0 && block < num_blocks, caller, ": 'block_table[",
                                      b, ",", j, "]' is ", block, "; expected a block id in [0, ",
                                      num_blocks, ") (sequence ", b, " holds ", len,
                                      " tokens, so its first ", used, " entries are used)");
        }
      }
      detail::require<InvalidArgument>(!any_used || pool != nullptr, caller,
                                       ": 'pool' is null; expected ", num_blocks, " blocks of ",
                                       BlockSize, " rows of ", row_bytes, " bytes");
    }
  }
};

}  // namespace daedalus
