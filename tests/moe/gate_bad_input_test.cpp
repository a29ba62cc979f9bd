// SPDX-License-Identifier: Apache-2.0
// Bad input to the gate and the balancer: each throws the documented error with a message naming
// the argument (or the token), and changes nothing: the outputs, the load statistics and the
// selection bias are compared before and after.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/config/presets.hpp>
#include <daedalus/moe/balance.hpp>
#include <daedalus/moe/cpu/gate.hpp>
#include <daedalus/moe/gate.hpp>
#include <limits>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;

using daedalus::testing::contains;
using daedalus::testing::message_of;

constexpr float kSentinel = 12345.0f;

}  // namespace

TEST_CASE(
    "moe::route: a NaN or infinite input throws NumericError naming the token; outputs kept") {
  using C = daedalus::Tiny;
  const auto gate = moe::GateWeights<C>::random(dt::stream_seed(4600));
  dt::Random rng(4601);
  const int k = C::n_activated_experts;
  for (const int tokens : {3, 40, 700}) {  // the dot-product path and the chunked GEMM path
    for (const float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
      const int bad_token = tokens - 2;
      x[std::size_t(bad_token) * C::dim + 7] = bad;
      std::vector<std::int32_t> ids(std::size_t(tokens) * k, -7);
      std::vector<float> weights(ids.size(), kSentinel);
      const std::string what = message_of<daedalus::NumericError>([&] {
        moe::route(CpuBackend(2), gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
                   HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                   HostView<float, 2>(weights.data(), {tokens, k}));
      });
      INFO(what);
      CHECK(contains(what, "daedalus::moe::route: token " + std::to_string(bad_token) + " "));
      CHECK(std::all_of(ids.begin(), ids.end(), [](std::int32_t v) { return v == -7; }));
      CHECK(std::all_of(weights.begin(), weights.end(), [](float v) { return v == kSentinel; }));
    }
  }
}

TEST_CASE("moe::route_logits: NaN logits name the lowest bad token whatever the thread count") {
  const auto s = moe::GateSettings::from_config<daedalus::DeepSeekV3>();
  const int tokens = 50;
  dt::Random rng(4610);
  std::vector<float> logits = rng.uniform(std::size_t(tokens) * 256);
  logits[std::size_t(41) * 256 + 3] = std::numeric_limits<float>::quiet_NaN();
  logits[std::size_t(17) * 256 + 200] = -std::numeric_limits<float>::infinity();
  for (const int threads : {1, 2, 4}) {
    std::vector<std::int32_t> ids(std::size_t(tokens) * 8, -7);
    std::vector<float> weights(ids.size(), kSentinel);
    const std::string what = message_of<daedalus::NumericError>([&] {
      moe::route_logits(
          CpuBackend(threads), s, HostView<const float, 2>(logits.data(), {tokens, 256}),
          HostView<const float, 1>(), HostView<std::int32_t, 2>(ids.data(), {tokens, 8}),
          HostView<float, 2>(weights.data(), {tokens, 8}));
    });
    INFO(what);
    CHECK(contains(what, "token 17 has a non-finite logit"));
    CHECK(contains(what, "at expert 200"));
    CHECK(std::all_of(ids.begin(), ids.end(), [](std::int32_t v) { return v == -7; }));
  }
}

