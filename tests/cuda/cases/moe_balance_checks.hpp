// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for MoE balancing on the GPU (moe/cuda/balance.cuh), shared by daedalus_cuda_tests
// and daedalus_emulated_tests: the device balance losses against an fp64 reference and the CPU
// functions, bitwise the same from run to run, with the CPU's typed errors and messages; and the
// balancing simulation of tests/moe/balance_test.cpp (support/skewed_router.hpp) routed, counted
// and rebalanced on the device, whose MaxVio curve must equal the CPU's step for step. The
// simulation's TEST_CASEs live in the two test files, which choose its size (the full CPU shape
// on a GPU, a reduced one under emulation).
// Included by exactly one translation unit per binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/balance.hpp>
#include <daedalus/moe/cuda/balance.cuh>
#include <daedalus/moe/cuda/gate.cuh>
#include <daedalus/moe/cuda/routing_plan.cuh>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_gate_reference.hpp"
#include "support/skewed_router.hpp"

namespace daedalus::testing::moe_balance_checks {

namespace moe = daedalus::moe;
namespace ref = moe_gate_reference;

using ScoreView = TensorView<const float, 2, DeviceMemory>;
using IdView = TensorView<const std::int32_t, 2, DeviceMemory>;

inline bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }

/// Random scores in [0.01, 1] (never zero) or, `coarse`, eight values, so that a token's top-K
/// has exact ties (lower expert first); distinct random ids per token.
struct LossCase {
  int tokens, experts, k;
  bool coarse;
};

struct LossData {
  std::vector<float> scores;
  std::vector<std::int32_t> ids;
};

inline LossData loss_data(const LossCase& c, std::uint64_t stream) {
  Random rng(stream);
  LossData d{rng.uniform_in(std::size_t(c.tokens) * c.experts, 0.01, 1.0), {}};
  if (c.coarse) {
    for (float& s : d.scores) s = float(1 + rng.integer(0, 7)) / 8.0f;
  }
  for (int t = 0; t < c.tokens; ++t) {
    std::vector<std::int32_t> row;
    while (int(row.size()) < c.k) {
      const auto e = std::int32_t(rng.integer(0, c.experts - 1));
      if (std::find(row.begin(), row.end(), e) == row.end()) row.push_back(e);
    }
    d.ids.insert(d.ids.end(), row.begin(), row.end());
  }
  return d;
}

