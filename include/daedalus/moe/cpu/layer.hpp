// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/moe/layer.hpp"

/// The CPU parts of MoeLayer that are not the composable pieces' own: the gate's logits.
namespace daedalus::moe::detail {

template <>
struct LayerImpl<CpuBackend> {
  /// Tokens per work item of the logits product. The items' boundaries depend on the token count
  /// only, never on the thread count: Eigen's product blocking (and so its rounding) depends on
  /// the row count, and a token's logits, hence its expert choice and weights, must be the same
  /// bits for every thread count.
  static constexpr index_t chunk_tokens = 64;

  /// logits [tokens, experts] = x [tokens, dim] · weight [experts, dim]ᵀ.
  static void gate_logits(const CpuBackend& cpu, HostView<const float, 2> weight,
                          HostView<const float, 2> x, HostView<float, 2> logits) {
    const index_t tokens = x.extent(0);
    const index_t dim = x.extent(1);
    const index_t experts = weight.extent(0);
    const index_t chunks = (tokens + chunk_tokens - 1) / chunk_tokens;
    cpu.parallel_for(chunks, [&](index_t c, int) {
      const index_t t0 = c * chunk_tokens;
      const index_t n = std::min(chunk_tokens, tokens - t0);
      cpu::map(logits.data() + t0 * experts, n, experts, experts).noalias() =
          cpu::map(x.data() + t0 * dim, n, dim, dim) *
          cpu::map(weight.data(), experts, dim, dim).transpose();
    });
  }
};

}  // namespace daedalus::moe::detail
