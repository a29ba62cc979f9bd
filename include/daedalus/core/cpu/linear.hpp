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

/// The tiles `linear` cuts y [tokens, out] into. Their sizes depend on the problem's shape only,
/// never on the thread count: Eigen's GEMM takes a different instruction path (and summation
/// order) for a row depending on where it falls in its product's packet blocks, so products cut at
/// thread-dependent boundaries round differently. With the cut fixed by the shape, the threads only
/// decide who computes which tile, and y is bitwise the same for any thread count.
struct LinearTiling {
  index_t features;  // output features per tile (the last tile may be narrower)
  index_t tokens;    // tokens per tile (the last tile may be shorter)

  /// Decode-sized products (a few tokens) are GEMVs bound by reading w: narrow tiles of 64
  /// features spread w over every thread. Larger products are GEMMs: at most 16 feature tiles of
  /// at least 128 features and token tiles of 512, so each operand is packed a bounded number of
  /// times (x once per feature tile, w once per token tile) and a tile is still large enough for
  /// Eigen's micro-kernel.
  static LinearTiling for_shape(index_t tokens, index_t out) {
    constexpr index_t kGemvTokens = 32;
    if (tokens <= kGemvTokens) return {64, tokens};
    const index_t features = std::max<index_t>(128, (ceil_div(out, 16) + 15) / 16 * 16);
    return {features, 512};
  }

  static index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
};

/// y = x · wᵀ, the `nn.Linear` product: x [tokens, in] (rows `x_stride` apart), w [out, in]
/// (DeepSeek's layout) and y [tokens, out] packed row-major. y is cut into the shape-determined
/// tiles of LinearTiling; each thread takes one contiguous range of them (feature-major, so a
/// thread streams its own rows of w), and the result is bitwise the same for any thread count.
inline void linear(const CpuBackend& cpu, const float* x, index_t tokens, index_t in,
                   index_t x_stride, const float* w, index_t out, float* y) {
  if (tokens == 0 || out == 0) return;
  const LinearTiling tiling = LinearTiling::for_shape(tokens, out);
  const index_t feature_tiles = LinearTiling::ceil_div(out, tiling.features);
  const index_t token_tiles = LinearTiling::ceil_div(tokens, tiling.tokens);
  cpu.parallel_ranges(feature_tiles * token_tiles, [&](std::int64_t i0, std::int64_t i1, int) {
    for (std::int64_t i = i0; i < i1; ++i) {
      const index_t f0 = (i / token_tiles) * tiling.features;
      const index_t f1 = std::min(out, f0 + tiling.features);
      const index_t t0 = (i % token_tiles) * tiling.tokens;
      const index_t t1 = std::min(tokens, t0 + tiling.tokens);
      map(y + t0 * out + f0, t1 - t0, f1 - f0, out).noalias() =
          map(x + t0 * x_stride, t1 - t0, in, x_stride) *
          map(w + f0 * in, f1 - f0, in, in).transpose();
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
