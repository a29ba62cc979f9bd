// SPDX-License-Identifier: Apache-2.0
// The gate's AVX-512 routing path (moe/cpu/gate_vector_route.hpp) against the generic path
// (cpu_gate::route_scored_token_generic), its oracle: on the same scores, the same ids in the
// same order and the same weights, bit for bit, for the presets and for settings that stress its
// edges (groups of one expert, groups not a multiple of 16 wide, no group limit, k = 16,
// multiplicative bias), on random scores, on scores with many exact ties, and with every bias
// very negative. The generic path itself is checked against the fp64 reference in
// gate_reference_test.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <daedalus/config/presets.hpp>
#include <daedalus/moe/cpu/gate.hpp>
#include <daedalus/moe/gate.hpp>
#include <string>
#include <vector>

#include "support/random.hpp"

namespace {

using daedalus::ScoreFunc;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace cpu_gate = daedalus::moe::cpu_gate;

enum class Bias { none, small, very_negative };

/// Logits of one token: uniform in ±scale, or (ties) drawn from 5 values so that many scores,
/// selection scores and group scores are exactly equal.
std::vector<float> token_logits(dt::Random& rng, int experts, double scale, bool ties) {
  std::vector<float> logits = rng.uniform(std::size_t(experts), scale);
  if (ties) {
    for (float& l : logits) l = float(rng.integer(-2, 2)) * 0.5f + 0.125f;
  }
  return logits;
}

/// Routes `tokens` random tokens through both paths and requires identical outputs. Every third
/// token has tied logits, every fifth large ones.
void check_paths_agree(const moe::GateSettings& settings, Bias bias_kind, int tokens,
                       std::uint64_t stream) {
  settings.validate("check_paths_agree");
  const int experts = settings.n_routed_experts, k = settings.topk;
  dt::Random rng(stream);
  std::vector<float> bias;
  if (bias_kind == Bias::small) {
    bias = settings.bias_mode == moe::BiasMode::multiplicative
               ? rng.uniform_in(std::size_t(experts), 0.8, 1.2)
               : rng.uniform(std::size_t(experts), 0.1);
  } else if (bias_kind == Bias::very_negative) {
    // Selection scores near -100 lose their low bits (ulp 2^-17 · 8): many exact ties, and every
    // selection score far below the 0 a wrong fill of dropped groups would give.
    bias = rng.uniform_in(std::size_t(experts), -100.5, -99.5);
  }
  const float* b = bias.empty() ? nullptr : bias.data();
  cpu_gate::TokenScratch scratch(settings);
  std::vector<std::int32_t> ids_generic(static_cast<std::size_t>(k)),
      ids_vector(static_cast<std::size_t>(k));
  std::vector<float> w_generic(static_cast<std::size_t>(k)), w_vector(static_cast<std::size_t>(k));
  for (int t = 0; t < tokens; ++t) {
    const bool ties = t % 3 == 2;
    const double scale = t % 5 == 4 ? 30.0 : 2.0;  // 30: saturated sigmoid, peaked softmax
    const std::vector<float> logits = token_logits(rng, experts, scale, ties);
    REQUIRE(cpu_gate::token_scores(settings.score_func, logits.data(), experts, scratch));
    cpu_gate::route_scored_token_generic(settings, b, scratch, ids_generic.data(),
                                         w_generic.data());
    cpu_gate::route_scored_token(settings, b, scratch, ids_vector.data(), w_vector.data());
    INFO("token " << t << (ties ? " (ties)" : "") << ", logit scale " << scale);
    REQUIRE(ids_vector == ids_generic);
    REQUIRE(w_vector == w_generic);
  }
}

moe::GateSettings settings_of(ScoreFunc f, int experts, int groups, int limited, int k,
                              bool normalize = true) {
  moe::GateSettings s;
  s.score_func = f;
  s.n_routed_experts = experts;
  s.n_expert_groups = groups;
  s.n_limited_groups = limited;
  s.topk = k;
  s.normalize = normalize;
  s.route_scale = 2.5;
  return s;
}

}  // namespace

