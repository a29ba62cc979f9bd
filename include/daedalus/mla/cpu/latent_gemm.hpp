// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/cpu/microkernel_avx512.hpp"
#include "daedalus/core/tensor_view.hpp"

/// The two products of the absorbed attention inner loop, for one tile of query rows and one
/// block of n cached tokens, both in "keys-major" form:
///   scoresᵀ [n, rows]      = K [n, width] · qᵀ [width, rows]          (width = 576 in DeepSeek)
///   acc     [rows, values] += (pᵀ [n, rows])ᵀ · K [n, 0:values]         (values = 512)
/// Keeping scores as [key][row] makes the softmax vertical (one vector holds 16 query rows of one
/// key) and lets the value product broadcast p[row][key] from contiguous memory; the query tile
/// is transposed once per tile, never the keys, so the cache is read as it lies.
/// With AVX-512 both products run on the register-blocked micro-kernel of
/// core/cpu/microkernel_avx512.hpp (6 × 64 outputs in 24 zmm accumulators, one operand broadcast
/// from memory into each FMA); elsewhere on Eigen's GEMM.
namespace daedalus::mla::cpu_kernels {

/// Query rows per packed panel (the micro-kernel's 64 columns) and the padding unit of a tile's
/// rows.
inline constexpr index_t kPanel = cpu::kMicroColumns;

/// Whether the register-blocked AVX-512 kernels are compiled in (-mavx512f, or -march=native on
/// an AVX-512 machine).
inline constexpr bool has_avx512_kernels = cpu::has_avx512_micro_kernel;

/// Rows of a query tile rounded up to whole panels: the stride of a scoresᵀ row.
inline index_t padded_rows(index_t rows) { return (rows + kPanel - 1) / kPanel * kPanel; }

/// A tile of query rows [rows, width] prepared for the score product: on the AVX-512 path
/// transposed into panels packed[p][d][k] = q[p·64 + k][d] (zero past `rows`).
struct QueryTile {
  const float* q;
  index_t rows;
  index_t width;
  const float* packed;
};

inline QueryTile prepare_query_tile(const float* q, index_t rows, index_t width,
                                    [[maybe_unused]] std::vector<float>& scratch) {
#if defined(__AVX512F__)
  const index_t panels = padded_rows(rows) / kPanel;
  if (scratch.size() < std::size_t(panels * width * kPanel))
    scratch.resize(std::size_t(panels * width * kPanel));
  for (index_t p = 0; p < panels; ++p) {
    float* dst = scratch.data() + p * width * kPanel;
    const index_t k_end = std::min(kPanel, rows - p * kPanel);
    for (index_t d = 0; d < width; ++d) {
      for (index_t k = 0; k < k_end; ++k) dst[d * kPanel + k] = q[(p * kPanel + k) * width + d];
      for (index_t k = k_end; k < kPanel; ++k) dst[d * kPanel + k] = 0.0f;
    }
  }
  return {q, rows, width, scratch.data()};
#else
  return {q, rows, width, nullptr};
#endif
}

/// Portable path: Eigen's GEMM.
inline void scores_portable(const QueryTile& tile, const float* keys, index_t n, index_t key_stride,
                            float* scores_t, index_t st_stride) {
  cpu::map(scores_t, n, tile.rows, st_stride).noalias() =
      cpu::map(keys, n, tile.width, key_stride) *
      cpu::map(tile.q, tile.rows, tile.width, tile.width).transpose();
}

inline void accumulate_portable(const float* p_t, index_t rows, index_t n, index_t pt_stride,
                                const float* keys, index_t key_stride, index_t values, float* acc) {
  cpu::map(acc, rows, values, values).noalias() +=
      cpu::map(p_t, n, rows, pt_stride).transpose() * cpu::map(keys, n, values, key_stride);
}

#if defined(__AVX512F__)

/// scoresᵀ[n, padded_rows] = keys · qᵀ: each key row is broadcast against 64 packed query rows.
inline void scores_avx512(const QueryTile& tile, const float* keys, index_t n, index_t key_stride,
                          float* scores_t, index_t st_stride) {
  const index_t panels = padded_rows(tile.rows) / kPanel;
  for (index_t p = 0; p < panels; ++p) {
    const float* panel = tile.packed + p * tile.width * kPanel;
    cpu::for_row_blocks(n, [&]<int R>(index_t t) {
      cpu::micro_kernel<R, false>(keys + t * key_stride, key_stride, 1, tile.width, panel, kPanel,
                                  scores_t + t * st_stride + p * kPanel, st_stride);
    });
  }
}

/// acc[rows, values] += pᵀᵀ · keys[:, 0:values]: p[row][key] = p_t[key][row] is broadcast from
/// contiguous memory against 64 values of each key. `values` must be a multiple of 64.
inline void accumulate_avx512(const float* p_t, index_t rows, index_t n, index_t pt_stride,
                              const float* keys, index_t key_stride, index_t values, float* acc) {
  for (index_t j = 0; j < values; j += kPanel) {
    cpu::for_row_blocks(rows, [&]<int R>(index_t r) {
      cpu::micro_kernel<R, true>(p_t + r, 1, pt_stride, n, keys + j, key_stride,
                                 acc + r * values + j, values);
    });
  }
}

#endif  // __AVX512F__

/// scoresᵀ[n, rows] = keys[n, width] · qᵀ on the best path compiled in; st_stride ≥
/// padded_rows(tile.rows) (padded columns receive 0).
inline void latent_scores(const QueryTile& tile, const float* keys, index_t n, index_t key_stride,
                          float* scores_t, index_t st_stride) {
#if defined(__AVX512F__)
  scores_avx512(tile, keys, n, key_stride, scores_t, st_stride);
#else
  scores_portable(tile, keys, n, key_stride, scores_t, st_stride);
#endif
}

/// acc[rows, values] += (p_t[n, rows])ᵀ · keys[n, 0:values] on the best path compiled in.
inline void latent_accumulate(const float* p_t, index_t rows, index_t n, index_t pt_stride,
                              const float* keys, index_t key_stride, index_t values, float* acc) {
#if defined(__AVX512F__)
  if (values % kPanel == 0) {
    accumulate_avx512(p_t, rows, n, pt_stride, keys, key_stride, values, acc);
    return;
  }
#endif
  accumulate_portable(p_t, rows, n, pt_stride, keys, key_stride, values, acc);
}

}  // namespace daedalus::mla::cpu_kernels
