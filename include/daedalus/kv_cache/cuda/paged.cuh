// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/kv_cache/block_allocator.hpp"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/kv_cache/cuda/encode_rows.cuh"
#include "daedalus/kv_cache/paged.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus {

/// The block table of a batch in device memory, for PagedLatentCache<..., CudaBackend, ...>::view:
/// the host BlockTable the allocator fills, and device copies of its table and lengths. The
/// device buffers only grow, so a decode loop that rebuilds the view every step reuses them.
/// A view points into it: keep it alive, and unchanged, while a kernel reads the view.
struct DeviceBlockTable {
  BlockTable host;
  cuda::DeviceBuffer<std::int32_t> table;    // at least host.table.size() entries
  cuda::DeviceBuffer<std::int32_t> seqlens;  // at least host.batch() entries
};

namespace cuda {
using ::daedalus::DeviceBlockTable;
}  // namespace cuda

/// One layer's latent cache in device memory, in blocks: the pool is [num_blocks, BlockSize,
/// row_bytes] bytes of LatentRowFormat<C, Storage> rows on the device (FlashMLA's paged `k_cache`
/// layout), while which blocks each sequence uses stays with the host BlockAllocator shared by
/// every layer (vLLM's design: scheduling is host work, the pool is device memory). The API is
/// the host cache's (paged.hpp): same checks, same typed errors and messages, nothing changes
/// when a call throws; a write that needs a copy of a shared block gets it as a device-to-device
/// copy on the cache's stream, before its rows are written.
///
/// Every device operation is issued to the stream of the cache's CudaBackend, in order. Host
/// calls that return data (read, rows, download, and write's finiteness check) synchronise that
/// stream; `encode_rows` and `view` do not.
///
/// @tparam C         an MlaConfig
/// @tparam Storage   bfloat16 or half (the device backend's storage types)
/// @tparam BlockSize tokens per block; must equal the allocator's block_size
template <MlaConfig C, class Storage, int BlockSize>
class PagedLatentCache<C, CudaBackend, Storage, BlockSize> final : private detail::BlockPoolHook {
  static_assert(std::same_as<Storage, bfloat16> || std::same_as<Storage, half>,
                "daedalus::PagedLatentCache: the CUDA backend stores bfloat16 or half rows (fp32 "
                "and fp8 device pools are not supported)");
  static_assert(BlockSize >= 1, "daedalus::PagedLatentCache: BlockSize must be at least 1");

 public:
  using config = C;
  using backend_type = CudaBackend;
  using storage_type = Storage;
  using device_storage_type = cuda::device_storage_t<Storage>;
  using format = LatentRowFormat<C, Storage>;
  using host_cache = PagedLatentCache<C, CpuBackend, Storage, BlockSize>;
  static constexpr int block_size = BlockSize;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;
  /// Bytes of one cached token, and of one block.
  static constexpr std::size_t row_bytes = format::row_bytes;
  static constexpr std::size_t block_bytes = row_bytes * std::size_t(BlockSize);

  /// A device pool of allocator.num_blocks() blocks, zero-filled on the backend's stream, and
  /// registered with `allocator` so that its copy-on-write copies reach this pool. The cache keeps
  /// a handle of the allocator, so either may be destroyed first.
  /// @throws InvalidArgument when allocator.block_size() != BlockSize; CudaError when the pool
  ///         cannot be allocated.
  explicit PagedLatentCache(const BlockAllocator& allocator, const CudaBackend& backend = {})
      : allocator_(check_allocator(allocator)),
        backend_(backend),
        pool_(std::size_t(allocator.num_blocks()) * block_bytes),
        flag_(1) {
    if (pool_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(pool_.data(), 0, pool_.bytes(), backend_.stream()));
    allocator_.register_pool(this);
  }

  /// An allocator of `num_blocks` blocks of this cache's BlockSize tokens, for every layer's
  /// pool: the block size is then stated once, in the cache type.
  /// @throws InvalidArgument as BlockAllocator's constructor.
  [[nodiscard]] static BlockAllocator make_allocator(index_t num_blocks) {
    return BlockAllocator(num_blocks, BlockSize);
  }

