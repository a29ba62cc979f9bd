// SPDX-License-Identifier: Apache-2.0
// moe::dispatch and moe::combine: dispatch copies each kept slot's token row (bitwise) and zeroes
// padding rows; combine matches an fp64 weighted sum over each token's kept slots; dispatch then
// combine with weights 1/k returns the input; both are bitwise identical for 1, 2, 3 and 5
// threads; bad input throws and leaves the outputs untouched.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace tol = daedalus::testing::tolerance;

struct Batch {
  int tokens, k, experts, width;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  std::vector<float> x;
  HostView<const std::int32_t, 2> id_view() const { return {ids.data(), {tokens, k}}; }
  HostView<const float, 2> weight_view() const { return {weights.data(), {tokens, k}}; }
  HostView<const float, 2> x_view() const { return {x.data(), {tokens, width}}; }
};

Batch random_batch(std::uint64_t stream, int tokens, int k, int experts, int width,
                   int favoured = 0) {
  dt::Random rng(stream);
  Batch b{tokens, k, experts, width, {}, {}, {}};
  b.ids = moe_reference::distinct_ids([&](int n) { return int(rng.integer(0, n - 1)); }, tokens, k,
                                      experts, favoured);
  b.weights = rng.uniform_in(b.ids.size(), 0.01, 1.0);
  b.x = rng.uniform(std::size_t(tokens) * width);
  return b;
}

std::vector<float> dispatched(const CpuBackend& cpu, const moe::RoutingPlan& plan, const Batch& b) {
  std::vector<float> rows(std::size_t(plan.rows()) * b.width, 7.0f);  // 7: catches unwritten rows
  moe::dispatch(cpu, plan, b.x_view(), HostView<float, 2>(rows.data(), {plan.rows(), b.width}));
  return rows;
}

std::vector<float> combined(const CpuBackend& cpu, const moe::RoutingPlan& plan,
                            const std::vector<float>& expert_out, int tokens, int width,
                            moe::CombineInto mode, const std::vector<float>& initial) {
  std::vector<float> out = initial;
  out.resize(std::size_t(tokens) * width, 7.0f);
  moe::combine(cpu, plan, HostView<const float, 2>(expert_out.data(), {plan.rows(), width}),
               HostView<float, 2>(out.data(), {tokens, width}), mode);
  return out;
}

