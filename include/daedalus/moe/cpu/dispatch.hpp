// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <cstring>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/dispatch.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// The CPU dispatch and combine: memory-bound row copies and weighted row sums, split over the
/// backend's threads in static contiguous ranges (of rows for dispatch, of tokens for combine).
namespace daedalus::moe::detail {

template <>
struct DispatchImpl<CpuBackend> {
  static void dispatch(const CpuBackend& cpu, const RoutingPlan& plan, HostView<const float, 2> x,
                       HostView<float, 2> expert_in) {
    const index_t width = x.extent(1);
    const index_t k = plan.k();
    const std::int32_t* row_slot = plan.row_slot().data();
    const float* src = x.data();
    float* dst = expert_in.data();
    const auto row_bytes = std::size_t(width) * sizeof(float);
    cpu.parallel_ranges(plan.rows(), [&](index_t r0, index_t r1, int) {
      for (index_t r = r0; r < r1; ++r) {
        const std::int32_t s = row_slot[r];
        if (s >= 0)
          std::memcpy(dst + r * width, src + index_t(s) / k * width, row_bytes);
        else
          std::memset(dst + r * width, 0, row_bytes);
      }
    });
  }

  static void combine(const CpuBackend& cpu, const RoutingPlan& plan,
                      HostView<const float, 2> expert_out, HostView<float, 2> out,
                      CombineInto mode) {
    const index_t width = expert_out.extent(1);
    const index_t k = plan.k();
    const std::int32_t* slot_row = plan.slot_row().data();
    const float* row_weight = plan.row_weight().data();
    const float* y = expert_out.data();
    float* o_base = out.data();
    cpu.parallel_ranges(plan.tokens(), [&](index_t t0, index_t t1, int) {
      for (index_t t = t0; t < t1; ++t) {
        float* __restrict o = o_base + t * width;
        bool written = mode == CombineInto::accumulate;
        for (index_t j = 0; j < k; ++j) {
          const std::int32_t row = slot_row[t * k + j];
          if (row < 0) continue;  // dropped for capacity: contributes nothing
          const float w = row_weight[row];
          const float* __restrict yr = y + index_t(row) * width;
          if (written) {
            for (index_t i = 0; i < width; ++i) o[i] += w * yr[i];
          } else {
            for (index_t i = 0; i < width; ++i) o[i] = w * yr[i];
            written = true;
          }
        }
        if (!written) std::memset(o, 0, std::size_t(width) * sizeof(float));
      }
    });
  }
};

}  // namespace daedalus::moe::detail
