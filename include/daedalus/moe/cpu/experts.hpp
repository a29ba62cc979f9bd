// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/experts.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// The CPU SwiGLU experts: grouped GEMMs on Eigen's single-threaded product, one work item per
/// (expert, block of output columns), the items shared dynamically by the backend's threads (as
/// the MLA projections do, docs/architecture.md "Threading").
namespace daedalus::moe {

/// Tiling of the CPU expert kernels. Columns per work item: 128 hidden units (phase 1) or 128
/// output features (phase 2) give V2-Lite 11 + 16 items per expert, enough to balance two to
/// a few dozen threads even when one token visits only six experts, and each item still streams
/// a 1-2 MiB slab of weights through a GEMM wide enough for Eigen's micro-kernel.
struct CpuExpertTraits {
  static constexpr index_t hidden_columns = 128;
  static constexpr index_t output_columns = 128;
  /// Segments of 2 to this many rows (most experts of a small batch) use `small_product`, which
  /// streams each weight row once, instead of a GEMM, which would first pack the weight slab (a
  /// second pass over it) for too few rows to pay that back. One row is Eigen's GEMV.
  static constexpr index_t small_rows = 8;
};

namespace detail {

/// Sums the 16 lanes of `v` as a fixed tree (GCC 12's _mm512_reduce_add_ps trips
/// -Wuninitialized in its own header).
#if defined(__AVX512F__)
inline float sum_lanes(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int half = 8; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) lanes[i] += lanes[i + half];
  return lanes[0];
}
#endif

/// out[c][r] = w[c] · x[r] for `Cols` (1 or 2) weight rows `w_stride` apart and the `Rows` rows
/// of x (`x_stride` apart), `depth` long: each weight vector is loaded once per 16 floats and
/// used for every token row, each token vector once for every weight row, with one accumulator
/// per pair, while the token rows stay in L1. For segments of a few tokens, where a GEMM spends
/// more time packing the weights than multiplying them.
template <int Cols, int Rows>
inline void dot_block(const float* w, index_t w_stride, index_t depth, const float* x,
                      index_t x_stride, float (*out)[8]) {
  index_t d = 0;
#if defined(__AVX512F__)
  __m512 acc[Cols][Rows];
  for (int c = 0; c < Cols; ++c)
    for (int r = 0; r < Rows; ++r) acc[c][r] = _mm512_setzero_ps();
  for (; d + 16 <= depth; d += 16) {
    __m512 wv[Cols];
    for (int c = 0; c < Cols; ++c) wv[c] = _mm512_loadu_ps(w + c * w_stride + d);
    for (int r = 0; r < Rows; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * x_stride + d);
      for (int c = 0; c < Cols; ++c) acc[c][r] = _mm512_fmadd_ps(wv[c], xv, acc[c][r]);
    }
  }
  for (int c = 0; c < Cols; ++c)
    for (int r = 0; r < Rows; ++r) out[c][r] = sum_lanes(acc[c][r]);
#else
  for (int c = 0; c < Cols; ++c)
    for (int r = 0; r < Rows; ++r) out[c][r] = 0.0f;
#endif
  for (; d < depth; ++d)
    for (int c = 0; c < Cols; ++c)
      for (int r = 0; r < Rows; ++r) out[c][r] += w[c * w_stride + d] * x[r * x_stride + d];
}

template <int Cols>
inline void dot_block_rows(index_t rows, const float* w, index_t depth, const float* x,
                           float (*out)[8]) {
  switch (rows) {
    case 1:
      dot_block<Cols, 1>(w, depth, depth, x, depth, out);
      break;
    case 2:
      dot_block<Cols, 2>(w, depth, depth, x, depth, out);
      break;
    case 3:
      dot_block<Cols, 3>(w, depth, depth, x, depth, out);
      break;
    case 4:
      dot_block<Cols, 4>(w, depth, depth, x, depth, out);
      break;
    case 5:
      dot_block<Cols, 5>(w, depth, depth, x, depth, out);
      break;
    case 6:
      dot_block<Cols, 6>(w, depth, depth, x, depth, out);
      break;
    case 7:
      dot_block<Cols, 7>(w, depth, depth, x, depth, out);
      break;
    default:
      dot_block<Cols, 8>(w, depth, depth, x, depth, out);
      break;
  }
}

