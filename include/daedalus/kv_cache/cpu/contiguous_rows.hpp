// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/contiguous_layout.hpp"

namespace daedalus::detail {

/// The rows of a host ContiguousLatentCache: one vector of [total rows, latent_dim] Storage
/// values, written by rounding fp32 rows to Storage (to nearest even) and read where they lie by
/// the CPU attention kernels.
template <MlaConfig C, class Storage>
class ContiguousRows<C, CpuBackend, Storage> : public ContiguousLayout {
  static_assert(std::same_as<Storage, float> || std::same_as<Storage, bfloat16> ||
                    std::same_as<Storage, half>,
                "daedalus::ContiguousLatentCache: the CPU backend stores float, bfloat16 or half "
                "rows (fp8 rows are for the paged cache)");
  static constexpr index_t kLatentDim = MlaShape<C>::latent_dim;

 public:
  ContiguousRows(std::vector<index_t> capacities, const CpuBackend& /*backend*/)
      : ContiguousLayout(std::move(capacities)),
        rows_(std::size_t(total_rows()) * std::size_t(kLatentDim)) {}

  /// The valid rows of sequence `seq`: [length(seq), latent_dim].
  [[nodiscard]] HostView<const Storage, 2> rows(index_t seq) const {
    const std::size_t s = checked(seq, "rows");
    return {rows_.data() + offsets_[s] * kLatentDim, {lengths_[s], kLatentDim}};
  }

  /// Pointer to row `pos` of sequence `seq` (no checks: for kernels that validated already).
  [[nodiscard]] const Storage* row_pointer(index_t seq, index_t pos) const {
    return rows_.data() + (offsets_[std::size_t(seq)] + pos) * kLatentDim;
  }

 protected:
  /// Throws NumericError, naming the first non-finite value by row and column, with a message
  /// starting with `caller`.
  static void require_finite_rows(std::string_view caller, HostView<const float, 2> rows) {
    const index_t count = rows.extent(0) * kLatentDim;
    for (index_t i = 0; i < count; ++i) {
      if (!std::isfinite(rows.data()[i])) {
        throw NumericError(message(caller, ": 'rows' holds a non-finite value at row ",
                                   i / kLatentDim, ", column ", i % kLatentDim));
      }
    }
  }
  /// Rounds `rows` to Storage into positions [start_pos, start_pos + n) of `seq`.
  void encode(index_t seq, index_t start_pos, HostView<const float, 2> rows) {
    Storage* dst = rows_.data() + (offsets_[std::size_t(seq)] + start_pos) * kLatentDim;
    const index_t count = rows.extent(0) * kLatentDim;
    for (index_t i = 0; i < count; ++i) dst[i] = from_float<Storage>(rows.data()[i]);
  }

 private:
  std::vector<Storage> rows_;  // [total rows, latent_dim]
};

}  // namespace daedalus::detail
