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

/// A latent cache with one contiguous range of rows per sequence, in device memory: the device
/// counterpart of the host ContiguousLatentCache (contiguous.hpp), with its API, checks, typed
/// errors and messages; lengths and capacities stay on the host. Rows are latent_dim values of
/// Storage (the normed latent c then the rotated k_pe; DeepSeek-V2 paper, section 2.1.2).
///
/// Every device operation is issued to the stream of the cache's CudaBackend, in order. Host
/// calls that return data (read, rows, download, and write's finiteness check) synchronise that
/// stream; `encode_rows` and `batch` do not.
///
/// @tparam C       an MlaConfig
/// @tparam Storage bfloat16 or half (the device backend's storage types)
template <MlaConfig C, StorageType Storage>
class ContiguousLatentCache<C, CudaBackend, Storage> {
  static_assert(std::same_as<Storage, bfloat16> || std::same_as<Storage, half>,
                "daedalus::ContiguousLatentCache: the CUDA backend stores bfloat16 or half rows "
                "(fp32 and fp8 device caches are not supported)");

 public:
  using config = C;
  using backend_type = CudaBackend;
  using storage_type = Storage;
  using device_storage_type = cuda::device_storage_t<Storage>;
  using host_cache = ContiguousLatentCache<C, CpuBackend, Storage>;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;
  /// Bytes of one cached token.
  static constexpr std::size_t row_bytes = std::size_t(latent_dim) * sizeof(Storage);

  /// `num_sequences` sequences of `capacity` tokens each, zero-filled on the backend's stream.
  /// @throws InvalidArgument when either is negative or a capacity exceeds 2^31 - 1 (device
  ///         kernels index positions with int); CudaError when the memory cannot be allocated.
  ContiguousLatentCache(index_t num_sequences, index_t capacity, const CudaBackend& backend = {})
      : ContiguousLatentCache(
            std::vector<index_t>(static_cast<std::size_t>(check_count(num_sequences)), capacity),
            backend) {}

  /// One sequence per entry of `capacities`, each with its own capacity in tokens.
  /// @throws InvalidArgument when a capacity is negative or exceeds 2^31 - 1.
  explicit ContiguousLatentCache(std::vector<index_t> capacities, const CudaBackend& backend = {})
      : capacities_(check_capacities(std::move(capacities))),
        lengths_(capacities_.size(), 0),
        offsets_(offsets_of(capacities_)),
        backend_(backend),
        rows_(std::size_t(offsets_.back()) * row_bytes),
        flag_(1) {
    if (rows_.bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(rows_.data(), 0, rows_.bytes(), backend_.stream()));
  }

  [[nodiscard]] const CudaBackend& backend() const { return backend_; }
  [[nodiscard]] index_t num_sequences() const { return index_t(capacities_.size()); }
  /// True when `seq` names one of the cache's sequences (as the host cache).
  [[nodiscard]] bool contains(index_t seq) const { return seq >= 0 && seq < num_sequences(); }
  /// The ids of the sequences, ascending: 0, 1, ..., num_sequences - 1.
  [[nodiscard]] std::vector<index_t> sequences() const {
    std::vector<index_t> ids(capacities_.size());
    for (std::size_t s = 0; s < ids.size(); ++s) ids[s] = index_t(s);
    return ids;
  }
  [[nodiscard]] index_t capacity(index_t seq) const {
    return capacities_[checked(seq, "capacity")];
  }
  [[nodiscard]] index_t length(index_t seq) const { return lengths_[checked(seq, "length")]; }

  /// Bytes one cached token takes in one layer (latent_dim × sizeof(Storage)).
  static constexpr std::size_t bytes_per_token() { return row_bytes; }
  /// Bytes the whole cache holds allocated on the device.
  [[nodiscard]] std::size_t bytes() const { return rows_.bytes(); }

  /// The rows of every sequence, [sum of capacities, latent_dim] of Storage, device memory.
  [[nodiscard]] const std::byte* pool_data() const { return rows_.data(); }
  /// The first pool row of sequence `seq` (no checks).
  [[nodiscard]] index_t first_row(index_t seq) const { return offsets_[std::size_t(seq)]; }
  /// Device pointer to row `pos` of sequence `seq` (no checks).
  [[nodiscard]] const device_storage_type* row_pointer(index_t seq, index_t pos) const {
    return reinterpret_cast<const device_storage_type*>(rows_.data()) +
           (offsets_[std::size_t(seq)] + pos) * latent_dim;
  }

