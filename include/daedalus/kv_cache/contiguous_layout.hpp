// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/core/traits.hpp"

namespace daedalus::detail {

/// The bookkeeping of a ContiguousLatentCache, the same for every backend: sequence s owns rows
/// [first_row(s), first_row(s) + capacity(s)) of one pool, and length(s) of them are valid. The
/// checks and messages of the cache's API live here once; where the rows are is the business of
/// the backend's ContiguousRows.
class ContiguousLayout {
 public:
  /// One sequence per entry of `capacities`.
  /// @throws InvalidArgument when a capacity is negative or above 2^31 - 1 (positions are int32
  ///         in the device kernels and in FlashMLA's cache_seqlens), or the total overflows.
  explicit ContiguousLayout(std::vector<index_t> capacities)
      : capacities_(std::move(capacities)),
        lengths_(capacities_.size(), 0),
        offsets_(capacities_.size() + 1, 0) {
    constexpr index_t kMaxCapacity = std::numeric_limits<std::int32_t>::max();
    for (std::size_t s = 0; s < capacities_.size(); ++s) {
      require<InvalidArgument>(capacities_[s] >= 0 && capacities_[s] <= kMaxCapacity, kName,
                               ": capacity of sequence ", s, " is ", capacities_[s],
                               "; expected a count in [0, ", kMaxCapacity,
                               "] (positions are int32 in the device kernels)");
      require<InvalidArgument>(
          offsets_[s] <= std::numeric_limits<index_t>::max() / 1024 - capacities_[s], kName,
          ": the capacities add up to more than ", std::numeric_limits<index_t>::max() / 1024,
          " rows");
      offsets_[s + 1] = offsets_[s] + capacities_[s];
    }
  }

  /// `num_sequences` sequences of `capacity` tokens each.
  /// @throws InvalidArgument when num_sequences is negative, and as above.
  static std::vector<index_t> uniform(index_t num_sequences, index_t capacity) {
    require<InvalidArgument>(num_sequences >= 0, kName, ": 'num_sequences' is ", num_sequences,
                             "; expected at least 0");
    return std::vector<index_t>(static_cast<std::size_t>(num_sequences), capacity);
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
  /// The first pool row of sequence `seq` (no checks).
  [[nodiscard]] index_t first_row(index_t seq) const { return offsets_[std::size_t(seq)]; }
  /// Rows of the pool: the sum of the capacities.
  [[nodiscard]] index_t total_rows() const { return offsets_.back(); }

  /// Checks what `write(seq, start_pos, rows of n)` would check, without writing: lets a caller
  /// validate every argument before it mutates anything. Messages start with `caller`, the
  /// fully qualified name of the public function the user called (e.g. "daedalus::mla::prefill").
  void check_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) const {
    require<OutOfRange>(seq >= 0 && seq < num_sequences(), caller, ": sequence ", seq,
                        " is not in [0, ", num_sequences(), ")");
    const std::size_t s = std::size_t(seq);
    require<OutOfRange>(start_pos >= 0 && start_pos <= lengths_[s], caller, ": 'start_pos' is ",
                        start_pos, "; expected a position in [0, ", lengths_[s], "] (sequence ",
                        seq, " holds ", lengths_[s], " tokens)");
    require<InvalidArgument>(n >= 0, caller, ": the write has ", n, " rows; expected at least 0");
    // start_pos <= length <= capacity, so the subtraction cannot overflow where a sum could.
    if (n > capacities_[s] - start_pos) {
      throw CapacityError(
          message(caller, ": sequence ", seq, " would hold ",
                  n <= std::numeric_limits<index_t>::max() - start_pos
                      ? std::to_string(start_pos + n)
                      : "more than " + std::to_string(std::numeric_limits<index_t>::max()),
                  " tokens; its capacity is ", capacities_[s]));
    }
  }

  /// Keeps the first `new_length` tokens of sequence `seq`.
  /// @throws OutOfRange when new_length is not in [0, length(seq)].
  void truncate(index_t seq, index_t new_length) {
    const std::size_t s = checked(seq, "truncate");
    require<OutOfRange>(new_length >= 0 && new_length <= lengths_[s], kName,
                        "::truncate: 'new_length' is ", new_length, "; expected a length in [0, ",
                        lengths_[s], "]");
    lengths_[s] = new_length;
  }

  /// Empties sequence `seq` (its capacity stays reserved).
  void clear(index_t seq) { lengths_[checked(seq, "clear")] = 0; }
  /// Empties every sequence.
  void clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

 protected:
  static constexpr std::string_view kName = "daedalus::ContiguousLatentCache";

  std::size_t checked(index_t seq, std::string_view function) const {
    require<OutOfRange>(seq >= 0 && seq < num_sequences(), kName, "::", function, ": sequence ",
                        seq, " is not in [0, ", num_sequences(), ")");
    return std::size_t(seq);
  }
  /// Sets the length of a sequence a validated write filled.
  void set_length(index_t seq, index_t length) { lengths_[std::size_t(seq)] = length; }

  std::vector<index_t> capacities_;
  std::vector<index_t> lengths_;
  std::vector<index_t> offsets_;  // first row of each sequence; offsets_.back() = total rows
};

/// Where a ContiguousLatentCache keeps its rows and how it moves them, per backend: the CPU's in
/// kv_cache/cpu/contiguous_rows.hpp, CUDA's in kv_cache/cuda/contiguous.cuh. Each derives from
/// ContiguousLayout and provides the constructor (capacities, backend), `require_finite_rows`
/// and `encode` (what `write` needs), and the backend's own accessors.
template <MlaConfig C, class Backend, class Storage>
class ContiguousRows {
  static_assert(dependent_false<Backend>,
                "daedalus::ContiguousLatentCache: no implementation for this backend is visible: "
                "include <daedalus/cuda.cuh> in a .cu file for CudaBackend");
};

}  // namespace daedalus::detail
