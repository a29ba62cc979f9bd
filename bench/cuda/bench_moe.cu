// SPDX-License-Identifier: Apache-2.0
//
// GPU benchmarks of daedalus's Mixture-of-Experts (Google Benchmark, CUDA events).
//
// - BM_copy_bandwidth, BM_cublas_bf16_gemm: the memory and matrix roofs (bench_support.cuh);
//   copy_bw_fraction divides by the copy bandwidth measured when the binary starts.
// - BM_gate_logits<C>/tokens:T: the gate's logits x · Wᵀ in fp32 (cuda::gemm, cuBLAS SGEMM:
//   DeepSeek scores the gate in fp32), 2·T·dim·E FLOPs.
// - BM_gate_routing<C>/tokens:T: moe::route_logits on those logits, the fused routing kernel
//   (scores, selection bias, group limit, top-k, weights) with its finiteness check (one 16-byte
//   copy back and a stream synchronisation). routing_over_logits = this row's time over
//   BM_gate_logits' time at the same T (the target: under 10% at 4096 tokens).
// - BM_gate<C>/tokens:T: moe::route with a DeviceGateWeights, both steps. DeepSeek-V3's shapes
// (7168 → 256 experts,
//   8 groups / 4 kept, top-8, sigmoid with bias) at 1, 64, 4096 and 65536 tokens.
// - BM_plan<C>/tokens:T: DeviceRoutingPlan::build (its validation included) for ids routed from
//   random logits.
// - BM_dispatch_combine<C>/tokens:T: moe::dispatch then moe::combine over a built plan. Bytes per
//   step = what the two passes must move at least: dispatch reads T·dim and writes T·k·dim floats,
//   combine the reverse, so 2·(k + 1)·T·dim·4 bytes (the CPU benchmark's count); V3 at 4096
//   tokens × 7168 (the target: at least 60% of the copy bandwidth).
// - BM_routed_experts_mma<C>/tokens:T and BM_routed_experts_cublas<C>/tokens:T: the routed
//   experts alone over a plan built once from random routing (uniform logits through the
//   config's gate), bf16 weights drawn on the device: moe::routed_experts (the grouped mma
//   kernel) and moe::routed_experts_cublas (cublasGemmGroupedBatchedEx, its host copy of the
//   segment sizes included). FLOP/s = 2·3·dim·inter per kept row (the three projections);
//   DeepSeek-V2-Lite and DeepSeek-V3 at 4096 tokens.
// - BM_moe_layer<C>/tokens:T: MoeLayer<C, CudaBackend>::forward with random weights (bf16 experts),
//   DeepSeek-V2-Lite (64 experts of width 1408, top-6, 2 shared) at 1, 64, 512 and 4096 tokens;
//   FLOP/s of useful work (MoeLayer::flops), tokens/s. The PyTorch expert loop on the same shapes
//   is bench/compare/torch_moe.py --device cuda (bench/gpu/check.sh runs both).
// - BM_moe_layer_permuted_read<C>/tokens:T: the same layer with DeviceExpertPath::
//   grouped_mma_permuted_read (the first expert GEMM reads the tokens through the plan; no
//   dispatched copy) at 512 and 4096 tokens: whether skipping the copy pays.
// - BM_moe_layer_cublas<C>/tokens:T: the same layer with DeviceExpertPath::cublas_grouped (routed
//   experts through cublasGemmGroupedBatchedEx, shared experts through cublasGemmEx) at 1, 64,
//   512 and 4096 tokens: whether cuBLAS beats the grouped mma kernel, and from which batch on.
//
// Every iteration flushes L2 first (outside the timed region) and times one call between two
// CUDA events, after two untimed calls; the first also checks that the row's outputs are finite.
//
// Names containing "Tiny" run tiny shapes (CI's smoke convention). Without a CUDA device the
// binary says so and exits 0; listing (--benchmark_list_tests) works without one.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.cuh"

