// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for the grouped SwiGLU experts on the GPU (moe/cuda/experts.cuh), shared by
// daedalus_cuda_tests and daedalus_emulated_tests. Reference: fp64 from the same bf16-rounded
// weights and bf16-rounded inputs, so the tolerance covers only what the device adds (fp32
// accumulation, its exp, and the rounding of the hidden activations to bf16 before w2), each
// bounded rigorously per element. Included by exactly one translation unit per binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/cuda/dispatch.cuh>
#include <daedalus/moe/cuda/experts.cuh>
#include <daedalus/moe/cuda/routing_plan.cuh>
#include <limits>
#include <span>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"

namespace daedalus::testing::moe_experts_checks {

namespace moe = daedalus::moe;

/// Widths that are not multiples of the 64-row, 64-column, 32-deep tiles: dim 200 (four column
/// tiles, the last of 8), moe_inter_dim 72 (three 32-unit tiles, the last of 8; three k steps of
/// w2, the last of 8).
struct OddExperts : Tiny {
  static constexpr const char* name = "OddExperts";
  static constexpr int dim = 200;
  static constexpr int moe_inter_dim = 72;
  static constexpr int n_routed_experts = 6;
  static constexpr int n_activated_experts = 2;
  static constexpr int n_expert_groups = 2;
  static constexpr int n_limited_groups = 1;
};

inline double bf16(double x) { return double(float(bfloat16(float(x)))); }

/// The routed experts over a plan with padding (pad_block 8; dropless unless `settings` set a
/// capacity) on random tokens, half of whose picks favour experts 0 and 1; and the permuted read
/// (routed_experts_from_tokens) against them bit for bit.
template <class C>
void check_routed_experts(const CudaBackend& cuda, int tokens, std::uint64_t stream,
                          const moe::PlanSettings& settings = {0.0, moe::DropPolicy::probs, 8}) {
  constexpr int experts = C::n_routed_experts, k = C::n_activated_experts;
  constexpr int dim = C::dim, inter = C::moe_inter_dim;
  const auto weights = moe::ExpertWeights<C>::random(stream);
  const moe::DeviceExpertWeights<C> device_weights(cuda, weights);

  Random rng(stream + 1);
  std::vector<std::int32_t> ids = moe_reference::distinct_ids(
      [&](int n) { return int(rng.integer(0, n - 1)); }, tokens, k, experts, 2);
  const std::vector<float> routing_weights = rng.uniform_in(ids.size(), 0.1, 1.0);
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * dim);
  const auto ids_d = cuda::to_device(cuda, ids);
  const auto weights_d = cuda::to_device(cuda, routing_weights);
  const auto x_d = cuda::to_device(cuda, x);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {tokens, k}),
             TensorView<const float, 2, DeviceMemory>(weights_d.data(), {tokens, k}), experts,
             settings);
  const index_t rows = plan.rows();
  cuda::DeviceBuffer<float> in_d(std::size_t(rows) * dim), hidden_d(std::size_t(rows) * inter),
      out_d(std::size_t(rows) * dim);
  moe::dispatch(cuda, plan, TensorView<const float, 2, DeviceMemory>(x_d.data(), {tokens, dim}),
                TensorView<float, 2, DeviceMemory>(in_d.data(), {rows, dim}));
  moe::routed_experts(cuda, device_weights, plan,
                      TensorView<const float, 2, DeviceMemory>(in_d.data(), {rows, dim}),
                      TensorView<float, 2, DeviceMemory>(hidden_d.data(), {rows, inter}),
                      TensorView<float, 2, DeviceMemory>(out_d.data(), {rows, dim}));
  const auto hidden = cuda::to_host(cuda, hidden_d);
  const auto out = cuda::to_host(cuda, out_d);
  const auto host_plan = plan.download(cuda);

  // The permuted read: the same tiles from the token rows in place of the dispatched copy, so the
  // same bits (hidden and out overwritten with NaN first: every row is written again).
  {
    cuda::DeviceBuffer<float> hidden2_d(hidden.size()), out2_d(out.size());
    const std::vector<float> nan_hidden(hidden.size(), std::numeric_limits<float>::quiet_NaN());
    const std::vector<float> nan_out(out.size(), std::numeric_limits<float>::quiet_NaN());
    cuda::copy(cuda, hidden2_d, std::span<const float>(nan_hidden));
    cuda::copy(cuda, out2_d, std::span<const float>(nan_out));
    moe::routed_experts_from_tokens(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(x_d.data(), {tokens, dim}),
        TensorView<float, 2, DeviceMemory>(hidden2_d.data(), {rows, inter}),
        TensorView<float, 2, DeviceMemory>(out2_d.data(), {rows, dim}));
    CHECK(cuda::to_host(cuda, hidden2_d) == hidden);
    CHECK(cuda::to_host(cuda, out2_d) == out);
  }

  const double gamma_dim = 1.01 * dim * 0x1p-24, gamma_inter = 1.01 * inter * 0x1p-24;
  std::size_t hidden_bad = 0, out_bad = 0, padding_bad = 0, checked = 0;
  std::vector<double> h(inter), h_bound(inter);
  for (index_t r = 0; r < rows; ++r) {
    const std::int32_t slot = host_plan.row_slot[std::size_t(r)];
    if (slot < 0) {
      for (int j = 0; j < inter; ++j) padding_bad += hidden[std::size_t(r) * inter + j] != 0.0f;
      for (int n = 0; n < dim; ++n) padding_bad += out[std::size_t(r) * dim + n] != 0.0f;
      continue;
    }
    ++checked;
    const int e = ids[std::size_t(slot)];
    const float* xr = x.data() + std::size_t(slot / k) * dim;
    const auto w1 = weights.w1(e), w3 = weights.w3(e), w2 = weights.w2(e);
    for (int j = 0; j < inter; ++j) {
      double g = 0, u = 0, g_mag = 0, u_mag = 0;
      for (int c = 0; c < dim; ++c) {
        const double xv = bf16(xr[c]);
        g += xv * bf16(w1(j, c));
        u += xv * bf16(w3(j, c));
        g_mag += std::fabs(xv * bf16(w1(j, c)));
        u_mag += std::fabs(xv * bf16(w3(j, c)));
      }
      const double silu = g / (1.0 + std::exp(-g));
      h[std::size_t(j)] = silu * u;
      // d silu / dg is at most 1.1; the device's exp adds a relative 2^-20 at most.
      h_bound[std::size_t(j)] = 1.1 * std::fabs(u) * gamma_dim * g_mag +
                                std::fabs(silu) * gamma_dim * u_mag +
                                0x1p-20 * std::fabs(h[std::size_t(j)]) + 1e-30;
      hidden_bad += std::fabs(double(hidden[std::size_t(r) * inter + j]) - h[std::size_t(j)]) >
                    h_bound[std::size_t(j)];
    }
    for (int n = 0; n < dim; ++n) {
      double want = 0, bound = 0, mag = 0;
      for (int j = 0; j < inter; ++j) {
        const double w = bf16(w2(n, j));
        want += h[std::size_t(j)] * w;
        mag += std::fabs(h[std::size_t(j)] * w);
        // The device rounds its hidden value (within h_bound of h) to bf16: relative error at
        // most u = 2^-8 (8 significant bits, round to nearest).
        bound += std::fabs(w) * (0x1p-8 * (std::fabs(h[std::size_t(j)]) + h_bound[std::size_t(j)]) +
                                 h_bound[std::size_t(j)]);
      }
      bound += gamma_inter * 1.01 * mag + 1e-30;
      out_bad += std::fabs(double(out[std::size_t(r) * dim + n]) - want) > bound;
    }
  }
  if (settings.capacity_factor > 0) REQUIRE(host_plan.dropped > 0);  // experts 0, 1 overflow
  CHECK(checked == std::size_t(tokens) * k - std::size_t(host_plan.dropped));
  CHECK(hidden_bad == 0);
  CHECK(out_bad == 0);
  CHECK(padding_bad == 0);
}