TEST_CASE("the gate rejects mismatched shapes, bad settings and a bad bias") {
  using C = daedalus::DeepSeekV3;
  const auto gate = moe::GateWeights<C>::random(dt::stream_seed(4620));
  dt::Random rng(4621);
  const int tokens = 4;
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  const std::vector<float> logits = rng.uniform(std::size_t(tokens) * 256);
  std::vector<std::int32_t> ids(std::size_t(tokens) * 9, -7);
  std::vector<float> weights(ids.size(), kSentinel);
  const auto s = moe::GateSettings::from_config<C>();
  auto route_logits = [&](const moe::GateSettings& settings, index_t experts, index_t k,
                          HostView<const float, 1> bias) {
    moe::route_logits(CpuBackend(2), settings,
                      HostView<const float, 2>(logits.data(), {tokens, experts}), bias,
                      HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                      HostView<float, 2>(weights.data(), {tokens, k}));
  };

  CHECK(contains(message_of<daedalus::InvalidArgument>([&] {
                   moe::route(CpuBackend(2), gate,
                              HostView<const float, 2>(x.data(), {tokens * 2, C::dim / 2}),
                              HostView<std::int32_t, 2>(ids.data(), {tokens * 2, 8}),
                              HostView<float, 2>(weights.data(), {tokens * 2, 8}));
                 }),
                 "daedalus::moe::route: 'x' has extents [8,3584]; expected [8,7168]"));
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] {
                   moe::route(CpuBackend(2), gate,
                              HostView<const float, 2>(x.data(), {tokens, C::dim}),
                              HostView<std::int32_t, 2>(ids.data(), {tokens, 9}),
                              HostView<float, 2>(weights.data(), {tokens, 8}));
                 }),
                 "'topk_ids' has extents [4,9]; expected [4,8]"));
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] { route_logits(s, 255, 8, {}); }),
                 "'logits' has extents [4,255]; expected [4,256]"));
  CHECK(contains(message_of<daedalus::InvalidArgument>([&] {
                   route_logits(s, 256, 8, HostView<const float, 1>(gate.bias().data(), {255}));
                 }),
                 "'bias' has extents [255]; expected [256]"));

  // k larger than the experts the group limit allows: V3 keeps 4 groups of 32 = 128 experts.
  auto too_many = s;
  too_many.topk = 129;
  CHECK(
      contains(message_of<daedalus::InvalidArgument>([&] { route_logits(too_many, 256, 129, {}); }),
               "'topk' is 129; expected a value in [1, 128]"));
  auto bad_groups = s;
  bad_groups.n_expert_groups = 7;
  CHECK(
      contains(message_of<daedalus::InvalidArgument>([&] { route_logits(bad_groups, 256, 8, {}); }),
               "'n_expert_groups' is 7"));
  auto bad_limit = s;
  bad_limit.n_limited_groups = 9;
  CHECK(
      contains(message_of<daedalus::InvalidArgument>([&] { route_logits(bad_limit, 256, 8, {}); }),
               "'n_limited_groups' is 9"));
  auto bad_scale = s;
  bad_scale.route_scale = std::numeric_limits<double>::quiet_NaN();
  CHECK(
      contains(message_of<daedalus::InvalidArgument>([&] { route_logits(bad_scale, 256, 8, {}); }),
               "'route_scale' is nan"));

  std::vector<float> nan_bias(256, 0.0f);
  nan_bias[99] = std::numeric_limits<float>::quiet_NaN();
  CHECK(contains(message_of<daedalus::NumericError>([&] {
                   route_logits(s, 256, 8, HostView<const float, 1>(nan_bias.data(), {256}));
                 }),
                 "'bias' holds a non-finite value (nan) at expert 99"));
  // Nothing above wrote an output.
  CHECK(std::all_of(ids.begin(), ids.end(), [](std::int32_t v) { return v == -7; }));
  CHECK(std::all_of(weights.begin(), weights.end(), [](float v) { return v == kSentinel; }));
}

