// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/block_allocator.hpp"
#include "daedalus/kv_cache/cpu/paged_pool.hpp"
#include "daedalus/kv_cache/paged_pool.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus {

/// One layer's latent KV cache in fixed-size blocks, laid out as FlashMLA lays out its paged
/// cache: a pool of [num_blocks, BlockSize, row_bytes] bytes, each row one cached token, the
/// kv_lora_rank normed latent c then the qk_rope_head_dim rotated k_pe (576 values in DeepSeek;
/// DeepSeek-V2 paper, section 2.1.2) in the row format of `Storage` (LatentRowFormat). Which
/// blocks a sequence uses, and sharing between sequences, is decided by a BlockAllocator shared
/// by every layer of the model: block id b is the same slot in each layer's pool. So the pool, a
/// block table and the sequence lengths can be handed to a FlashMLA-style kernel as they are.
///
/// The methods mirror ContiguousLatentCache (length, check_write, write, append) so the MLA
/// front treats both alike. Lengths live in the allocator, shared by the layers: a step of a
/// model of several layers reserves its positions once (BlockAllocator::reserve) and each layer
/// writes exactly those (mla::decode and mla::prefill take the SlotReservation); a write at
/// explicit positions [start_pos, start_pos + n) is the same for every layer too. Appending at a
/// sequence's length is refused while the allocator serves more than one pool: the second layer
/// would append after the first layer's rows.
///
/// @tparam C         an MlaConfig
/// One type for every backend: the API, its checks and its messages are written here; where the
/// pool lives and how rows move is the backend's detail::PagedPool (host:
/// kv_cache/cpu/paged_pool.hpp; device, with its extra accessors such as encode_rows, upload and
/// download: kv_cache/cuda/paged.cuh). Which blocks a sequence holds is host data on every
/// backend (the BlockAllocator).
///
/// @tparam Backend   CpuBackend (this header) or CudaBackend (<daedalus/cuda.cuh>)
/// @tparam Storage   float, bfloat16, half or Fp8E4m3Latent on the CPU, bfloat16 or half on the
///                   GPU (see LatentRowFormat)
/// @tparam BlockSize tokens per block (FlashMLA uses 64); must equal the allocator's block_size
template <MlaConfig C, class Backend = CpuBackend, class Storage = float, int BlockSize = 64>
class PagedLatentCache final : public detail::PagedPool<C, Backend, Storage, BlockSize> {
  static_assert(LatentStorage<Storage>,
                "daedalus::PagedLatentCache: Storage must be float, bfloat16, half or "
                "Fp8E4m3Latent");
  static_assert(BlockSize >= 1, "daedalus::PagedLatentCache: BlockSize must be at least 1");
  using Pool = detail::PagedPool<C, Backend, Storage, BlockSize>;

 public:
  using config = C;
  using backend_type = Backend;
  using storage_type = Storage;
  using memory_space = typename Backend::memory_space;
  using format = LatentRowFormat<C, Storage>;
  static constexpr int block_size = BlockSize;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;
  /// Bytes of one cached token, and of one block.
  static constexpr std::size_t row_bytes = format::row_bytes;
  static constexpr std::size_t block_bytes = row_bytes * std::size_t(BlockSize);

  /// An allocator of `num_blocks` blocks of this cache's BlockSize tokens, for every layer's
  /// pool: the block size is then stated once, in the cache type.
  /// @throws InvalidArgument as BlockAllocator's constructor.
  [[nodiscard]] static BlockAllocator make_allocator(index_t num_blocks) {
    return BlockAllocator(num_blocks, BlockSize);
  }

  /// A pool of allocator.num_blocks() blocks, zero-filled (on the device: on the backend's
  /// stream), registered with `allocator` so that its copy-on-write copies reach this pool. The
  /// cache keeps a handle of the allocator, so either may be destroyed first.
  /// @throws InvalidArgument when allocator.block_size() != BlockSize; CudaError (device) when
  ///         the pool cannot be allocated.
  explicit PagedLatentCache(const BlockAllocator& allocator, const Backend& backend = {})
      : Pool(check_allocator(allocator), backend) {
    this->allocator_.register_pool(this);
  }

  PagedLatentCache(const PagedLatentCache&) = delete;
  PagedLatentCache& operator=(const PagedLatentCache&) = delete;
  PagedLatentCache& operator=(PagedLatentCache&&) = delete;
  /// Moves the pool; the allocator then copies on write into the new object.
  PagedLatentCache(PagedLatentCache&& other) noexcept : Pool(std::move(other)) {
    this->allocator_.replace_pool(&other, this);
    other.registered_ = false;
  }
  ~PagedLatentCache() {
    if (this->registered_) this->allocator_.unregister_pool(this);
  }

  /// A handle of the allocator this pool is registered with.
  [[nodiscard]] BlockAllocator allocator() const { return this->allocator_; }
  [[nodiscard]] index_t num_blocks() const { return this->allocator_.num_blocks(); }
  /// Bytes of one cached token in this pool (row_bytes).
  static constexpr std::size_t bytes_per_token() { return row_bytes; }
  /// Bytes the pool holds allocated.
  [[nodiscard]] std::size_t bytes() const { return std::size_t(num_blocks()) * block_bytes; }