  /// Checks what `write(seq, start_pos, rows of n)` would check, without writing (host only).
  void check_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) const {
    detail::require<OutOfRange>(seq >= 0 && seq < num_sequences(), caller, ": sequence ", seq,
                                " is not in [0, ", num_sequences(), ")");
    const std::size_t s = std::size_t(seq);
    detail::require<OutOfRange>(start_pos >= 0 && start_pos <= lengths_[s], caller,
                                ": 'start_pos' is ", start_pos, "; expected a position in [0, ",
                                lengths_[s], "] (sequence ", seq, " holds ", lengths_[s],
                                " tokens)");
    detail::require<CapacityError>(start_pos + n <= capacities_[s], caller, ": sequence ", seq,
                                   " would hold ", start_pos + n, " tokens; its capacity is ",
                                   capacities_[s]);
  }

  /// Writes `rows` ([n, latent_dim] fp32 in device memory, rounded to Storage to nearest even)
  /// at positions [start_pos, start_pos + n) of `seq` and sets its length to start_pos + n.
  /// The finiteness check runs on the device first and costs a flag copy (a stream
  /// synchronisation); `encode_rows` is the path without it.
  /// @throws OutOfRange when `seq` is not a sequence, or start_pos > length(seq);
  ///         CapacityError when start_pos + n > capacity(seq); InvalidArgument for a bad shape;
  ///         NumericError for a non-finite value. Nothing is written when it throws.
  void write(index_t seq, index_t start_pos, TensorView<const float, 2, DeviceMemory> rows) {
    check_write(kWrite, seq, start_pos, rows.extent(0));
    detail::check_extents(kWrite, "rows", rows, {rows.extent(0), latent_dim});
    const index_t n = rows.extent(0);
    if (const auto bad = cuda::first_non_finite(backend_, rows.data(), n * latent_dim, flag_)) {
      throw NumericError(detail::message(kWrite, ": 'rows' holds a non-finite value at row ",
                                         bad->first / latent_dim, ", column ",
                                         bad->first % latent_dim));
    }
    dst_rows_.reserve(std::size_t(n));
    dst_rows_.host.clear();
    add_destinations(seq, start_pos, n);
    const std::int64_t* dst = dst_rows_.upload(backend_);
    cuda::launch_encode_rows<device_storage_type, latent_dim>(backend_, rows.data(), dst,
                                                              rows_.data(), n);
    lengths_[std::size_t(seq)] = start_pos + n;
  }

  /// Appends `rows` ([n, latent_dim], device) after the valid rows of sequence `seq`.
  void append(index_t seq, TensorView<const float, 2, DeviceMemory> rows) {
    write(seq, length(seq), rows);
  }

  /// The fast path of a batched forward pass whose front validated everything (check_write for
  /// each entry and a finiteness check of its own): row i·q_len + j of `rows` (device,
  /// [seqs.size()·q_len, latent_dim] fp32) goes to position starts[i] + j of seqs[i], whose
  /// length becomes starts[i] + q_len; one kernel, NO checks of positions or values, no host
  /// synchronisation. A sequence listed twice is written in list order.
  /// @throws InvalidArgument when the spans differ in size or q_len < 0.
  void encode_rows(std::span<const index_t> seqs, std::span<const index_t> starts, index_t q_len,
                   const float* rows) {
    detail::require<InvalidArgument>(seqs.size() == starts.size(), kEncode, ": 'starts' has ",
                                     starts.size(), " entries; expected ", seqs.size(),
                                     " (one per sequence)");
    detail::require<InvalidArgument>(q_len >= 0, kEncode, ": 'q_len' is ", q_len,
                                     "; expected at least 0");
    cuda::encode_batch<device_storage_type, latent_dim>(
        backend_, seqs, q_len, rows, rows_.data(), dst_rows_, [&](std::size_t i) {
          add_destinations(seqs[i], starts[i], q_len);
          lengths_[std::size_t(seqs[i])] = starts[i] + q_len;
        });
  }

  /// Keeps the first `new_length` tokens of sequence `seq`.
  /// @throws OutOfRange when new_length is not in [0, length(seq)].
  void truncate(index_t seq, index_t new_length) {
    const std::size_t s = checked(seq, "truncate");
    detail::require<OutOfRange>(new_length >= 0 && new_length <= lengths_[s], kName,
                                "::truncate: 'new_length' is ", new_length,
                                "; expected a length in [0, ", lengths_[s], "]");
    lengths_[s] = new_length;
  }

  /// Empties sequence `seq` (its capacity stays reserved).
  void clear(index_t seq) { lengths_[checked(seq, "clear")] = 0; }
  /// Empties every sequence.
  void clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

  /// The batch of sequences `seqs` (in that order; repeats allowed) as the device kernels read
  /// it: first rows and lengths built into `storage`'s host arrays and uploaded to its device
  /// buffers on the cache's stream (no synchronisation). The batch points into `storage`.
  /// @throws OutOfRange when a sequence is not in [0, num_sequences).
  [[nodiscard]] cuda::DeviceLatentBatch<cuda::ContiguousRowAddress> batch(
      std::span<const index_t> seqs, DeviceBatchRows& storage) const {
    detail::require<InvalidArgument>(
        seqs.size() <= std::size_t(std::numeric_limits<int>::max()), kName, "::batch: 'seqs' has ",
        seqs.size(), " entries; expected at most ", std::numeric_limits<int>::max());
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
    out.row_bytes = row_bytes;
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
    detail::require<OutOfRange>(
        start_pos >= 0 && n >= 0 && start_pos + n <= length, kRead, ": tokens [", start_pos, ", ",
        start_pos + n, ") are not all in sequence ", seq, ", which holds ", length, " tokens");
    detail::check_extents(kRead, "out", out, {n, latent_dim});
    if (n == 0) return;
    std::vector<Storage> staged(std::size_t(n) * latent_dim);
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(staged.data(), row_pointer(seq, start_pos),
                                        std::size_t(n) * row_bytes, cudaMemcpyDeviceToHost,
                                        backend_.stream()));
    backend_.synchronize();
    for (std::size_t i = 0; i < staged.size(); ++i) out.data()[i] = to_float(staged[i]);
  }

  /// Every valid token of `seq` as fp32, [length(seq) · latent_dim] row-major (host).
  [[nodiscard]] std::vector<float> rows(index_t seq) const {
    std::vector<float> out(std::size_t(length(seq)) * latent_dim);
    read(seq, 0, HostView<float, 2>(out.data(), {length(seq), latent_dim}));
    return out;
  }

  /// Copies a host cache of the same capacities into this one: every row (host to device, on
  /// the stream) and every length.
  /// @throws InvalidArgument when the capacities differ.
  void upload(const host_cache& host) {
    require_same_shape("upload", host);
    if (bytes() > 0)
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(rows_.data(), host.row_pointer(0, 0), bytes(),
                                          cudaMemcpyHostToDevice, backend_.stream()));
    for (index_t s = 0; s < num_sequences(); ++s) lengths_[std::size_t(s)] = host.length(s);
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
                 HostView<const float, 2>(all[std::size_t(s)].data(), {length(s), latent_dim}));
  }

 private:
  static constexpr std::string_view kName = "daedalus::ContiguousLatentCache";
  static constexpr std::string_view kWrite = "daedalus::ContiguousLatentCache::write";
  static constexpr std::string_view kRead = "daedalus::ContiguousLatentCache::read";
  static constexpr std::string_view kEncode = "daedalus::ContiguousLatentCache::encode_rows";

  static index_t check_count(index_t n) {
    detail::require<InvalidArgument>(n >= 0, kName, ": 'num_sequences' is ", n,
                                     "; expected at least 0");
    return n;
  }
  static std::vector<index_t> check_capacities(std::vector<index_t> capacities) {
    for (std::size_t s = 0; s < capacities.size(); ++s) {
      detail::require<InvalidArgument>(capacities[s] >= 0, kName, ": capacity of sequence ", s,
                                       " is ", capacities[s], "; expected at least 0");
      detail::require<InvalidArgument>(
          capacities[s] <= std::numeric_limits<std::int32_t>::max(), kName,
          ": capacity of sequence ", s, " is ", capacities[s], "; expected at most ",
          std::numeric_limits<std::int32_t>::max(), " (device kernels index tokens with int)");
    }
    return capacities;
  }
  static std::vector<index_t> offsets_of(const std::vector<index_t>& capacities) {
    std::vector<index_t> offsets(capacities.size() + 1, 0);
    for (std::size_t s = 0; s < capacities.size(); ++s) offsets[s + 1] = offsets[s] + capacities[s];
    return offsets;
  }
  std::size_t checked(index_t seq, std::string_view function) const {
    detail::require<OutOfRange>(seq >= 0 && seq < num_sequences(), kName, "::", function,
                                ": sequence ", seq, " is not in [0, ", num_sequences(), ")");
    return std::size_t(seq);
  }
  void require_same_shape(std::string_view function, const host_cache& host) const {
    detail::require<InvalidArgument>(host.num_sequences() == num_sequences(), kName, "::", function,
                                     ": 'host' has ", host.num_sequences(), " sequences; expected ",
                                     num_sequences());
    for (index_t s = 0; s < num_sequences(); ++s)
      detail::require<InvalidArgument>(host.capacity(s) == capacities_[std::size_t(s)], kName,
                                       "::", function, ": 'host' sequence ", s, " has capacity ",
                                       host.capacity(s), "; expected ",
                                       capacities_[std::size_t(s)]);
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

  std::vector<index_t> capacities_;
  std::vector<index_t> lengths_;
  std::vector<index_t> offsets_;  // first row of each sequence; offsets_.back() = total rows
  CudaBackend backend_;
  cuda::DeviceBuffer<std::byte> rows_;           // [total rows, latent_dim] of Storage
  cuda::DeviceBuffer<unsigned long long> flag_;  // finiteness scan result
  cuda::detail::StagedArray<std::int64_t> dst_rows_;
};

}  // namespace daedalus
