// SPDX-License-Identifier: Apache-2.0
//
// Auxiliary-loss-free load balancing (DeepSeek-V3 report, section 2.1.2; arXiv 2408.15664) on a
// skewed router, with and without the bias update.
//
// The router: 32 experts in 4 groups (2 kept per token), top-4, sigmoid scores with a selection
// bias, normalised weights (DeepSeek-V3's gate at a small size). Each step routes a batch of
// 8,192 tokens whose logits are uniform in [-2, 2] plus a fixed skew: +1.0 for experts 0-7 and
// +0.5 for experts 8-11, so that without balancing the first experts take far more than their
// share. Two routers see the same batches: one updates its bias after every step with the sign
// rule (b_i += γ·sign(c̄ − c_i), γ = 0.001), the other never does.
//
// Prints MaxVio_batch of both every 50 steps, and writes every step to a CSV (default
// moe_balance.csv; first argument to change it) that scripts/plot_moe_balance.py turns into
// docs/img/moe_balance.png. Usage: example_moe_balance [csv path] [steps]

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using namespace daedalus;

constexpr int kExperts = 32, kTopk = 4, kTokens = 8192;

/// A fast uniform in [-1, 1) (splitmix64): a step draws 262,144 logits.
struct Uniform {
  std::uint64_t state;
  float operator()() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return float(double(z >> 40) * 0x1p-23 - 1.0);
  }
};

float skew(int expert) { return expert < 8 ? 1.0f : (expert < 12 ? 0.5f : 0.0f); }

/// One router: its selection bias, load statistics and (optionally) balancer.
struct Router {
  std::vector<float> bias = std::vector<float>(kExperts, 0.0f);
  moe::LoadStats stats{kExperts};
  bool balance;
  std::vector<std::int32_t> ids = std::vector<std::int32_t>(std::size_t(kTokens) * kTopk);
  std::vector<float> weights = std::vector<float>(std::size_t(kTokens) * kTopk);

  void step(const CpuBackend& cpu, const moe::GateSettings& settings,
            const std::vector<float>& logits, const moe::BiasBalancer& balancer) {
    moe::route_logits(cpu, settings, HostView<const float, 2>(logits.data(), {kTokens, kExperts}),
                      HostView<const float, 1>(bias.data(), {kExperts}),
                      HostView<std::int32_t, 2>(ids.data(), {kTokens, kTopk}),
                      HostView<float, 2>(weights.data(), {kTokens, kTopk}));
    stats.record(HostView<const std::int32_t, 2>(ids.data(), {kTokens, kTopk}));
    if (balance) balancer.update(HostView<float, 1>(bias.data(), {kExperts}), stats.step_counts());
  }
};

}  // namespace

int main(int argc, char** argv) {
  const std::string csv_path = argc > 1 ? argv[1] : "moe_balance.csv";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 1000;
  if (steps < 1) {
    std::fprintf(stderr, "example_moe_balance: steps must be at least 1\n");
    return 2;
  }

  moe::GateSettings settings;
  settings.score_func = ScoreFunc::sigmoid;
  settings.n_routed_experts = kExperts;
  settings.n_expert_groups = 4;
  settings.n_limited_groups = 2;
  settings.topk = kTopk;
  settings.normalize = true;
  const moe::BiasBalancer balancer(kExperts, {moe::BiasUpdate::sign, 0.001});
  const CpuBackend cpu;

  Router balanced, unbalanced;
  balanced.balance = true;
  unbalanced.balance = false;
  std::vector<float> logits(std::size_t(kTokens) * kExperts);
  std::vector<float> scores(logits.size());
  Uniform uniform{20261129};

  std::FILE* csv = std::fopen(csv_path.c_str(), "w");
  if (csv == nullptr) {
    std::fprintf(stderr, "example_moe_balance: cannot write %s\n", csv_path.c_str());
    return 1;
  }
  std::fprintf(csv,
               "step,maxvio_batch_with_update,maxvio_batch_without_update,bias_min,bias_max\n");
  std::printf("%d experts (4 groups, 2 kept), top-%d, %d tokens a step, sign rule, gamma 0.001\n",
              kExperts, kTopk, kTokens);
  std::printf("%6s  %22s  %22s\n", "step", "MaxVio_batch (update)", "MaxVio_batch (none)");

  int first_below = -1;
  for (int s = 0; s < steps; ++s) {
    for (int t = 0; t < kTokens; ++t)
      for (int e = 0; e < kExperts; ++e)
        logits[std::size_t(t) * kExperts + e] = 2.0f * uniform() + skew(e);
    balanced.step(cpu, settings, logits, balancer);
    unbalanced.step(cpu, settings, logits, balancer);
    const double with_update = balanced.stats.max_vio_batch();
    const double without = unbalanced.stats.max_vio_batch();
    if (first_below < 0 && with_update < 0.1) first_below = s;
    float bias_min = balanced.bias[0], bias_max = balanced.bias[0];
    for (const float b : balanced.bias) {
      bias_min = std::min(bias_min, b);
      bias_max = std::max(bias_max, b);
    }
    std::fprintf(csv, "%d,%.6f,%.6f,%.6f,%.6f\n", s, with_update, without, bias_min, bias_max);
    if (s % 50 == 0 || s == steps - 1)
      std::printf("%6d  %22.4f  %22.4f\n", s, with_update, without);
  }
  std::fclose(csv);

  // The balance losses of the last batch, as values (DeepSeek-V3 eqs. 17-20; the classic loss).
  moe::compute_scores(cpu, ScoreFunc::sigmoid,
                      HostView<const float, 2>(logits.data(), {kTokens, kExperts}),
                      HostView<float, 2>(scores.data(), {kTokens, kExperts}));
  const HostView<const float, 2> last_scores(scores.data(), {kTokens, kExperts});
  std::printf("\nfirst step with MaxVio_batch < 0.1 (update): %d\n", first_below);
  std::printf("mean MaxVio_batch over the run: update %.4f, none %.4f\n",
              balanced.stats.mean_max_vio_batch(), unbalanced.stats.mean_max_vio_batch());
  std::printf("MaxVio_global over the run:     update %.4f, none %.4f\n",
              balanced.stats.max_vio_global(), unbalanced.stats.max_vio_global());
  std::printf(
      "auxiliary loss of the last batch (alpha 1): update %.4f, none %.4f\n",
      moe::auxiliary_balance_loss(
          last_scores, HostView<const std::int32_t, 2>(balanced.ids.data(), {kTokens, kTopk}), 1.0),
      moe::auxiliary_balance_loss(
          last_scores, HostView<const std::int32_t, 2>(unbalanced.ids.data(), {kTokens, kTopk}),
          1.0));
  std::printf("sequence-wise loss of the last batch as one sequence (alpha 1): %.4f\n",
              moe::sequence_balance_loss(last_scores, kTopk, 1.0));
  std::printf("wrote %s\n", csv_path.c_str());
  return 0;
}
