// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus {

/// A latent KV cache with one contiguous region per sequence. Each cached token is one row of
/// `latent_dim` values (576 in DeepSeek): the RMS-normed compressed latent c (kv_lora_rank) then
/// the rotated shared key k_pe (qk_rope_head_dim) — exactly what the absorbed attention reads
/// (DeepSeek-V2 paper, section 2.1.2: only c and k_pe are cached). Sequence s owns rows
/// [0, capacity(s)); `length(s)` of them are valid.
///
/// @tparam C       an MlaConfig
/// @tparam Backend where the rows live; this header provides the host (CpuBackend) storage
/// @tparam Storage float, bfloat16 or half; kernels widen to fp32
template <MlaConfig C, class Backend = CpuBackend, StorageType Storage = float>
class ContiguousLatentCache {
  static_assert(std::same_as<typename Backend::memory_space, HostMemory>,
                "daedalus::ContiguousLatentCache: no implementation for this backend is visible: "
                "include <daedalus/cuda.cuh> in a .cu file for CudaBackend");

 public:
  using config = C;
  using backend_type = Backend;
  using storage_type = Storage;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;

  /// `num_sequences` sequences of `capacity` tokens each.
  /// @throws InvalidArgument when either is negative.
  ContiguousLatentCache(index_t num_sequences, index_t capacity)
      : ContiguousLatentCache(
            std::vector<index_t>(static_cast<std::size_t>(check_count(num_sequences)), capacity)) {}

  /// One sequence per entry of `capacities`, each with its own capacity in tokens.
  /// @throws InvalidArgument when a capacity is negative.
  explicit ContiguousLatentCache(std::vector<index_t> capacities)
      : capacities_(std::move(capacities)),
        lengths_(capacities_.size(), 0),
        offsets_(capacities_.size() + 1, 0) {
    for (std::size_t s = 0; s < capacities_.size(); ++s) {
      detail::require<InvalidArgument>(capacities_[s] >= 0, kName, ": capacity of sequence ", s,
                                       " is ", capacities_[s], "; expected at least 0");
      offsets_[s + 1] = offsets_[s] + capacities_[s];
    }
    rows_.resize(static_cast<std::size_t>(offsets_.back()) * latent_dim);
  }

  /// Sequences are named by index_t ids, as in PagedLatentCache: here the ids [0, num_sequences)
  /// given at construction, all live for the cache's lifetime (a paged cache's come from its
  /// allocator's add_sequence and end with release). Both caches answer num_sequences,
  /// contains and sequences alike.
  [[nodiscard]] index_t num_sequences() const { return index_t(capacities_.size()); }
  /// True when `seq` names one of the cache's sequences.
  [[nodiscard]] bool contains(index_t seq) const { return seq >= 0 && seq < num_sequences(); }
  /// The ids of the sequences, ascending: 0, 1, ..., num_sequences - 1.
  [[nodiscard]] std::vector<index_t> sequences() const {
    std::vector<index_t> ids(capacities_.size());
    std::iota(ids.begin(), ids.end(), index_t{0});
    return ids;
  }
  [[nodiscard]] index_t capacity(index_t seq) const {
    return capacities_[checked(seq, "capacity")];
  }
  [[nodiscard]] index_t length(index_t seq) const { return lengths_[checked(seq, "length")]; }

  /// Bytes one cached token takes in one layer (latent_dim × sizeof(Storage)).
  static constexpr std::size_t bytes_per_token() {
    return latent_dim * StorageTraits<Storage>::bytes;
  }
  /// Bytes the whole cache holds allocated.
  [[nodiscard]] std::size_t bytes() const { return rows_.size() * sizeof(Storage); }

  /// The valid rows of sequence `seq`: [length(seq), latent_dim].
  [[nodiscard]] HostView<const Storage, 2> rows(index_t seq) const {
    const std::size_t s = checked(seq, "rows");
    return {rows_.data() + offsets_[s] * latent_dim, {lengths_[s], latent_dim}};
  }

  /// Writes `rows` ([n, latent_dim], fp32, rounded to Storage) at positions
  /// [start_pos, start_pos + n) of sequence `seq` and sets its length to start_pos + n. Rows
  /// at and past start_pos are overwritten, so a chunk may be recomputed (chunked prefill).
  /// @throws OutOfRange when `seq` is not a sequence, or start_pos > length(seq);
  ///         CapacityError when start_pos + n > capacity(seq); InvalidArgument for a bad shape;
  ///         NumericError for a non-finite value. Nothing is written when it throws.
  void write(index_t seq, index_t start_pos, HostView<const float, 2> rows) {
    check_write(kWrite, seq, start_pos, rows.extent(0));
    detail::check_extents(kWrite, "rows", rows, {rows.extent(0), latent_dim});
    const index_t n = rows.extent(0);
    for (index_t i = 0; i < n * latent_dim; ++i) {
      if (!std::isfinite(rows.data()[i])) {
        throw NumericError(detail::message(kWrite, ": 'rows' holds a non-finite value at row ",
                                           i / latent_dim, ", column ", i % latent_dim));
      }
    }
    Storage* dst = mutable_row(seq, start_pos);
    for (index_t i = 0; i < n * latent_dim; ++i) dst[i] = from_float<Storage>(rows.data()[i]);
    lengths_[std::size_t(seq)] = start_pos + n;
  }

  /// Appends `rows` ([n, latent_dim]) after the valid rows of sequence `seq`.
  void append(index_t seq, HostView<const float, 2> rows) { write(seq, length(seq), rows); }

  /// Checks what `write(seq, start_pos, rows of n)` would check, without writing: lets a caller
  /// validate every argument before it mutates anything. Messages start with `caller`, the
  /// fully qualified name of the public function the user called (e.g. "daedalus::mla::prefill").
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

  /// Pointer to row `pos` of sequence `seq` (no checks: for kernels that validated already).
  [[nodiscard]] const Storage* row_pointer(index_t seq, index_t pos) const {
    return rows_.data() + (offsets_[std::size_t(seq)] + pos) * latent_dim;
  }

 private:
  static constexpr std::string_view kName = "daedalus::ContiguousLatentCache";
  static constexpr std::string_view kWrite = "daedalus::ContiguousLatentCache::write";

  static index_t check_count(index_t n) {
    detail::require<InvalidArgument>(n >= 0, kName, ": 'num_sequences' is ", n,
                                     "; expected at least 0");
    return n;
  }
  std::size_t checked(index_t seq, std::string_view function) const {
    detail::require<OutOfRange>(seq >= 0 && seq < num_sequences(), kName, "::", function,
                                ": sequence ", seq, " is not in [0, ", num_sequences(), ")");
    return std::size_t(seq);
  }
  Storage* mutable_row(index_t seq, index_t pos) {
    return rows_.data() + (offsets_[std::size_t(seq)] + pos) * latent_dim;
  }

  std::vector<index_t> capacities_;
  std::vector<index_t> lengths_;
  std::vector<index_t> offsets_;  // first row of each sequence; offsets_.back() = total rows
  std::vector<Storage> rows_;     // [total rows, latent_dim]
};

}  // namespace daedalus
