// SPDX-License-Identifier: Apache-2.0
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/core/tensor_view.hpp"

/// The register-blocked fp32 micro-kernel behind the CPU backend's packed products: MLA's
/// absorbed scores and values (mla/cpu/latent_gemm.hpp) and the MoE gate's logits
/// (moe/cpu/gate_gemm.hpp). One call computes
///   out[R, 64] = a[R, depth] · b[depth, 64]   (or out += ... with Accumulate)
/// with its 4·R outputs in zmm accumulators (24 of the 32 registers for R = 6): per step d it
/// loads the four vectors of b's row d and broadcasts each a[i][d] from memory into four FMAs.
/// Every output is one chain of fused multiply-adds over d in increasing order, starting from 0
/// or from out's value, whatever R and however the caller blocks its rows: the fixed order that
/// the gate's bitwise reproducibility (the same choice for any thread count or token chunking)
/// rests on. The operands' strides are arguments, so one kernel reads a packed panel, a cache
/// block as it lies, or a transposed probability tile. Without AVX-512 only the constants and
/// the row blocking are defined; callers keep their portable (Eigen) paths.
namespace daedalus::cpu {

/// Columns of one micro-kernel tile (4 zmm of fp32): the width of the callers' packed panels.
inline constexpr index_t kMicroColumns = 64;
/// Rows of a full tile: 6 · 4 accumulators, the 4 vectors of a b row and a broadcast take 29 of
/// the 32 zmm registers.
inline constexpr index_t kMicroRows = 6;

/// Whether the AVX-512 micro-kernel is compiled in (-mavx512f, or -march=native on an AVX-512
/// machine).
inline constexpr bool has_avx512_micro_kernel =
#if defined(__AVX512F__)
    true;
#else
    false;
#endif

/// Calls `micro.template operator()<R>(row)` over `rows` rows: blocks of R = kMicroRows from row
/// 0 up, then one block of the remaining 1 to 5 rows, if any.
template <class Micro>
inline void for_row_blocks(index_t rows, Micro&& micro) {
  static_assert(kMicroRows == 6, "for_row_blocks dispatches remainders of 1 to 5 rows");
  index_t r = 0;
  for (; r + kMicroRows <= rows; r += kMicroRows) micro.template operator()<int(kMicroRows)>(r);
  switch (rows - r) {
    case 1:
      micro.template operator()<1>(r);
      break;
    case 2:
      micro.template operator()<2>(r);
      break;
    case 3:
      micro.template operator()<3>(r);
      break;
    case 4:
      micro.template operator()<4>(r);
      break;
    case 5:
      micro.template operator()<5>(r);
      break;
    default:
      break;
  }
}

#if defined(__AVX512F__)

/// out[R, 64] (row stride out_stride) = a[R, depth] · b[depth, 64], or += when Accumulate.
/// Element (i, d) of a is a[i · a_stride + d · a_step], broadcast; row d of b starts at
/// b + d · b_stride and is loaded as 4 vectors. Unaligned loads and stores throughout.
template <int R, bool Accumulate>
inline void micro_kernel(const float* a, index_t a_stride, index_t a_step, index_t depth,
                         const float* b, index_t b_stride, float* out, index_t out_stride) {
  static_assert(R >= 1 && R <= kMicroRows, "micro_kernel: 1 to kMicroRows rows");
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = Accumulate ? _mm512_loadu_ps(out + i * out_stride + index_t{16} * j)
                             : _mm512_setzero_ps();
  for (index_t d = 0; d < depth; ++d) {
    const float* brow = b + d * b_stride;
    const __m512 b0 = _mm512_loadu_ps(brow);
    const __m512 b1 = _mm512_loadu_ps(brow + 16);
    const __m512 b2 = _mm512_loadu_ps(brow + 32);
    const __m512 b3 = _mm512_loadu_ps(brow + 48);
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_stride + d * a_step]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(av, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(av, b3, acc[i][3]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * out_stride + index_t{16} * j, acc[i][j]);
}

#endif  // __AVX512F__

}  // namespace daedalus::cpu
