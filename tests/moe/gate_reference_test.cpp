// SPDX-License-Identifier: Apache-2.0
// moe::route and moe::route_logits against the independent fp64 gate reference
// (support/reference/moe_gate_reference.hpp) for DeepSeek-V2-Lite, V2, V3 and Tiny: identical
// expert ids, weights within the fp32 tolerance; the group limit; the -inf mask when every bias
// is very negative; the tie rule; bitwise determinism across thread counts.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/config/presets.hpp>
#include <daedalus/moe/cpu/gate.hpp>
#include <daedalus/moe/gate.hpp>
#include <set>
#include <vector>

#include "support/random.hpp"
#include "support/reference/moe_gate_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::ScoreFunc;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace ref = moe_gate_reference;
namespace tol = daedalus::testing::tolerance;

ref::Settings reference_settings(const moe::GateSettings& s) {
  return {s.score_func == ScoreFunc::sigmoid,
          s.n_routed_experts,
          s.n_expert_groups,
          s.n_limited_groups,
          s.topk,
          s.normalize,
          s.route_scale,
          s.bias_mode == moe::BiasMode::multiplicative};
}

struct Outputs {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

/// Compares the gate's outputs with the reference's. A token whose reference margin (the
/// smallest gap that decided its choice) is below twice `decision_error(t)` (the fp32 error of
/// its selection scores) could legitimately go either way: it is skipped, and such tokens must be
/// rare (at most 3, or 2% of the batch), or the test would prove little. Every other token must
/// have exactly the reference's ids in the reference's order, and weights within
/// `weight_tolerance` (row-relative).
template <class DecisionError>
void compare(const Outputs& got, const ref::Result& want, int tokens, int k,
             DecisionError&& decision_error, double weight_tolerance) {
  int near_ties = 0, compared = 0;
  double worst = 0.0;
  for (int t = 0; t < tokens; ++t) {
    const std::size_t row = std::size_t(t) * k;
    if (want.margin[std::size_t(t)] <= 2.0 * decision_error(t)) {
      ++near_ties;
      continue;
    }
    ++compared;
    for (int j = 0; j < k; ++j) {
      INFO("token " << t << ", slot " << j);
      REQUIRE(got.ids[row + j] == want.ids[row + j]);
    }
    const std::vector<float> g(got.weights.begin() + long(row),
                               got.weights.begin() + long(row + k));
    const std::vector<double> w(want.weights.begin() + long(row),
                                want.weights.begin() + long(row + k));
    worst = std::max(worst, tol::row_relative_error(g, w, std::size_t(k)));
  }
  INFO("tokens " << tokens << ", near ties skipped " << near_ties << ", worst weight error "
                 << worst);
  CHECK(near_ties <= std::max(3, tokens / 50));
  CHECK(compared > 0);
  CHECK(worst <= weight_tolerance);
}

/// The whole gate of config C on `tokens` random tokens, against the reference fed the exact
/// (fp64) logits of the same fp32 inputs.
template <class C>
void check_route(int tokens, std::uint64_t stream, int threads) {
  const auto gate = moe::GateWeights<C>::random(dt::stream_seed(stream));
  dt::Random rng(stream + 1);
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  const auto settings = moe::GateSettings::from_config<C>();
  const int k = settings.topk;
  Outputs got{std::vector<std::int32_t>(std::size_t(tokens) * k),
              std::vector<float>(std::size_t(tokens) * k)};
  moe::route(CpuBackend(threads), gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
             HostView<std::int32_t, 2>(got.ids.data(), {tokens, k}),
             HostView<float, 2>(got.weights.data(), {tokens, k}));

  const std::vector<float> w(gate.weight().data(), gate.weight().data() + gate.weight().size());
  const std::vector<double> logits = ref::logits(x, w, tokens, C::dim, C::n_routed_experts);
  const std::vector<double> bias(gate.bias().data(), gate.bias().data() + gate.bias().extent(0));
  const ref::Result want = ref::gate(reference_settings(settings), logits, tokens, bias);

  // fp32 logits: a dim-long dot product of random-signed terms errs by about u·√dim·‖terms‖₂
  // (its partial sums, and their rounding, grow like √dim·rms; see ref::dot_term_norms), ×8 for
  // headroom. A sigmoid score moves by at most 1/4 of its logit's error; a softmax score by at
  // most 2·s times it (its own logit and the normaliser). The bias addition adds a rounding.
  const std::vector<double> norms = ref::dot_term_norms(x, w, tokens, C::dim, C::n_routed_experts);
  const double logit_error =
      8.0 * tol::fp32_u * std::sqrt(double(C::dim)) * *std::max_element(norms.begin(), norms.end());
  const bool sigmoid = settings.score_func == ScoreFunc::sigmoid;
  auto decision_error = [&](int t) {
    return logit_error * (sigmoid ? 0.25 : 2.0 * want.max_score[std::size_t(t)]) +
           4.0 * tol::fp32_u * want.max_selection[std::size_t(t)];
  };
  // Weights, relative: 2·logit_error from the score, as much again from the normalising sum,
  // plus the fp32 exp and the softmax sum over E terms.
  const double weight_tolerance = 4.0 * logit_error + tol::fp32_vs_reference(C::n_routed_experts);
  compare(got, want, tokens, k, decision_error, weight_tolerance);
}

/// route_logits on fp32 logits against the reference fed the same logits widened to double.
void check_route_logits(const moe::GateSettings& settings, int tokens, std::uint64_t stream,
                        bool with_bias, double logit_scale = 2.0) {
  const int experts = settings.n_routed_experts, k = settings.topk;
  dt::Random rng(stream);
  const std::vector<float> logits = rng.uniform(std::size_t(tokens) * experts, logit_scale);
  std::vector<float> bias;
  if (with_bias) {
    bias = settings.bias_mode == moe::BiasMode::multiplicative
               ? rng.uniform_in(std::size_t(experts), 0.8, 1.2)
               : rng.uniform(std::size_t(experts), 0.1);
  }
  Outputs got{std::vector<std::int32_t>(std::size_t(tokens) * k),
              std::vector<float>(std::size_t(tokens) * k)};
  moe::route_logits(CpuBackend(2), settings,
                    HostView<const float, 2>(logits.data(), {tokens, experts}),
                    HostView<const float, 1>(bias.data(), {index_t(bias.size())}),
                    HostView<std::int32_t, 2>(got.ids.data(), {tokens, k}),
                    HostView<float, 2>(got.weights.data(), {tokens, k}));
  const ref::Result want =
      ref::gate(reference_settings(settings), dt::widen(logits), tokens, dt::widen(bias));
  // Same logits: a selection score differs by a few roundings (fp32 exp, the bias addition) of
  // its own size; the softmax normaliser (E terms) scales a whole row alike and cannot reorder
  // it, but it does enter the weights: fp32_vs_reference(E) each, twice with normalisation.
  auto decision_error = [&](int t) {
    return 8.0 * tol::fp32_u * want.max_selection[std::size_t(t)];
  };
  compare(got, want, tokens, k, decision_error, 2.0 * tol::fp32_vs_reference(experts));
}

}  // namespace