/// Weights and plan from another backend or config are compile errors; a plan built for
/// another number of experts and wrong extents are typed errors.
inline void check_routed_experts_bad_input(const CudaBackend& cuda) {
  const auto weights = moe::ExpertWeights<Tiny>::random(9);
  const moe::DeviceExpertWeights<Tiny> device_weights(cuda, weights);
  const std::vector<std::int32_t> ids = {0, 1, 2, 3, 4, 5};
  const std::vector<float> w(ids.size(), 0.5f);
  const auto ids_d = cuda::to_device(cuda, ids);
  const auto w_d = cuda::to_device(cuda, w);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 7);
  cuda::DeviceBuffer<float> a(6 * Tiny::dim), h(6 * Tiny::moe_inter_dim), o(6 * Tiny::dim);
  const auto run = [&](index_t rows_in) {
    moe::routed_experts(cuda, device_weights, plan,
                        TensorView<const float, 2, DeviceMemory>(a.data(), {rows_in, Tiny::dim}),
                        TensorView<float, 2, DeviceMemory>(h.data(), {6, Tiny::moe_inter_dim}),
                        TensorView<float, 2, DeviceMemory>(o.data(), {6, Tiny::dim}));
  };
  CHECK(contains(message_of<InvalidArgument>([&] { run(6); }),
                 "'plan' was built for 7 experts; expected 12"));
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 12);
  CHECK(contains(message_of<InvalidArgument>([&] { run(5); }), "'expert_in' has extents"));
  CHECK_NOTHROW(run(6));

  // The permuted read: x must be the plan's tokens.
  const auto from_tokens = [&](index_t tokens) {
    moe::routed_experts_from_tokens(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(a.data(), {tokens, Tiny::dim}),
        TensorView<float, 2, DeviceMemory>(h.data(), {6, Tiny::moe_inter_dim}),
        TensorView<float, 2, DeviceMemory>(o.data(), {6, Tiny::dim}));
  };
  CHECK(contains(message_of<InvalidArgument>([&] { from_tokens(3); }),
                 "daedalus::moe::routed_experts_from_tokens: 'x' has extents"));
  CHECK_NOTHROW(from_tokens(2));
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 7);
  CHECK(contains(message_of<InvalidArgument>([&] { from_tokens(2); }),
                 "'plan' was built for 7 experts; expected 12"));
}

}  // namespace daedalus::testing::moe_experts_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_experts_checks;
  TEST_CASE("grouped SwiGLU experts on the tensor cores against fp64 (Tiny, odd widths)") {
    const daedalus::CudaBackend cuda;
    check_routed_experts<daedalus::Tiny>(cuda, 45, 8201);
    check_routed_experts<OddExperts>(cuda, 83, 8202);
  }
  TEST_CASE("grouped SwiGLU experts with capacity drops; the permuted read = dispatch + experts") {
    const daedalus::CudaBackend cuda;
    const daedalus::moe::PlanSettings capacity{0.7, daedalus::moe::DropPolicy::probs, 8};
    check_routed_experts<daedalus::Tiny>(cuda, 50, 8211, capacity);
    check_routed_experts<OddExperts>(cuda, 71, 8212, capacity);
  }
  TEST_CASE("grouped SwiGLU experts: bad input gets typed errors") {
    check_routed_experts_bad_input(daedalus::CudaBackend{});
  }
}