TEST_CASE("a failed training step updates neither the load statistics nor the bias") {
  using C = daedalus::Tiny;
  auto gate = moe::GateWeights<C>::random(dt::stream_seed(4630));
  dt::Random rng(4631);
  const int tokens = 64, k = C::n_activated_experts;
  moe::LoadStats stats(C::n_routed_experts);
  const moe::BiasBalancer balancer(C::n_routed_experts);
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());

  // One good step, so that there is state to keep.
  std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  auto step = [&] {
    moe::route(CpuBackend(2), gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
               HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
               HostView<float, 2>(weights.data(), {tokens, k}));
    stats.record(HostView<const std::int32_t, 2>(ids.data(), {tokens, k}));
    balancer.update(gate.bias(), stats.step_counts());
  };
  step();
  const std::vector<float> bias_before(gate.bias().data(),
                                       gate.bias().data() + C::n_routed_experts);
  const std::vector<std::int64_t> total_before(stats.total_counts().begin(),
                                               stats.total_counts().end());

  // A NaN token: route throws, the step stops before record and update.
  x[std::size_t(5) * C::dim] = std::numeric_limits<float>::quiet_NaN();
  CHECK(contains(message_of<daedalus::NumericError>(step), "token 5"));
  // An id out of range: record throws, counts unchanged.
  std::vector<std::int32_t> bad_ids(ids.size(), 1);
  bad_ids[std::size_t(3) * k + 1] = C::n_routed_experts;
  CHECK(contains(message_of<daedalus::OutOfRange>([&] {
                   stats.record(HostView<const std::int32_t, 2>(bad_ids.data(), {tokens, k}));
                 }),
                 "'topk_ids' holds 12 at token 3, slot 1; expected an expert id in [0, 12)"));
  // Counts of the wrong size or negative: update throws, bias unchanged.
  const std::vector<std::int64_t> short_counts(11, 1);
  CHECK(contains(
      message_of<daedalus::InvalidArgument>([&] { balancer.update(gate.bias(), short_counts); }),
      "'counts' has 11 entries; expected 12"));
  std::vector<std::int64_t> negative(12, 5);
  negative[4] = -1;
  CHECK(contains(
      message_of<daedalus::InvalidArgument>([&] { balancer.update(gate.bias(), negative); }),
      "'counts' holds -1 at expert 4"));
  // The multiplicative rule with a non-positive bias: nothing changes either.
  const moe::BiasBalancer multiplicative(C::n_routed_experts,
                                         {moe::BiasUpdate::multiplicative, 0.001});
  CHECK(contains(message_of<daedalus::InvalidArgument>(
                     [&] { multiplicative.update(gate.bias(), stats.step_counts()); }),
                 "needs positive biases"));

  CHECK(std::vector<float>(gate.bias().data(), gate.bias().data() + C::n_routed_experts) ==
        bias_before);
  CHECK(std::vector<std::int64_t>(stats.total_counts().begin(), stats.total_counts().end()) ==
        total_before);
  CHECK(stats.steps() == 1);
}

TEST_CASE("GateWeights::set_weight rejects wrong extents and non-finite values; gate unchanged") {
  using C = daedalus::Tiny;
  auto gate = moe::GateWeights<C>::random(dt::stream_seed(4640));
  const std::vector<float> weight_before(gate.weight().data(),
                                         gate.weight().data() + gate.weight().size());
  const std::vector<float> packed_before(gate.packed_weight().data(),
                                         gate.packed_weight().data() + gate.packed_weight().size());
  dt::Random rng(4641);
  std::vector<float> w = rng.uniform(std::size_t(C::n_routed_experts) * C::dim);
  CHECK(contains(
      message_of<daedalus::InvalidArgument>([&] {
        gate.set_weight(HostView<const float, 2>(w.data(), {C::n_routed_experts - 1, C::dim}));
      }),
      "daedalus::moe::GateWeights::set_weight: 'weight' has extents [11,96]; expected "
      "[12,96]"));
  w[5 * C::dim + 17] = std::numeric_limits<float>::infinity();
  CHECK(
      contains(message_of<daedalus::NumericError>([&] {
                 gate.set_weight(HostView<const float, 2>(w.data(), {C::n_routed_experts, C::dim}));
               }),
               "'weight' holds a non-finite value at expert 5, column 17"));
  CHECK(std::equal(weight_before.begin(), weight_before.end(), gate.weight().data()));
  CHECK(std::equal(packed_before.begin(), packed_before.end(), gate.packed_weight().data()));
}