TEST_CASE_TEMPLATE("moe::route matches the fp64 reference gate", C, daedalus::DeepSeekV2Lite,
                   daedalus::DeepSeekV2, daedalus::DeepSeekV3, daedalus::Tiny) {
  // 37 tokens take the small-batch path (experts split over threads), 150 the token-split path
  // (≥ 64 per thread).
  SUBCASE("37 tokens") { check_route<C>(37, 4100, 2); }
  SUBCASE("150 tokens") { check_route<C>(150, 4110, 2); }
  SUBCASE("150 tokens, one thread") { check_route<C>(150, 4120, 1); }
}

TEST_CASE("moe::route on Tiny crosses the 512-token chunk boundary") {
  check_route<daedalus::Tiny>(1203, 4130, 2);
  check_route<daedalus::Tiny>(700, 4135, 1);
}

TEST_CASE_TEMPLATE("moe::route_logits matches the fp64 reference gate", C, daedalus::DeepSeekV2Lite,
                   daedalus::DeepSeekV2, daedalus::DeepSeekV3, daedalus::Tiny) {
  const auto settings = moe::GateSettings::from_config<C>();
  SUBCASE("the config's own bias") {
    check_route_logits(settings, 301, 4200, moe::GateWeights<C>::has_bias_by_default);
  }
  SUBCASE("the other bias choice") {
    // V2 with a bias takes the top-2 group sum over softmax scores; V3 without one, the max.
    check_route_logits(settings, 301, 4210, !moe::GateWeights<C>::has_bias_by_default);
  }
  SUBCASE("normalisation flipped, route scale 3") {
    auto s = settings;
    s.normalize = !s.normalize;
    s.route_scale = 3.0;
    check_route_logits(s, 97, 4220, true);
  }
  SUBCASE("multiplicative bias") {
    auto s = settings;
    s.bias_mode = moe::BiasMode::multiplicative;
    check_route_logits(s, 97, 4230, true);
  }
  SUBCASE("sigmoid for softmax and back") {
    auto s = settings;
    s.score_func = s.score_func == ScoreFunc::sigmoid ? ScoreFunc::softmax : ScoreFunc::sigmoid;
    check_route_logits(s, 97, 4240, true);
  }
  SUBCASE("large logits (saturated sigmoid, peaked softmax)") {
    check_route_logits(settings, 97, 4250, true, 30.0);
  }
}