/// Both losses on the device equal the fp64 reference and the CPU functions, the value and the
/// device-scalar forms give the same bits, and a second call gives the same bits again. Shapes:
/// V3's 256 experts, top-8; one token; T spanning several 64-token chunks and not a multiple of
/// them; exact ties.
inline void check_losses_match_reference(const CudaBackend& cuda) {
  const LossCase cases[] = {
      {37, 12, 3, false}, {200, 64, 6, false}, {131, 256, 8, false},
      {1, 1, 1, false},   {97, 12, 4, true},   {65, 16, 16, false},
  };
  std::uint64_t stream = 4800;
  moe::DeviceBalanceLoss workspace(cuda);  // reused across shapes: its scratch grows and shrinks
  cuda::DeviceBuffer<double> scalar(1);
  for (const LossCase& c : cases) {
    CAPTURE(c.tokens);
    CAPTURE(c.experts);
    CAPTURE(c.k);
    CAPTURE(c.coarse);
    const LossData d = loss_data(c, ++stream);
    const auto scores_d = cuda::to_device(cuda, d.scores);
    const auto ids_d = cuda::to_device(cuda, d.ids);
    const ScoreView scores(scores_d.data(), {c.tokens, c.experts});
    const IdView ids(ids_d.data(), {c.tokens, c.k});
    const HostView<const float, 2> host_scores(d.scores.data(), {c.tokens, c.experts});
    const HostView<const std::int32_t, 2> host_ids(d.ids.data(), {c.tokens, c.k});

    const double seq = moe::sequence_balance_loss(cuda, scores, c.k, 1e-4);
    const double aux = moe::auxiliary_balance_loss(cuda, scores, ids, 0.003);
    // Every sum runs in fp64 over fp32 inputs (exact in fp64), on the device, the CPU and the
    // reference alike, in different orders: each of the T-term and E-term sums is within
    // (T + E)·2^-53 ≈ 4e-14 (T + E ≤ 400) of the exact value, relative, so 1e-12 has margin.
    // The top-K choice is exact (the same comparisons on the same floats), so f_i agrees.
    CHECK(seq == doctest::Approx(
                     ref::sequence_balance_loss(widen(d.scores), c.tokens, c.experts, c.k, 1e-4))
                     .epsilon(1e-12));
    CHECK(seq ==
          doctest::Approx(moe::sequence_balance_loss(host_scores, c.k, 1e-4)).epsilon(1e-12));
    CHECK(aux == doctest::Approx(ref::auxiliary_balance_loss(widen(d.scores), d.ids, c.tokens,
                                                             c.experts, c.k, 0.003))
                     .epsilon(1e-12));
    CHECK(
        aux ==
        doctest::Approx(moe::auxiliary_balance_loss(host_scores, host_ids, 0.003)).epsilon(1e-12));

    // Deterministic: the same bits again, from the value form and from the device-scalar form.
    CHECK(same_bits(moe::sequence_balance_loss(cuda, scores, c.k, 1e-4), seq));
    CHECK(same_bits(workspace.sequence(cuda, scores, c.k, 1e-4), seq));
    workspace.sequence(cuda, scores, c.k, 1e-4,
                       TensorView<double, 1, DeviceMemory>(scalar.data(), {1}));
    workspace.check(cuda);
    CHECK(same_bits(cuda::to_host(cuda, scalar).front(), seq));
    CHECK(same_bits(moe::auxiliary_balance_loss(cuda, scores, ids, 0.003), aux));
    workspace.auxiliary(cuda, scores, ids, 0.003,
                        TensorView<double, 1, DeviceMemory>(scalar.data(), {1}));
    workspace.check(cuda);
    CHECK(same_bits(cuda::to_host(cuda, scalar).front(), aux));
  }

  // Uniform scores: P_i = 1/E, both losses equal α whatever the choice; all the score on the
  // two experts every token picks: α·E/K (the tests of the CPU functions, on the device).
  const std::vector<float> flat(std::size_t(4) * 8, 0.5f);
  const std::vector<std::int32_t> skewed = {0, 1, 0, 1, 0, 1, 0, 1};
  std::vector<float> peaked(std::size_t(4) * 8, 0.0f);
  for (std::size_t t = 0; t < 4; ++t) peaked[t * 8] = peaked[t * 8 + 1] = 0.7f;
  const auto flat_d = cuda::to_device(cuda, flat);
  const auto peaked_d = cuda::to_device(cuda, peaked);
  const auto skewed_d = cuda::to_device(cuda, skewed);
  const IdView skewed_ids(skewed_d.data(), {4, 2});
  CHECK(moe::sequence_balance_loss(cuda, ScoreView(flat_d.data(), {4, 8}), 2, 1.0) ==
        doctest::Approx(1.0));
  CHECK(moe::auxiliary_balance_loss(cuda, ScoreView(flat_d.data(), {4, 8}), skewed_ids, 1.0) ==
        doctest::Approx(1.0));
  CHECK(moe::sequence_balance_loss(cuda, ScoreView(peaked_d.data(), {4, 8}), 2, 1.0) ==
        doctest::Approx(4.0));
  CHECK(moe::auxiliary_balance_loss(cuda, ScoreView(peaked_d.data(), {4, 8}), skewed_ids, 1.0) ==
        doctest::Approx(4.0));
}

