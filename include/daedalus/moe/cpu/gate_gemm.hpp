// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/cpu/microkernel_avx512.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/gate.hpp"

/// The gate's logits GEMM, logits [tokens, E] = x [tokens, dim] · Wᵀ (W [E, dim]), with an
/// accumulation order that depends on neither the thread count nor how tokens are chunked, so
/// the gate's choice is bitwise reproducible.
///
/// With AVX-512: W comes packed into panels of 64 experts, depth-major (packed[p][d][j] =
/// W[64p + j][d], zero past E; GateWeights keeps this copy, moe/gate.hpp, so a call only streams
/// it); every output tile of 6 tokens × 64 experts is accumulated in 24 zmm registers over depth
/// blocks of kDepthBlock, each x value broadcast against 4 vectors of the panel (the micro-kernel
/// of core/cpu/microkernel_avx512.hpp, which MLA's latent products share). A depth block of one
/// panel (512 × 64 × 4 B = 128 KiB) stays in L2 while every token of a chunk passes over it. Each
/// logit is the sum over d in increasing order, block by block: the same for any chunking.
/// Elsewhere: Eigen's GEMM on fixed chunks (its blocking depends only on the chunk's shape, and
/// chunk boundaries do not depend on the thread count).
namespace daedalus::moe::cpu_gate {

/// Experts per packed panel (4 zmm of fp32): GateWeights' packed layout.
inline constexpr index_t kPanel = detail::kGatePanel;
static_assert(kPanel == cpu::kMicroColumns, "a gate panel is one micro-kernel tile wide");
/// Token rows per register tile.
inline constexpr index_t kTileRows = cpu::kMicroRows;
/// Depth per block: a panel's block is 128 KiB, a 192-token chunk's x block 384 KiB.
inline constexpr index_t kDepthBlock = 512;

/// E rounded up to whole panels: the row stride of the logits a chunk writes.
inline index_t padded_experts(index_t experts) { return (experts + kPanel - 1) / kPanel * kPanel; }

#if defined(__AVX512F__)

/// out[rows, 64] (row stride out_stride) (+)= x[rows, depth] (row stride x_stride) ·
/// panel[depth, 64], in register tiles of kTileRows token rows and one remainder.
template <bool Accumulate>
inline void gate_tiles(index_t rows, const float* x, index_t x_stride, index_t depth,
                       const float* panel, float* out, index_t out_stride) {
  cpu::for_row_blocks(rows, [&]<int R>(index_t r) {
    cpu::micro_kernel<R, Accumulate>(x + r * x_stride, x_stride, 1, depth, panel, kPanel,
                                     out + r * out_stride, out_stride);
  });
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

}  // namespace daedalus::moe::cpu_gate
