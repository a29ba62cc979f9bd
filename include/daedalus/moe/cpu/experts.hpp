// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

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
};

namespace detail {

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
      const auto x = map(job.x, n, dim, dim);
      auto gate = map(job.hidden + item.c0, n, cols, width);
      gate.noalias() = x * map(job.weights.w13 + item.c0 * dim, cols, dim, dim).transpose();
      cpu::RowMatrix up(n, cols);
      up.noalias() = x * map(job.weights.w13 + (width + item.c0) * dim, cols, dim, dim).transpose();
      // silu(a) = a · σ(a) = a / (1 + e^-a) (DeepSeek `Expert.forward`: F.silu(w1(x)) * w3(x)).
      gate.array() = gate.array() / (1.0f + (-gate.array()).exp()) * up.array();
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
      map(job.y + item.c0, job.rows, cols, dim).noalias() =
          map(job.hidden, job.rows, width, width) *
          map(job.weights.w2 + item.c0 * width, cols, width, width).transpose();
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