/// Bad input: the CPU functions' error types and messages. Shapes and k throw before anything
/// is enqueued; a bad score (naming the first bad token) or id (naming token and slot) is found
/// on the device. A refused device-scalar call leaves its output unchanged, check() reports it
/// once, and the workspace computes the next call normally.
inline void check_loss_bad_input(const CudaBackend& cuda) {
  const LossCase c{23, 12, 3, false};
  const LossData good = loss_data(c, 4900);
  const auto scores_d = cuda::to_device(cuda, good.scores);
  const auto ids_d = cuda::to_device(cuda, good.ids);
  const ScoreView scores(scores_d.data(), {c.tokens, c.experts});
  const IdView ids(ids_d.data(), {c.tokens, c.k});

  // Value errors: the device's message is the CPU's, for each loss.
  const auto same_error = [&](const std::vector<float>& bad_scores,
                              const std::vector<std::int32_t>& bad_ids, const std::string& part,
                              bool id_error) {
    CAPTURE(part);
    const auto s_d = cuda::to_device(cuda, bad_scores);
    const auto i_d = cuda::to_device(cuda, bad_ids);
    const ScoreView s(s_d.data(), {c.tokens, c.experts});
    const IdView i(i_d.data(), {c.tokens, c.k});
    const HostView<const float, 2> hs(bad_scores.data(), {c.tokens, c.experts});
    const HostView<const std::int32_t, 2> hi(bad_ids.data(), {c.tokens, c.k});
    if (!id_error) {
      const std::string device =
          message_of<NumericError>([&] { (void)moe::sequence_balance_loss(cuda, s, c.k); });
      CHECK(contains(device, part));
      CHECK(device == message_of<NumericError>([&] { (void)moe::sequence_balance_loss(hs, c.k); }));
      const std::string aux =
          message_of<NumericError>([&] { (void)moe::auxiliary_balance_loss(cuda, s, i); });
      CHECK(contains(aux, part));
      CHECK(aux == message_of<NumericError>([&] { (void)moe::auxiliary_balance_loss(hs, hi); }));
    } else {
      const std::string aux =
          message_of<OutOfRange>([&] { (void)moe::auxiliary_balance_loss(cuda, s, i); });
      CHECK(contains(aux, part));
      CHECK(aux == message_of<OutOfRange>([&] { (void)moe::auxiliary_balance_loss(hs, hi); }));
    }
  };
  std::vector<float> nan_scores = good.scores;
  nan_scores[std::size_t(9 * c.experts + 2)] = -1.0f;  // a later token: the first one is named
  nan_scores[std::size_t(5 * c.experts + 7)] = std::numeric_limits<float>::quiet_NaN();
  nan_scores[std::size_t(5 * c.experts + 9)] = INFINITY;
  same_error(nan_scores, good.ids, "loss: token 5 has score nan at expert 7", false);
  std::vector<float> negative = good.scores;
  negative[std::size_t(17 * c.experts + 11)] = -0.25f;
  same_error(negative, good.ids, "token 17 has score -0.25 at expert 11", false);
  std::vector<float> zero_row = good.scores;
  std::fill_n(zero_row.begin() + 3 * c.experts, c.experts, 0.0f);
  same_error(zero_row, good.ids, "token 3 has scores summing to 0", false);
  std::vector<std::int32_t> bad_ids = good.ids;
  bad_ids[std::size_t(20 * c.k + 2)] = -1;
  bad_ids[std::size_t(6 * c.k + 1)] = 12;
  same_error(good.scores, bad_ids, "'topk_ids' holds 12 at token 6, slot 1", true);
  // A bad score outranks a bad id, as on the CPU (which checks the scores first).
  same_error(nan_scores, bad_ids, "token 5 has score nan", false);

  // Shapes and k: InvalidArgument with the CPU's message.
  const HostView<const float, 2> hs(good.scores.data(), {c.tokens, c.experts});
  const HostView<const std::int32_t, 2> hi(good.ids.data(), {c.tokens, c.k});
  for (const int k : {0, c.experts + 1}) {
    const std::string device =
        message_of<InvalidArgument>([&] { (void)moe::sequence_balance_loss(cuda, scores, k); });
    CHECK(contains(device, "'k' is " + std::to_string(k) + "; expected a value in [1, 12]"));
    CHECK(device == message_of<InvalidArgument>([&] { (void)moe::sequence_balance_loss(hs, k); }));
  }
  const std::string short_ids = message_of<InvalidArgument>([&] {
    (void)moe::auxiliary_balance_loss(cuda, scores, IdView(ids_d.data(), {c.tokens - 1, c.k}));
  });
  CHECK(contains(short_ids, "'topk_ids' has extents [22,3]; expected [23,3]"));
  CHECK(short_ids == message_of<InvalidArgument>([&] {
          (void)moe::auxiliary_balance_loss(
              hs, HostView<const std::int32_t, 2>(good.ids.data(), {c.tokens - 1, c.k}));
        }));
  const std::string no_columns = message_of<InvalidArgument>([&] {
    (void)moe::auxiliary_balance_loss(cuda, scores, IdView(ids_d.data(), {c.tokens, 0}));
  });
  CHECK(contains(no_columns, "expected at least one column"));
  const std::string no_tokens = message_of<InvalidArgument>([&] {
    (void)moe::sequence_balance_loss(cuda, ScoreView(scores_d.data(), {0, c.experts}), 1);
  });
  CHECK(contains(no_tokens, "'scores' has extents [0,12]; expected at least one token"));
  CHECK(no_tokens == message_of<InvalidArgument>([&] {
          (void)moe::sequence_balance_loss(
              HostView<const float, 2>(good.scores.data(), {0, c.experts}), 1);
        }));

  // The device-scalar form: a refused call changes nothing; check() reports it once.
  moe::DeviceBalanceLoss workspace(cuda);
  cuda::DeviceBuffer<double> scalar = cuda::to_device(cuda, std::vector<double>{42.0});
  const TensorView<double, 1, DeviceMemory> out(scalar.data(), {1});
  const auto bad_d = cuda::to_device(cuda, nan_scores);
  workspace.sequence(cuda, ScoreView(bad_d.data(), {c.tokens, c.experts}), c.k, 1e-4, out);
  workspace.sequence(cuda, ScoreView(bad_d.data(), {c.tokens, c.experts}), c.k, 1e-4, out);
  CHECK(cuda::to_host(cuda, scalar).front() == 42.0);
  CHECK(contains(message_of<NumericError>([&] { workspace.check(cuda); }),
                 "daedalus::moe::sequence_balance_loss: token 5 has score nan at expert 7"));
  CHECK(message_of<NumericError>([&] { workspace.check(cuda); }) == "<nothing thrown>");
  CHECK(contains(message_of<InvalidArgument>([&] {
                   workspace.sequence(cuda, scores, c.k, 1e-4,
                                      TensorView<double, 1, DeviceMemory>(scalar.data(), {2}));
                 }),
                 "'loss' has extents [2]; expected [1]"));
  CHECK(cuda::to_host(cuda, scalar).front() == 42.0);
  workspace.auxiliary(cuda, scores, ids, 0.003, out);
  workspace.check(cuda);
  CHECK(cuda::to_host(cuda, scalar).front() ==
        doctest::Approx(moe::auxiliary_balance_loss(hs, hi, 0.003)).epsilon(1e-12));
}

