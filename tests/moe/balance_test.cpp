// SPDX-License-Identifier: Apache-2.0
// Load statistics, the bias balancer's three rules, the balance losses against the fp64
// reference, and the balancing simulation: a skewed router whose MaxVio falls from above 1 to
// below 0.1 with the loss-free bias update, and stays high without it.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/moe/balance.hpp>
#include <daedalus/moe/cpu/gate.hpp>
#include <daedalus/moe/gate.hpp>
#include <vector>

#include "support/random.hpp"
#include "support/reference/moe_gate_reference.hpp"
#include "support/skewed_router.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace ref = moe_gate_reference;

/// The shared skewed router (support/skewed_router.hpp) routed on the CPU.
struct CpuSkewedRouter : dt::SkewedRouter {
  static constexpr int tokens_per_step = 4096;
  std::vector<std::int32_t> ids = std::vector<std::int32_t>(std::size_t(tokens_per_step) * k);
  std::vector<float> weights = std::vector<float>(std::size_t(tokens_per_step) * k);

  explicit CpuSkewedRouter(std::uint64_t seed) : SkewedRouter(seed, tokens_per_step) {}

  /// One step: draw a batch, route it with the current bias, return its ids.
  HostView<const std::int32_t, 2> step(const CpuBackend& cpu) {
    draw();
    moe::route_logits(cpu, settings, HostView<const float, 2>(logits.data(), {tokens, experts}),
                      HostView<const float, 1>(bias.data(), {experts}),
                      HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                      HostView<float, 2>(weights.data(), {tokens, k}));
    return {ids.data(), {tokens, k}};
  }
};

/// MaxVio_batch of each of `steps` steps, with or without the bias update.
/// When `late` is given, it records the steps from `late_from` on.
std::vector<double> simulate(int steps, bool update, moe::BalancerSettings balancer_settings = {},
                             moe::LoadStats* late = nullptr, int late_from = 0) {
  CpuSkewedRouter router(dt::stream_seed(4700));
  moe::LoadStats stats(CpuSkewedRouter::experts);
  const moe::BiasBalancer balancer(CpuSkewedRouter::experts, balancer_settings);
  const CpuBackend cpu(2);
  std::vector<double> max_vio;
  for (int s = 0; s < steps; ++s) {
    const auto ids = router.step(cpu);
    stats.record(ids);
    if (late != nullptr && s >= late_from) late->record(ids);
    max_vio.push_back(stats.max_vio_batch());
    if (update)
      balancer.update(HostView<float, 1>(router.bias.data(), {CpuSkewedRouter::experts}),
                      stats.step_counts());
  }
  return max_vio;
}

}  // namespace

TEST_CASE("max_violation and LoadStats count and accumulate") {
  CHECK(moe::max_violation(std::vector<std::int64_t>{4, 4, 4, 4}) == 0.0);
  CHECK(moe::max_violation(std::vector<std::int64_t>{8, 0, 4, 4}) == doctest::Approx(1.0));
  CHECK(moe::max_violation(std::vector<std::int64_t>{0, 0, 0}) == 0.0);

  moe::LoadStats stats(4);
  const std::vector<std::int32_t> step1 = {0, 1, 0, 2, 0, 3};  // 3 tokens, k = 2
  stats.record(HostView<const std::int32_t, 2>(step1.data(), {3, 2}));
  CHECK(std::vector<std::int64_t>(stats.step_counts().begin(), stats.step_counts().end()) ==
        std::vector<std::int64_t>{3, 1, 1, 1});
  CHECK(stats.max_vio_batch() == doctest::Approx(1.0));  // mean 1.5, max 3
  const std::vector<std::int32_t> step2 = {1, 2, 3, 1, 2, 3};
  stats.record(HostView<const std::int32_t, 2>(step2.data(), {3, 2}));
  CHECK(std::vector<std::int64_t>(stats.total_counts().begin(), stats.total_counts().end()) ==
        std::vector<std::int64_t>{3, 3, 3, 3});
  CHECK(stats.max_vio_batch() == doctest::Approx(1.0 / 3.0));  // {0,2,2,2}: mean 1.5, max 2
  CHECK(stats.max_vio_global() == 0.0);
  CHECK(stats.mean_max_vio_batch() == doctest::Approx((1.0 + 1.0 / 3.0) / 2.0));
  CHECK(stats.steps() == 2);
  stats.reset();
  CHECK(stats.steps() == 0);
  CHECK(stats.max_vio_global() == 0.0);
}

TEST_CASE("BiasBalancer: sign, proportional and multiplicative rules") {
  const std::vector<std::int64_t> counts = {10, 2, 6, 6};  // mean 6
  SUBCASE("sign (DeepSeek-V3)") {
    std::vector<float> bias = {0.5f, -0.25f, 0.0f, 1.0f};
    moe::BiasBalancer(4).update(HostView<float, 1>(bias.data(), {4}), counts);
    CHECK(bias[0] == doctest::Approx(0.499));   // overloaded: down by γ = 0.001
    CHECK(bias[1] == doctest::Approx(-0.249));  // underloaded: up
    CHECK(bias[2] == 0.0f);                     // at the mean: unchanged
    CHECK(bias[3] == 1.0f);
  }
  SUBCASE("proportional, on the relative shortfall") {
    std::vector<float> bias = {0.0f, 0.0f, 0.0f, 0.0f};
    moe::BiasBalancer(4, {moe::BiasUpdate::proportional, 0.01})
        .update(HostView<float, 1>(bias.data(), {4}), counts);
    CHECK(bias[0] == doctest::Approx(0.01 * (6.0 - 10.0) / 6.0));
    CHECK(bias[1] == doctest::Approx(0.01 * (6.0 - 2.0) / 6.0));
    CHECK(bias[2] == 0.0f);
  }
  SUBCASE("multiplicative") {
    std::vector<float> bias = {1.0f, 2.0f, 1.0f, 0.5f};
    moe::BiasBalancer(4, {moe::BiasUpdate::multiplicative, 0.1})
        .update(HostView<float, 1>(bias.data(), {4}), counts);
    CHECK(bias[0] == doctest::Approx(0.9));
    CHECK(bias[1] == doctest::Approx(2.2));
    CHECK(bias[2] == 1.0f);
    CHECK(bias[3] == 0.5f);
  }
  SUBCASE("rate 0 and an empty step change nothing") {
    std::vector<float> bias = {0.5f, -0.25f, 0.0f, 1.0f};
    const std::vector<float> before = bias;
    moe::BiasBalancer(4, {moe::BiasUpdate::sign, 0.0})
        .update(HostView<float, 1>(bias.data(), {4}), counts);
    moe::BiasBalancer(4).update(HostView<float, 1>(bias.data(), {4}),
                                std::vector<std::int64_t>(4, 0));
    CHECK(bias == before);
  }
}