TEST_CASE_TEMPLATE("no token uses more than n_limited_groups groups", C, daedalus::DeepSeekV2,
                   daedalus::DeepSeekV3, daedalus::Tiny) {
  const auto settings = moe::GateSettings::from_config<C>();
  const int tokens = 400, experts = settings.n_routed_experts, k = settings.topk;
  const int per_group = settings.experts_per_group();
  dt::Random rng(4300);
  const std::vector<float> logits = rng.uniform(std::size_t(tokens) * experts, 3.0);
  // A bias that favours one expert in every group pushes tokens to spread over groups.
  std::vector<float> bias(std::size_t(experts), 0.0f);
  for (int g = 0; g < settings.n_expert_groups; ++g) bias[std::size_t(g * per_group)] = 0.5f;
  for (const bool with_bias : {false, true}) {
    std::vector<std::int32_t> ids(std::size_t(tokens) * k);
    std::vector<float> weights(ids.size());
    moe::route_logits(CpuBackend(2), settings,
                      HostView<const float, 2>(logits.data(), {tokens, experts}),
                      HostView<const float, 1>(bias.data(), {with_bias ? experts : 0}),
                      HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                      HostView<float, 2>(weights.data(), {tokens, k}));
    int tokens_at_limit = 0;
    for (int t = 0; t < tokens; ++t) {
      std::set<int> groups, experts_seen;
      for (int j = 0; j < k; ++j) {
        groups.insert(ids[std::size_t(t) * k + j] / per_group);
        experts_seen.insert(ids[std::size_t(t) * k + j]);
      }
      INFO("token " << t << (with_bias ? " with bias" : " without bias"));
      REQUIRE(int(groups.size()) <= settings.n_limited_groups);
      REQUIRE(int(experts_seen.size()) == k);  // k distinct experts
      tokens_at_limit += int(groups.size()) == settings.n_limited_groups;
    }
    // The limit binds: many tokens would use more groups without it.
    CHECK(tokens_at_limit > tokens / 4);
  }
}