/// MaxVio_batch of every step, the final bias and the run's statistics of one simulation.
struct SimulationRun {
  std::vector<double> max_vio;
  std::vector<float> bias;
  double mean_max_vio = 0.0, max_vio_global = 0.0;
};

/// The simulation on the CPU: route_logits, LoadStats::record, BiasBalancer::update.
inline SimulationRun simulate_on_cpu(std::uint64_t seed, int tokens, int steps, bool update,
                                     double gamma) {
  SkewedRouter router(seed, tokens);
  const int experts = SkewedRouter::experts, k = SkewedRouter::k;
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  std::vector<float> weights(ids.size());
  moe::LoadStats stats(experts);
  const moe::BiasBalancer balancer(experts, {moe::BiasUpdate::sign, gamma});
  const CpuBackend cpu(1);
  SimulationRun run;
  for (int s = 0; s < steps; ++s) {
    router.draw();
    moe::route_logits(cpu, router.settings,
                      HostView<const float, 2>(router.logits.data(), {tokens, experts}),
                      HostView<const float, 1>(router.bias.data(), {experts}),
                      HostView<std::int32_t, 2>(ids.data(), {tokens, k}),
                      HostView<float, 2>(weights.data(), {tokens, k}));
    stats.record(HostView<const std::int32_t, 2>(ids.data(), {tokens, k}));
    run.max_vio.push_back(stats.max_vio_batch());
    if (update)
      balancer.update(HostView<float, 1>(router.bias.data(), {experts}), stats.step_counts());
  }
  run.bias = router.bias;
  run.mean_max_vio = stats.mean_max_vio_batch();
  run.max_vio_global = stats.max_vio_global();
  return run;
}

