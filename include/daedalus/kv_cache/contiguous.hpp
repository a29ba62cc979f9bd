// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/contiguous_layout.hpp"
#include "daedalus/kv_cache/cpu/contiguous_rows.hpp"

namespace daedalus {

/// A latent KV cache with one contiguous region per sequence. Each cached token is one row of
/// `latent_dim` values (576 in DeepSeek): the RMS-normed compressed latent c (kv_lora_rank) then
/// the rotated shared key k_pe (qk_rope_head_dim) — exactly what the absorbed attention reads
/// (DeepSeek-V2 paper, section 2.1.2: only c and k_pe are cached). Sequence s owns rows
/// [0, capacity(s)); `length(s)` of them are valid.
///
/// One type for every backend: the API, its checks and its messages are written here and in
/// detail::ContiguousLayout; where the rows live and how they are moved is the backend's
/// detail::ContiguousRows (host: kv_cache/cpu/contiguous_rows.hpp; device, with its extra
/// accessors such as encode_rows, batch, upload and download: kv_cache/cuda/contiguous.cuh).
/// Lengths and capacities are host data on every backend.
///
/// @tparam C       an MlaConfig
/// @tparam Backend CpuBackend (this header) or CudaBackend (<daedalus/cuda.cuh>)
/// @tparam Storage the row type: float, bfloat16 or half on the CPU, bfloat16 or half on the GPU;
///                 kernels widen to fp32
template <MlaConfig C, class Backend = CpuBackend, StorageType Storage = float>
class ContiguousLatentCache final : public detail::ContiguousRows<C, Backend, Storage> {
  using Rows = detail::ContiguousRows<C, Backend, Storage>;

 public:
  using config = C;
  using backend_type = Backend;
  using storage_type = Storage;
  using memory_space = typename Backend::memory_space;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;
  /// Bytes of one cached token.
  static constexpr std::size_t row_bytes = std::size_t(latent_dim) * sizeof(Storage);

  /// `num_sequences` sequences of `capacity` tokens each (zero-filled).
  /// @throws InvalidArgument when either is negative or the capacity is above 2^31 - 1;
  ///         CudaError (device) when the memory cannot be allocated.
  ContiguousLatentCache(index_t num_sequences, index_t capacity, const Backend& backend = {})
      : Rows(detail::ContiguousLayout::uniform(num_sequences, capacity), backend) {}

  /// One sequence per entry of `capacities`, each with its own capacity in tokens.
  /// @throws InvalidArgument when a capacity is negative or above 2^31 - 1.
  explicit ContiguousLatentCache(std::vector<index_t> capacities, const Backend& backend = {})
      : Rows(std::move(capacities), backend) {}

  /// Bytes one cached token takes in one layer (latent_dim × sizeof(Storage)).
  static constexpr std::size_t bytes_per_token() { return row_bytes; }
  /// Bytes the whole cache holds allocated.
  [[nodiscard]] std::size_t bytes() const { return std::size_t(this->total_rows()) * row_bytes; }

  /// Writes `rows` ([n, latent_dim], fp32 in the backend's memory, rounded to Storage to nearest
  /// even) at positions [start_pos, start_pos + n) of sequence `seq` and sets its length to
  /// start_pos + n. Rows at and past start_pos are overwritten, so a chunk may be recomputed
  /// (chunked prefill). On the GPU the finiteness check runs on the device and costs a flag copy
  /// (a stream synchronisation); `encode_rows` is the path without it.
  /// @throws OutOfRange when `seq` is not a sequence, or start_pos > length(seq);
  ///         CapacityError when start_pos + n > capacity(seq); InvalidArgument for a bad shape;
  ///         NumericError for a non-finite value. Nothing is written when it throws.
  void write(index_t seq, index_t start_pos, TensorView<const float, 2, memory_space> rows) {
    this->check_write(kWrite, seq, start_pos, rows.extent(0));
    detail::check_extents(kWrite, "rows", rows, {rows.extent(0), latent_dim});
    this->require_finite_rows(kWrite, rows);
    this->encode(seq, start_pos, rows);
    this->set_length(seq, start_pos + rows.extent(0));
  }

  /// Appends `rows` ([n, latent_dim]) after the valid rows of sequence `seq`.
  void append(index_t seq, TensorView<const float, 2, memory_space> rows) {
    write(seq, this->length(seq), rows);
  }

 private:
  static constexpr std::string_view kWrite = "daedalus::ContiguousLatentCache::write";
};

}  // namespace daedalus