TEST_CASE("the -inf mask: with every bias very negative, no expert of a dropped group is chosen") {
  // With dropped groups filled with 0 instead of -inf, a masked expert (0) would beat every
  // eligible one (score − 100 < 0): this case catches that bug.
  const auto settings = moe::GateSettings::from_config<daedalus::DeepSeekV3>();
  const int tokens = 64, experts = settings.n_routed_experts, k = settings.topk;
  const int per_group = settings.experts_per_group();
  dt::Random rng(4400);
  const std::vector<float> logits = rng.uniform(std::size_t(tokens) * experts, 2.0);
  std::vector<float> bias = rng.uniform_in(std::size_t(experts), -100.5, -99.5);
  // Groups 5-7 are a little less negative: they must always be kept, with one more group.
  for (int e = 5 * per_group; e < experts; ++e) bias[std::size_t(e)] += 20.0f;
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());
  moe::route_logits(CpuBackend(2), settings,
                    HostView<const float, 2>(logits.data(), {tokens, experts}),
                    HostView<const float, 1>(bias.data(), {experts}),
                    HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                    HostView<float, 2>(weights.data(), {tokens, k}));
  const ref::Result want =
      ref::gate(reference_settings(settings), dt::widen(logits), tokens, dt::widen(bias));
  for (int t = 0; t < tokens; ++t) {
    double sum = 0.0;
    for (int j = 0; j < k; ++j) {
      const int e = ids[std::size_t(t) * k + j];
      INFO("token " << t << ", slot " << j << ", expert " << e);
      REQUIRE(want.group_kept[std::size_t(t) * settings.n_expert_groups + e / per_group] == 1);
      REQUIRE(e == want.ids[std::size_t(t) * k + j]);
      sum += weights[std::size_t(t) * k + j];
    }
    // Weights come from the unbiased scores: normalised, they sum to route_scale (not to
    // anything the -100 bias would produce).
    CHECK(sum == doctest::Approx(settings.route_scale).epsilon(1e-5));
  }
}

TEST_CASE("ties go to the lower expert id and the lower group id") {
  // Every logit equal: every score and group score ties.
  SUBCASE("V3 settings, all equal") {
    const auto s = moe::GateSettings::from_config<daedalus::DeepSeekV3>();
    const std::vector<float> logits(std::size_t(s.n_routed_experts), 0.25f);
    std::vector<std::int32_t> ids(std::size_t(s.topk));
    std::vector<float> weights(ids.size());
    moe::route_logits(CpuBackend(1), s, HostView<const float, 2>(logits.data(), {1, 256}),
                      HostView<const float, 1>(), HostView<std::int32_t, 2>(ids.data(), {1, 8}),
                      HostView<float, 2>(weights.data(), {1, 8}));
    // Groups 0-3 kept (lower group ids), experts 0..7 of group 0 chosen in increasing order.
    for (int j = 0; j < 8; ++j) CHECK(ids[std::size_t(j)] == j);
    for (int j = 0; j < 8; ++j) CHECK(weights[std::size_t(j)] == doctest::Approx(2.5 / 8));
  }
  SUBCASE("Tiny settings, ties across groups") {
    // Tiny: 12 experts, 4 groups of 3, 2 kept, top-3, with bias (top-2 sums). Groups 1 and 3
    // tie for best, group 2 third: groups 1 and 3 are kept. Inside, experts 4, 9 and 10 tie on
    // the top value; 4 < 9 < 10 in that order.
    const auto s = moe::GateSettings::from_config<daedalus::Tiny>();
    const std::vector<float> logits = {0, 0, 0, 0, 2, 1, 0.5f, 0.5f, 0.5f, 2, 2, -1};
    const std::vector<float> bias(12, 0.0f);
    std::vector<std::int32_t> ids(3);
    std::vector<float> weights(3);
    // Group 1 top-2 sum: σ(2)+σ(1); group 3: σ(2)+σ(2) — not a tie; make group 3's second
    // value 1 too by using expert 10's logit 1 instead.
    std::vector<float> l = logits;
    l[10] = 1.0f;
    l[11] = 2.0f;  // group 3 = {9: 2, 10: 1, 11: 2}: top-2 sum σ(2)+σ(2) > group 1's
    l[5] = 2.0f;   // group 1 = {3: 0, 4: 2, 5: 2}: now equal to group 3
    moe::route_logits(CpuBackend(1), s, HostView<const float, 2>(l.data(), {1, 12}),
                      HostView<const float, 1>(bias.data(), {12}),
                      HostView<std::int32_t, 2>(ids.data(), {1, 3}),
                      HostView<float, 2>(weights.data(), {1, 3}));
    // Candidates with σ(2): 4, 5 (group 1), 9, 11 (group 3); top-3 by lower id: 4, 5, 9.
    CHECK(ids[0] == 4);
    CHECK(ids[1] == 5);
    CHECK(ids[2] == 9);
  }
}

