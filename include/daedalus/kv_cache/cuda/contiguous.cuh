// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
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
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/kv_cache/cuda/encode_rows.cuh"
#include "daedalus/kv_cache/storage.hpp"

namespace daedalus {

/// Where the sequences of a batch start in a device contiguous cache, for
/// ContiguousLatentCache<..., CudaBackend, ...>::batch: host arrays and their device copies
/// (which only grow, so a decode loop reuses them). A batch points into it: keep it alive, and
/// unchanged, while a kernel reads the batch.
struct DeviceBatchRows {
  std::vector<std::int64_t> host_first_row;    // [batch] first pool row of each entry
  std::vector<std::int32_t> host_seqlens;      // [batch] cached tokens of each entry
  cuda::DeviceBuffer<std::int64_t> first_row;  // at least batch entries
  cuda::DeviceBuffer<std::int32_t> seqlens;    // at least batch entries
};

namespace cuda {
using ::daedalus::DeviceBatchRows;
}  // namespace cuda

namespace detail {

/// The rows of a device ContiguousLatentCache (the front, with its API, checks and messages,
/// is kv_cache/contiguous.hpp): one device pool of [total rows, latent_dim] Storage values
/// (the normed latent c then the rotated k_pe; DeepSeek-V2 paper, section 2.1.2), written by a
/// kernel that rounds fp32 rows to nearest even. Lengths and capacities stay on the host.
///
/// Every device operation is issued to the stream of the cache's CudaBackend, in order. Host
/// calls that return data (read, rows, download, and write's finiteness check) synchronise that
/// stream; `encode_rows` and `batch` do not.
template <MlaConfig C, class Storage>
class ContiguousRows<C, CudaBackend, Storage> : public ContiguousLayout {
  static_assert(std::same_as<Storage, bfloat16> || std::same_as<Storage, half>,
                "daedalus::ContiguousLatentCache: the CUDA backend stores bfloat16 or half rows "
                "(fp32 and fp8 device caches are not supported)");
  static constexpr int kLatentDim = MlaShape<C>::latent_dim;
  static constexpr std::size_t kRowBytes = std::size_t(kLatentDim) * sizeof(Storage);

 public:
  using device_storage_type = cuda::device_storage_t<Storage>;
  using host_cache = ContiguousLatentCache<C, CpuBackend, Storage>;

  /// The pool, zero-filled on the backend's stream.
  /// @throws CudaError when the memory cannot be allocated.
  ContiguousRows(std::vector<index_t> capacities, const CudaBackend& backend)
      : ContiguousLayout(std::move(capacities)),
        backend_(backend),
        rows_(std::size_t(total_rows()) * kRowBytes),
        flag_(1) {
    if (rows_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(rows_.data(), 0, rows_.bytes(), backend_.stream()));
  }

  [[nodiscard]] const CudaBackend& backend() const { return backend_; }

  /// The rows of every sequence, [sum of capacities, latent_dim] of Storage, device memory.
  [[nodiscard]] const std::byte* pool_data() const { return rows_.data(); }
  /// Device pointer to row `pos` of sequence `seq` (no checks).
  [[nodiscard]] const device_storage_type* row_pointer(index_t seq, index_t pos) const {
    return reinterpret_cast<const device_storage_type*>(rows_.data()) +
           (offsets_[std::size_t(seq)] + pos) * kLatentDim;
  }

  /// The fast path of a batched forward pass whose front validated everything (check_write for
  /// each entry and a finiteness check of its own): row i·q_len + j of `rows` (device,
  /// [seqs.size()·q_len, latent_dim] fp32) goes to position starts[i] + j of seqs[i], whose
  /// length becomes starts[i] + q_len; one kernel, NO checks of positions or values, no host
  /// synchronisation. A sequence listed twice is written in list order.
  /// @throws InvalidArgument when the spans differ in size or q_len < 0.
  void encode_rows(std::span<const index_t> seqs, std::span<const index_t> starts, index_t q_len,
                   const float* rows) {
    require<InvalidArgument>(seqs.size() == starts.size(), kEncode, ": 'starts' has ",
                             starts.size(), " entries; expected ", seqs.size(),
                             " (one per sequence)");
    require<InvalidArgument>(q_len >= 0, kEncode, ": 'q_len' is ", q_len, "; expected at least 0");
    cuda::encode_batch<device_storage_type, kLatentDim>(
        backend_, seqs, q_len, rows, rows_.data(), dst_rows_, [&](std::size_t i) {
          add_destinations(seqs[i], starts[i], q_len);
          set_length(seqs[i], starts[i] + q_len);
        });
  }