namespace {

using namespace daedalus;  // so template arguments print as "DeepSeekV3"
namespace dcuda = daedalus::cuda;
using daedalus::bench::bench_device;
using daedalus::bench::BenchDevice;
using daedalus::bench::fill_random;

template <class T, int R>
using DeviceView = TensorView<T, R, DeviceMemory>;

/// The gate's device data for T tokens of config C: random activations in [-1, 1), the gate of
/// GateWeights<C>::random (weight in ±1/sqrt(dim), nn.Linear's range; the config's selection
/// bias) on the device, the logits, and the routed ids and weights.
template <class C>
struct GateData {
  static constexpr int experts = C::n_routed_experts;
  static constexpr int k = C::n_activated_experts;
  static constexpr index_t dim = C::dim;

  index_t tokens;
  moe::DeviceGateWeights<C> gate;
  dcuda::DeviceBuffer<float> x, logits, topk_weights;
  dcuda::DeviceBuffer<std::int32_t> topk_ids;

  GateData(const CudaBackend& backend, index_t t)
      : tokens(t),
        gate(backend, moe::GateWeights<C>::random(3)),
        x(std::size_t(t * dim)),
        logits(std::size_t(t * experts)),
        topk_weights(std::size_t(t * k)),
        topk_ids(std::size_t(t * k)) {
    fill_random(backend, x.data(), x.size(), 0x5eed0301);
  }

  /// The logits GEMM alone (what moe::route runs first).
  void compute_logits(const CudaBackend& backend) {
    dcuda::gemm<float>(backend, tokens, experts, dim, {x.data(), dim, 0},
                       {gate.weight().data(), dim, 0}, dcuda::Weight::transposed,
                       {logits.data(), experts, 0});
  }
  /// The fused routing alone, on the logits.
  void route_logits(const CudaBackend& backend) {
    moe::route_logits(backend, moe::GateSettings::from_config<C>(),
                      DeviceView<const float, 2>(logits.data(), {tokens, index_t(experts)}),
                      gate.bias(),
                      DeviceView<std::int32_t, 2>(topk_ids.data(), {tokens, index_t(k)}),
                      DeviceView<float, 2>(topk_weights.data(), {tokens, index_t(k)}));
  }
  /// The whole gate: moe::route.
  void route(const CudaBackend& backend) {
    moe::route(backend, gate, DeviceView<const float, 2>(x.data(), {tokens, dim}),
               DeviceView<float, 2>(logits.data(), {tokens, index_t(experts)}),
               DeviceView<std::int32_t, 2>(topk_ids.data(), {tokens, index_t(k)}),
               DeviceView<float, 2>(topk_weights.data(), {tokens, index_t(k)}));
  }

  /// Logits and routing computed once: the input of the plan and dispatch rows.
  static GateData routed(const CudaBackend& backend, index_t t) {
    GateData data(backend, t);
    data.route(backend);
    return data;
  }

