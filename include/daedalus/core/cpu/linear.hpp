// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
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

/// y = x · wᵀ, the `nn.Linear` product: x [tokens, in] (rows `x_stride` apart), w [out, in]
/// (DeepSeek's layout) and y [tokens, out] packed row-major. The output features are split into one
/// contiguous range per thread, so each thread streams its own rows of w once (a GEMV for one token
/// is memory-bound on w) and the result does not depend on the thread count.
inline void linear(const CpuBackend& cpu, const float* x, index_t tokens, index_t in,
                   index_t x_stride, const float* w, index_t out, float* y) {
  if (tokens == 0 || out == 0) return;
  // Ranges of at least 16 output features keep Eigen's micro-kernel fed.
  const index_t chunks = std::min<index_t>(cpu.num_threads(), std::max<index_t>(1, out / 16));
  CpuBackend team(static_cast<int>(chunks));
  team.parallel_ranges(chunks, [&](std::int64_t c0, std::int64_t c1, int) {
    for (std::int64_t c = c0; c < c1; ++c) {
      const index_t r0 = out * c / chunks;
      const index_t r1 = out * (c + 1) / chunks;
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