  /// The batch of sequences `seqs` (in that order; repeats allowed) as the device kernels read
  /// it: first rows and lengths built into `storage`'s host arrays and uploaded to its device
  /// buffers on the cache's stream (no synchronisation). The batch points into `storage`.
  /// @throws OutOfRange when a sequence is not in [0, num_sequences).
  [[nodiscard]] cuda::DeviceLatentBatch<cuda::ContiguousRowAddress> batch(
      std::span<const index_t> seqs, DeviceBatchRows& storage) const {
    require<InvalidArgument>(seqs.size() <= std::size_t(std::numeric_limits<int>::max()), kName,
                             "::batch: 'seqs' has ", seqs.size(), " entries; expected at most ",
                             std::numeric_limits<int>::max());
    for (const index_t seq : seqs) checked(seq, "batch");
    storage.host_first_row.resize(seqs.size());
    storage.host_seqlens.resize(seqs.size());
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      storage.host_first_row[b] = offsets_[std::size_t(seqs[b])];
      storage.host_seqlens[b] = std::int32_t(lengths_[std::size_t(seqs[b])]);
    }
    cuda::grow(storage.first_row, seqs.size(), cuda::Growth::doubling);
    cuda::grow(storage.seqlens, seqs.size(), cuda::Growth::doubling);
    upload(storage.first_row.data(), storage.host_first_row);
    upload(storage.seqlens.data(), storage.host_seqlens);
    cuda::DeviceLatentBatch<cuda::ContiguousRowAddress> out;
    out.pool = rows_.data();
    out.row_bytes = kRowBytes;
    out.address = cuda::ContiguousRowAddress{storage.first_row.data()};
    out.seqlens = storage.seqlens.data();
    out.batch = static_cast<int>(seqs.size());
    return out;
  }

  /// Reads tokens [start_pos, start_pos + n) of `seq` back as fp32 into host `out`
  /// ([n, latent_dim]): one device-to-host copy, a stream synchronisation, and a decode.
  /// @throws OutOfRange when `seq` is not a sequence or the range is outside [0, length(seq));
  ///         InvalidArgument for a bad shape.
  void read(index_t seq, index_t start_pos, HostView<float, 2> out) const {
    const index_t length = lengths_[checked(seq, "read")];
    const index_t n = out.extent(0);
    require<OutOfRange>(start_pos >= 0 && n >= 0 && start_pos <= length && n <= length - start_pos,
                        kRead, ": tokens [", start_pos, ", ", start_pos + n,
                        ") are not all in sequence ", seq, ", which holds ", length, " tokens");
    check_extents(kRead, "out", out, {n, kLatentDim});
    if (n == 0) return;
    std::vector<Storage> staged(std::size_t(n) * kLatentDim);
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(staged.data(), row_pointer(seq, start_pos),
                                        std::size_t(n) * kRowBytes, cudaMemcpyDeviceToHost,
                                        backend_.stream()));
    backend_.synchronize();
    for (std::size_t i = 0; i < staged.size(); ++i) out.data()[i] = to_float(staged[i]);
  }

  /// Every valid token of `seq` as fp32, [length(seq) · latent_dim] row-major (host).
  [[nodiscard]] std::vector<float> rows(index_t seq) const {
    std::vector<float> out(std::size_t(length(seq)) * kLatentDim);
    read(seq, 0, HostView<float, 2>(out.data(), {length(seq), kLatentDim}));
    return out;
  }