TEST_CASE_TEMPLATE("GateWeights keeps its packed copy in step with the weight", C, daedalus::Tiny,
                   daedalus::DeepSeekV2) {
  // The packed layout, element by element: packed[p][d][j] = W[64p + j][d], 0 past the experts
  // (Tiny: 12 experts in one panel of 64; V2: 160 in three), for random(), then after set_weight.
  auto gate = moe::GateWeights<C>::random(dt::stream_seed(4510));
  auto check_layout = [&] {
    const float* w = gate.weight().data();
    const float* packed = gate.packed_weight().data();
    CHECK(gate.packed_weight().extent(1) == 64);
    REQUIRE(gate.packed_weight().extent(0) == (C::n_routed_experts + 63) / 64 * C::dim);
    CHECK(reinterpret_cast<std::uintptr_t>(packed) % 64 == 0);
    int mismatches = 0;
    for (index_t p = 0; p * 64 < C::n_routed_experts; ++p) {
      for (index_t d = 0; d < C::dim; ++d) {
        for (index_t j = 0; j < 64; ++j) {
          const index_t e = p * 64 + j;
          const float want = e < C::n_routed_experts ? w[e * C::dim + d] : 0.0f;
          mismatches += packed[(p * C::dim + d) * 64 + j] != want;
        }
      }
    }
    CHECK(mismatches == 0);
  };
  check_layout();

  // set_weight: the gate then routes exactly as a gate built from the same arrays.
  dt::Random rng(4511);
  const std::vector<float> w2 =
      rng.uniform(std::size_t(C::n_routed_experts) * C::dim, 1.0 / std::sqrt(double(C::dim)));
  gate.set_weight(HostView<const float, 2>(w2.data(), {C::n_routed_experts, C::dim}));
  check_layout();
  const auto fresh = moe::GateWeights<C>::from_arrays(
      HostView<const float, 2>(w2.data(), {C::n_routed_experts, C::dim}), gate.bias());
  const int tokens = 50, k = C::n_activated_experts;
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
  std::vector<std::int32_t> ids_set(std::size_t(tokens) * k), ids_fresh(ids_set.size());
  std::vector<float> w_set(ids_set.size()), w_fresh(ids_set.size());
  moe::route(CpuBackend(2), gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
             HostView<std::int32_t, 2>(ids_set.data(), {tokens, k}),
             HostView<float, 2>(w_set.data(), {tokens, k}));
  moe::route(CpuBackend(2), fresh, HostView<const float, 2>(x.data(), {tokens, C::dim}),
             HostView<std::int32_t, 2>(ids_fresh.data(), {tokens, k}),
             HostView<float, 2>(w_fresh.data(), {tokens, k}));
  CHECK(ids_set == ids_fresh);
  CHECK(w_set == w_fresh);
  // And not as the old weight did (the new weight matters).
  const auto old_gate = moe::GateWeights<C>::random(dt::stream_seed(4510));
  std::vector<std::int32_t> ids_old(ids_set.size());
  std::vector<float> w_old(ids_set.size());
  moe::route(CpuBackend(2), old_gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
             HostView<std::int32_t, 2>(ids_old.data(), {tokens, k}),
             HostView<float, 2>(w_old.data(), {tokens, k}));
  CHECK(ids_old != ids_set);
}

TEST_CASE("moe::route is bitwise identical across thread counts") {
  using C = daedalus::DeepSeekV3;
  const auto gate = moe::GateWeights<C>::random(dt::stream_seed(4500));
  dt::Random rng(4501);
  for (const int tokens : {5, 300}) {
    const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
    std::vector<std::int32_t> ids_ref;
    std::vector<float> w_ref;
    for (const int threads : {1, 2, 3}) {
      std::vector<std::int32_t> ids(std::size_t(tokens) * 8);
      std::vector<float> w(ids.size());
      moe::route(CpuBackend(threads), gate, HostView<const float, 2>(x.data(), {tokens, C::dim}),
                 HostView<std::int32_t, 2>(ids.data(), {tokens, 8}),
                 HostView<float, 2>(w.data(), {tokens, 8}));
      if (threads == 1) {
        ids_ref = ids;
        w_ref = w;
      } else {
        INFO(tokens << " tokens, " << threads << " threads");
        CHECK(ids == ids_ref);
        CHECK(w == w_ref);
      }
    }
  }
}
