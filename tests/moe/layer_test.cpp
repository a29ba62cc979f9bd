// SPDX-License-Identifier: Apache-2.0
// moe::MoeLayer against the direct fp64 reference (for each token, loop over its chosen experts,
// plus the shared MLP; support/reference/moe_layer_reference.hpp), dropless and with a capacity;
// bitwise determinism across thread counts; bad input leaves the layer and the output untouched.
// The expert choice itself (ids and weights) is the gate's, tested in tests/moe/gate_*.cpp; here
// the reference takes the layer's ids and weights and recomputes everything after them.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <limits>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"
#include "support/tolerance.hpp"

namespace daedalus::testing {

/// V2-Lite's widths and gate (softmax, top-6, 2 shared experts) with 8 routed experts instead of
/// 64, so that a test draws 0.3 GB of weights rather than 2.2 GB.
struct V2LiteEightExperts : daedalus::DeepSeekV2Lite {
  static constexpr const char* name = "V2LiteEightExperts";
  static constexpr int n_routed_experts = 8;
};

/// Tiny without shared experts: the layer is the routed experts alone.
struct TinyNoShared : daedalus::Tiny {
  static constexpr const char* name = "TinyNoShared";
  static constexpr int n_shared_experts = 0;
};

}  // namespace daedalus::testing

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace tol = daedalus::testing::tolerance;

/// A layer from checkpoint-layout arrays that the reference reads as well.
template <class C>
struct LayerFixture {
  static constexpr std::size_t E = C::n_routed_experts, dim = C::dim, inter = C::moe_inter_dim;
  static constexpr std::size_t shared = std::size_t(C::n_shared_experts) * C::moe_inter_dim;
  std::vector<float> gate, w1, w3, w2, s1, s3, s2;

  explicit LayerFixture(std::uint64_t stream) {
    dt::Random rng(stream);
    const double in_dim = 1.0 / std::sqrt(double(dim));
    // A gate 4× nn.Linear's scale spreads the scores, so the top-k is clear of near-ties.
    gate = rng.uniform(E * dim, 4.0 * in_dim);
    w1 = rng.uniform(E * inter * dim, in_dim);
    w3 = rng.uniform(E * inter * dim, in_dim);
    w2 = rng.uniform(E * dim * inter, 1.0 / std::sqrt(double(inter)));
    s1 = rng.uniform(shared * dim, in_dim);
    s3 = rng.uniform(shared * dim, in_dim);
    s2 = rng.uniform(dim * shared, 1.0 / std::sqrt(double(std::max<std::size_t>(shared, 1))));
  }

  moe::MoeLayer<C> layer(const moe::PlanSettings& settings = {}) const {
    const std::vector<float> no_bias;
    std::vector<float> bias;
    if (moe::GateWeights<C>::has_bias_by_default) {
      dt::Random rng(1);
      bias = rng.uniform(E, 0.05);
    }
    return moe::MoeLayer<C>(moe::GateWeights<C>::from_arrays(
                                HostView<const float, 2>(gate.data(), {index_t(E), index_t(dim)}),
                                HostView<const float, 1>(bias.data(), {index_t(bias.size())})),
                            moe::ExpertWeights<C>::from_arrays(w1, w3, w2),
                            moe::SharedExpertWeights<C>::from_arrays(s1, s3, s2), settings);
  }

  std::vector<moe_reference::Mlp> experts() const {
    std::vector<moe_reference::Mlp> all;
    for (std::size_t e = 0; e < E; ++e)
      all.push_back({w1.data() + e * inter * dim, w3.data() + e * inter * dim,
                     w2.data() + e * dim * inter, int(inter)});
    return all;
  }
  moe_reference::Mlp shared_mlp() const { return {s1.data(), s3.data(), s2.data(), int(shared)}; }
};

/// The layer chains the expert products (K = dim, then K = inter or the shared width) and a
/// (k + 1)-term combine: 4·K·u with K the longest of them bounds it (tolerance.hpp), far below
/// what a wrong weight, expert or dropped slot gives (order 1e-1).
template <class C>
double layer_tolerance() {
  return tol::fp32_vs_reference(std::max<std::int64_t>(
      {C::dim, C::moe_inter_dim, std::int64_t(C::n_shared_experts) * C::moe_inter_dim}));
}

template <class C>
std::vector<float> forward(moe::MoeLayer<C>& layer, const CpuBackend& cpu,
                           const std::vector<float>& x) {
  const index_t tokens = index_t(x.size()) / C::dim;
  std::vector<float> out(x.size(), 3.0f);
  layer.forward(cpu, HostView<const float, 2>(x.data(), {tokens, C::dim}),
                HostView<float, 2>(out.data(), {tokens, C::dim}));
  return out;
}