  PagedLatentCache(const PagedLatentCache&) = delete;
  PagedLatentCache& operator=(const PagedLatentCache&) = delete;
  PagedLatentCache& operator=(PagedLatentCache&&) = delete;
  /// Moves the pool; the allocator then copies on write into the new object.
  PagedLatentCache(PagedLatentCache&& other) noexcept
      : BlockPoolHook(other),
        allocator_(other.allocator_),
        backend_(other.backend_),
        pool_(std::move(other.pool_)),
        flag_(std::move(other.flag_)),
        dst_rows_(std::move(other.dst_rows_)),
        copy_error_(other.copy_error_) {
    allocator_.replace_pool(&other, this);
    other.registered_ = false;
  }
  ~PagedLatentCache() {
    if (registered_) allocator_.unregister_pool(this);
  }

  [[nodiscard]] const CudaBackend& backend() const { return backend_; }
  /// A handle of the allocator this pool is registered with.
  [[nodiscard]] BlockAllocator allocator() const { return allocator_; }
  [[nodiscard]] index_t num_blocks() const { return allocator_.num_blocks(); }
  /// Bytes of one cached token in this pool (row_bytes).
  static constexpr std::size_t bytes_per_token() { return row_bytes; }
  /// Bytes the pool holds allocated on the device.
  [[nodiscard]] std::size_t bytes() const { return std::size_t(num_blocks()) * block_bytes; }

  /// The pool, [num_blocks, BlockSize, row_bytes] bytes of device memory.
  [[nodiscard]] const std::byte* pool_data() const { return pool_.data(); }
  /// The pool, writable, for a caller that fills blocks with its own kernels (rows written this
  /// way bypass the checks of `write`).
  [[nodiscard]] std::byte* pool_data() { return pool_.data(); }
  /// Row `slot` of block `block`, a device pointer (no checks).
  [[nodiscard]] const std::byte* row_pointer(std::int32_t block, index_t slot) const {
    return pool_.data() + (std::size_t(block) * BlockSize + std::size_t(slot)) * row_bytes;
  }

  /// Tokens sequence `seq` holds. @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] index_t length(index_t seq) const { return allocator_.length(seq); }
  /// The live sequences of the allocator, named as in ContiguousLatentCache (index_t ids).
  [[nodiscard]] index_t num_sequences() const { return allocator_.num_sequences(); }
  /// True when `seq` was added to the allocator and not released.
  [[nodiscard]] bool contains(index_t seq) const { return allocator_.contains(seq); }
  /// The ids of the live sequences, ascending.
  [[nodiscard]] std::vector<index_t> sequences() const { return allocator_.sequences(); }

