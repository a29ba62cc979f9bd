// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/gate.hpp"

/// The gate's logits GEMM, logits [tokens, E] = x [tokens, dim] · Wᵀ (W [E, dim]), with an
/// accumulation order that depends on neither the thread count nor how tokens are chunked, so
/// the gate's choice is bitwise reproducible.
///
/// With AVX-512: W comes packed into panels of 64 experts, depth-major (packed[p][d][j] =
/// W[64p + j][d], zero past E; GateWeights keeps this copy, moe/gate.hpp, so a call only streams
/// it); every output tile of 6 tokens × 64 experts is accumulated in 24 zmm registers over depth
/// blocks of kDepthBlock, each x value broadcast against 4 vectors of the panel (the register
/// blocking of mla/cpu/latent_gemm.hpp). A depth block of one panel (512 × 64 × 4 B = 128 KiB)
/// stays in L2 while every token of a chunk passes over it. Each logit is the sum over d in
/// increasing order, block by block: the same for any chunking. Elsewhere: Eigen's GEMM on fixed
/// chunks (its blocking depends only on the chunk's shape, and chunk boundaries do not depend on
/// the thread count).
namespace daedalus::moe::cpu_gate {

/// Experts per packed panel (4 zmm of fp32): GateWeights' packed layout.
inline constexpr index_t kPanel = detail::kGatePanel;
/// Token rows per register tile.
inline constexpr index_t kTileRows = 6;
/// Depth per block: a panel's block is 128 KiB, a 192-token chunk's x block 384 KiB.
inline constexpr index_t kDepthBlock = 512;

/// E rounded up to whole panels: the row stride of the logits a chunk writes.
inline index_t padded_experts(index_t experts) { return (experts + kPanel - 1) / kPanel * kPanel; }

#if defined(__AVX512F__)

/// out[R, 64] (row stride out_stride) (+)= x[R, depth] (row stride x_stride) · panel[depth, 64].
template <int R, bool Accumulate>
inline void gate_tile(const float* x, index_t x_stride, index_t depth, const float* panel,
                      float* out, index_t out_stride) {
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = Accumulate ? _mm512_loadu_ps(out + i * out_stride + std::ptrdiff_t{16} * j)
                             : _mm512_setzero_ps();
  for (index_t d = 0; d < depth; ++d) {
    const float* row = panel + d * kPanel;
    const __m512 b0 = _mm512_loadu_ps(row);
    const __m512 b1 = _mm512_loadu_ps(row + 16);
    const __m512 b2 = _mm512_loadu_ps(row + 32);
    const __m512 b3 = _mm512_loadu_ps(row + 48);
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * x_stride + d]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(out + i * out_stride + std::ptrdiff_t{16} * j, acc[i][j]);
}

template <bool Accumulate>
inline void gate_tiles(index_t rows, const float* x, index_t x_stride, index_t depth,
                       const float* panel, float* out, index_t out_stride) {
  index_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    gate_tile<kTileRows, Accumulate>(x + r * x_stride, x_stride, depth, panel, out + r * out_stride,
                                     out_stride);
  const float* xr = x + r * x_stride;
  float* o = out + r * out_stride;
  switch (rows - r) {
    case 1:
      gate_tile<1, Accumulate>(xr, x_stride, depth, panel, o, out_stride);
      break;
    case 2:
      gate_tile<2, Accumulate>(xr, x_stride, depth, panel, o, out_stride);
      break;
    case 3:
      gate_tile<3, Accumulate>(xr, x_stride, depth, panel, o, out_stride);
      break;
    case 4:
      gate_tile<4, Accumulate>(xr, x_stride, depth, panel, o, out_stride);
      break;
    case 5:
      gate_tile<5, Accumulate>(xr, x_stride, depth, panel, o, out_stride);
      break;
    default:
      break;
  }
}

/// logits [rows, padded_experts] (row stride out_stride) = x [rows, dim] · Wᵀ from the packed
/// panels, one thread. Padded columns receive 0.
inline void chunk_logits(const float* x, index_t rows, index_t dim, const float* packed,
                         index_t experts, float* logits, index_t out_stride) {
  const index_t panels = padded_experts(experts) / kPanel;
  for (index_t d0 = 0; d0 < dim; d0 += kDepthBlock) {
    const index_t depth = std::min(kDepthBlock, dim - d0);
    for (index_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * dim * kPanel + d0 * kPanel;
      float* out = logits + p * kPanel;
      if (d0 == 0)
        gate_tiles<false>(rows, x + d0, dim, depth, panel, out, out_stride);
      else
        gate_tiles<true>(rows, x + d0, dim, depth, panel, out, out_stride);
    }
  }
}

#endif  // __AVX512F__

/// Whether the packed AVX-512 kernel is compiled in.
inline constexpr bool has_avx512_gate_kernel =
#if defined(__AVX512F__)
    true;
#else
    false;
#endif

}  // namespace daedalus::moe::cpu_gate