TEST_CASE("the vector path covers the presets on an AVX-512 build") {
#if defined(__AVX512F__)
  CHECK(cpu_gate::vector_route_applies(moe::GateSettings::from_config<daedalus::DeepSeekV3>()));
  CHECK(cpu_gate::vector_route_applies(moe::GateSettings::from_config<daedalus::DeepSeekV2>()));
  CHECK(cpu_gate::vector_route_applies(moe::GateSettings::from_config<daedalus::DeepSeekV2Lite>()));
  CHECK(cpu_gate::vector_route_applies(moe::GateSettings::from_config<daedalus::Tiny>()));
  CHECK_FALSE(cpu_gate::vector_route_applies(settings_of(ScoreFunc::sigmoid, 64, 16, 4, 8)));
  CHECK_FALSE(cpu_gate::vector_route_applies(settings_of(ScoreFunc::sigmoid, 64, 8, 4, 17)));
#else
  CHECK_FALSE(cpu_gate::vector_route_applies(moe::GateSettings::from_config<daedalus::Tiny>()));
  MESSAGE("built without AVX-512: the vector path is not compiled, both paths are the generic one");
#endif
}

TEST_CASE_TEMPLATE("the vector routing path gives the generic path's ids and weights", C,
                   daedalus::DeepSeekV3, daedalus::DeepSeekV2, daedalus::DeepSeekV2Lite,
                   daedalus::Tiny) {
  const auto settings = moe::GateSettings::from_config<C>();
  SUBCASE("no bias") { check_paths_agree(settings, Bias::none, 300, 4700); }
  SUBCASE("small bias") { check_paths_agree(settings, Bias::small, 300, 4710); }
  SUBCASE("every bias very negative") {
    check_paths_agree(settings, Bias::very_negative, 300, 4720);
  }
  SUBCASE("multiplicative bias") {
    auto s = settings;
    s.bias_mode = moe::BiasMode::multiplicative;
    check_paths_agree(s, Bias::small, 300, 4730);
  }
  SUBCASE("the other score function") {
    auto s = settings;
    s.score_func =
        settings.score_func == ScoreFunc::sigmoid ? ScoreFunc::softmax : ScoreFunc::sigmoid;
    check_paths_agree(s, Bias::small, 300, 4740);
  }
}

TEST_CASE("the vector routing path at its edges") {
  const ScoreFunc sig = ScoreFunc::sigmoid, soft = ScoreFunc::softmax;
  struct Case {
    const char* name;
    moe::GateSettings settings;
  };
  const Case cases[] = {
      {"V3 with k = 16", settings_of(sig, 256, 8, 4, 16)},
      {"V3 with every group kept", settings_of(sig, 256, 8, 8, 8)},
      {"V3 with one group kept, k = its 32 experts' half", settings_of(sig, 256, 8, 1, 16)},
      {"8 groups of one expert", settings_of(sig, 8, 8, 3, 2)},
      {"8 groups of 5", settings_of(soft, 40, 8, 3, 6, false)},
      {"8 groups of 21 (two vectors each, a tail)", settings_of(sig, 168, 8, 2, 7)},
      {"3 groups of 7", settings_of(sig, 21, 3, 2, 5)},
      {"one group of 300 experts, k = 1", settings_of(soft, 300, 1, 1, 1)},
      {"one group of 10 experts, k = 10", settings_of(sig, 10, 1, 1, 10)},
      {"2 groups of 17, k = 16 from one", settings_of(sig, 34, 2, 1, 16)},
  };
  std::uint64_t stream = 4750;
  for (const Case& c : cases) {
    for (const Bias bias : {Bias::none, Bias::small, Bias::very_negative}) {
      CAPTURE(c.name);
      CAPTURE(int(bias));
      check_paths_agree(c.settings, bias, 120, stream++);
    }
  }
}

TEST_CASE("the vector routing path: every score equal") {
  // All candidates tie: the insertion-sort fallback (more than 16 candidates at τ) decides, and
  // the groups tie too (lower group ids kept).
  for (const bool with_bias : {false, true}) {
    auto s = moe::GateSettings::from_config<daedalus::DeepSeekV3>();
    cpu_gate::TokenScratch scratch(s);
    const std::vector<float> logits(256, 0.5f);
    const std::vector<float> bias(256, 0.25f);
    REQUIRE(cpu_gate::token_scores(s.score_func, logits.data(), 256, scratch));
    std::vector<std::int32_t> ids(8);
    std::vector<float> w(8);
    cpu_gate::route_scored_token(s, with_bias ? bias.data() : nullptr, scratch, ids.data(),
                                 w.data());
    for (int j = 0; j < 8; ++j) CHECK(ids[std::size_t(j)] == j);
  }
}