  /// Tokens sequence `seq` holds. @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] index_t length(index_t seq) const { return this->allocator_.length(seq); }
  /// The live sequences of the allocator, named as in ContiguousLatentCache (index_t ids).
  [[nodiscard]] index_t num_sequences() const { return this->allocator_.num_sequences(); }
  /// True when `seq` was added to the allocator and not released.
  [[nodiscard]] bool contains(index_t seq) const { return this->allocator_.contains(seq); }
  /// The ids of the live sequences, ascending.
  [[nodiscard]] std::vector<index_t> sequences() const { return this->allocator_.sequences(); }

  /// Checks what `write(seq, start_pos, rows of n)` would check, without writing: the sequence is
  /// live, start_pos lies in [0, length(seq)], and the pool has the free blocks the write needs,
  /// copy-on-write copies included. Messages start with `caller`.
  /// @throws OutOfRange, InvalidArgument or CapacityError as write does.
  void check_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) const {
    this->allocator_.check_write(caller, seq, start_pos, n);
  }

  /// Writes `rows` ([n, latent_dim], fp32 in the backend's memory, converted to the row format)
  /// at positions [start_pos, start_pos + n) of sequence `seq` and sets its length to
  /// start_pos + n: rows at and past start_pos are replaced (a chunk may be recomputed). Shared
  /// blocks the write touches are copied first, in every layer's pool. On the GPU the
  /// finiteness check runs on the device and costs one flag copy (a stream synchronisation);
  /// `encode_rows` is the path without it.
  /// @throws OutOfRange for a released or unknown sequence or start_pos > length(seq);
  ///         CapacityError when the pool lacks free blocks; InvalidArgument for a bad shape;
  ///         NumericError for a NaN or infinite value (naming its row and column). Nothing
  ///         changes when it throws (a CudaError after the allocator was updated means the
  ///         device failed, and the pool is then lost anyway).
  void write(index_t seq, index_t start_pos, TensorView<const float, 2, memory_space> rows) {
    this->check_usable();
    check_write(kWrite, seq, start_pos, rows.extent(0));
    detail::check_extents(kWrite, "rows", rows, {rows.extent(0), latent_dim});
    this->require_finite_rows(kWrite, rows);
    this->reserve_rows(rows.extent(0));  // the last allocation before the allocator changes
    this->allocator_.prepare_write(kWrite, seq, start_pos, rows.extent(0));
    this->check_usable();
    this->encode(this->allocator_.blocks(seq), start_pos, rows);
  }

  /// Appends `rows` ([n, latent_dim]) after the tokens of sequence `seq`.
  /// @throws InvalidArgument when the allocator serves more than one pool (layers share lengths:
  ///         write at explicit positions, or reserve the step); otherwise as write.
  void append(index_t seq, TensorView<const float, 2, memory_space> rows) {
    this->allocator_.check_live(kAppend, seq);
    this->allocator_.require_single_pool(kAppend);
    write(seq, length(seq), rows);
  }

  /// Reads tokens [start_pos, start_pos + n) of `seq` back as fp32 into host `out`
  /// ([n, latent_dim]); on the GPU one copy per block touched, then a stream synchronisation.
  /// @throws OutOfRange for a released or unknown sequence or a range outside [0, length(seq));
  ///         InvalidArgument for a bad shape.
  void read(index_t seq, index_t start_pos, HostView<float, 2> out) const {
    this->check_usable();
    const index_t length = this->allocator_.length(seq);
    const index_t n = out.extent(0);
    detail::require<OutOfRange>(
        start_pos >= 0 && n >= 0 && start_pos <= length && n <= length - start_pos, kRead,
        ": tokens [", start_pos, ", ", start_pos + n, ") are not all in sequence ", seq,
        ", which holds ", length, " tokens");
    detail::check_extents(kRead, "out", out, {n, latent_dim});
    if (n == 0) return;
    this->decode(this->allocator_.blocks(seq), start_pos, out);
  }

  /// Every token of `seq` as fp32, [length(seq) · latent_dim] row-major (host).
  [[nodiscard]] std::vector<float> rows(index_t seq) const {
    std::vector<float> out(std::size_t(length(seq)) * latent_dim);
    read(seq, 0, HostView<float, 2>(out.data(), {length(seq), latent_dim}));
    return out;
  }

 private:
  static constexpr std::string_view kName = "daedalus::PagedLatentCache";
  static constexpr std::string_view kWrite = "daedalus::PagedLatentCache::write";
  static constexpr std::string_view kRead = "daedalus::PagedLatentCache::read";
  static constexpr std::string_view kAppend = "daedalus::PagedLatentCache::append";

  static const BlockAllocator& check_allocator(const BlockAllocator& allocator) {
    detail::require<InvalidArgument>(allocator.block_size() == BlockSize, kName,
                                     ": the allocator's block_size is ", allocator.block_size(),
                                     "; expected ", BlockSize, " (the cache's BlockSize)");
    return allocator;
  }
};

}  // namespace daedalus