/// y[r, c] = w[c] · x[r] for c in [c0, c1) and every row r of x, then `finish(r, c, value)`;
/// x and w packed with `depth` columns. Token rows are taken 8 at a time, weight rows 2 at a time.
template <class Finish>
inline void small_product(const float* w, index_t depth, index_t c0, index_t c1, const float* x,
                          index_t rows, Finish&& finish) {
  float out[2][8];
  for (index_t r0 = 0; r0 < rows; r0 += 8) {
    const index_t n = std::min<index_t>(8, rows - r0);
    const float* xr = x + r0 * depth;
    index_t c = c0;
    for (; c + 2 <= c1; c += 2) {
      dot_block_rows<2>(n, w + c * depth, depth, xr, out);
      for (index_t r = 0; r < n; ++r) {
        finish(r0 + r, c, out[0][r]);
        finish(r0 + r, c + 1, out[1][r]);
      }
    }
    if (c < c1) {
      dot_block_rows<1>(n, w + c * depth, depth, xr, out);
      for (index_t r = 0; r < n; ++r) finish(r0 + r, c, out[0][r]);
    }
  }
}

/// One SwiGLU MLP applied to a block of rows: y = w2(silu(w1 x) ⊙ w3 x).
struct SwigluJob {
  const float* x;  // [rows, dim]
  index_t rows;
  SwigluView weights;
  float* hidden;  // [rows, weights.width]
  float* y;       // [rows, dim]
};

template <>
struct ExpertsImpl<CpuBackend> {
  using Traits = CpuExpertTraits;

  using ColMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

  /// The transpose of the row-major block `rows × cols` at `data` (rows `stride` apart), as a
  /// writable column-major `cols × rows` matrix.
  static auto tmap(float* data, index_t cols, index_t rows, index_t stride) {
    return Eigen::Map<ColMatrix, Eigen::Unaligned, Eigen::OuterStride<>>(
        data, cols, rows, Eigen::OuterStride<>(stride));
  }

  /// Runs the jobs in two phases (the hidden activations of every job, then every output), each
  /// a parallel_for over (job, column block) items. Which thread runs an item never changes its
  /// arithmetic, so results are the same for every thread count.
  static void run(const CpuBackend& cpu, std::span<const SwigluJob> jobs, index_t dim) {
    struct Item {
      std::int32_t job;
      index_t c0, c1;
    };
    std::vector<Item> items;
    using cpu::map;

    // Phase 1: hidden[:, c0:c1] = silu(x · w1[c0:c1]ᵀ) ⊙ (x · w3[c0:c1]ᵀ).
    items.clear();
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      const SwigluJob& job = jobs[j];
      if (job.rows == 0 || job.weights.width == 0) continue;
      for (index_t c0 = 0; c0 < job.weights.width; c0 += Traits::hidden_columns)
        items.push_back(
            {std::int32_t(j), c0, std::min(job.weights.width, c0 + Traits::hidden_columns)});
    }
    cpu.parallel_for(index_t(items.size()), [&](index_t i, int) {
      const Item& item = items[std::size_t(i)];
      const SwigluJob& job = jobs[std::size_t(item.job)];
      const index_t width = job.weights.width;
      const index_t n = job.rows;
      const index_t cols = item.c1 - item.c0;
      if (n > 1 && n <= Traits::small_rows) {
        const float* w13 = job.weights.w13;
        float* hidden = job.hidden;
        small_product(w13, dim, item.c0, item.c1, job.x, n,
                      [&](index_t r, index_t c, float a) { hidden[r * width + c] = a; });
        small_product(w13 + width * dim, dim, item.c0, item.c1, job.x, n,
                      [&](index_t r, index_t c, float b) {
                        const float a = hidden[r * width + c];
                        hidden[r * width + c] = a / (1.0f + std::exp(-a)) * b;
                      });
        return;
      }
      // Transposed, hiddenᵀ[c0:c1, :] = w1[c0:c1] · xᵀ: the weight slab is the GEMM's left
      // operand, whose rows Eigen's micro-kernel vectorises, so a segment of a few dozen tokens
      // still fills the vectors.
      const auto xt = map(job.x, n, dim, dim).transpose();
      ColMatrix gate(cols, n), up(cols, n);
      gate.noalias() = map(job.weights.w13 + item.c0 * dim, cols, dim, dim) * xt;
      up.noalias() = map(job.weights.w13 + (width + item.c0) * dim, cols, dim, dim) * xt;
      // silu(a) = a · σ(a) = a / (1 + e^-a) (DeepSeek `Expert.forward`: F.silu(w1(x)) * w3(x)).
      // On Eigen's own (aligned) temporaries: its vectorised exp and its scalar exp differ in
      // the last bit, and on a view of the caller's buffer which elements take which would
      // depend on that buffer's address, so results would change from run to run.
      gate.array() = gate.array() / (1.0f + (-gate.array()).exp()) * up.array();
      tmap(job.hidden + item.c0, cols, n, width) = gate;
    });