  /// Copies a host cache of the same capacities into this one: every row (host to device, on
  /// the stream) and every length.
  /// @throws InvalidArgument when the capacities differ.
  void upload(const host_cache& host) {
    require_same_shape("upload", host);
    if (rows_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(rows_.data(), host.row_pointer(0, 0), rows_.bytes(),
                                          cudaMemcpyHostToDevice, backend_.stream()));
    for (index_t s = 0; s < num_sequences(); ++s) set_length(s, host.length(s));
  }

  /// Copies this cache into a host cache of the same capacities: the valid rows of each
  /// sequence and its length (the stream is synchronised; `host` is complete on return).
  /// @throws InvalidArgument when the capacities differ. Nothing changes when it throws.
  void download(host_cache& host) const {
    require_same_shape("download", host);
    std::vector<std::vector<float>> all(capacities_.size());
    for (index_t s = 0; s < num_sequences(); ++s) all[std::size_t(s)] = rows(s);
    // The host cache has no raw writable storage; its write re-rounds the decoded values,
    // which is exact (a bf16 or fp16 value is an fp32 value), so the rows arrive bit for bit.
    for (index_t s = 0; s < num_sequences(); ++s)
      host.write(s, 0,
                 HostView<const float, 2>(all[std::size_t(s)].data(), {length(s), kLatentDim}));
  }

 protected:
  /// Throws NumericError, naming the first non-finite value by row and column, with a message
  /// starting with `caller`: a scan on the device, then a flag copy (a synchronisation).
  void require_finite_rows(std::string_view caller, TensorView<const float, 2, DeviceMemory> rows) {
    if (const auto bad =
            cuda::first_non_finite(backend_, rows.data(), rows.extent(0) * kLatentDim, flag_)) {
      throw NumericError(message(caller, ": 'rows' holds a non-finite value at row ",
                                 bad->first / kLatentDim, ", column ", bad->first % kLatentDim));
    }
  }
  /// Rounds `rows` to Storage into positions [start_pos, start_pos + n) of `seq`, on the stream.
  void encode(index_t seq, index_t start_pos, TensorView<const float, 2, DeviceMemory> rows) {
    const index_t n = rows.extent(0);
    dst_rows_.reserve(std::size_t(n));
    dst_rows_.host.clear();
    add_destinations(seq, start_pos, n);
    const std::int64_t* dst = dst_rows_.upload(backend_);
    cuda::launch_encode_rows<device_storage_type, kLatentDim>(backend_, rows.data(), dst,
                                                              rows_.data(), n);
  }

 private:
  static constexpr std::string_view kRead = "daedalus::ContiguousLatentCache::read";
  static constexpr std::string_view kEncode = "daedalus::ContiguousLatentCache::encode_rows";

  void require_same_shape(std::string_view function, const host_cache& host) const {
    require<InvalidArgument>(host.num_sequences() == num_sequences(), kName, "::", function,
                             ": 'host' has ", host.num_sequences(), " sequences; expected ",
                             num_sequences());
    for (index_t s = 0; s < num_sequences(); ++s)
      require<InvalidArgument>(host.capacity(s) == capacities_[std::size_t(s)], kName,
                               "::", function, ": 'host' sequence ", s, " has capacity ",
                               host.capacity(s), "; expected ", capacities_[std::size_t(s)]);
  }

  void add_destinations(index_t seq, index_t start_pos, index_t n) {
    for (index_t pos = start_pos; pos < start_pos + n; ++pos)
      dst_rows_.host.push_back(offsets_[std::size_t(seq)] + pos);
  }

  template <class T>
  void upload(T* dst, const std::vector<T>& src) const {
    if (!src.empty())
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(T),
                                          cudaMemcpyHostToDevice, backend_.stream()));
  }

  CudaBackend backend_;
  cuda::DeviceBuffer<std::byte> rows_;           // [total rows, latent_dim] of Storage
  cuda::DeviceBuffer<unsigned long long> flag_;  // finiteness scan result
  cuda::detail::StagedArray<std::int64_t> dst_rows_;
};

}  // namespace detail

}  // namespace daedalus
