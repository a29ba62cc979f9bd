// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/fp8.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"
#include "daedalus/mla/cpu/latent_block.hpp"

/// Where the CPU attention kernels read cached latent rows from. A kernel never assumes one
/// layout: it asks a row source for the run of rows that lie contiguously in memory from a
/// position on — the whole key block for a contiguous cache, the rest of the page for a paged
/// one — and hands each run to the GEMM micro-kernels as it lies. So contiguous and paged caches
/// share one kernel, and a paged block costs the kernel one extra call per page, never a copy.
///
/// A row source provides
///   element_type       what a stored row is an array of: the storage type for plain rows
///                      (float, bfloat16, half), std::byte for packed formats (fp8)
///   row_stride         elements from one stored row to the next inside a run
///   batch(), length(b) the number of sequences and the cached tokens of sequence b
///   run(b, pos, max)   {pointer to row pos of sequence b, rows that follow it contiguously,
///                      at most max}; pos < length(b)
///   decode(src, n, dst) widens n stored rows of a run to fp32 [n, latent_dim]
namespace daedalus::mla::detail {

/// Consecutive cached rows that lie one after another in memory (row stride row_stride).
template <class Element>
struct LatentRun {
  const Element* rows;
  index_t count;
};

/// e4m3 code → fp32, all 256 codes, taken from Fp8E4m3::to_float (exact: every e4m3 value is an
/// fp32 value). A table lookup widens a code in one load, against the bit assembly per value.
inline const std::array<float, 256>& e4m3_to_float_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int code = 0; code < 256; ++code)
      t[std::size_t(code)] = Fp8E4m3{static_cast<std::uint8_t>(code)}.to_float();
    return t;
  }();
  return table;
}

/// Widens `n` stored rows (row stride `stride` elements) to fp32 rows of latent_dim values.
/// Plain rows are widened exactly (latent_block.hpp's conversions); packed rows go through
/// their LatentRowFormat.
template <MlaConfig C, class Storage>
struct LatentRowDecoder {
  static constexpr index_t D = MlaShape<C>::latent_dim;
  using format = LatentRowFormat<C, Storage>;

  template <class Element>
  static void decode(const Element* src, index_t n, index_t stride, float* dst) {
    if constexpr (std::is_same_v<Element, float>) {
      for (index_t r = 0; r < n; ++r)
        std::memcpy(dst + r * D, src + r * stride, sizeof(float) * std::size_t(D));
    } else if constexpr (format::is_plain) {
      for (index_t r = 0; r < n; ++r) widen_latent_values(src + r * stride, D, dst + r * D);
    } else {
      for (index_t r = 0; r < n; ++r)
        format::decode(reinterpret_cast<const std::byte*>(src) + r * stride, dst + r * D);
    }
  }
};

/// FlashMLA's fp8 rows: e4m3 latent × per-tile scale, then the bf16 k_pe. The same arithmetic as
/// LatentRowFormat<C, Fp8E4m3Latent>::decode (code value times tile scale, in fp32), with the
/// code widened by table (tests/mla/paged_attention_test.cpp checks the two agree bit for bit).
template <MlaConfig C>
struct LatentRowDecoder<C, Fp8E4m3Latent> {
  static constexpr index_t D = MlaShape<C>::latent_dim;
  using format = LatentRowFormat<C, Fp8E4m3Latent>;

  static void decode(const std::byte* src, index_t n, index_t stride, float* dst) {
    const float* table = e4m3_to_float_table().data();
    for (index_t r = 0; r < n; ++r) {
      const std::byte* row = src + r * stride;
      float* out = dst + r * D;
      for (int t = 0; t < format::num_tiles; ++t) {
        const float scale = format::tile_scale(row, t);
        const int end = std::min((t + 1) * format::tile_width, format::kv_lora_rank);
        for (int i = t * format::tile_width; i < end; ++i)
          out[i] = table[std::to_integer<std::uint8_t>(row[i])] * scale;
      }
      const auto* rope = reinterpret_cast<const std::uint16_t*>(row + format::rope_offset);
      for (int i = 0; i < format::rope_dim; ++i) {
        const std::uint32_t wide = std::uint32_t(rope[i]) << 16;  // bf16 → fp32 is a shift
        std::memcpy(out + format::kv_lora_rank + i, &wide, sizeof wide);
      }
    }
  }
};