  /// Checks what `write(seq, start_pos, rows of n)` would check, without writing (host only).
  /// @throws OutOfRange, InvalidArgument or CapacityError as write does.
  void check_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) const {
    allocator_.check_write(caller, seq, start_pos, n);
  }

  /// Writes `rows` ([n, latent_dim] fp32 in device memory, rounded to Storage to nearest even)
  /// at positions [start_pos, start_pos + n) of `seq` and sets its length to start_pos + n, as
  /// the host cache's write. The finiteness check runs on the device before anything changes and
  /// costs one device-to-host copy of a flag (a stream synchronisation); `encode_rows` is the
  /// path without it.
  /// @throws OutOfRange for a released or unknown sequence or start_pos > length(seq);
  ///         CapacityError when the pool lacks free blocks; InvalidArgument for a bad shape;
  ///         NumericError for a NaN or infinite value (naming its row and column). Nothing
  ///         changes when it throws (a CudaError after the allocator was updated means the
  ///         device failed, and the pool is then lost anyway).
  void write(index_t seq, index_t start_pos, TensorView<const float, 2, DeviceMemory> rows) {
    throw_if_copy_failed();
    check_write(kWrite, seq, start_pos, rows.extent(0));
    detail::check_extents(kWrite, "rows", rows, {rows.extent(0), latent_dim});
    const index_t n = rows.extent(0);
    if (const auto bad = cuda::first_non_finite(backend_, rows.data(), n * latent_dim, flag_)) {
      throw NumericError(detail::message(kWrite, ": 'rows' holds a non-finite value (", bad->second,
                                         ") at row ", bad->first / latent_dim, ", column ",
                                         bad->first % latent_dim));
    }
    dst_rows_.reserve(std::size_t(n));
    allocator_.prepare_write(kWrite, seq, start_pos, n);
    throw_if_copy_failed();
    dst_rows_.host.clear();
    add_destinations(seq, start_pos, n);
    const std::int64_t* dst = dst_rows_.upload(backend_);
    cuda::launch_encode_rows<device_storage_type, latent_dim>(backend_, rows.data(), dst,
                                                              pool_.data(), n);
  }

  /// Appends `rows` ([n, latent_dim], device) after the tokens of sequence `seq`.
  void append(index_t seq, TensorView<const float, 2, DeviceMemory> rows) {
    allocator_.check_live(kAppend, seq);
    allocator_.require_single_pool(kAppend);
    write(seq, length(seq), rows);
  }

  /// The fast path of a batched forward pass whose front has validated everything (with
  /// BlockAllocator::check_writes and a finiteness check of its own): for each i,
  /// allocator.prepare_write(seqs[i], starts[i], q_len), then one kernel that writes row
  /// i·q_len + j of `rows` (device, [seqs.size()·q_len, latent_dim] fp32) at position
  /// starts[i] + j of seqs[i]. NO checks of the values and no host synchronisation. Entries
  /// may share blocks (forks): a shared block is copied when its entry is prepared, before any
  /// row of the batch is written. A sequence listed twice is written in list order (the rows of
  /// earlier entries are issued before the later entry is prepared).
  /// @throws InvalidArgument when the spans differ in size or q_len < 0; whatever
  ///         prepare_write throws for an invalid entry (entries before it stay prepared: the
  ///         caller validates first).
  void encode_rows(std::span<const index_t> seqs, std::span<const index_t> starts, index_t q_len,
                   const float* rows) {
    throw_if_copy_failed();
    detail::require<InvalidArgument>(seqs.size() == starts.size(), kEncode, ": 'starts' has ",
                                     starts.size(), " entries; expected ", seqs.size(),
                                     " (one per sequence)");
    detail::require<InvalidArgument>(q_len >= 0, kEncode, ": 'q_len' is ", q_len,
                                     "; expected at least 0");
    cuda::encode_batch<device_storage_type, latent_dim>(
        backend_, seqs, q_len, rows, pool_.data(), dst_rows_, [&](std::size_t i) {
          allocator_.prepare_write(kEncode, seqs[i], starts[i], q_len);
          throw_if_copy_failed();
          add_destinations(seqs[i], starts[i], q_len);
        });
  }

  /// The view of sequences `seqs` (in that order) that device kernels read: this pool, with the
  /// block table and lengths built into `storage.host` and uploaded to `storage`'s device
  /// buffers on the cache's stream (no synchronisation). The view points into `storage`.
  /// @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] PagedLatentView<C, Storage, BlockSize, DeviceMemory> view(
      std::span<const index_t> seqs, DeviceBlockTable& storage) const {
    throw_if_copy_failed();
    allocator_.block_table(seqs, storage.host);
    const BlockTable& host = storage.host;
    grow(storage.table, host.table.size());
    grow(storage.seqlens, host.seqlens.size());
    upload(storage.table.data(), host.table);
    upload(storage.seqlens.data(), host.seqlens);
    return {
        pool_data(), num_blocks(),
        TensorView<const std::int32_t, 2, DeviceMemory>(storage.table.data(),
                                                        {host.batch(), host.max_blocks}),
        TensorView<const std::int32_t, 1, DeviceMemory>(storage.seqlens.data(), {host.batch()})};
  }

  /// Reads tokens [start_pos, start_pos + n) of `seq` back as fp32 into host `out`
  /// ([n, latent_dim]): copies the rows to the host (one copy per block touched), synchronises
  /// the stream, and decodes them.
  /// @throws OutOfRange for a released or unknown sequence or a range outside [0, length(seq));
  ///         InvalidArgument for a bad shape.
  void read(index_t seq, index_t start_pos, HostView<float, 2> out) const {
    throw_if_copy_failed();
    const index_t length = allocator_.length(seq);
    const index_t n = out.extent(0);
    detail::require<OutOfRange>(
        start_pos >= 0 && n >= 0 && start_pos + n <= length, kRead, ": tokens [", start_pos, ", ",
        start_pos + n, ") are not all in sequence ", seq, ", which holds ", length, " tokens");
    detail::check_extents(kRead, "out", out, {n, latent_dim});
    if (n == 0) return;
    const std::span<const std::int32_t> blocks = allocator_.blocks(seq);
    std::vector<std::byte> staged(std::size_t(n) * row_bytes);
    for (index_t pos = start_pos; pos < start_pos + n;) {
      const index_t slot = pos % BlockSize;
      const index_t count = std::min<index_t>(BlockSize - slot, start_pos + n - pos);
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(staged.data() + std::size_t(pos - start_pos) * row_bytes,
                                          row_pointer(blocks[std::size_t(pos / BlockSize)], slot),
                                          std::size_t(count) * row_bytes, cudaMemcpyDeviceToHost,
                                          backend_.stream()));
      pos += count;
    }
    backend_.synchronize();
    for (index_t i = 0; i < n; ++i)
      format::decode(staged.data() + std::size_t(i) * row_bytes, out.data() + i * latent_dim);
  }

  /// Every token of `seq` as fp32, [length(seq) · latent_dim] row-major (host).
  [[nodiscard]] std::vector<float> rows(index_t seq) const {
    std::vector<float> out(std::size_t(length(seq)) * latent_dim);
    read(seq, 0, HostView<float, 2>(out.data(), {length(seq), latent_dim}));
    return out;
  }

  /// Copies the whole pool of a host cache over the same allocator into this one (host to
  /// device, on the stream; the host pool may change once the call returns).
  /// @throws InvalidArgument when `host` uses another allocator.
  void upload(const host_cache& host) {
    throw_if_copy_failed();
    require_same_allocator("upload", host.allocator());
    if (bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(pool_.data(), host.pool_data(), bytes(),
                                          cudaMemcpyHostToDevice, backend_.stream()));
  }

  /// Copies this whole pool into a host cache over the same allocator (device to host; the
  /// stream is synchronised, so `host` is complete on return).
  /// @throws InvalidArgument when `host` uses another allocator.
  void download(host_cache& host) const {
    throw_if_copy_failed();
    require_same_allocator("download", host.allocator());
    if (bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(host.pool_data(), pool_.data(), bytes(),
                                          cudaMemcpyDeviceToHost, backend_.stream()));
    backend_.synchronize();
  }

 private:
  static constexpr std::string_view kName = "daedalus::PagedLatentCache";
  static constexpr std::string_view kWrite = "daedalus::PagedLatentCache::write";
  static constexpr std::string_view kRead = "daedalus::PagedLatentCache::read";
  static constexpr std::string_view kAppend = "daedalus::PagedLatentCache::append";
  static constexpr std::string_view kEncode = "daedalus::PagedLatentCache::encode_rows";

  static const BlockAllocator& check_allocator(const BlockAllocator& allocator) {
    detail::require<InvalidArgument>(allocator.block_size() == BlockSize, kName,
                                     ": the allocator's block_size is ", allocator.block_size(),
                                     "; expected ", BlockSize, " (the cache's BlockSize)");
    return allocator;
  }

  void require_same_allocator(std::string_view function, const BlockAllocator& other) const {
    detail::require<InvalidArgument>(other == allocator_, kName, "::", function,
                                     ": 'host' uses another BlockAllocator; expected the one this "
                                     "cache uses (block ids must mean the same blocks)");
  }

  /// The pool row of every position [start_pos, start_pos + n) of `seq`, appended to the staged
  /// destinations (after prepare_write, so the block list is the one the rows go to).
  void add_destinations(index_t seq, index_t start_pos, index_t n) {
    const std::span<const std::int32_t> blocks = allocator_.blocks(seq);
    for (index_t pos = start_pos; pos < start_pos + n; ++pos)
      dst_rows_.host.push_back(std::int64_t(blocks[std::size_t(pos / BlockSize)]) * BlockSize +
                               pos % BlockSize);
  }

  template <class T>
  static void grow(cuda::DeviceBuffer<T>& buffer, std::size_t n) {
    if (buffer.size() < n) buffer = cuda::DeviceBuffer<T>(std::max(n, 2 * buffer.size()));
  }
  template <class T>
  void upload(T* dst, const std::vector<T>& src) const {
    if (!src.empty())
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(T),
                                          cudaMemcpyHostToDevice, backend_.stream()));
  }

  /// Copy-on-write, called by the allocator in the middle of a change it cannot undo: the copy
  /// is issued on the stream, and a failure to issue it (a device that already failed) is kept
  /// and reported by the next call on this cache rather than thrown through the allocator.
  void copy_block_rows(std::int32_t dst, std::int32_t src, index_t rows) override {
    const cudaError_t status =
        cudaMemcpyAsync(pool_.data() + std::size_t(dst) * block_bytes,
                        pool_.data() + std::size_t(src) * block_bytes,
                        std::size_t(rows) * row_bytes, cudaMemcpyDeviceToDevice, backend_.stream());
    if (status != cudaSuccess && copy_error_ == cudaSuccess) copy_error_ = status;
  }
  void throw_if_copy_failed() const {
    if (copy_error_ != cudaSuccess)
      cuda::detail::check_cuda(copy_error_, "cudaMemcpyAsync (copy-on-write of a shared block)",
                               __FILE__, __LINE__);
  }

  BlockAllocator allocator_;  // a handle: the allocator lives at least as long as this pool
  bool registered_ = true;    // false once moved from
  CudaBackend backend_;
  cuda::DeviceBuffer<std::byte> pool_;
  cuda::DeviceBuffer<unsigned long long> flag_;  // finiteness scan result
  cuda::detail::StagedArray<std::int64_t> dst_rows_;
  cudaError_t copy_error_ = cudaSuccess;
};