/// The same simulation on the device, from the same logits (drawn on the host from the same
/// stream and uploaded each step): route_logits, DeviceRoutingPlan, DeviceLoadStats::record and
/// DeviceBiasBalancer::update, with the counts and the bias kept on the device. The host reads
/// each step's MaxVio only to compare the curves.
inline SimulationRun simulate_on_device(const CudaBackend& cuda, std::uint64_t seed, int tokens,
                                        int steps, bool update, double gamma) {
  SkewedRouter router(seed, tokens);
  const int experts = SkewedRouter::experts, k = SkewedRouter::k;
  cuda::DeviceBuffer<float> logits(std::size_t(tokens) * experts);
  cuda::DeviceBuffer<float> bias = cuda::to_device(cuda, router.bias);
  cuda::DeviceBuffer<std::int32_t> ids(std::size_t(tokens) * k);
  cuda::DeviceBuffer<float> weights(std::size_t(tokens) * k);
  moe::DeviceRoutingPlan plan;
  moe::DeviceLoadStats stats(cuda, experts);
  const moe::DeviceBiasBalancer balancer(cuda, experts, {moe::BiasUpdate::sign, gamma});
  const TensorView<float, 1, DeviceMemory> bias_view(bias.data(), {experts});
  SimulationRun run;
  for (int s = 0; s < steps; ++s) {
    cuda::copy(cuda, logits, std::span<const float>(router.draw()));
    moe::route_logits(cuda, router.settings,
                      TensorView<const float, 2, DeviceMemory>(logits.data(), {tokens, experts}),
                      TensorView<const float, 1, DeviceMemory>(bias.data(), {experts}),
                      TensorView<std::int32_t, 2, DeviceMemory>(ids.data(), {tokens, k}),
                      TensorView<float, 2, DeviceMemory>(weights.data(), {tokens, k}));
    plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids.data(), {tokens, k}),
               TensorView<const float, 2, DeviceMemory>(weights.data(), {tokens, k}), experts);
    stats.record(cuda, plan);
    run.max_vio.push_back(stats.max_vio_batch(cuda));  // synchronises: the logits may be redrawn
    if (update) balancer.update(cuda, bias_view, stats);
  }
  balancer.check(cuda, bias_view);
  run.bias = cuda::to_host(cuda, bias);
  run.mean_max_vio = stats.mean_max_vio_batch(cuda);
  run.max_vio_global = stats.max_vio_global(cuda);
  return run;
}

/// The balancing simulation on the device equals the CPU's exactly, with and without the bias
/// update: the same fp32 logits give the same ids (gate.cuh), hence the same counts, the same
/// MaxVio (the same double arithmetic) and the same bias updates (the same double arithmetic,
/// rounded to float once), step after step. Then the behaviour itself: MaxVio starts above 1
/// and, with the update, its mean over the last `late_steps` steps is below `late_bound`;
/// without it MaxVio never falls below 1.
/// @return the device run with the update, for the caller's own checks of its shape.
inline SimulationRun check_simulation(const CudaBackend& cuda, std::uint64_t seed, int tokens,
                                      int steps, double gamma, int steps_without, int late_steps,
                                      double late_bound) {
  CAPTURE(tokens);
  CAPTURE(steps);
  CAPTURE(gamma);
  const SimulationRun cpu = simulate_on_cpu(seed, tokens, steps, true, gamma);
  const SimulationRun gpu = simulate_on_device(cuda, seed, tokens, steps, true, gamma);
  REQUIRE(gpu.max_vio.size() == cpu.max_vio.size());
  std::size_t curve_mismatches = 0;
  for (std::size_t s = 0; s < cpu.max_vio.size(); ++s)
    curve_mismatches += same_bits(gpu.max_vio[s], cpu.max_vio[s]) ? 0 : 1;
  CHECK(curve_mismatches == 0);
  CHECK(gpu.bias == cpu.bias);
  CHECK(same_bits(gpu.mean_max_vio, cpu.mean_max_vio));
  CHECK(same_bits(gpu.max_vio_global, cpu.max_vio_global));

  const SimulationRun cpu_without = simulate_on_cpu(seed, tokens, steps_without, false, gamma);
  const SimulationRun gpu_without =
      simulate_on_device(cuda, seed, tokens, steps_without, false, gamma);
  CHECK(gpu_without.max_vio == cpu_without.max_vio);
  CHECK(gpu_without.bias == std::vector<float>(SkewedRouter::experts, 0.0f));

  double late_mean = 0.0;
  for (int s = steps - late_steps; s < steps; ++s) late_mean += gpu.max_vio[std::size_t(s)];
  late_mean /= late_steps;
  MESSAGE("device simulation, " << tokens << " tokens a step, gamma " << gamma << ": MaxVio step 0 "
                                << gpu.max_vio.front() << ", mean of the last " << late_steps
                                << " steps " << late_mean << ", MaxVio_global "
                                << gpu.max_vio_global << "; without the update, last step "
                                << gpu_without.max_vio.back());
  CHECK(gpu.max_vio.front() > 1.0);
  CHECK(late_mean < late_bound);
  CHECK(*std::min_element(gpu_without.max_vio.begin(), gpu_without.max_vio.end()) > 1.0);
  return gpu;
}

}  // namespace daedalus::testing::moe_balance_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_balance_checks;
  TEST_CASE("device balance losses: fp64 reference and CPU values, bitwise repeatable") {
    check_losses_match_reference(daedalus::CudaBackend{});
  }
  TEST_CASE("device balance losses bad input: the CPU's typed errors and messages") {
    check_loss_bad_input(daedalus::CudaBackend{});
  }
}