  DeviceView<const std::int32_t, 2> ids() const { return {topk_ids.data(), {tokens, index_t(k)}}; }
  DeviceView<const float, 2> weights() const { return {topk_weights.data(), {tokens, index_t(k)}}; }
};

/// Skips the row with a message when `values` holds a value that is not finite.
bool outputs_finite(benchmark::State& state, const CudaBackend& backend,
                    const dcuda::DeviceBuffer<float>& values, const char* what) {
  const std::int64_t bad = daedalus::bench::first_non_finite(dcuda::to_host(backend, values));
  if (bad < 0) return true;
  state.SkipWithError(
      (std::string(what) + " value " + std::to_string(bad) + " is unwritten or not finite")
          .c_str());
  return false;
}

enum class GatePart { logits, routing, whole };

template <class C>
void BM_gate(benchmark::State& state, GatePart part) {
  try {
    BenchDevice& dev = bench_device();
    const index_t tokens = state.range(0);
    GateData<C> gate = GateData<C>::routed(dev.backend, tokens);
    if (!outputs_finite(state, dev.backend, gate.topk_weights, "topk_weights")) return;
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, [&] {
      if (part == GatePart::logits) gate.compute_logits(dev.backend);
      if (part == GatePart::routing) gate.route_logits(dev.backend);
      if (part == GatePart::whole) gate.route(dev.backend);
    });
    const double calls = double(state.iterations());
    const double flops = 2.0 * double(tokens) * double(C::dim) * C::n_routed_experts;
    if (part != GatePart::routing)
      state.counters["FLOP/s"] = seconds > 0 ? flops * calls / seconds : 0.0;
    state.counters["tokens/s"] = seconds > 0 ? double(tokens) * calls / seconds : 0.0;
    state.counters["tokens"] = double(tokens);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class C>
void BM_plan(benchmark::State& state) {
  try {
    BenchDevice& dev = bench_device();
    const index_t tokens = state.range(0);
    const GateData<C> gate = GateData<C>::routed(dev.backend, tokens);
    moe::DeviceRoutingPlan plan;
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, [&] {
      plan.build(dev.backend, gate.ids(), gate.weights(), C::n_routed_experts);
    });
    const double slots = double(tokens) * C::n_activated_experts;
    state.counters["slots/s"] = seconds > 0 ? slots * double(state.iterations()) / seconds : 0.0;
    state.counters["tokens"] = double(tokens);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class C>
void BM_dispatch_combine(benchmark::State& state) {
  try {
    BenchDevice& dev = bench_device();
    const index_t tokens = state.range(0);
    constexpr index_t dim = C::dim;
    constexpr int k = C::n_activated_experts;
    const GateData<C> gate = GateData<C>::routed(dev.backend, tokens);
    moe::DeviceRoutingPlan plan;
    plan.build(dev.backend, gate.ids(), gate.weights(), C::n_routed_experts);
    const index_t rows = plan.rows();
    dcuda::DeviceBuffer<float> expert_rows(std::size_t(rows * dim)), out(std::size_t(tokens * dim));
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xff, out.bytes(), dev.stream.get()));
    const DeviceView<const float, 2> x(gate.x.data(), {tokens, dim});
    const auto step = [&] {
      moe::dispatch(dev.backend, plan, x, DeviceView<float, 2>(expert_rows.data(), {rows, dim}));
      moe::combine(dev.backend, plan, DeviceView<const float, 2>(expert_rows.data(), {rows, dim}),
                   DeviceView<float, 2>(out.data(), {tokens, dim}));
    };
    step();
    if (!outputs_finite(state, dev.backend, out, "combined output")) return;
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, step);
    const double bytes = 2.0 * double(k + 1) * double(tokens) * double(dim) * sizeof(float);
    const double rate = seconds > 0 ? bytes * double(state.iterations()) / seconds : 0.0;
    state.counters["bytes"] = bytes;
    state.counters["bytes/s"] = rate;
    state.counters["copy_bw_fraction"] =
        dev.copy_bytes_per_second > 0 ? rate / dev.copy_bytes_per_second : 0.0;
    state.counters["tokens"] = double(tokens);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

enum class ExpertPath { mma, cublas };

/// Bf16 routed experts of config C drawn on the device (uniform in ±1/sqrt(in), nn.Linear's
/// range): the host never holds V3's 45 GB of fp32 experts.
template <class C>
moe::DeviceExpertWeights<C> device_random_experts(const CudaBackend& backend) {
  using D = typename moe::DeviceExpertWeights<C>::device_type;
  const std::size_t per = std::size_t(C::moe_inter_dim) * std::size_t(C::dim);
  dcuda::DeviceBuffer<D> w13(std::size_t(C::n_routed_experts) * 2 * per),
      w2(std::size_t(C::n_routed_experts) * per);
  fill_random(backend, w13.data(), w13.size(), 0x5eed0501, 1.0f / std::sqrt(float(C::dim)));
  fill_random(backend, w2.data(), w2.size(), 0x5eed0502, 1.0f / std::sqrt(float(C::moe_inter_dim)));
  return moe::DeviceExpertWeights<C>(std::move(w13), std::move(w2));
}

template <class C>
void BM_routed_experts(benchmark::State& state, ExpertPath path) {
  try {
    BenchDevice& dev = bench_device();
    const index_t tokens = state.range(0);
    constexpr index_t dim = C::dim, inter = C::moe_inter_dim;
    static moe::DeviceExpertWeights<C> weights = device_random_experts<C>(dev.backend);
    const GateData<C> gate = GateData<C>::routed(dev.backend, tokens);
    moe::DeviceRoutingPlan plan;
    plan.build(dev.backend, gate.ids(), gate.weights(), C::n_routed_experts);
    const index_t rows = plan.rows();
    dcuda::DeviceBuffer<float> in(std::size_t(rows * dim)), hidden(std::size_t(rows * inter)),
        out(std::size_t(rows * dim));
    moe::dispatch(dev.backend, plan, DeviceView<const float, 2>(gate.x.data(), {tokens, dim}),
                  DeviceView<float, 2>(in.data(), {rows, dim}));
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xff, out.bytes(), dev.stream.get()));
    moe::CublasExpertWorkspace workspace;
    const DeviceView<const float, 2> in_view(in.data(), {rows, dim});
    const DeviceView<float, 2> out_view(out.data(), {rows, dim});
    const auto step = [&] {
      if (path == ExpertPath::mma) {
        moe::routed_experts(dev.backend, weights, plan, in_view,
                            DeviceView<float, 2>(hidden.data(), {rows, inter}), out_view);
      } else {
        moe::routed_experts_cublas(dev.backend, weights, plan, in_view, workspace, out_view);
      }
    };
    step();
    if (!outputs_finite(state, dev.backend, out, "expert output")) return;
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, step);
    const double calls = double(state.iterations());
    // Dropless plan: every slot is a kept row.
    const double flops =
        2.0 * 3.0 * double(dim) * double(inter) * double(tokens) * double(C::n_activated_experts);
    state.counters["FLOP/s"] = seconds > 0 ? flops * calls / seconds : 0.0;
    state.counters["gemm_fraction"] = seconds > 0 && dev.gemm_flops_per_second > 0
                                          ? flops * calls / seconds / dev.gemm_flops_per_second
                                          : 0.0;
    state.counters["tokens"] = double(tokens);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class C>
void register_experts(const std::string& config, const std::vector<std::int64_t>& token_counts) {
  for (const auto& [name, path] : {std::pair{"BM_routed_experts_mma", ExpertPath::mma},
                                   std::pair{"BM_routed_experts_cublas", ExpertPath::cublas}}) {
    for (const std::int64_t tokens : token_counts) {
      daedalus::bench::register_timed(std::string(name) + "<" + config + ">", &BM_routed_experts<C>,
                                      path)
          ->Arg(tokens)
          ->ArgName("tokens");
    }
  }
}

template <class C>
void register_gate(const std::string& config, const std::vector<std::int64_t>& token_counts) {
  for (const auto& [name, part] :
       {std::pair{"BM_gate_logits", GatePart::logits},
        std::pair{"BM_gate_routing", GatePart::routing}, std::pair{"BM_gate", GatePart::whole}}) {
    for (const std::int64_t tokens : token_counts) {
      daedalus::bench::register_timed(std::string(name) + "<" + config + ">", &BM_gate<C>, part)
          ->Arg(tokens)
          ->ArgName("tokens");
    }
  }
}

template <class C>
void register_movement(const std::string& config, std::int64_t tokens) {
  daedalus::bench::register_timed("BM_plan<" + config + ">", &BM_plan<C>)
      ->Arg(tokens)
      ->ArgName("tokens");
  daedalus::bench::register_timed("BM_dispatch_combine<" + config + ">", &BM_dispatch_combine<C>)
      ->Arg(tokens)
      ->ArgName("tokens");
}

/// One V2-Lite-sized layer per config for every BM_moe_layer row (its random weights take
/// seconds to draw on the host and gigabytes to upload).
template <class C>
moe::MoeLayer<C, CudaBackend>& layer_of(const CudaBackend& backend) {
  static moe::MoeLayer<C, CudaBackend> layer = moe::MoeLayer<C, CudaBackend>::random(backend, 7);
  return layer;
}

template <class C, moe::DeviceExpertPath kPath>
void BM_moe_layer(benchmark::State& state) {
  try {
    BenchDevice& dev = bench_device();
    const index_t tokens = state.range(0);
    constexpr index_t dim = C::dim;
    moe::MoeLayer<C, CudaBackend>& layer = layer_of<C>(dev.backend);
    layer.set_expert_path(kPath);
    dcuda::DeviceBuffer<float> x(std::size_t(tokens * dim)), out(std::size_t(tokens * dim));
    fill_random(dev.backend, x.data(), x.size(), 0x5eed0401);
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xff, out.bytes(), dev.stream.get()));
    const auto step = [&] {
      layer.forward(dev.backend, DeviceView<const float, 2>(x.data(), {tokens, dim}),
                    DeviceView<float, 2>(out.data(), {tokens, dim}));
    };
    step();
    if (!outputs_finite(state, dev.backend, out, "layer output")) return;
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, step);
    const double calls = double(state.iterations());
    const double flops = moe::MoeLayer<C, CudaBackend>::flops(tokens);
    state.counters["FLOP/s"] = seconds > 0 ? flops * calls / seconds : 0.0;
    state.counters["gemm_fraction"] = seconds > 0 && dev.gemm_flops_per_second > 0
                                          ? flops * calls / seconds / dev.gemm_flops_per_second
                                          : 0.0;
    state.counters["tokens/s"] = seconds > 0 ? double(tokens) * calls / seconds : 0.0;
    state.counters["tokens"] = double(tokens);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

