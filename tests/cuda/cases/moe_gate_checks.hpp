// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for the MoE gate's routing on the GPU (moe/cuda/gate.cuh), shared by
// daedalus_cuda_tests and daedalus_emulated_tests. The CPU backend is the reference: from the same
// fp32 logits the device must choose exactly the CPU's experts, in the CPU's order (both compute
// the scores with the same operations: core/math.hpp), for the V2-Lite, V2, V3 and Tiny gates,
// with exact ties and with very negative biases; the weights are the same bits as well.
// Included by exactly one translation unit per binary.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/cuda/gate.cuh>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"

namespace daedalus::testing::moe_gate_checks {

namespace moe = daedalus::moe;

enum class Logits { random, coarse };
enum class Bias { none, random, very_negative };

struct GateRun {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

inline GateRun route_on_cpu(const moe::GateSettings& s, const std::vector<float>& logits,
                            const std::vector<float>& bias, index_t tokens) {
  GateRun r{std::vector<std::int32_t>(std::size_t(tokens) * s.topk),
            std::vector<float>(std::size_t(tokens) * s.topk)};
  moe::route_logits(CpuBackend(1), s,
                    HostView<const float, 2>(logits.data(), {tokens, s.n_routed_experts}),
                    HostView<const float, 1>(bias.data(), {index_t(bias.size())}),
                    HostView<std::int32_t, 2>(r.ids.data(), {tokens, s.topk}),
                    HostView<float, 2>(r.weights.data(), {tokens, s.topk}));
  return r;
}

struct DeviceGate {
  cuda::DeviceBuffer<float> logits, bias, weights;
  cuda::DeviceBuffer<std::int32_t> ids;
};

inline void route_on_device(const CudaBackend& cuda, const moe::GateSettings& s, DeviceGate& d,
                            index_t tokens, index_t bias_size) {
  moe::route_logits(
      cuda, s,
      TensorView<const float, 2, DeviceMemory>(d.logits.data(), {tokens, s.n_routed_experts}),
      TensorView<const float, 1, DeviceMemory>(d.bias.data(), {bias_size}),
      TensorView<std::int32_t, 2, DeviceMemory>(d.ids.data(), {tokens, s.topk}),
      TensorView<float, 2, DeviceMemory>(d.weights.data(), {tokens, s.topk}));
}

inline DeviceGate upload(const CudaBackend& cuda, const moe::GateSettings& s,
                         const std::vector<float>& logits, const std::vector<float>& bias,
                         index_t tokens) {
  DeviceGate d{cuda::to_device(cuda, logits),
               bias.empty() ? cuda::DeviceBuffer<float>(1) : cuda::to_device(cuda, bias),
               cuda::DeviceBuffer<float>(std::size_t(tokens) * s.topk),
               cuda::DeviceBuffer<std::int32_t>(std::size_t(tokens) * s.topk)};
  return d;
}

/// The gate of config C from the same logits on both backends: identical ids and identical
/// weights (both compute scores, selection, normalisation and route scale with the same
/// sequence of IEEE operations).
template <class C>
void check_gate_matches_cpu(const CudaBackend& cuda, Logits kind, Bias bias_kind,
                            std::uint64_t stream) {
  const moe::GateSettings s = moe::GateSettings::from_config<C>();
  const index_t tokens = 37;  // not a multiple of the 4 warps of a block
  Random rng(stream);
  std::vector<float> logits = rng.uniform(std::size_t(tokens) * s.n_routed_experts, 4.0);
  if (kind == Logits::coarse) {
    // Eight values: exact ties between experts of one token are frequent, so the tie rule
    // (lower id first) and the top-2 group sum of equal values are exercised.
    for (float& l : logits) l = float(std::lround(l)) * 0.5f;
  }
  std::vector<float> bias;
  if (bias_kind == Bias::random) bias = rng.uniform(std::size_t(s.n_routed_experts), 0.5);
  if (bias_kind == Bias::very_negative) {
    bias = rng.uniform_in(std::size_t(s.n_routed_experts), -2000.0, -1000.0);
  }
  const GateRun cpu = route_on_cpu(s, logits, bias, tokens);
  DeviceGate d = upload(cuda, s, logits, bias, tokens);
  route_on_device(cuda, s, d, tokens, index_t(bias.size()));
  const auto ids = cuda::to_host(cuda, d.ids);
  const auto weights = cuda::to_host(cuda, d.weights);
  std::size_t id_mismatches = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    id_mismatches += ids[i] != cpu.ids[i] ? 1 : 0;
    const double scale = std::max(std::fabs(double(cpu.weights[i])), 1e-30);
    worst = std::max(worst, std::fabs(double(weights[i]) - double(cpu.weights[i])) / scale);
  }
  CHECK(id_mismatches == 0);
  CHECK(worst == 0.0);
}

/// Bad input: a NaN bias or logit throws NumericError naming what the CPU names, and the outputs
/// keep their previous contents; mismatched extents throw InvalidArgument.
inline void check_gate_bad_input(const CudaBackend& cuda) {
  const moe::GateSettings s = moe::GateSettings::from_config<DeepSeekV3>();
  const index_t tokens = 9;
  Random rng(8100);
  std::vector<float> logits = rng.uniform(std::size_t(tokens) * s.n_routed_experts, 3.0);
  std::vector<float> bias = rng.uniform(std::size_t(s.n_routed_experts), 0.5);
  DeviceGate d = upload(cuda, s, logits, bias, tokens);
  route_on_device(cuda, s, d, tokens, index_t(bias.size()));
  const auto ids_before = cuda::to_host(cuda, d.ids);
  const auto weights_before = cuda::to_host(cuda, d.weights);
  const auto unchanged = [&] {
    CHECK(cuda::to_host(cuda, d.ids) == ids_before);
    CHECK(cuda::to_host(cuda, d.weights) == weights_before);
  };

  std::vector<float> bad_logits = logits;
  bad_logits[std::size_t(5 * s.n_routed_experts + 7)] = std::nanf("");
  bad_logits[std::size_t(6 * s.n_routed_experts + 1)] = INFINITY;
  cuda::copy(cuda, d.logits, std::span<const float>(bad_logits));
  const std::string logit_error =
      message_of<NumericError>([&] { route_on_device(cuda, s, d, tokens, index_t(bias.size())); });
  CHECK(contains(logit_error, "token 5 has a non-finite logit (NaN or infinite) at expert 7"));
  const std::string cpu_logit_error =
      message_of<NumericError>([&] { route_on_cpu(s, bad_logits, bias, tokens); });
  CHECK(logit_error == cpu_logit_error);
  unchanged();

  cuda::copy(cuda, d.logits, std::span<const float>(logits));
  std::vector<float> bad_bias = bias;
  bad_bias[2] = std::nanf("");
  cuda::copy(cuda, d.bias, std::span<const float>(bad_bias));
  const std::string bias_error =
      message_of<NumericError>([&] { route_on_device(cuda, s, d, tokens, index_t(bias.size())); });
  CHECK(bias_error == message_of<NumericError>([&] { route_on_cpu(s, logits, bad_bias, tokens); }));
  CHECK(contains(bias_error, "'bias' holds a non-finite value (nan) at expert 2"));
  unchanged();

  cuda::copy(cuda, d.bias, std::span<const float>(bias));
  const std::string shape_error = message_of<InvalidArgument>([&] {
    moe::route_logits(
        cuda, s,
        TensorView<const float, 2, DeviceMemory>(d.logits.data(), {tokens, s.n_routed_experts}),
        TensorView<const float, 1, DeviceMemory>(d.bias.data(), {index_t(bias.size())}),
        TensorView<std::int32_t, 2, DeviceMemory>(d.ids.data(), {tokens - 1, s.topk}),
        TensorView<float, 2, DeviceMemory>(d.weights.data(), {tokens, s.topk}));
  });
  CHECK(contains(shape_error, "'topk_ids' has extents"));
  unchanged();
}

}  // namespace daedalus::testing::moe_gate_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_gate_checks;
  TEST_CASE("device gate = CPU gate: DeepSeek-V3 (sigmoid, bias, group top-2 sum, 4 of 8 groups)") {
    const daedalus::CudaBackend cuda;
    check_gate_matches_cpu<daedalus::DeepSeekV3>(cuda, Logits::random, Bias::random, 8001);
    check_gate_matches_cpu<daedalus::DeepSeekV3>(cuda, Logits::coarse, Bias::none, 8002);
    check_gate_matches_cpu<daedalus::DeepSeekV3>(cuda, Logits::coarse, Bias::random, 8003);
    check_gate_matches_cpu<daedalus::DeepSeekV3>(cuda, Logits::random, Bias::very_negative, 8004);
  }
  TEST_CASE("device gate = CPU gate: DeepSeek-V2 (softmax, 3 of 8 groups) and V2-Lite") {
    const daedalus::CudaBackend cuda;
    check_gate_matches_cpu<daedalus::DeepSeekV2>(cuda, Logits::random, Bias::none, 8011);
    check_gate_matches_cpu<daedalus::DeepSeekV2>(cuda, Logits::coarse, Bias::none, 8012);
    check_gate_matches_cpu<daedalus::DeepSeekV2Lite>(cuda, Logits::random, Bias::none, 8013);
    check_gate_matches_cpu<daedalus::DeepSeekV2Lite>(cuda, Logits::coarse, Bias::none, 8014);
  }
  TEST_CASE("device gate = CPU gate: Tiny (12 experts, 2 of 4 groups, route scale)") {
    const daedalus::CudaBackend cuda;
    check_gate_matches_cpu<daedalus::Tiny>(cuda, Logits::random, Bias::random, 8021);
    check_gate_matches_cpu<daedalus::Tiny>(cuda, Logits::coarse, Bias::random, 8022);
    check_gate_matches_cpu<daedalus::Tiny>(cuda, Logits::random, Bias::very_negative, 8023);
  }
  TEST_CASE("device gate bad input: the CPU's typed errors and messages, outputs unchanged") {
    check_gate_bad_input(daedalus::CudaBackend{});
  }
}