TEST_CASE("the sequence-wise and auxiliary balance losses match the fp64 reference") {
  const int tokens = 37, experts = 12, k = 3;
  dt::Random rng(4710);
  std::vector<float> scores = rng.uniform_in(std::size_t(tokens) * experts, 0.01, 1.0);
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(rng.integer(0, experts - 1));
  const HostView<const float, 2> s(scores.data(), {tokens, experts});
  // Both are sums of E products of means over T tokens in fp64: a few units of 2^-52.
  CHECK(moe::sequence_balance_loss(s, k, 1e-4) ==
        doctest::Approx(ref::sequence_balance_loss(dt::widen(scores), tokens, experts, k, 1e-4))
            .epsilon(1e-12));
  CHECK(moe::auxiliary_balance_loss(s, HostView<const std::int32_t, 2>(ids.data(), {tokens, k}),
                                    0.003) ==
        doctest::Approx(
            ref::auxiliary_balance_loss(dt::widen(scores), ids, tokens, experts, k, 0.003))
            .epsilon(1e-12));

  // Uniform scores: P_i = 1/E, so Σ f_i P_i = 1 whatever f, and both losses equal α.
  const std::vector<float> flat(std::size_t(4) * 8, 0.5f);
  const std::vector<std::int32_t> skewed = {0, 1, 0, 1, 0, 1, 0, 1};  // 4 tokens, k = 2
  CHECK(moe::sequence_balance_loss(HostView<const float, 2>(flat.data(), {4, 8}), 2, 1.0) ==
        doctest::Approx(1.0));
  CHECK(moe::auxiliary_balance_loss(HostView<const float, 2>(flat.data(), {4, 8}),
                                    HostView<const std::int32_t, 2>(skewed.data(), {4, 2}),
                                    1.0) == doctest::Approx(1.0));
  // All the score on experts 0 and 1, which every token chooses: f = E/K on them, P = 1/2:
  // the loss is α·E/K, its maximum.
  std::vector<float> peaked(std::size_t(4) * 8, 0.0f);
  for (int t = 0; t < 4; ++t) peaked[std::size_t(t) * 8] = peaked[std::size_t(t) * 8 + 1] = 0.7f;
  CHECK(moe::sequence_balance_loss(HostView<const float, 2>(peaked.data(), {4, 8}), 2, 1.0) ==
        doctest::Approx(4.0));
  CHECK(moe::auxiliary_balance_loss(HostView<const float, 2>(peaked.data(), {4, 8}),
                                    HostView<const std::int32_t, 2>(skewed.data(), {4, 2}),
                                    1.0) == doctest::Approx(4.0));
}

TEST_CASE("balancing simulation: MaxVio falls from above 1 to below 0.1 within 150 steps") {
  // The skew is a fixed shift of the logits, so without the update every batch is alike: 100
  // steps show it persists. With the sign rule (γ = 0.001) the favoured experts' biases fall
  // by γ a step until their load meets the mean (observed: below 0.1 at step ~100). After that
  // a batch's MaxVio is sampling noise: c̄ = 4096·4/16 = 1024 slots per expert, so a count
  // varies by √c̄ ≈ 3% and the largest of 16 by 2-3 times that; the counts accumulated over
  // the last 150 steps are balanced far better (MaxVio_global).
  constexpr int steps = 400;
  moe::LoadStats late(CpuSkewedRouter::experts);
  const std::vector<double> with_update = simulate(steps, true, {}, &late, 250);
  const std::vector<double> without = simulate(100, false);
  MESSAGE("MaxVio_batch with update: step 0 "
          << with_update[0] << ", 50 " << with_update[50] << ", 100 " << with_update[100]
          << ", 200 " << with_update[200] << ", 399 " << with_update[399]
          << "; MaxVio_global of steps 250-399 " << late.max_vio_global() << "; without: step 99 "
          << without[99]);
  CHECK(with_update[0] > 1.0);
  const auto first_below =
      std::find_if(with_update.begin(), with_update.end(), [](double v) { return v < 0.1; });
  CHECK(first_below - with_update.begin() <= 150);
  double late_mean = 0.0;
  for (int s = 250; s < steps; ++s) late_mean += with_update[std::size_t(s)] / (steps - 250);
  CHECK(late_mean < 0.07);
  CHECK(*std::max_element(with_update.begin() + 250, with_update.end()) < 0.15);
  CHECK(late.max_vio_global() < 0.02);
  // Without the update the skew persists: never below 1.
  CHECK(*std::min_element(without.begin(), without.end()) > 1.0);
}
