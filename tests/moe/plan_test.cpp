// SPDX-License-Identifier: Apache-2.0
// moe::RoutingPlan: the permutation is a stable sort of the (token, slot) pairs by expert, with
// consistent offsets, counts and inverse map; padding to a block; capacity keeps exactly the slots
// Megatron-Core's drop policies keep (checked against the independent rule in
// support/reference/moe_layer_reference.hpp); bad input throws typed errors and leaves a plan as
// it was.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <daedalus/daedalus.hpp>
#include <limits>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"

namespace {

using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;

struct Routing {
  int tokens, k, experts;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
  HostView<const std::int32_t, 2> id_view() const { return {ids.data(), {tokens, k}}; }
  HostView<const float, 2> weight_view() const { return {weights.data(), {tokens, k}}; }
};

/// Random routing; with `coarse` the weights take only 8 values, so equal weights (the tie rule)
/// occur often.
Routing random_routing(std::uint64_t stream, int tokens, int k, int experts, int favoured = 0,
                       bool coarse = false) {
  dt::Random rng(stream);
  Routing r{tokens, k, experts, {}, {}};
  r.ids = moe_reference::distinct_ids([&](int n) { return int(rng.integer(0, n - 1)); }, tokens, k,
                                      experts, favoured);
  r.weights = rng.uniform_in(r.ids.size(), 0.01, 1.0);
  if (coarse)
    for (float& w : r.weights) w = float(1 + rng.integer(0, 7)) / 8.0f;
  return r;
}

/// Everything a plan exposes, for before/after comparisons.
struct Snapshot {
  index_t tokens, k, rows, capacity, dropped;
  int experts;
  std::vector<index_t> offsets, counts, routed;
  std::vector<std::int32_t> row_slot, slot_row;
  std::vector<float> row_weight;
  bool operator==(const Snapshot&) const = default;
};
Snapshot snapshot(const moe::RoutingPlan& p) {
  return {p.tokens(),
          p.k(),
          p.rows(),
          p.capacity(),
          p.dropped(),
          p.num_experts(),
          {p.offsets().begin(), p.offsets().end()},
          {p.counts().begin(), p.counts().end()},
          {p.routed_counts().begin(), p.routed_counts().end()},
          {p.row_slot().begin(), p.row_slot().end()},
          {p.slot_row().begin(), p.slot_row().end()},
          {p.row_weight().begin(), p.row_weight().end()}};
}

/// The invariants every plan satisfies, given which slots were kept.
void check_plan(const moe::RoutingPlan& plan, const Routing& r, const std::vector<bool>& kept,
                index_t block) {
  const index_t slots = index_t(r.tokens) * r.k;
  REQUIRE(plan.tokens() == r.tokens);
  REQUIRE(plan.k() == r.k);
  REQUIRE(plan.num_experts() == r.experts);
  REQUIRE(plan.offsets().size() == std::size_t(r.experts) + 1);
  REQUIRE(plan.slot_row().size() == std::size_t(slots));
  CHECK(plan.offsets()[0] == 0);
  index_t kept_total = 0, rows = 0;
  for (int e = 0; e < r.experts; ++e) {
    index_t routed = 0, mine = 0;
    for (index_t s = 0; s < slots; ++s) {
      routed += r.ids[std::size_t(s)] == e;
      mine += r.ids[std::size_t(s)] == e && kept[std::size_t(s)];
    }
    CHECK(plan.routed_counts()[std::size_t(e)] == routed);
    CHECK(plan.counts()[std::size_t(e)] == mine);
    const index_t begin = plan.offsets()[std::size_t(e)];
    const index_t end = plan.offsets()[std::size_t(e) + 1];
    CHECK(begin == rows);
    CHECK(end - begin == (mine + block - 1) / block * block);
    // The segment lists expert e's kept slots in increasing (token, slot) order: a stable sort.
    std::int32_t previous = -1;
    for (index_t row = begin; row < begin + mine; ++row) {
      const std::int32_t s = plan.row_slot()[std::size_t(row)];
      REQUIRE(s >= 0);
      CHECK(s > previous);
      previous = s;
      CHECK(r.ids[std::size_t(s)] == e);
      CHECK(kept[std::size_t(s)]);
      CHECK(plan.slot_row()[std::size_t(s)] == row);
      CHECK(plan.row_weight()[std::size_t(row)] == r.weights[std::size_t(s)]);
    }
    for (index_t row = begin + mine; row < end; ++row) {  // padding
      CHECK(plan.row_slot()[std::size_t(row)] == -1);
      CHECK(plan.row_weight()[std::size_t(row)] == 0.0f);
    }
    kept_total += mine;
    rows = end;
  }
  CHECK(plan.rows() == rows);
  CHECK(plan.rows() <= slots + index_t(r.experts) * (block - 1));
  CHECK(plan.dropped() == slots - kept_total);
  for (index_t s = 0; s < slots; ++s)
    CHECK((plan.slot_row()[std::size_t(s)] >= 0) == bool(kept[std::size_t(s)]));
}

using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("routing plan: dropless stable sort by expert, offsets, counts, inverse map", C,
                   daedalus::Tiny, daedalus::DeepSeekV2Lite, daedalus::DeepSeekV3) {
  for (int tokens : {1, 37, 300}) {
    CAPTURE(tokens);
    const Routing r = random_routing(7100 + std::uint64_t(tokens), tokens, C::n_activated_experts,
                                     C::n_routed_experts);
    moe::RoutingPlan plan;
    plan.build(r.id_view(), r.weight_view(), C::n_routed_experts);
    CHECK(plan.rows() == index_t(tokens) * C::n_activated_experts);
    CHECK(plan.dropped() == 0);
    check_plan(plan, r, std::vector<bool>(r.ids.size(), true), 1);
  }
}

TEST_CASE("routing plan: segments padded to the GEMM block, padding rows marked -1") {
  const Routing r = random_routing(7200, 53, 3, 12, 3);
  for (index_t block : {1, 4, 16, 64}) {
    CAPTURE(block);
    moe::RoutingPlan plan;
    plan.build(r.id_view(), r.weight_view(), r.experts, {.pad_block = block});
    check_plan(plan, r, std::vector<bool>(r.ids.size(), true), block);
    for (int e = 0; e < r.experts; ++e) CHECK(plan.offsets()[std::size_t(e)] % block == 0);
  }
}

TEST_CASE("routing plan: capacity drops exactly the documented slots") {
  // Experts 0-2 of 12 are favoured, so they overflow; the weights take 8 values, so the "probs"
  // policy meets equal weights and its tie rule (earlier slot first) decides.
  const Routing r = random_routing(7300, 61, 3, 12, 3, true);
  for (auto policy : {moe::DropPolicy::probs, moe::DropPolicy::position}) {
    for (double factor : {0.5, 1.0, 1.3, 2.0}) {
      for (index_t block : {1, 8}) {
        CAPTURE(factor);
        CAPTURE(block);
        CAPTURE(policy == moe::DropPolicy::probs);
        moe::RoutingPlan plan;
        plan.build(r.id_view(), r.weight_view(), r.experts,
                   {.capacity_factor = factor, .drop_policy = policy, .pad_block = block});
        // C = ceil(T·k/E · factor): 61·3/12 = 15.25.
        const long capacity = long(std::ceil(61.0 * 3.0 / 12.0 * factor));
        CHECK(plan.capacity() == capacity);
        const std::vector<bool> kept = moe_reference::kept_slots(
            r.ids, r.weights, r.experts, capacity, policy == moe::DropPolicy::probs);
        check_plan(plan, r, kept, block);
        if (factor <= 1.0) CHECK(plan.dropped() > 0);  // the favoured experts overflow
      }
    }
  }
}

TEST_CASE("routing plan: a capacity past every expert's share is capped at tokens x k") {
  // 1e300 · T·k/E does not fit an integer; no expert can receive more than T·k slots anyway.
  const Routing r = random_routing(7350, 61, 3, 12, 3, true);
  moe::RoutingPlan plan;
  plan.build(r.id_view(), r.weight_view(), r.experts, {.capacity_factor = 1e300});
  CHECK(plan.capacity() == 61 * 3);
  CHECK(plan.dropped() == 0);
  check_plan(plan, r, std::vector<bool>(r.ids.size(), true), 1);
}

TEST_CASE("routing plan: a reused plan equals a fresh one; empty batches are allowed") {
  const Routing big = random_routing(7400, 90, 6, 64);
  const Routing small = random_routing(7401, 5, 6, 64);
  moe::RoutingPlan reused;
  reused.build(big.id_view(), big.weight_view(), 64, {.capacity_factor = 0.8});
  reused.build(small.id_view(), small.weight_view(), 64, {.pad_block = 4});
  moe::RoutingPlan fresh;
  fresh.build(small.id_view(), small.weight_view(), 64, {.pad_block = 4});
  CHECK(snapshot(reused) == snapshot(fresh));

  moe::RoutingPlan empty;
  empty.build(HostView<const std::int32_t, 2>(nullptr, {0, 6}),
              HostView<const float, 2>(nullptr, {0, 6}), 64, {.pad_block = 8});
  CHECK(empty.rows() == 0);
  CHECK(empty.dropped() == 0);
}

TEST_CASE("routing plan: bad input throws a typed error naming it and leaves the plan unchanged") {
  const Routing r = random_routing(7500, 9, 3, 12);
  moe::RoutingPlan plan;
  plan.build(r.id_view(), r.weight_view(), 12, {.capacity_factor = 1.0});
  const Snapshot before = snapshot(plan);
  const std::string fn = "daedalus::moe::RoutingPlan::build";

  for (std::int32_t bad : {-1, 12, 1000}) {
    Routing wrong = r;
    wrong.ids[3 * 3 + 1] = bad;
    const std::string msg = message_of<daedalus::OutOfRange>(
        [&] { plan.build(wrong.id_view(), wrong.weight_view(), 12); });
    CAPTURE(msg);
    CHECK(contains(msg, fn));
    CHECK(contains(msg, "'topk_ids' holds expert id " + std::to_string(bad)));
    CHECK(contains(msg, "token 3, slot 1"));
    CHECK(contains(msg, "expected an id in [0, 12)"));
    CHECK(snapshot(plan) == before);
  }
  {
    Routing wrong = r;
    wrong.weights[2 * 3 + 2] = std::numeric_limits<float>::quiet_NaN();
    const std::string msg = message_of<daedalus::NumericError>(
        [&] { plan.build(wrong.id_view(), wrong.weight_view(), 12); });
    CAPTURE(msg);
    CHECK(contains(msg, "'topk_weights' holds a non-finite value"));
    CHECK(contains(msg, "token 2, slot 2"));
    CHECK(snapshot(plan) == before);
  }
  {
    const std::string msg = message_of<daedalus::InvalidArgument>([&] {
      plan.build(r.id_view(), HostView<const float, 2>(r.weights.data(), {8, 3}), 12);
    });
    CAPTURE(msg);
    CHECK(contains(msg, "'topk_weights' has extents [8,3]; expected [9,3]"));
    CHECK(snapshot(plan) == before);
  }
  {
    const std::string msg =
        message_of<daedalus::InvalidArgument>([&] { plan.build(r.id_view(), r.weight_view(), 0); });
    CAPTURE(msg);
    CHECK(contains(msg, "'num_experts' is 0; expected at least 1"));
    CHECK(snapshot(plan) == before);
  }
  for (double factor :
       {-1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    const std::string msg = message_of<daedalus::InvalidArgument>(
        [&] { plan.build(r.id_view(), r.weight_view(), 12, {.capacity_factor = factor}); });
    CAPTURE(msg);
    CHECK(contains(msg, "'capacity_factor' is"));
    CHECK(snapshot(plan) == before);
  }
  {
    const std::string msg = message_of<daedalus::InvalidArgument>(
        [&] { plan.build(r.id_view(), r.weight_view(), 12, {.pad_block = 0}); });
    CAPTURE(msg);
    CHECK(contains(msg, "'pad_block' is 0; expected at least 1"));
    CHECK(snapshot(plan) == before);
  }
  {
    const std::string msg = message_of<daedalus::InvalidArgument>([&] {
      plan.build(HostView<const std::int32_t, 2>(r.ids.data(), {9, 0}),
                 HostView<const float, 2>(r.weights.data(), {9, 0}), 12);
    });
    CAPTURE(msg);
    CHECK(contains(msg, "'topk_ids' has extents [9,0]"));
    CHECK(snapshot(plan) == before);
  }
}
