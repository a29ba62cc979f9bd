// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "daedalus/core/dtype.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/mla/cpu/latent_gemm.hpp"

/// The absorbed attention products for a bf16 latent cache on CPUs with AVX512-BF16
/// (`vdpbf16ps`: 16 lanes, each adding the dot product of two bf16 pairs into an fp32
/// accumulator, twice the multiply rate of fp32 FMA). Operands are handled as 32-bit units that
/// hold one bf16 pair along the reduction dimension:
///   scores: a pair of latent dimensions (d, d+1) of one key is read from the cache as it lies and
///           broadcast; the query tile is rounded to bf16 and packed as [d/2][row] pairs.
///   values: the probabilities of keys (t, t+1) for one row are rounded to bf16 and packed as
///           [t/2][row] pairs; the key block's value columns are packed as [t/2][value] pairs.
/// Accumulation stays fp32. Rounding q and p to bf16 adds a relative error of at most 2^-8 per
/// product term on top of the cache's own bf16 rounding; the tests' bf16 tolerance covers both.
/// Without AVX512-BF16 the bf16 cache is widened to fp32 and the fp32 kernels run.
namespace daedalus::mla::cpu_kernels {

inline constexpr bool has_avx512_bf16_kernels =
#if defined(__AVX512BF16__)
    true;
#else
    false;
#endif

#if defined(__AVX512BF16__)

/// Rounds 16 floats to bf16 (nearest even) and returns their bit patterns widened to 32 bits.
inline __m512i bf16_bits_u32(__m512 x) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof bits);
  return _mm512_cvtepu16_epi32(bits);
}

/// Packs two fp32 vectors as 16 bf16 pairs (lo in the low half of each 32-bit unit).
inline __m512i pack_pair(__m512 lo, __m512 hi) {
  return _mm512_or_si512(bf16_bits_u32(lo), _mm512_slli_epi32(bf16_bits_u32(hi), 16));
}

/// out[R, 64] (+)= Σ_k pair(a[i·a_stride + k·a_step]) · pairs b[k·b_stride .. +64], fp32 out.
template <int R, bool Accumulate>
inline void bf16_micro_kernel(const std::uint32_t* a, index_t a_stride, index_t a_step,
                              index_t depth, const std::uint32_t* b, index_t b_stride, float* out,
                              index_t out_stride) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = Accumulate ? _mm512_loadu_ps(out + i * out_stride + index_t{16} * j)
                             : _mm512_setzero_ps();
  for (index_t k = 0; k < depth; ++k) {
    const std::uint32_t* brow = b + k * b_stride;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(brow);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(brow + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(brow + 32);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(brow + 48);
    for (int i = 0; i < R; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[i * a_stride + k * a_step]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], av, b2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], av, b3);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * out_stride + index_t{16} * j, acc[i][j]);
}

/// A query tile rounded to bf16 and packed as panels [p][d/2][64 rows] of pairs.
struct QueryTileBf16 {
  index_t rows;
  index_t width;  // even
  const std::uint32_t* packed;
};

inline QueryTileBf16 prepare_query_tile_bf16(const float* q, index_t rows, index_t width,
                                             std::vector<std::uint32_t>& scratch) {
  const index_t panels = padded_rows(rows) / kPanel;
  const index_t pairs = width / 2;
  if (scratch.size() < std::size_t(panels * pairs * kPanel))
    scratch.resize(std::size_t(panels * pairs * kPanel));
  for (index_t p = 0; p < panels; ++p) {
    std::uint32_t* dst = scratch.data() + p * pairs * kPanel;
    for (index_t k = 0; k < kPanel; ++k) {
      const index_t r = p * kPanel + k;
      for (index_t d2 = 0; d2 < pairs; ++d2) {
        std::uint32_t unit = 0;
        if (r < rows) {
          const auto lo = Eigen::numext::bit_cast<std::uint16_t>(bfloat16(q[r * width + 2 * d2]));
          const auto hi =
              Eigen::numext::bit_cast<std::uint16_t>(bfloat16(q[r * width + 2 * d2 + 1]));
          unit = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
        }
        dst[d2 * kPanel + k] = unit;
      }
    }
  }
  return {rows, width, scratch.data()};
}