template <class C>
std::vector<double> reference(const LayerFixture<C>& f, const moe::MoeLayer<C>& layer,
                              const std::vector<float>& x, const std::vector<bool>* kept) {
  const int tokens = int(x.size() / C::dim);
  const auto experts = f.experts();
  const auto shared = f.shared_mlp();
  std::vector<double> want;
  for (int t = 0; t < tokens; ++t) {
    const auto y =
        moe_reference::moe_token(x.data() + std::size_t(t) * C::dim, C::dim,
                                 layer.topk_ids().data() + t * C::n_activated_experts,
                                 layer.topk_weights().data() + t * C::n_activated_experts,
                                 C::n_activated_experts, experts, &shared, kept, t);
    want.insert(want.end(), y.begin(), y.end());
  }
  return want;
}

using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("MoE layer: dropless forward against the fp64 per-token reference", C,
                   daedalus::Tiny, dt::TinyNoShared, dt::V2LiteEightExperts) {
  const LayerFixture<C> f(8600);
  auto layer = f.layer();
  const int tokens = C::dim < 100 ? 57 : 6;
  dt::Random rng(8601);
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  const auto out = forward(layer, CpuBackend(2), x);
  CHECK(layer.plan().dropped() == 0);
  CHECK(layer.topk_ids().extent(0) == tokens);
  CHECK(tol::row_relative_error(out, reference(f, layer, x, nullptr), C::dim) <=
        layer_tolerance<C>());
}

TEST_CASE("MoE layer: a capacity drops exactly the documented slots") {
  using C = daedalus::Tiny;
  const LayerFixture<C> f(8700);
  dt::Random rng(8701);
  const int tokens = 64;
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  for (auto policy : {moe::DropPolicy::probs, moe::DropPolicy::position}) {
    auto layer = f.layer({.capacity_factor = 0.75, .drop_policy = policy, .pad_block = 4});
    const auto out = forward(layer, CpuBackend(2), x);
    const std::vector<std::int32_t> ids(layer.topk_ids().data(),
                                        layer.topk_ids().data() + layer.topk_ids().size());
    const std::vector<float> weights(layer.topk_weights().data(),
                                     layer.topk_weights().data() + layer.topk_weights().size());
    const long capacity =
        long(std::ceil(double(tokens) * C::n_activated_experts / C::n_routed_experts * 0.75));
    const auto kept = moe_reference::kept_slots(ids, weights, C::n_routed_experts, capacity,
                                                policy == moe::DropPolicy::probs);
    CHECK(layer.plan().dropped() == long(std::count(kept.begin(), kept.end(), false)));
    CHECK(layer.plan().dropped() > 0);
    CHECK(tol::row_relative_error(out, reference(f, layer, x, &kept), C::dim) <=
          layer_tolerance<C>());
  }
}

TEST_CASE("MoE layer: bitwise identical for 1, 2 and 3 threads and any buffer alignment") {
  using C = daedalus::Tiny;
  const LayerFixture<C> f(8800);
  auto layer = f.layer();
  dt::Random rng(8801);
  const std::vector<float> x = rng.uniform(std::size_t(200) * C::dim);
  const auto one = forward(layer, CpuBackend(1), x);
  for (int threads : {2, 3}) {
    const auto many = forward(layer, CpuBackend(threads), x);
    CHECK(std::memcmp(many.data(), one.data(), one.size() * sizeof(float)) == 0);
  }
  // And wherever the caller's buffers lie (shifted by 1 and 3 floats).
  std::vector<float> x_shifted(x.size() + 1), out_shifted(x.size() + 3);
  std::copy(x.begin(), x.end(), x_shifted.begin() + 1);
  layer.forward(CpuBackend(2), HostView<const float, 2>(x_shifted.data() + 1, {200, C::dim}),
                HostView<float, 2>(out_shifted.data() + 3, {200, C::dim}));
  CHECK(std::memcmp(out_shifted.data() + 3, one.data(), one.size() * sizeof(float)) == 0);
}