using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("dispatch: rows gathered bitwise in plan order, padding rows zero", C,
                   daedalus::Tiny, daedalus::DeepSeekV2Lite) {
  const CpuBackend cpu(2);
  const Batch b = random_batch(7600, 37, C::n_activated_experts, C::n_routed_experts, C::dim, 2);
  for (moe::PlanSettings settings : {moe::PlanSettings{}, moe::PlanSettings{.pad_block = 8},
                                     moe::PlanSettings{.capacity_factor = 0.7, .pad_block = 4}}) {
    moe::RoutingPlan plan;
    plan.build(b.id_view(), b.weight_view(), b.experts, settings);
    const std::vector<float> rows = dispatched(cpu, plan, b);
    for (index_t r = 0; r < plan.rows(); ++r) {
      const std::int32_t s = plan.row_slot()[std::size_t(r)];
      const float* got = rows.data() + r * b.width;
      if (s < 0) {
        for (int i = 0; i < b.width; ++i) REQUIRE(got[i] == 0.0f);
      } else {
        const float* want = b.x.data() + (s / b.k) * b.width;
        REQUIRE(std::memcmp(got, want, std::size_t(b.width) * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE_TEMPLATE("combine: the weighted sum over kept slots, against fp64", C, daedalus::Tiny,
                   daedalus::DeepSeekV2Lite) {
  const CpuBackend cpu(2);
  const int k = C::n_activated_experts;
  const Batch b = random_batch(7700, 41, k, C::n_routed_experts, C::dim, 2);
  dt::Random rng(7701);
  for (moe::PlanSettings settings :
       {moe::PlanSettings{}, moe::PlanSettings{.capacity_factor = 0.6, .pad_block = 16}}) {
    moe::RoutingPlan plan;
    plan.build(b.id_view(), b.weight_view(), b.experts, settings);
    const std::vector<float> expert_out = rng.uniform(std::size_t(plan.rows()) * b.width);
    const std::vector<float> base = rng.uniform(std::size_t(b.tokens) * b.width);
    for (auto mode : {moe::CombineInto::overwrite, moe::CombineInto::accumulate}) {
      const std::vector<float> got = combined(cpu, plan, expert_out, b.tokens, b.width, mode, base);
      std::vector<double> want(got.size(), 0.0);
      for (int t = 0; t < b.tokens; ++t) {
        for (int i = 0; i < b.width; ++i) {
          double sum =
              mode == moe::CombineInto::accumulate ? base[std::size_t(t) * b.width + i] : 0.0;
          for (int j = 0; j < k; ++j) {
            const std::int32_t row = plan.slot_row()[std::size_t(t) * k + j];
            if (row < 0) continue;
            sum += double(b.weights[std::size_t(t) * k + j]) *
                   double(expert_out[std::size_t(row) * b.width + i]);
          }
          want[std::size_t(t) * b.width + i] = sum;
        }
      }
      // Each element is a sum of at most k + 1 fp32 products (tolerance.hpp: K·u per sum).
      CHECK(tol::row_relative_error(got, want, std::size_t(b.width)) <=
            tol::fp32_vs_reference(k + 1));
    }
    if (settings.capacity_factor > 0) {
      // Tokens whose slots were all dropped get exactly 0 (overwrite) or keep their value.
      for (int t = 0; t < b.tokens; ++t) {
        bool any = false;
        for (int j = 0; j < k; ++j) any |= plan.slot_row()[std::size_t(t) * k + j] >= 0;
        if (any) continue;
        const auto o =
            combined(cpu, plan, expert_out, b.tokens, b.width, moe::CombineInto::overwrite, base);
        const auto a =
            combined(cpu, plan, expert_out, b.tokens, b.width, moe::CombineInto::accumulate, base);
        for (int i = 0; i < b.width; ++i) {
          CHECK(o[std::size_t(t) * b.width + i] == 0.0f);
          CHECK(a[std::size_t(t) * b.width + i] == base[std::size_t(t) * b.width + i]);
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("dispatch then combine with weights 1/k returns the input", C, daedalus::Tiny,
                   daedalus::DeepSeekV2Lite, daedalus::DeepSeekV3) {
  const CpuBackend cpu(2);
  const int k = C::n_activated_experts;
  Batch b = random_batch(7800, 29, k, C::n_routed_experts, C::dim);
  for (float& w : b.weights) w = 1.0f / float(k);
  for (index_t block : {1, 8}) {
    moe::RoutingPlan plan;
    plan.build(b.id_view(), b.weight_view(), b.experts, {.pad_block = block});
    const std::vector<float> rows = dispatched(cpu, plan, b);
    const std::vector<float> back =
        combined(cpu, plan, rows, b.tokens, b.width, moe::CombineInto::overwrite, {});
    // k terms (1/k rounded to fp32) · x summed in fp32: within k·u of x relative to the row.
    CHECK(tol::row_relative_error(back, b.x, std::size_t(b.width)) <= tol::fp32_vs_reference(k));
  }
}

TEST_CASE("dispatch and combine: bitwise identical for 1, 2, 3 and 5 threads") {
  using C = daedalus::DeepSeekV2Lite;
  const int k = C::n_activated_experts;
  const Batch b = random_batch(7900, 77, k, C::n_routed_experts, C::dim, 4);
  dt::Random rng(7901);
  moe::RoutingPlan plan;
  plan.build(b.id_view(), b.weight_view(), b.experts, {.capacity_factor = 1.1, .pad_block = 4});
  const std::vector<float> expert_out = rng.uniform(std::size_t(plan.rows()) * b.width);
  const std::vector<float> base = rng.uniform(std::size_t(b.tokens) * b.width);
  const CpuBackend one(1);
  const auto rows1 = dispatched(one, plan, b);
  const auto out1 =
      combined(one, plan, expert_out, b.tokens, b.width, moe::CombineInto::accumulate, base);
  for (int threads : {2, 3, 5}) {
    CAPTURE(threads);
    const CpuBackend cpu(threads);
    CHECK(dispatched(cpu, plan, b) == rows1);
    const auto out =
        combined(cpu, plan, expert_out, b.tokens, b.width, moe::CombineInto::accumulate, base);
    CHECK(std::memcmp(out.data(), out1.data(), out.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("dispatch and combine: bad input throws naming the argument, outputs untouched") {
  const CpuBackend cpu(2);
  const Batch b = random_batch(8000, 9, 3, 12, 96);
  moe::RoutingPlan plan;
  plan.build(b.id_view(), b.weight_view(), 12, {.pad_block = 4});
  std::vector<float> rows(std::size_t(plan.rows()) * 96, 5.0f);
  std::vector<float> out(std::size_t(9) * 96, 5.0f);
  const auto rows_before = rows;
  const auto out_before = out;
  const index_t R = plan.rows();

  auto msg = message_of<daedalus::InvalidArgument>([&] {
    moe::dispatch(cpu, plan, HostView<const float, 2>(b.x.data(), {8, 96}),
                  HostView<float, 2>(rows.data(), {R, 96}));
  });
  CHECK(contains(msg, "daedalus::moe::dispatch: 'x' has extents [8,96]; expected [9,96]"));
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::dispatch(cpu, plan, b.x_view(), HostView<float, 2>(rows.data(), {R - 1, 96}));
  });
  CHECK(contains(msg, "'expert_in' has extents [" + std::to_string(R - 1) + ",96]; expected [" +
                          std::to_string(R) + ",96]"));
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::combine(cpu, plan, HostView<const float, 2>(rows.data(), {R, 96}),
                 HostView<float, 2>(out.data(), {9, 95}));
  });
  CHECK(contains(msg, "daedalus::moe::combine: 'out' has extents [9,95]; expected [9,96]"));
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::combine(cpu, plan, HostView<const float, 2>(rows.data(), {R + 1, 96}),
                 HostView<float, 2>(out.data(), {9, 96}));
  });
  CHECK(contains(msg, "'expert_out' has extents"));
  const moe::RoutingPlan empty;
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::combine(cpu, empty, HostView<const float, 2>(rows.data(), {0, 96}),
                 HostView<float, 2>(out.data(), {0, 96}));
  });
  CHECK(contains(msg, "'plan' is empty"));
  CHECK(rows == rows_before);
  CHECK(out == out_before);
}
