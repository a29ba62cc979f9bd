// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "daedalus/core/backend.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/dispatch.hpp"
#include "daedalus/moe/routing_plan.hpp"

/// The CPU dispatch and combine: memory-bound row copies and weighted row sums, split over the
/// backend's threads in static contiguous ranges of tokens. Each output element is written by
/// one thread with arithmetic that does not depend on the partition, so both are bitwise the
/// same for every thread count.
namespace daedalus::moe::detail {

/// Copies one row with streaming (non-temporal) stores where the CPU has them. The
/// expert-ordered buffer is written once and read back only by the experts, usually after many
/// other rows: ordinary stores would first read every destination line into the cache
/// (read-for-ownership), a third memory pass on top of the read and the write. memcpy does the
/// same for large copies; a single row (28 KiB at V3's width) is below its threshold.
inline void stream_row(float* dst, const float* src, index_t n) {
  index_t i = 0;
#if defined(__AVX512F__)
  constexpr index_t lanes = 16;
  constexpr std::uintptr_t align = 64;
#elif defined(__AVX__)
  constexpr index_t lanes = 8;
  constexpr std::uintptr_t align = 32;
#endif
#if defined(__AVX512F__) || defined(__AVX__)
  for (; i < n && reinterpret_cast<std::uintptr_t>(dst + i) % align != 0; ++i) dst[i] = src[i];
  for (; i + lanes <= n; i += lanes) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

/// Orders the streaming stores of this thread before later loads and stores (other threads read
/// the rows after the parallel region's barrier).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

template <>
struct DispatchImpl<CpuBackend> {
  /// Floats of an output row combine accumulates at a time: 4 KiB, L1-resident while the k
  /// expert rows stream through it.
  static constexpr index_t combine_block = 1024;

  /// Token-major: each thread reads its tokens' rows once and writes each to its k destination
  /// rows (a token's row stays in L1/L2 for its k copies). Gathering row-major instead would read
  /// every token row k times from memory, k · tokens · width floats rather than tokens · width.
  /// Padding rows are zeroed in a second pass over the experts' segments.
  static void dispatch(const CpuBackend& cpu, const RoutingPlan& plan, HostView<const float, 2> x,
                       HostView<float, 2> expert_in) {
    const index_t width = x.extent(1);
    const index_t k = plan.k();
    const std::int32_t* slot_row = plan.slot_row().data();
    const float* src = x.data();
    float* dst = expert_in.data();
    cpu.parallel_ranges(plan.tokens(), [&](index_t t0, index_t t1, int) {
      for (index_t t = t0; t < t1; ++t) {
        for (index_t j = 0; j < k; ++j) {
          const std::int32_t row = slot_row[t * k + j];
          if (row >= 0) stream_row(dst + index_t(row) * width, src + t * width, width);
        }
      }
      stream_fence();
    });
    if (plan.rows() == plan.tokens() * k - plan.dropped()) return;  // no padding
    const auto offsets = plan.offsets();
    const auto counts = plan.counts();
    cpu.parallel_ranges(plan.num_experts(), [&](index_t e0, index_t e1, int) {
      for (index_t e = e0; e < e1; ++e) {
        const index_t begin = offsets[std::size_t(e)] + counts[std::size_t(e)];
        const index_t end = offsets[std::size_t(e) + 1];
        std::memset(dst + begin * width, 0, std::size_t((end - begin) * width) * sizeof(float));
      }
    });
  }

  /// Token-major: each token's output is accumulated block by block in a local buffer from its
  /// kept rows in slot order, then stored once (streaming: the output is not read again here).
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
      alignas(64) float acc[combine_block];
      for (index_t t = t0; t < t1; ++t) {
        float* o = o_base + t * width;
        for (index_t c0 = 0; c0 < width; c0 += combine_block) {
          const index_t n = std::min(combine_block, width - c0);
          bool written = mode == CombineInto::accumulate;
          if (written) std::memcpy(acc, o + c0, std::size_t(n) * sizeof(float));
          for (index_t j = 0; j < k; ++j) {
            const std::int32_t row = slot_row[t * k + j];
            if (row < 0) continue;  // dropped for capacity: contributes nothing
            const float w = row_weight[row];
            const float* __restrict yr = y + index_t(row) * width + c0;
            if (written) {
              for (index_t i = 0; i < n; ++i) acc[i] += w * yr[i];
            } else {
              for (index_t i = 0; i < n; ++i) acc[i] = w * yr[i];
              written = true;
            }
          }
          if (written)
            stream_row(o + c0, acc, n);
          else
            std::memset(o + c0, 0, std::size_t(n) * sizeof(float));
        }
      }
      stream_fence();
    });
  }
};

}  // namespace daedalus::moe::detail