namespace cuda {

/// The batch of a device PagedLatentView as the device kernels read it (pool, block table,
/// lengths; no copy). Does not validate the view's contents, which live on the device: see
/// mla::cuda::validate_on_device.
/// @throws InvalidArgument when the block table or the lengths are not packed row-major, or the
///         batch does not fit an int.
template <MlaConfig C, class Storage, int BS>
[[nodiscard]] DeviceLatentBatch<PagedRowAddress> latent_batch(
    const PagedLatentView<C, Storage, BS, DeviceMemory>& view) {
  constexpr std::string_view kName = "daedalus::cuda::latent_batch";
  ::daedalus::detail::require<InvalidArgument>(
      view.block_table.is_contiguous() && view.cache_seqlens.is_contiguous(), kName,
      ": the view's 'block_table' and 'cache_seqlens' must be packed row-major");
  ::daedalus::detail::require<InvalidArgument>(
      view.batch() <= std::numeric_limits<int>::max() &&
          view.max_blocks() <= std::numeric_limits<int>::max(),
      kName, ": the view has ", view.batch(), " entries of ", view.max_blocks(),
      " blocks; expected at most ", std::numeric_limits<int>::max(), " of each");
  DeviceLatentBatch<PagedRowAddress> batch;
  batch.pool = view.pool;
  batch.row_bytes = view.row_bytes;
  batch.address = PagedRowAddress{view.block_table.data(), static_cast<int>(view.max_blocks()), BS};
  batch.seqlens = view.cache_seqlens.data();
  batch.batch = static_cast<int>(view.batch());
  return batch;
}

}  // namespace cuda
}  // namespace daedalus