/// The rows of a ContiguousLatentCache for a batch of its sequence ids: every run is as long as
/// asked.
template <MlaConfig C, class Storage>
class ContiguousLatentRows {
 public:
  using element_type = Storage;
  static constexpr index_t row_stride = MlaShape<C>::latent_dim;

  ContiguousLatentRows(const ContiguousLatentCache<C, CpuBackend, Storage>& cache,
                       std::span<const index_t> seqs)
      : cache_(&cache), seqs_(seqs) {}

  [[nodiscard]] index_t batch() const { return index_t(seqs_.size()); }
  [[nodiscard]] index_t length(index_t b) const { return cache_->length(seqs_[std::size_t(b)]); }
  [[nodiscard]] LatentRun<Storage> run(index_t b, index_t pos, index_t max_rows) const {
    return {cache_->row_pointer(seqs_[std::size_t(b)], pos), max_rows};
  }
  static void decode(const Storage* src, index_t n, float* dst) {
    LatentRowDecoder<C, Storage>::decode(src, n, row_stride, dst);
  }

 private:
  const ContiguousLatentCache<C, CpuBackend, Storage>* cache_;
  std::span<const index_t> seqs_;
};

/// The rows of a (validated) PagedLatentView: a run ends at the end of its page.
template <MlaConfig C, class Storage, int BlockSize>
class PagedLatentRows {
 public:
  using view_type = PagedLatentView<C, Storage, BlockSize, HostMemory>;
  using format = LatentRowFormat<C, Storage>;
  using element_type = std::conditional_t<format::is_plain, Storage, std::byte>;
  static constexpr index_t row_stride =
      index_t(format::row_bytes / sizeof(element_type));  // latent_dim for plain rows
  static_assert(format::row_bytes % sizeof(element_type) == 0);

  explicit PagedLatentRows(const view_type& view) : view_(view) {}

  [[nodiscard]] index_t batch() const { return view_.batch(); }
  [[nodiscard]] index_t length(index_t b) const { return view_.length(b); }
  [[nodiscard]] LatentRun<element_type> run(index_t b, index_t pos, index_t max_rows) const {
    const index_t in_page = BlockSize - pos % BlockSize;
    return {reinterpret_cast<const element_type*>(view_.row(b, pos)), std::min(max_rows, in_page)};
  }
  static void decode(const element_type* src, index_t n, float* dst) {
    LatentRowDecoder<C, Storage>::decode(src, n, row_stride, dst);
  }

 private:
  view_type view_;
};

/// Calls `body(run, offset)` for the runs that make up rows [pos, pos + n) of sequence b, offset
/// being the run's first row relative to pos.
template <class Rows, class Body>
inline void for_each_run(const Rows& rows, index_t b, index_t pos, index_t n, Body&& body) {
  for (index_t offset = 0; offset < n;) {
    const auto run = rows.run(b, pos + offset, n - offset);
    body(run, offset);
    offset += run.count;
  }
}

/// Rows [pos, pos + n) of sequence b as fp32 [n, latent_dim]: in place when they are fp32 and one
/// run, else widened (and gathered across pages) into `scratch`.
template <class Rows>
inline const float* latent_rows_fp32(const Rows& rows, index_t b, index_t pos, index_t n,
                                     index_t latent_dim, std::vector<float>& scratch) {
  using Element = typename Rows::element_type;
  if constexpr (std::is_same_v<Element, float>) {
    const auto first = rows.run(b, pos, n);
    if (first.count == n && Rows::row_stride == latent_dim) return first.rows;
  }
  if (scratch.size() < std::size_t(n * latent_dim)) scratch.resize(std::size_t(n * latent_dim));
  float* dst = scratch.data();
  for_each_run(rows, b, pos, n, [&](const auto& run, index_t offset) {
    Rows::decode(run.rows, run.count, dst + offset * latent_dim);
  });
  return dst;
}

}  // namespace daedalus::mla::detail