/// scoresᵀ[n, padded rows] = keys (bf16 rows, stride key_stride elements, even) · qᵀ.
inline void scores_bf16(const QueryTileBf16& tile, const bfloat16* keys, index_t n,
                        index_t key_stride, float* scores_t, index_t st_stride) {
  const index_t panels = padded_rows(tile.rows) / kPanel;
  const index_t pairs = tile.width / 2;
  const auto* key_units = reinterpret_cast<const std::uint32_t*>(keys);
  for (index_t p = 0; p < panels; ++p) {
    const std::uint32_t* panel = tile.packed + p * pairs * kPanel;
    cpu::for_row_blocks(n, [&]<int R>(index_t t) {
      bf16_micro_kernel<R, false>(key_units + t * (key_stride / 2), key_stride / 2, 1, pairs, panel,
                                  kPanel, scores_t + t * st_stride + p * kPanel, st_stride);
    });
  }
}

/// Packs probabilities scoresᵀ[n, rows] (fp32) as [ceil(n/2)][padded rows] bf16 pairs over keys.
inline void pack_probabilities_bf16(const float* p_t, index_t n, index_t rows, index_t st_stride,
                                    std::vector<std::uint32_t>& packed) {
  const index_t width = padded_rows(rows);
  const index_t key_pairs = (n + 1) / 2;
  if (packed.size() < std::size_t(key_pairs * width)) packed.resize(std::size_t(key_pairs * width));
  for (index_t t2 = 0; t2 < key_pairs; ++t2) {
    const float* lo = p_t + 2 * t2 * st_stride;
    const bool has_hi = 2 * t2 + 1 < n;
    for (index_t r = 0; r < width; r += 16) {
      // Columns past `rows` hold finite padding (0·q scores turned into probabilities); they
      // only feed accumulator rows that are never read.
      const __m512 vlo = _mm512_loadu_ps(lo + r);
      const __m512 vhi = has_hi ? _mm512_loadu_ps(lo + st_stride + r) : _mm512_setzero_ps();
      _mm512_storeu_si512(packed.data() + t2 * width + r, pack_pair(vlo, vhi));
    }
  }
}

/// Packs the first `values` columns of n bf16 key rows as [ceil(n/2)][values] pairs over keys;
/// key row t starts at row_at(t) (rows need not be evenly spaced: pages of a paged cache).
template <class RowAt>
inline void pack_values_bf16_at(RowAt&& row_at, index_t n, index_t values,
                                std::vector<std::uint32_t>& packed) {
  const index_t key_pairs = (n + 1) / 2;
  if (packed.size() < std::size_t(key_pairs * values))
    packed.resize(std::size_t(key_pairs * values));
  for (index_t t2 = 0; t2 < key_pairs; ++t2) {
    const auto* lo = reinterpret_cast<const std::uint16_t*>(row_at(2 * t2));
    const bool has_hi = 2 * t2 + 1 < n;
    const auto* hi = has_hi ? reinterpret_cast<const std::uint16_t*>(row_at(2 * t2 + 1)) : lo;
    std::uint32_t* dst = packed.data() + t2 * values;
    for (index_t j = 0; j < values; j += 16) {
      const __m512i vlo =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + j)));
      const __m512i vhi =
          has_hi
              ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + j)))
              : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + j, _mm512_or_si512(vlo, _mm512_slli_epi32(vhi, 16)));
    }
  }
}

/// Packs the first `values` columns of n bf16 key rows (stride key_stride) as
/// [ceil(n/2)][values] pairs over keys.
inline void pack_values_bf16(const bfloat16* keys, index_t n, index_t key_stride, index_t values,
                             std::vector<std::uint32_t>& packed) {
  pack_values_bf16_at([&](index_t t) { return keys + t * key_stride; }, n, values, packed);
}

/// acc[rows, values] += pᵀᵀ · V with both operands packed as bf16 pairs over keys.
inline void accumulate_bf16(const std::uint32_t* p_pairs, index_t rows, index_t key_pairs,
                            const std::uint32_t* v_pairs, index_t values, float* acc) {
  const index_t width = padded_rows(rows);
  for (index_t j = 0; j < values; j += kPanel) {
    cpu::for_row_blocks(rows, [&]<int R>(index_t r) {
      bf16_micro_kernel<R, true>(p_pairs + r, 1, width, key_pairs, v_pairs + j, values,
                                 acc + r * values + j, values);
    });
  }
}

#endif  // __AVX512BF16__

/// Whether a config's latent can use the bf16 kernels: widths split into pairs and values into
/// whole 64-column panels (DeepSeek's 576 / 512 do).
inline constexpr bool bf16_kernels_fit(index_t width, index_t values) {
  return has_avx512_bf16_kernels && width % 2 == 0 && values % kPanel == 0;
}

}  // namespace daedalus::mla::cpu_kernels