/// The layer with the routed experts' path kPath; `kind` names the path in the row
/// (bench/gpu/table.py reads it).
template <class C, moe::DeviceExpertPath kPath>
void register_layer(const std::string& kind, const std::string& config,
                    const std::vector<std::int64_t>& token_counts) {
  for (const std::int64_t tokens : token_counts) {
    daedalus::bench::register_timed(kind + "<" + config + ">", &BM_moe_layer<C, kPath>)
        ->Arg(tokens)
        ->ArgName("tokens");
  }
}

void register_benchmarks() {
  daedalus::bench::register_roof_benchmarks();
  register_gate<Tiny>("Tiny", {1, 300});
  register_movement<Tiny>("Tiny", 300);
  register_gate<DeepSeekV3>("DeepSeekV3", {1, 64, 4096, 65536});
  register_movement<DeepSeekV3>("DeepSeekV3", 4096);
  register_experts<Tiny>("Tiny", {300});
  register_experts<DeepSeekV2Lite>("DeepSeekV2Lite", {4096});
  register_experts<DeepSeekV3>("DeepSeekV3", {4096});
  using Path = moe::DeviceExpertPath;
  register_layer<Tiny, Path::grouped_mma>("BM_moe_layer", "Tiny", {5, 300});
  register_layer<Tiny, Path::grouped_mma_permuted_read>("BM_moe_layer_permuted_read", "Tiny",
                                                        {300});
  register_layer<Tiny, Path::cublas_grouped>("BM_moe_layer_cublas", "Tiny", {300});
  register_layer<DeepSeekV2Lite, Path::grouped_mma>("BM_moe_layer", "DeepSeekV2Lite",
                                                    {1, 64, 512, 4096});
  // Whether reading the tokens through the plan beats materialising the dispatched copy, and
  // whether cuBLAS beats the grouped mma kernel.
  register_layer<DeepSeekV2Lite, Path::grouped_mma_permuted_read>("BM_moe_layer_permuted_read",
                                                                  "DeepSeekV2Lite", {512, 4096});
  register_layer<DeepSeekV2Lite, Path::cublas_grouped>("BM_moe_layer_cublas", "DeepSeekV2Lite",
                                                       {1, 64, 512, 4096});
}

}  // namespace

int main(int argc, char** argv) {
  return daedalus::bench::run_benchmarks("bench_cuda_moe", argc, argv, register_benchmarks);
}