    // Phase 2: y[:, c0:c1] = hidden · w2[c0:c1]ᵀ.
    items.clear();
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      const SwigluJob& job = jobs[j];
      if (job.rows == 0) continue;
      if (job.weights.width == 0) {  // no hidden units: the MLP's output is zero
        std::memset(job.y, 0, std::size_t(job.rows * dim) * sizeof(float));
        continue;
      }
      for (index_t c0 = 0; c0 < dim; c0 += Traits::output_columns)
        items.push_back({std::int32_t(j), c0, std::min(dim, c0 + Traits::output_columns)});
    }
    cpu.parallel_for(index_t(items.size()), [&](index_t i, int) {
      const Item& item = items[std::size_t(i)];
      const SwigluJob& job = jobs[std::size_t(item.job)];
      const index_t width = job.weights.width;
      const index_t cols = item.c1 - item.c0;
      if (job.rows > 1 && job.rows <= Traits::small_rows) {
        float* y = job.y;
        small_product(job.weights.w2, width, item.c0, item.c1, job.hidden, job.rows,
                      [&](index_t r, index_t c, float v) { y[r * dim + c] = v; });
        return;
      }
      tmap(job.y + item.c0, cols, job.rows, dim).noalias() =
          map(job.weights.w2 + item.c0 * width, cols, width, width) *
          map(job.hidden, job.rows, width, width).transpose();
    });
  }

  template <MoeConfig C>
  static void routed(const CpuBackend& cpu, const ExpertWeights<C>& weights,
                     const RoutingPlan& plan, HostView<const float, 2> expert_in,
                     HostView<float, 2> hidden, HostView<float, 2> expert_out) {
    constexpr index_t dim = C::dim;
    constexpr index_t inter = C::moe_inter_dim;
    const auto offsets = plan.offsets();
    const auto counts = plan.counts();
    std::vector<SwigluJob> jobs;
    jobs.reserve(std::size_t(C::n_routed_experts));
    for (int e = 0; e < C::n_routed_experts; ++e) {
      const index_t r0 = offsets[std::size_t(e)];
      const index_t n = counts[std::size_t(e)];
      // Padding rows (after the kept ones) are not computed but set to zero: what the expert
      // gives for the zero rows dispatch puts there (silu(0) · 0 = 0, w2 · 0 = 0).
      const index_t pad = offsets[std::size_t(e) + 1] - r0 - n;
      if (pad > 0) {
        std::memset(hidden.data() + (r0 + n) * inter, 0, std::size_t(pad * inter) * sizeof(float));
        std::memset(expert_out.data() + (r0 + n) * dim, 0, std::size_t(pad * dim) * sizeof(float));
      }
      if (n == 0) continue;
      jobs.push_back({expert_in.data() + r0 * dim, n, weights.swiglu(e), hidden.data() + r0 * inter,
                      expert_out.data() + r0 * dim});
    }
    run(cpu, jobs, dim);
  }

  template <MoeConfig C>
  static void shared(const CpuBackend& cpu, const SharedExpertWeights<C>& weights,
                     HostView<const float, 2> x, HostView<float, 2> hidden,
                     HostView<float, 2> out) {
    const SwigluJob job{x.data(), x.extent(0), weights.swiglu(), hidden.data(), out.data()};
    run(cpu, std::span<const SwigluJob>(&job, 1), C::dim);
  }
};

}  // namespace detail
}  // namespace daedalus::moe
