// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for the MoE routing plan, dispatch and combine on the GPU, shared by
// daedalus_cuda_tests (nvcc, a real device) and daedalus_emulated_tests (g++ against the
// emulation layer). The CPU backend is the reference: the device plan must equal RoutingPlan
// exactly (it is integer bookkeeping), dispatch must copy bit for bit, and combine must agree
// with the CPU's combine within the rounding of its k-term sums (the two may contract a·b + c
// into an FMA differently), and be bitwise identical from run to run.
// Included by exactly one translation unit per binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/cuda/balance.cuh>
#include <daedalus/moe/cuda/dispatch.cuh>
#include <daedalus/moe/cuda/routing_plan.cuh>
#include <span>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"

namespace daedalus::testing::moe_plan_checks {

namespace moe = daedalus::moe;

struct Routing {
  int tokens, k, experts;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

/// Random routing (distinct experts per token); `favoured` experts get about half the picks, so
/// some experts overflow a capacity; `coarse` weights take 8 values, so equal weights (the probs
/// policy's tie rule) are common.
inline Routing random_routing(std::uint64_t stream, int tokens, int k, int experts, int favoured,
                              bool coarse) {
  Random rng(stream);
  Routing r{tokens, k, experts, {}, {}};
  r.ids = moe_reference::distinct_ids([&](int n) { return int(rng.integer(0, n - 1)); }, tokens, k,
                                      experts, favoured);
  r.weights = rng.uniform_in(r.ids.size(), 0.01, 1.0);
  if (coarse) {
    for (float& w : r.weights) w = float(1 + rng.integer(0, 7)) / 8.0f;
  }
  return r;
}

struct DeviceRouting {
  cuda::DeviceBuffer<std::int32_t> ids;
  cuda::DeviceBuffer<float> weights;
  TensorView<const std::int32_t, 2, DeviceMemory> id_view(const Routing& r) const {
    return {ids.data(), {r.tokens, r.k}};
  }
  TensorView<const float, 2, DeviceMemory> weight_view(const Routing& r) const {
    return {weights.data(), {r.tokens, r.k}};
  }
};

inline DeviceRouting upload(const CudaBackend& cuda, const Routing& r) {
  return {cuda::to_device(cuda, r.ids), cuda::to_device(cuda, r.weights)};
}

/// The device plan equals the CPU plan in every array; rows past the CPU plan's end are padding.
inline void require_same_plan(const CudaBackend& cuda, const moe::RoutingPlan& cpu,
                              const moe::DeviceRoutingPlan& gpu) {
  const auto h = gpu.download(cuda);
  REQUIRE(gpu.tokens() == cpu.tokens());
  REQUIRE(gpu.k() == cpu.k());
  CHECK(gpu.capacity() == cpu.capacity());
  CHECK(gpu.rows() >= cpu.rows());
  CHECK(h.dropped == cpu.dropped());
  const auto experts = std::size_t(cpu.num_experts());
  REQUIRE(h.offsets.size() >= experts + 1);
  bool same_segments = true;
  for (std::size_t e = 0; e < experts; ++e) {
    same_segments = same_segments && h.counts[e] == cpu.counts()[e] &&
                    h.routed_counts[e] == cpu.routed_counts()[e] &&
                    h.offsets[e] == cpu.offsets()[e];
  }
  CHECK(same_segments);
  CHECK(h.offsets[experts] == cpu.offsets()[experts]);
  std::size_t row_mismatches = 0;
  for (std::size_t r = 0; r < std::size_t(gpu.rows()); ++r) {
    const bool in_plan = r < std::size_t(cpu.rows());
    const std::int32_t slot = in_plan ? cpu.row_slot()[r] : -1;
    const float weight = in_plan ? cpu.row_weight()[r] : 0.0f;
    row_mismatches += (h.row_slot[r] != slot || h.row_weight[r] != weight) ? 1 : 0;
  }
  CHECK(row_mismatches == 0);
  std::size_t slot_mismatches = 0;
  for (std::size_t s = 0; s < cpu.slot_row().size(); ++s)
    slot_mismatches += h.slot_row[s] != cpu.slot_row()[s] ? 1 : 0;
  CHECK(slot_mismatches == 0);
}

/// Dropless, padded and capacity-limited plans (both drop policies, with ties), on batches that
/// span several 256-slot chunks and on tiny ones, equal the CPU's RoutingPlan.
inline void check_plan_matches_cpu(const CudaBackend& cuda) {
  struct Case {
    int tokens, k, experts, favoured;
    bool coarse;
    moe::PlanSettings settings;
  };
  const Case cases[] = {
      {300, 6, 64, 0, false, {}},
      {1, 8, 256, 0, false, {}},
      {0, 3, 12, 0, false, {}},
      {157, 3, 12, 4, false, {0.0, moe::DropPolicy::probs, 16}},
      {211, 6, 64, 8, true, {1.0, moe::DropPolicy::probs, 1}},
      {211, 6, 64, 8, false, {0.7, moe::DropPolicy::position, 1}},
      {97, 8, 32, 3, true, {1.25, moe::DropPolicy::probs, 8}},
      {97, 8, 32, 3, false, {1e300, moe::DropPolicy::probs, 8}},  // capacity capped at T·k
  };
  std::uint64_t stream = 7100;
  for (const Case& c : cases) {
    CAPTURE(c.tokens);
    CAPTURE(c.k);
    CAPTURE(c.experts);
    CAPTURE(c.settings.capacity_factor);
    CAPTURE(c.settings.pad_block);
    const Routing r = random_routing(++stream, c.tokens, c.k, c.experts, c.favoured, c.coarse);
    moe::RoutingPlan cpu;
    cpu.build(HostView<const std::int32_t, 2>(r.ids.data(), {r.tokens, r.k}),
              HostView<const float, 2>(r.weights.data(), {r.tokens, r.k}), r.experts, c.settings);
    const DeviceRouting d = upload(cuda, r);
    moe::DeviceRoutingPlan gpu;
    gpu.build(cuda, d.id_view(r), d.weight_view(r), r.experts, c.settings);
    require_same_plan(cuda, cpu, gpu);
    // A plan reused for a second batch (its arrays double-buffered) is rebuilt exactly.
    gpu.build(cuda, d.id_view(r), d.weight_view(r), r.experts, c.settings);
    require_same_plan(cuda, cpu, gpu);
  }
}

/// Dispatch copies rows bit for bit (zeros in padding rows); combine equals the CPU's within the
/// bound of a k-term fp32 sum and is bitwise the same on a second run; dispatch then combine
/// with weights 1/k returns the input (within rounding). Widths with and without 16-byte access.
inline void check_dispatch_combine(const CudaBackend& cuda) {
  const CpuBackend cpu_backend(1);
  for (const int width : {36, 37}) {
    for (const double capacity : {0.0, 0.8}) {
      CAPTURE(width);
      CAPTURE(capacity);
      const Routing r = random_routing(7200 + std::uint64_t(width), 123, 6, 64, 6, false);
      const moe::PlanSettings settings{capacity, moe::DropPolicy::probs, 4};
      moe::RoutingPlan cpu;
      cpu.build(HostView<const std::int32_t, 2>(r.ids.data(), {r.tokens, r.k}),
                HostView<const float, 2>(r.weights.data(), {r.tokens, r.k}), r.experts, settings);
      const DeviceRouting d = upload(cuda, r);
      moe::DeviceRoutingPlan gpu;
      gpu.build(cuda, d.id_view(r), d.weight_view(r), r.experts, settings);

      Random rng(7300 + std::uint64_t(width));
      const std::vector<float> x = rng.uniform(std::size_t(r.tokens) * width);
      const auto x_d = cuda::to_device(cuda, x);
      // Dispatch: the CPU's rows bit for bit, then padding rows zero.
      std::vector<float> cpu_in(std::size_t(cpu.rows()) * width);
      moe::dispatch(cpu_backend, cpu, HostView<const float, 2>(x.data(), {r.tokens, width}),
                    HostView<float, 2>(cpu_in.data(), {cpu.rows(), width}));
      cuda::DeviceBuffer<float> in_d(std::size_t(gpu.rows()) * width);
      moe::dispatch(cuda, gpu,
                    TensorView<const float, 2, DeviceMemory>(x_d.data(), {r.tokens, width}),
                    TensorView<float, 2, DeviceMemory>(in_d.data(), {gpu.rows(), width}));
      const auto gpu_in = cuda::to_host(cuda, in_d);
      std::size_t differing = 0;
      for (std::size_t i = 0; i < gpu_in.size(); ++i) {
        const float want = i < cpu_in.size() ? cpu_in[i] : 0.0f;
        differing += gpu_in[i] != want ? 1 : 0;
      }
      CHECK(differing == 0);

      // Combine: expert outputs are random rows; overwrite and accumulate.
      const std::vector<float> y = rng.uniform(std::size_t(gpu.rows()) * width);
      const auto y_d = cuda::to_device(cuda, y);
      const std::vector<float> prior = rng.uniform(std::size_t(r.tokens) * width);
      for (const auto mode : {moe::CombineInto::overwrite, moe::CombineInto::accumulate}) {
        std::vector<float> cpu_out = prior;
        moe::combine(cpu_backend, cpu, HostView<const float, 2>(y.data(), {cpu.rows(), width}),
                     HostView<float, 2>(cpu_out.data(), {r.tokens, width}), mode);
        cuda::DeviceBuffer<float> out_d = cuda::to_device(cuda, prior);
        const auto run = [&] {
          cuda::copy(cuda, out_d, std::span<const float>(prior));
          moe::combine(cuda, gpu,
                       TensorView<const float, 2, DeviceMemory>(y_d.data(), {gpu.rows(), width}),
                       TensorView<float, 2, DeviceMemory>(out_d.data(), {r.tokens, width}), mode);
          return cuda::to_host(cuda, out_d);
        };
        const std::vector<float> first = run();
        const std::vector<float> second = run();
        CHECK(first == second);
        // Each element is a sum of at most k + 1 terms of magnitude ≤ 1 (weights < 1, |y| ≤ 1):
        // two fp32 evaluations of it differ by at most 2 · γ_{k+1} · (k + 1).
        const double bound = 2.0 * 1.01 * double(r.k + 1) * 0x1p-24 * double(r.k + 1);
        double worst = 0.0;
        for (std::size_t i = 0; i < first.size(); ++i)
          worst = std::max(worst, std::fabs(double(first[i]) - double(cpu_out[i])));
        CHECK(worst <= bound);
      }
    }
  }
}

/// Bad input: the CPU plan's typed errors and messages, and the plan keeps its previous batch.
inline void check_plan_bad_input(const CudaBackend& cuda) {
  const Routing good = random_routing(7400, 40, 4, 16, 0, false);
  const DeviceRouting d = upload(cuda, good);
  moe::DeviceRoutingPlan gpu;
  gpu.build(cuda, d.id_view(good), d.weight_view(good), good.experts);
  const auto before = gpu.download(cuda);

  const auto expect_unchanged = [&] {
    const auto after = gpu.download(cuda);
    CHECK(after.row_slot == before.row_slot);
    CHECK(after.slot_row == before.slot_row);
    CHECK(after.offsets == before.offsets);
    CHECK(gpu.tokens() == good.tokens);
  };
  {
    Routing bad = good;
    bad.ids[std::size_t(3 * bad.k + 1)] = 16;  // token 3, slot 1
    bad.ids[std::size_t(9 * bad.k + 2)] = -1;  // a later one: the first is reported
    const DeviceRouting b = upload(cuda, bad);
    const std::string what = message_of<OutOfRange>(
        [&] { gpu.build(cuda, b.id_view(bad), b.weight_view(bad), bad.experts); });
    CHECK(contains(what, "'topk_ids' holds expert id 16 at token 3, slot 1"));
    expect_unchanged();
  }
  {
    Routing bad = good;
    bad.weights[std::size_t(5 * bad.k + 3)] = std::nanf("");
    const DeviceRouting b = upload(cuda, bad);
    const std::string what = message_of<NumericError>(
        [&] { gpu.build(cuda, b.id_view(bad), b.weight_view(bad), bad.experts); });
    CHECK(contains(what, "non-finite value (nan) at token 5, slot 3"));
    expect_unchanged();
  }
  {
    const std::string what = message_of<InvalidArgument>([&] {
      gpu.build(
          cuda, d.id_view(good),
          TensorView<const float, 2, DeviceMemory>(d.weights.data(), {good.tokens - 1, good.k}),
          good.experts);
    });
    CHECK(contains(what, "'topk_weights' has extents"));
    expect_unchanged();
  }
  {
    cuda::DeviceBuffer<float> x(std::size_t(good.tokens) * 8);
    cuda::DeviceBuffer<float> rows(std::size_t(gpu.rows() + 1) * 8);
    const std::string what = message_of<InvalidArgument>([&] {
      moe::dispatch(cuda, gpu, TensorView<const float, 2, DeviceMemory>(x.data(), {good.tokens, 8}),
                    TensorView<float, 2, DeviceMemory>(rows.data(), {gpu.rows() + 1, 8}));
    });
    CHECK(contains(what, "'expert_in' has extents"));
  }
}

/// DeviceLoadStats counts as LoadStats (the plan's routed counts), with the same MaxVio figures;
/// DeviceBiasBalancer moves the bias exactly as BiasBalancer (same double arithmetic, one
/// rounding to float) under each rule, over several skewed steps.
inline void check_balance_matches_cpu(const CudaBackend& cuda) {
  const int experts = 24, k = 4, tokens = 150;
  for (const auto rule :
       {moe::BiasUpdate::sign, moe::BiasUpdate::proportional, moe::BiasUpdate::multiplicative}) {
    CAPTURE(int(rule));
    const moe::BalancerSettings settings{rule, 0.01};
    moe::LoadStats cpu_stats(experts);
    moe::DeviceLoadStats gpu_stats(cuda, experts);
    const moe::BiasBalancer cpu_balancer(experts, settings);
    const moe::DeviceBiasBalancer gpu_balancer(cuda, experts, settings);
    Random rng(7500 + std::uint64_t(rule));
    std::vector<float> bias = rng.uniform_in(std::size_t(experts), 0.5, 1.5);
    auto bias_d = cuda::to_device(cuda, bias);
    moe::DeviceRoutingPlan plan;
    for (int step = 0; step < 5; ++step) {
      const Routing r = random_routing(7600 + std::uint64_t(step), tokens, k, experts, 5, false);
      cpu_stats.record(HostView<const std::int32_t, 2>(r.ids.data(), {r.tokens, r.k}));
      const DeviceRouting d = upload(cuda, r);
      plan.build(cuda, d.id_view(r), d.weight_view(r), experts);
      gpu_stats.record(cuda, plan);
      cpu_balancer.update(HostView<float, 1>(bias.data(), {experts}), cpu_stats.step_counts());
      gpu_balancer.update(cuda, TensorView<float, 1, DeviceMemory>(bias_d.data(), {experts}),
                          gpu_stats);
    }
    const auto step = gpu_stats.step_counts(cuda);
    const auto total = gpu_stats.total_counts(cuda);
    CHECK(std::equal(step.begin(), step.end(), cpu_stats.step_counts().begin()));
    CHECK(std::equal(total.begin(), total.end(), cpu_stats.total_counts().begin()));
    CHECK(gpu_stats.steps(cuda) == cpu_stats.steps());
    CHECK(gpu_stats.max_vio_batch(cuda) == cpu_stats.max_vio_batch());
    CHECK(gpu_stats.mean_max_vio_batch(cuda) ==
          doctest::Approx(cpu_stats.mean_max_vio_batch()).epsilon(1e-12));
    CHECK(gpu_stats.max_vio_global(cuda) == cpu_stats.max_vio_global());
    CHECK(cuda::to_host(cuda, bias_d) == bias);
    gpu_stats.reset(cuda);
    CHECK(gpu_stats.steps(cuda) == 0);
    CHECK(gpu_stats.max_vio_global(cuda) == 0.0);
  }
}

/// A bad bias: the device refuses the step (bias unchanged) and `check` reports it with
/// BiasBalancer::update's message; size mismatches throw at once.
inline void check_balance_bad_input(const CudaBackend& cuda) {
  const int experts = 16;
  const Routing r = random_routing(7700, 40, 2, experts, 0, false);
  const DeviceRouting d = upload(cuda, r);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, d.id_view(r), d.weight_view(r), experts);
  moe::DeviceLoadStats stats(cuda, experts);
  stats.record(cuda, plan);
  const moe::DeviceBiasBalancer balancer(cuda, experts);
  std::vector<float> bias(std::size_t(experts), 0.25f);
  bias[3] = std::nanf("");
  auto bias_d = cuda::to_device(cuda, bias);
  const TensorView<float, 1, DeviceMemory> view(bias_d.data(), {experts});
  balancer.update(cuda, view, stats);
  const std::vector<float> after = cuda::to_host(cuda, bias_d);
  CHECK(std::equal(after.begin(), after.end(), bias.begin(),
                   [](float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }));
  const std::string what = message_of<InvalidArgument>([&] { balancer.check(cuda, view); });
  CHECK(contains(what, "'bias' holds nan at expert 3; expected a finite value"));
  CHECK_NOTHROW(balancer.check(cuda, view));  // reported once
  CHECK(contains(message_of<InvalidArgument>([&] {
                   balancer.update(cuda, TensorView<float, 1, DeviceMemory>(bias_d.data(), {15}),
                                   stats);
                 }),
                 "'bias' has extents [15]"));
  CHECK(contains(message_of<InvalidArgument>([&] { moe::DeviceLoadStats bad(cuda, 0); }),
                 "'num_experts' is 0"));
  moe::DeviceLoadStats other(cuda, experts + 1);
  CHECK(contains(message_of<InvalidArgument>([&] { other.record(cuda, plan); }),
                 "'plan' routes to 16 experts; expected 17"));
}

}  // namespace daedalus::testing::moe_plan_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_plan_checks;
  TEST_CASE("DeviceRoutingPlan equals RoutingPlan: dropless, padded, capacity (probs, position)") {
    check_plan_matches_cpu(daedalus::CudaBackend{});
  }
  TEST_CASE("device dispatch copies rows bitwise; combine matches the CPU and repeats bitwise") {
    check_dispatch_combine(daedalus::CudaBackend{});
  }
  TEST_CASE("DeviceRoutingPlan bad input: typed errors naming token and slot, plan unchanged") {
    check_plan_bad_input(daedalus::CudaBackend{});
  }
  TEST_CASE("DeviceLoadStats and DeviceBiasBalancer equal LoadStats and BiasBalancer") {
    check_balance_matches_cpu(daedalus::CudaBackend{});
  }
  TEST_CASE("DeviceBiasBalancer: a bad bias is refused on the device and reported by check") {
    check_balance_bad_input(daedalus::CudaBackend{});
  }
}
