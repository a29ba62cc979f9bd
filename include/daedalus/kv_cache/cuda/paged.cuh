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

namespace detail {

/// The pool of a device PagedLatentCache (the front, with its API, checks and messages, is
/// kv_cache/paged.hpp): [num_blocks, BlockSize, row_bytes] bytes of LatentRowFormat<C, Storage>
/// rows on the device (FlashMLA's paged `k_cache` layout), while which blocks each sequence uses
/// stays with the host BlockAllocator shared by every layer (vLLM's design: scheduling is host
/// work, the pool is device memory). A write that needs a copy of a shared block gets it as a
/// device-to-device copy on the cache's stream, before its rows are written.
///
/// Every device operation is issued to the stream of the cache's CudaBackend, in order. Host
/// calls that return data (read, rows, download, and write's finiteness check) synchronise that
/// stream; `encode_rows` and `view` do not.
template <MlaConfig C, class Storage, int BlockSize>
class PagedPool<C, CudaBackend, Storage, BlockSize> : public PagedPoolBase {
  static_assert(std::same_as<Storage, bfloat16> || std::same_as<Storage, half>,
                "daedalus::PagedLatentCache: the CUDA backend stores bfloat16 or half rows (fp32 "
                "and fp8 device pools are not supported)");
  using Format = LatentRowFormat<C, Storage>;
  static constexpr int kLatentDim = MlaShape<C>::latent_dim;
  static constexpr std::size_t kRowBytes = Format::row_bytes;
  static constexpr std::size_t kBlockBytes = kRowBytes * std::size_t(BlockSize);

 public:
  using device_storage_type = cuda::device_storage_t<Storage>;
  using host_cache = PagedLatentCache<C, CpuBackend, Storage, BlockSize>;

  [[nodiscard]] const CudaBackend& backend() const { return backend_; }

  /// The pool, [num_blocks, BlockSize, row_bytes] bytes of device memory.
  [[nodiscard]] const std::byte* pool_data() const { return pool_.data(); }
  /// The pool, writable, for a caller that fills blocks with its own kernels (rows written this
  /// way bypass the checks of `write`).
  [[nodiscard]] std::byte* pool_data() { return pool_.data(); }
  /// Row `slot` of block `block`, a device pointer (no checks).
  [[nodiscard]] const std::byte* row_pointer(std::int32_t block, index_t slot) const {
    return pool_.data() + (std::size_t(block) * BlockSize + std::size_t(slot)) * kRowBytes;
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
    check_usable();
    require<InvalidArgument>(seqs.size() == starts.size(), kEncode, ": 'starts' has ",
                             starts.size(), " entries; expected ", seqs.size(),
                             " (one per sequence)");
    require<InvalidArgument>(q_len >= 0, kEncode, ": 'q_len' is ", q_len, "; expected at least 0");
    cuda::encode_batch<device_storage_type, kLatentDim>(
        backend_, seqs, q_len, rows, pool_.data(), dst_rows_, [&](std::size_t i) {
          allocator_.prepare_write(kEncode, seqs[i], starts[i], q_len);
          check_usable();
          add_destinations(allocator_.blocks(seqs[i]), starts[i], q_len);
        });
  }

  /// The view of sequences `seqs` (in that order) that device kernels read: this pool, with the
  /// block table and lengths built into `storage.host` and uploaded to `storage`'s device
  /// buffers on the cache's stream (no synchronisation). The view points into `storage`.
  /// @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] PagedLatentView<C, Storage, BlockSize, DeviceMemory> view(
      std::span<const index_t> seqs, DeviceBlockTable& storage) const {
    check_usable();
    allocator_.block_table(seqs, storage.host);
    const BlockTable& host = storage.host;
    cuda::grow(storage.table, host.table.size(), cuda::Growth::doubling);
    cuda::grow(storage.seqlens, host.seqlens.size(), cuda::Growth::doubling);
    upload(storage.table.data(), host.table);
    upload(storage.seqlens.data(), host.seqlens);
    return {
        pool_data(), allocator_.num_blocks(),
        TensorView<const std::int32_t, 2, DeviceMemory>(storage.table.data(),
                                                        {host.batch(), host.max_blocks}),
        TensorView<const std::int32_t, 1, DeviceMemory>(storage.seqlens.data(), {host.batch()})};
  }

  /// Copies the whole pool of a host cache over the same allocator into this one (host to
  /// device, on the stream; the host pool may change once the call returns).
  /// @throws InvalidArgument when `host` uses another allocator.
  void upload(const host_cache& host) {
    check_usable();
    require_same_allocator("upload", host.allocator());
    if (pool_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(pool_.data(), host.pool_data(), pool_.bytes(),
                                          cudaMemcpyHostToDevice, backend_.stream()));
  }

  /// Copies this whole pool into a host cache over the same allocator (device to host; the
  /// stream is synchronised, so `host` is complete on return).
  /// @throws InvalidArgument when `host` uses another allocator.
  void download(host_cache& host) const {
    check_usable();
    require_same_allocator("download", host.allocator());
    if (pool_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(host.pool_data(), pool_.data(), pool_.bytes(),
                                          cudaMemcpyDeviceToHost, backend_.stream()));
    backend_.synchronize();
  }

