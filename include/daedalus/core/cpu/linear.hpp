// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus::cpu {

/// Row-major fp32 matrix types every CPU kernel maps its buffers to.
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstRowMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Maps `rows × cols` floats at `data` whose rows are `stride` floats apart.
inline ConstRowMap map(const float* data, index_t rows, index_t cols, index_t stride) {
  return ConstRowMap(data, rows, cols, Eigen::OuterStride<>(stride));
}
inline RowMap map(float* data, index_t rows, index_t cols, index_t stride) {
  return RowMap(data, rows, cols, Eigen::OuterStride<>(stride));
}

/// Output features per alignment group of `linear`: 48 is a multiple of the rows Eigen's fp32
/// GEMM kernel processes together (mr = 3 packets: 12 with SSE, 24 with AVX, 48 with AVX-512)
/// and of the row groups of its GEMV, and 48 floats are 192 bytes, three cache lines.
inline constexpr index_t kLinearFeatureAlign = 48;

/// y = x · wᵀ, the `nn.Linear` product: x [tokens, in] (rows `x_stride` apart), w [out, in]
/// (DeepSeek's layout) and y [tokens, out] packed row-major. The output features are split into one
/// contiguous range per thread, so each thread streams its own rows of w once (a GEMV for one token
/// is memory-bound on w).
///
/// The result is bitwise the same for any thread count. Eigen takes a different instruction path
/// (and summation order) for a row of its product depending on where the row falls in its packet
/// blocks, so ranges that start anywhere would round differently. Every range starts at a
/// multiple of kLinearFeatureAlign: each feature then sits at the same place in Eigen's blocks
/// whichever range holds it (the blocks of a range are multiples of the kernel's rows too, and
/// the depth blocking depends on `in` alone), and only the last out mod 48 features, the same
/// for every split, take the tail paths. The tests check it on ragged shapes and thread counts.
inline void linear(const CpuBackend& cpu, const float* x, index_t tokens, index_t in,
                   index_t x_stride, const float* w, index_t out, float* y) {
  if (tokens == 0 || out == 0) return;
  const index_t groups = (out + kLinearFeatureAlign - 1) / kLinearFeatureAlign;
  const index_t chunks = std::min<index_t>(cpu.num_threads(), groups);
  cpu.parallel_ranges(chunks, [&](std::int64_t c0, std::int64_t c1, int) {
    for (std::int64_t c = c0; c < c1; ++c) {
      const index_t r0 = std::min(out, groups * c / chunks * kLinearFeatureAlign);
      const index_t r1 = std::min(out, groups * (c + 1) / chunks * kLinearFeatureAlign);
      if (r1 <= r0) continue;
      map(y + r0, tokens, r1 - r0, out).noalias() =
          map(x, tokens, in, x_stride) * map(w + r0 * in, r1 - r0, in, in).transpose();
    }
  });
}

}  // namespace daedalus::cpu

namespace daedalus::cpu {

/// y = x · wᵀ with x packed [tokens, in].
inline void linear(const CpuBackend& cpu, const float* x, index_t tokens, index_t in,
                   const float* w, index_t out, float* y) {
  linear(cpu, x, tokens, in, in, w, out, y);
}

}  // namespace daedalus::cpu
