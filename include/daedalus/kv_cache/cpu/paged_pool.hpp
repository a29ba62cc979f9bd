// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string_view>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/paged_pool.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus::detail {

/// The pool of a host PagedLatentCache: 64-byte aligned host memory, zero-filled, rows encoded
/// and decoded by LatentRowFormat<C, Storage> where they lie; copy-on-write copies are memcpy.
template <MlaConfig C, class Storage, int BlockSize>
class PagedPool<C, CpuBackend, Storage, BlockSize> : public PagedPoolBase {
  using Format = LatentRowFormat<C, Storage>;
  static constexpr index_t kLatentDim = MlaShape<C>::latent_dim;
  static constexpr std::size_t kRowBytes = Format::row_bytes;

 public:
  /// The pool, [num_blocks, BlockSize, row_bytes] bytes (FlashMLA's `k_cache` layout).
  [[nodiscard]] const std::byte* pool_data() const { return pool_.get(); }
  /// The pool, writable: for a caller that fills blocks with its own kernels (the interchange
  /// with FlashMLA-style code). Rows written this way bypass the checks of `write`.
  [[nodiscard]] std::byte* pool_data() { return pool_.get(); }
  /// Row `slot` of block `block` (no checks: for kernels that validated their block table).
  [[nodiscard]] const std::byte* row_pointer(std::int32_t block, index_t slot) const {
    return pool_.get() + (std::size_t(block) * BlockSize + std::size_t(slot)) * kRowBytes;
  }

  /// The view of sequences `seqs` (in that order) that FlashMLA-style kernels and
  /// mla::absorbed_attention read: this pool, with the block table and lengths written into
  /// `storage` (which the view points into, so it must outlive the view and not change).
  /// @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] PagedLatentView<C, Storage, BlockSize> view(std::span<const index_t> seqs,
                                                            BlockTable& storage) const {
    allocator_.block_table(seqs, storage);
    return {pool_data(), allocator_.num_blocks(),
            HostView<const std::int32_t, 2>(storage.table.data(),
                                            {storage.batch(), storage.max_blocks}),
            HostView<const std::int32_t, 1>(storage.seqlens.data(), {storage.batch()})};
  }

 protected:
  PagedPool(const BlockAllocator& allocator, const CpuBackend& /*backend*/)
      : PagedPoolBase(allocator), pool_(allocate(allocator.num_blocks())) {}
  PagedPool(PagedPool&& other) noexcept : PagedPoolBase(other), pool_(std::move(other.pool_)) {}
  ~PagedPool() = default;

  /// Host calls cannot leave a pending failure behind.
  void check_usable() const {}
  /// Throws NumericError naming the first non-finite value (and the value), with a message
  /// starting with `caller`.
  static void require_finite_rows(std::string_view caller, HostView<const float, 2> rows) {
    const index_t count = rows.extent(0) * kLatentDim;
    for (index_t i = 0; i < count; ++i) {
      if (!std::isfinite(rows.data()[i])) {
        throw NumericError(message(caller, ": 'rows' holds a non-finite value (", rows.data()[i],
                                   ") at row ", i / kLatentDim, ", column ", i % kLatentDim));
      }
    }
  }
  /// Nothing to allocate before the allocator changes.
  void reserve_rows(index_t /*n*/) {}
  /// Encodes `rows` at positions [start_pos, start_pos + n) of the sequence whose block list is
  /// `blocks` (already prepared for the write).
  void encode(std::span<const std::int32_t> blocks, index_t start_pos,
              HostView<const float, 2> rows) {
    for (index_t i = 0; i < rows.extent(0); ++i) {
      const index_t pos = start_pos + i;
      Format::encode(rows.data() + i * kLatentDim,
                     mutable_row(blocks[std::size_t(pos / BlockSize)], pos % BlockSize));
    }
  }
  /// Decodes positions [start_pos, start_pos + n) of the sequence with block list `blocks` into
  /// `out` ([n, latent_dim] fp32).
  void decode(std::span<const std::int32_t> blocks, index_t start_pos,
              HostView<float, 2> out) const {
    for (index_t i = 0; i < out.extent(0); ++i) {
      const index_t pos = start_pos + i;
      Format::decode(row_pointer(blocks[std::size_t(pos / BlockSize)], pos % BlockSize),
                     out.data() + i * kLatentDim);
    }
  }

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  using Bytes = std::unique_ptr<std::byte[], AlignedDelete>;

  static Bytes allocate(index_t num_blocks) {
    const std::size_t bytes = std::size_t(num_blocks) * BlockSize * kRowBytes;
    Bytes pool(static_cast<std::byte*>(::operator new[](bytes, std::align_val_t{64})));
    std::memset(pool.get(), 0, bytes);
    return pool;
  }
  std::byte* mutable_row(std::int32_t block, index_t slot) {
    return pool_.get() + (std::size_t(block) * BlockSize + std::size_t(slot)) * kRowBytes;
  }
  void copy_block_rows(std::int32_t dst, std::int32_t src, index_t rows) override {
    std::memcpy(mutable_row(dst, 0), row_pointer(src, 0), std::size_t(rows) * kRowBytes);
  }

  Bytes pool_;
};

}  // namespace daedalus::detail