 protected:
  /// A device pool of allocator.num_blocks() blocks, zero-filled on the backend's stream.
  /// @throws CudaError when the pool cannot be allocated.
  PagedPool(const BlockAllocator& allocator, const CudaBackend& backend)
      : PagedPoolBase(allocator),
        backend_(backend),
        pool_(std::size_t(allocator.num_blocks()) * kBlockBytes),
        flag_(1) {
    if (pool_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(pool_.data(), 0, pool_.bytes(), backend_.stream()));
  }
  PagedPool(PagedPool&& other) noexcept
      : PagedPoolBase(other),
        backend_(other.backend_),
        pool_(std::move(other.pool_)),
        flag_(std::move(other.flag_)),
        dst_rows_(std::move(other.dst_rows_)),
        copy_error_(other.copy_error_) {}
  ~PagedPool() = default;

  /// A copy-on-write copy that could not be issued is reported by the next call on this cache.
  void check_usable() const {
    if (copy_error_ != cudaSuccess)
      cuda::detail::check_cuda(copy_error_, "cudaMemcpyAsync (copy-on-write of a shared block)",
                               __FILE__, __LINE__);
  }
  /// Throws NumericError naming the first non-finite value (and the value), with a message
  /// starting with `caller`: a scan on the device, then a flag copy (a synchronisation).
  void require_finite_rows(std::string_view caller, TensorView<const float, 2, DeviceMemory> rows) {
    if (const auto bad =
            cuda::first_non_finite(backend_, rows.data(), rows.extent(0) * kLatentDim, flag_)) {
      throw NumericError(message(caller, ": 'rows' holds a non-finite value (", bad->second,
                                 ") at row ", bad->first / kLatentDim, ", column ",
                                 bad->first % kLatentDim));
    }
  }
  /// The staging of a write's destination rows, allocated before the allocator changes.
  void reserve_rows(index_t n) { dst_rows_.reserve(std::size_t(n)); }
  /// Encodes `rows` at positions [start_pos, start_pos + n) of the sequence whose block list is
  /// `blocks` (already prepared for the write): one kernel on the stream.
  void encode(std::span<const std::int32_t> blocks, index_t start_pos,
              TensorView<const float, 2, DeviceMemory> rows) {
    dst_rows_.host.clear();
    add_destinations(blocks, start_pos, rows.extent(0));
    const std::int64_t* dst = dst_rows_.upload(backend_);
    cuda::launch_encode_rows<device_storage_type, kLatentDim>(backend_, rows.data(), dst,
                                                              pool_.data(), rows.extent(0));
  }
  /// Decodes positions [start_pos, start_pos + n) of the sequence with block list `blocks` into
  /// host `out` ([n, latent_dim] fp32): one copy per block touched, a synchronisation.
  void decode(std::span<const std::int32_t> blocks, index_t start_pos,
              HostView<float, 2> out) const {
    const index_t n = out.extent(0);
    std::vector<std::byte> staged(std::size_t(n) * kRowBytes);
    for (index_t pos = start_pos; pos < start_pos + n;) {
      const index_t slot = pos % BlockSize;
      const index_t count = std::min<index_t>(BlockSize - slot, start_pos + n - pos);
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(staged.data() + std::size_t(pos - start_pos) * kRowBytes,
                                          row_pointer(blocks[std::size_t(pos / BlockSize)], slot),
                                          std::size_t(count) * kRowBytes, cudaMemcpyDeviceToHost,
                                          backend_.stream()));
      pos += count;
    }
    backend_.synchronize();
    for (index_t i = 0; i < n; ++i)
      Format::decode(staged.data() + std::size_t(i) * kRowBytes, out.data() + i * kLatentDim);
  }

 private:
  static constexpr std::string_view kName = "daedalus::PagedLatentCache";
  static constexpr std::string_view kEncode = "daedalus::PagedLatentCache::encode_rows";

  void require_same_allocator(std::string_view function, const BlockAllocator& other) const {
    require<InvalidArgument>(other == allocator_, kName, "::", function,
                             ": 'host' uses another BlockAllocator; expected the one this "
                             "cache uses (block ids must mean the same blocks)");
  }

  /// The pool row of every position [start_pos, start_pos + n) of the sequence with block list
  /// `blocks`, appended to the staged destinations (after prepare_write, so the block list is
  /// the one the rows go to).
  void add_destinations(std::span<const std::int32_t> blocks, index_t start_pos, index_t n) {
    for (index_t pos = start_pos; pos < start_pos + n; ++pos)
      dst_rows_.host.push_back(std::int64_t(blocks[std::size_t(pos / BlockSize)]) * BlockSize +
                               pos % BlockSize);
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
        cudaMemcpyAsync(pool_.data() + std::size_t(dst) * kBlockBytes,
                        pool_.data() + std::size_t(src) * kBlockBytes,
                        std::size_t(rows) * kRowBytes, cudaMemcpyDeviceToDevice, backend_.stream());
    if (status != cudaSuccess && copy_error_ == cudaSuccess) copy_error_ = status;
  }

  CudaBackend backend_;
  cuda::DeviceBuffer<std::byte> pool_;
  cuda::DeviceBuffer<unsigned long long> flag_;  // finiteness scan result
  cuda::detail::StagedArray<std::int64_t> dst_rows_;
  cudaError_t copy_error_ = cudaSuccess;
};

}  // namespace detail

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