TEST_CASE("MoE layer: bad input throws naming it; the output and the layer are unchanged") {
  using C = daedalus::Tiny;
  const LayerFixture<C> f(8900);
  auto layer = f.layer();
  const CpuBackend cpu(2);
  dt::Random rng(8901);
  std::vector<float> x = rng.uniform(std::size_t(10) * C::dim);
  (void)forward(layer, cpu, x);
  const std::vector<std::int32_t> ids_before(layer.topk_ids().data(),
                                             layer.topk_ids().data() + layer.topk_ids().size());
  const auto rows_before =
      std::vector<std::int32_t>(layer.plan().row_slot().begin(), layer.plan().row_slot().end());
  std::vector<float> out(x.size(), 3.0f);
  const auto out_before = out;

  auto msg = message_of<daedalus::InvalidArgument>([&] {
    layer.forward(cpu, HostView<const float, 2>(x.data(), {10, C::dim}),
                  HostView<float, 2>(out.data(), {9, C::dim}));
  });
  CHECK(contains(msg,
                 "daedalus::moe::MoeLayer::forward: 'out' has extents [9,96]; expected [10,96]"));
  msg = message_of<daedalus::InvalidArgument>([&] {
    layer.forward(cpu, HostView<const float, 2>(x.data(), {16, 60}),
                  HostView<float, 2>(out.data(), {16, 60}));
  });
  CHECK(contains(msg, "'x' has extents [16,60]; expected [16,96]"));
  x[std::size_t(7) * C::dim + 5] = std::numeric_limits<float>::quiet_NaN();
  msg = message_of<daedalus::NumericError>([&] {
    layer.forward(cpu, HostView<const float, 2>(x.data(), {10, C::dim}),
                  HostView<float, 2>(out.data(), {10, C::dim}));
  });
  CHECK(contains(msg, "token 7"));
  x[std::size_t(7) * C::dim + 5] = 0.5f;
  layer.set_plan_settings({.pad_block = 0});
  msg = message_of<daedalus::InvalidArgument>([&] {
    layer.forward(cpu, HostView<const float, 2>(x.data(), {10, C::dim}),
                  HostView<float, 2>(out.data(), {10, C::dim}));
  });
  CHECK(contains(msg, "'pad_block' is 0"));

  CHECK(out == out_before);
  CHECK(std::equal(ids_before.begin(), ids_before.end(), layer.topk_ids().data()));
  CHECK(std::equal(rows_before.begin(), rows_before.end(), layer.plan().row_slot().begin()));
  CHECK(layer.topk_ids().extent(0) == 10);
}

TEST_CASE("MoE layer: forward_and_balance records the loads and applies the sign rule") {
  using C = daedalus::Tiny;  // sigmoid gate with a selection bias
  const LayerFixture<C> f(9000);
  auto layer = f.layer();
  const CpuBackend cpu(2);
  dt::Random rng(9001);
  std::vector<float> x = rng.uniform(std::size_t(40) * C::dim);
  std::vector<float> out(x.size());
  const HostView<const float, 2> xv(x.data(), {40, C::dim});
  const HostView<float, 2> ov(out.data(), {40, C::dim});
  moe::LoadStats stats(C::n_routed_experts);
  const moe::BiasBalancer balancer(C::n_routed_experts, {.update_rate = 0.001});
  const std::vector<float> bias0(layer.gate().bias().data(),
                                 layer.gate().bias().data() + C::n_routed_experts);
  layer.forward_and_balance(cpu, xv, ov, stats, balancer);

  // Loads: the slots of the batch routed to each expert, counted here from the ids.
  std::vector<std::int64_t> counts(C::n_routed_experts, 0);
  for (index_t i = 0; i < layer.topk_ids().size(); ++i) ++counts[layer.topk_ids().data()[i]];
  CHECK(std::equal(counts.begin(), counts.end(), stats.step_counts().begin()));
  // b_i += γ · sign(mean − c_i) (DeepSeek-V3 report, section 2.1.2).
  const double mean = 40.0 * C::n_activated_experts / C::n_routed_experts;
  for (int e = 0; e < C::n_routed_experts; ++e) {
    const double count = double(counts[std::size_t(e)]);
    const double sign = double(count < mean) - double(count > mean);
    CHECK(layer.gate().bias().data()[e] == float(double(bias0[e]) + 0.001 * sign));
  }

  // A failing step (NaN input) changes neither the bias nor the statistics.
  const std::vector<float> bias1(layer.gate().bias().data(),
                                 layer.gate().bias().data() + C::n_routed_experts);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(layer.forward_and_balance(cpu, xv, ov, stats, balancer), daedalus::NumericError);
  CHECK(std::equal(bias1.begin(), bias1.end(), layer.gate().bias().data()));
  CHECK(stats.steps() == 1);
  const moe::BiasBalancer wrong(C::n_routed_experts + 1);
  x[3] = 0.25f;
  const auto msg = message_of<daedalus::InvalidArgument>(
      [&] { layer.forward_and_balance(cpu, xv, ov, stats, wrong); });
  CHECK(contains(msg, "'stats' and 'balancer' are for 12 and 13 experts; expected 12"));
  CHECK(stats.steps() == 1);
}
