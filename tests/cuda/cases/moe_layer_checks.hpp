// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for the MoE layer on the GPU (moe/cuda/gate.cuh's DeviceGateWeights, moe::route
// and compute_scores; moe/cuda/experts.cuh's shared experts; moe/cuda/layer.cuh's
// MoeLayer<C, CudaBackend>), shared by daedalus_cuda_tests and daedalus_emulated_tests.
//
// References: fp64 loops written here from DeepSeek-V3's inference/model.py (`Gate`, `Expert`,
// `MoE.forward`) through support/reference/moe_layer_reference.hpp's rules, never the library's
// kernels; the host backend only where the device must agree with it exactly (the routing from
// the same fp32 logits, the scores, the balancer's bias step) or within the bf16 storage's
// tolerance (the whole layer). Every bound is derived in a comment from the storage types.
// Included by exactly one translation unit per binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/cuda/experts_cublas.cuh>
#include <daedalus/moe/cuda/layer.cuh>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"

namespace daedalus::testing::moe_layer_checks {

namespace moe = daedalus::moe;

/// Widths off every tile: dim 136 (two 64-column tiles and 8; four 32-deep k steps and 8),
/// moe_inter_dim 40 (one 32-unit tile and 8), two shared experts (width 80: two 32-unit tiles and
/// 16); ten experts in five groups of two, three groups kept, a sigmoid gate with a bias (V3's
/// group score: the sum of the top two), normalised weights, route scale 1.75.
struct OddLayer : Tiny {
  static constexpr const char* name = "OddLayer";
  static constexpr int dim = 136;
  static constexpr int moe_inter_dim = 40;
  static constexpr int n_routed_experts = 10;
  static constexpr int n_shared_experts = 2;
  static constexpr int n_activated_experts = 3;
  static constexpr int n_expert_groups = 5;
  static constexpr int n_limited_groups = 3;
  static constexpr ScoreFunc score_func = ScoreFunc::sigmoid;
  static constexpr double route_scale = 1.75;
};

/// Tiny without shared experts: the shared output is 0.
struct TinyNoShared : Tiny {
  static constexpr const char* name = "TinyNoShared";
  static constexpr int n_shared_experts = 0;
};

constexpr double kFp32U = 0x1p-24;  // fp32: 24 significant bits, round to nearest
constexpr double kBf16U = 0x1p-8;   // bf16: 8 significant bits, round to nearest

template <class T>
TensorView<const T, 2, DeviceMemory> cview(const cuda::DeviceBuffer<T>& b, index_t rows,
                                           index_t cols) {
  return {b.data(), {rows, cols}};
}
template <class T>
TensorView<T, 2, DeviceMemory> mview(cuda::DeviceBuffer<T>& b, index_t rows, index_t cols) {
  return {b.data(), {rows, cols}};
}

/// A device view's contents on the host.
template <class T>
std::vector<std::remove_const_t<T>> download(const CudaBackend& cuda,
                                             TensorView<T, 2, DeviceMemory> v) {
  std::vector<std::remove_const_t<T>> h(std::size_t(v.size()));
  cuda::copy(cuda, TensorView<std::remove_const_t<T>, 2, HostMemory>(h.data(), v.extents()),
             TensorView<const std::remove_const_t<T>, 2, DeviceMemory>(v));
  cuda.synchronize();
  return h;
}

inline double bf16(double x) { return double(float(bfloat16(float(x)))); }

/// One SwiGLU MLP row in fp64 with a bound on what the device (or the host) may differ by.
/// With `bf16_inputs` the reference reads x and the weights rounded to bf16, as the device
/// kernel does, and the bound covers what the kernel adds: fp32 accumulation over dim (then
/// width) products, γ_n = 1.01 · n · 2^-24 of the sum of magnitudes; its exp (2^-20 relative);
/// the rounding of the hidden activation to bf16 before w2 (2^-8 relative). Without, the inputs
/// are the fp32 values and the hidden rounding is fp32's (the host layer).
struct BoundedRow {
  std::vector<double> value, bound;
};

inline BoundedRow swiglu_bounded(const float* x, int dim, const float* w1, const float* w3,
                                 const float* w2, int inter, bool bf16_inputs) {
  const auto in = [&](float v) { return bf16_inputs ? bf16(v) : double(v); };
  // 2·γ_n with bf16 inputs, whose products the tensor cores may sum with truncation rather than
  // rounding (Fasi et al., 2021; kernel_checks.hpp); γ_n for the host's fp32 sums.
  const double gamma_scale = bf16_inputs ? 2.02 : 1.01;
  const double gamma_dim = gamma_scale * dim * kFp32U, gamma_inter = gamma_scale * inter * kFp32U;
  const double hidden_u = bf16_inputs ? kBf16U : kFp32U;
  std::vector<double> h(static_cast<std::size_t>(inter)), h_bound(static_cast<std::size_t>(inter));
  for (int j = 0; j < inter; ++j) {
    double g = 0, u = 0, g_mag = 0, u_mag = 0;
    for (int c = 0; c < dim; ++c) {
      const double xv = in(x[c]);
      const double a = xv * in(w1[std::size_t(j) * std::size_t(dim) + std::size_t(c)]);
      const double b = xv * in(w3[std::size_t(j) * std::size_t(dim) + std::size_t(c)]);
      g += a;
      u += b;
      g_mag += std::fabs(a);
      u_mag += std::fabs(b);
    }
    const double silu = g / (1.0 + std::exp(-g));
    h[std::size_t(j)] = silu * u;
    // d silu / dg is at most 1.1 in magnitude.
    h_bound[std::size_t(j)] = 1.1 * std::fabs(u) * gamma_dim * g_mag +
                              std::fabs(silu) * gamma_dim * u_mag +
                              0x1p-20 * std::fabs(h[std::size_t(j)]) + 1e-30;
  }
  BoundedRow r{std::vector<double>(static_cast<std::size_t>(dim)),
               std::vector<double>(static_cast<std::size_t>(dim))};
  for (int n = 0; n < dim; ++n) {
    double want = 0, bound = 0, mag = 0;
    for (int j = 0; j < inter; ++j) {
      const double w = in(w2[std::size_t(n) * std::size_t(inter) + std::size_t(j)]);
      const double hj = h[std::size_t(j)], bj = h_bound[std::size_t(j)];
      want += hj * w;
      mag += std::fabs(hj * w);
      bound += std::fabs(w) * (hidden_u * (std::fabs(hj) + bj) + bj);
    }
    r.value[std::size_t(n)] = want;
    r.bound[std::size_t(n)] = bound + gamma_inter * 1.01 * mag + 1e-30;
  }
  return r;
}

/// The routed expert `e` and the shared MLP of host weights as bounded rows.
template <class C>
BoundedRow expert_row(const moe::ExpertWeights<C>& w, int e, const float* x, bool bf16_inputs) {
  return swiglu_bounded(x, C::dim, w.w1(e).data(), w.w3(e).data(), w.w2(e).data(), C::moe_inter_dim,
                        bf16_inputs);
}
template <class C>
BoundedRow shared_row(const moe::SharedExpertWeights<C>& w, const float* x, bool bf16_inputs) {
  constexpr int width = int(moe::SharedExpertWeights<C>::width);
  if (width == 0) return {std::vector<double>(C::dim, 0.0), std::vector<double>(C::dim, 0.0)};
  return swiglu_bounded(x, C::dim, w.w1().data(), w.w3().data(), w.w2().data(), width, bf16_inputs);
}

/// The gate's logits x · Wᵀ of one token in fp64, with the magnitude Σ|x_d W_ed| per expert.
template <class C>
void logits_fp64(const moe::GateWeights<C>& gate, const float* x, std::vector<double>& value,
                 std::vector<double>& magnitude) {
  value.assign(C::n_routed_experts, 0.0);
  magnitude.assign(C::n_routed_experts, 0.0);
  const auto w = gate.weight();
  for (int e = 0; e < C::n_routed_experts; ++e) {
    for (int d = 0; d < C::dim; ++d) {
      const double p = double(x[d]) * double(w(e, d));
      value[std::size_t(e)] += p;
      magnitude[std::size_t(e)] += std::fabs(p);
    }
  }
}

/// True when token x's routing is decided by differences two fp32 logit computations may
/// disagree on: two selection scores, or two group scores, closer than 8 times the larger
/// logit error bound γ_dim · Σ|x W| (sigmoid and softmax move a score by at most the logit's
/// change times 1 (sigmoid: 1/4; softmax: 2 s ≤ 2) — 8 covers both computations, the bias add
/// and the top-2 group sum).
template <class C>
bool near_tie(const moe::GateWeights<C>& gate, const float* x) {
  std::vector<double> l, mag;
  logits_fp64(gate, x, l, mag);
  const double gamma = 1.01 * C::dim * kFp32U;
  const double eps = 8.0 * gamma * *std::max_element(mag.begin(), mag.end());
  const int experts = C::n_routed_experts, groups = C::n_expert_groups;
  std::vector<double> sel(static_cast<std::size_t>(experts));
  double max = *std::max_element(l.begin(), l.end()), sum = 0;
  for (int e = 0; e < experts; ++e) sum += std::exp(l[std::size_t(e)] - max);
  for (int e = 0; e < experts; ++e) {
    const double s = C::score_func == ScoreFunc::sigmoid
                         ? 1.0 / (1.0 + std::exp(-l[std::size_t(e)]))
                         : std::exp(l[std::size_t(e)] - max) / sum;
    sel[std::size_t(e)] = s + (gate.has_bias() ? double(gate.bias().data()[e]) : 0.0);
  }
  const auto any_close = [&](const std::vector<double>& v) {
    for (std::size_t i = 0; i < v.size(); ++i)
      for (std::size_t j = i + 1; j < v.size(); ++j)
        if (std::fabs(v[i] - v[j]) < eps) return true;
    return false;
  };
  if (any_close(sel)) return true;
  const int per = experts / groups;
  std::vector<double> group(static_cast<std::size_t>(groups));
  for (int g = 0; g < groups; ++g) {
    std::vector<double> v(sel.begin() + g * per, sel.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    group[std::size_t(g)] = gate.has_bias() && per > 1 ? v[0] + v[1] : v[0];
  }
  return groups > 1 && any_close(group);
}

// ---------------------------------------------------------------------------------------------
// The device gate.

/// moe::route on the device for config C: the logits against fp64 within the fp32 GEMM's bound,
/// and ids and weights equal, bit for bit, to the host route_logits on the device's own logits
/// (the routing from logits is exact on both backends; the logits themselves may differ in the
/// last bits between cuBLAS and the host GEMM, so the comparison with the host's moe::route is
/// the layer test's, which excuses near-ties only).
template <class C>
void check_device_route(const CudaBackend& cuda, index_t tokens, std::uint64_t stream) {
  constexpr index_t experts = C::n_routed_experts, k = C::n_activated_experts, dim = C::dim;
  const auto gate = moe::GateWeights<C>::random(stream);
  const moe::DeviceGateWeights<C> device_gate(cuda, gate);
  CHECK(device_gate.has_bias() == gate.has_bias());
  const std::vector<float> host_bias(gate.bias().data(), gate.bias().data() + gate.bias().size());
  CHECK(device_gate.download_bias(cuda) == host_bias);

  Random rng(stream + 1);
  const std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
  const auto x_d = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> logits_d(std::size_t(tokens * experts)),
      weights_d(std::size_t(tokens * k));
  cuda::DeviceBuffer<std::int32_t> ids_d(std::size_t(tokens * k));
  moe::route(cuda, device_gate, cview(x_d, tokens, dim), mview(logits_d, tokens, experts),
             mview(ids_d, tokens, k), mview(weights_d, tokens, k));
  const auto logits = cuda::to_host(cuda, logits_d);
  const auto ids = cuda::to_host(cuda, ids_d);
  const auto weights = cuda::to_host(cuda, weights_d);

  // fp32 products accumulated in fp32 over dim terms: |error| ≤ γ_dim · Σ|x_d W_ed|.
  const double gamma = 1.01 * double(dim) * kFp32U;
  std::size_t logit_bad = 0;
  std::vector<double> ref, mag;
  for (index_t t = 0; t < tokens; ++t) {
    logits_fp64(gate, x.data() + t * dim, ref, mag);
    for (index_t e = 0; e < experts; ++e) {
      logit_bad += std::fabs(double(logits[std::size_t(t * experts + e)]) - ref[std::size_t(e)]) >
                   gamma * mag[std::size_t(e)];
    }
  }
  CHECK(logit_bad == 0);

  const moe::GateSettings s = moe::GateSettings::from_config<C>();
  std::vector<std::int32_t> host_ids(ids.size());
  std::vector<float> host_weights(weights.size());
  moe::route_logits(CpuBackend(1), s, HostView<const float, 2>(logits.data(), {tokens, experts}),
                    gate.bias(), HostView<std::int32_t, 2>(host_ids.data(), {tokens, k}),
                    HostView<float, 2>(host_weights.data(), {tokens, k}));
  CHECK(ids == host_ids);
  CHECK(weights == host_weights);
}

/// The device route's errors are the host route's (type and message): a NaN in x names the
/// token, wrong extents name the argument; the outputs keep their contents.
inline void check_device_route_bad_input(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr index_t experts = C::n_routed_experts, k = C::n_activated_experts, dim = C::dim;
  const index_t tokens = 6;
  const auto gate = moe::GateWeights<C>::random(8401);
  const moe::DeviceGateWeights<C> device_gate(cuda, gate);
  Random rng(8402);
  std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
  x[std::size_t(4 * dim + 17)] = std::nanf("");
  const auto x_d = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> logits_d(std::size_t(tokens * experts));
  auto weights_d = cuda::to_device(cuda, rng.uniform(std::size_t(tokens * k)));
  auto ids_d = cuda::to_device(cuda, std::vector<std::int32_t>(std::size_t(tokens * k), 7));
  const auto ids_before = cuda::to_host(cuda, ids_d);
  const auto weights_before = cuda::to_host(cuda, weights_d);

  std::vector<std::int32_t> host_ids(ids_before.size());
  std::vector<float> host_weights(weights_before.size());
  const auto host_route = [&](index_t x_rows, index_t ids_rows) {
    moe::route(CpuBackend(1), gate, HostView<const float, 2>(x.data(), {x_rows, dim}),
               HostView<std::int32_t, 2>(host_ids.data(), {ids_rows, k}),
               HostView<float, 2>(host_weights.data(), {tokens, k}));
  };
  const auto device_route = [&](index_t x_rows, index_t ids_rows, index_t logit_rows) {
    moe::route(cuda, device_gate, cview(x_d, x_rows, dim), mview(logits_d, logit_rows, experts),
               mview(ids_d, ids_rows, k), mview(weights_d, tokens, k));
  };
  const std::string nan_error =
      message_of<NumericError>([&] { device_route(tokens, tokens, tokens); });
  CHECK(contains(nan_error, "daedalus::moe::route: token 4 has a non-finite logit"));
  CHECK(nan_error == message_of<NumericError>([&] { host_route(tokens, tokens); }));
  const std::string shape_error =
      message_of<InvalidArgument>([&] { device_route(tokens, tokens - 1, tokens); });
  CHECK(contains(shape_error, "'topk_ids' has extents"));
  CHECK(shape_error == message_of<InvalidArgument>([&] { host_route(tokens, tokens - 1); }));
  CHECK(contains(message_of<InvalidArgument>([&] { device_route(tokens, tokens, tokens + 1); }),
                 "daedalus::moe::route: 'logits' has extents"));
  CHECK(cuda::to_host(cuda, ids_d) == ids_before);
  CHECK(cuda::to_host(cuda, weights_d) == weights_before);
}

/// compute_scores on the device: bit for bit the host's (the same operations), within a derived
/// bound of fp64, in place as well; a NaN throws the host's error and leaves the scores alone.
inline void check_compute_scores(const CudaBackend& cuda, ScoreFunc score_func, index_t experts,
                                 std::uint64_t stream) {
  const index_t tokens = 29;  // not a multiple of a block's 4 warps
  const double range = 6.0;
  Random rng(stream);
  const std::vector<float> logits = rng.uniform(std::size_t(tokens * experts), range);
  auto logits_d = cuda::to_device(cuda, logits);
  cuda::DeviceBuffer<float> scores_d(logits.size());
  moe::compute_scores(cuda, score_func, cview(logits_d, tokens, experts),
                      mview(scores_d, tokens, experts));
  const auto scores = cuda::to_host(cuda, scores_d);

  std::vector<float> host(logits.size());
  moe::compute_scores(CpuBackend(1), score_func,
                      HostView<const float, 2>(logits.data(), {tokens, experts}),
                      HostView<float, 2>(host.data(), {tokens, experts}));
  CHECK(scores == host);

  // fp64 reference. exp_f32 is within 4 ulps (degree-7 Taylor on |r| ≤ ln2/2: 2^-27 relative,
  // and seven rounded fused steps). Sigmoid: 1 + e and the division add one rounding each:
  // ≤ 6 u relative. Softmax: l − max is rounded (relative 2^-24 · |l − max| ≤ 2 · range · u in
  // the exponent), the fp32 sum of `experts` positive terms adds ≤ experts · u, the reciprocal
  // and the product one rounding each: ≤ (2 · (4 + 2 · range) + experts + 2) · u. Times 1.1.
  const double rel = score_func == ScoreFunc::sigmoid
                         ? 6.0 * kFp32U
                         : (2.0 * (4.0 + 2.0 * range) + double(experts) + 2.0) * kFp32U;
  std::size_t bad = 0;
  for (index_t t = 0; t < tokens; ++t) {
    const float* l = logits.data() + t * experts;
    const double max = double(*std::max_element(l, l + experts));
    double sum = 0;
    for (index_t e = 0; e < experts; ++e) sum += std::exp(double(l[e]) - max);
    for (index_t e = 0; e < experts; ++e) {
      const double want = score_func == ScoreFunc::sigmoid ? 1.0 / (1.0 + std::exp(-double(l[e])))
                                                           : std::exp(double(l[e]) - max) / sum;
      bad += std::fabs(double(scores[std::size_t(t * experts + e)]) - want) > 1.1 * rel * want;
    }
  }
  CHECK(bad == 0);

  // In place: scores written over the logits.
  moe::compute_scores(cuda, score_func, cview(logits_d, tokens, experts),
                      mview(logits_d, tokens, experts));
  CHECK(cuda::to_host(cuda, logits_d) == scores);

  // A NaN and an infinity: the host's NumericError naming the first token; scores unchanged.
  std::vector<float> bad_logits = logits;
  bad_logits[std::size_t(11 * experts + 3)] = INFINITY;
  bad_logits[std::size_t(17 * experts + 1)] = std::nanf("");
  cuda::copy(cuda, logits_d, std::span<const float>(bad_logits));
  const std::string error = message_of<NumericError>([&] {
    moe::compute_scores(cuda, score_func, cview(logits_d, tokens, experts),
                        mview(scores_d, tokens, experts));
  });
  CHECK(contains(error, "daedalus::moe::compute_scores: token 11 has a non-finite logit"));
  CHECK(error == message_of<NumericError>([&] {
          moe::compute_scores(CpuBackend(1), score_func,
                              HostView<const float, 2>(bad_logits.data(), {tokens, experts}),
                              HostView<float, 2>(host.data(), {tokens, experts}));
        }));
  CHECK(cuda::to_host(cuda, scores_d) == scores);
}

// ---------------------------------------------------------------------------------------------
// Shared experts.

/// The shared MLP on the device against fp64 from the bf16-rounded weights and inputs, within
/// swiglu_bounded's per-element bound; the hidden workspace is the fp32 silu(g) · u.
template <class C>
void check_shared_experts(const CudaBackend& cuda, index_t tokens, std::uint64_t stream) {
  constexpr index_t dim = C::dim, width = moe::SharedExpertWeights<C>::width;
  const auto weights = moe::SharedExpertWeights<C>::random(stream);
  const moe::DeviceSharedExpertWeights<C> device_weights(cuda, weights);
  Random rng(stream + 1);
  const std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
  const auto x_d = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> hidden_d(std::size_t(std::max<index_t>(tokens * width, 1)));
  // Non-zero garbage in `out`: the call overwrites it (zeros without shared experts).
  auto out_d = cuda::to_device(cuda, rng.uniform(std::size_t(tokens * dim), 100.0));
  moe::shared_experts(cuda, device_weights, cview(x_d, tokens, dim),
                      TensorView<float, 2, DeviceMemory>(hidden_d.data(), {tokens, width}),
                      mview(out_d, tokens, dim));
  const auto out = cuda::to_host(cuda, out_d);
  // Through cuBLAS: the same roundings (x and the hidden activations to bf16, fp32 sums in
  // another order), so the same bound; `out` garbage again first.
  moe::CublasSharedExpertWorkspace workspace;
  cuda::copy(cuda, out_d, std::span<const float>(rng.uniform(std::size_t(tokens * dim), 100.0)));
  moe::shared_experts_cublas(cuda, device_weights, cview(x_d, tokens, dim), workspace,
                             mview(out_d, tokens, dim));
  const auto via_cublas = cuda::to_host(cuda, out_d);
  std::size_t bad = 0, cublas_bad = 0;
  for (index_t t = 0; t < tokens; ++t) {
    const BoundedRow r = shared_row(weights, x.data() + t * dim, true);
    for (index_t n = 0; n < dim; ++n) {
      const std::size_t i = std::size_t(t * dim + n);
      bad += !(std::fabs(double(out[i]) - r.value[std::size_t(n)]) <= r.bound[std::size_t(n)]);
      cublas_bad +=
          !(std::fabs(double(via_cublas[i]) - r.value[std::size_t(n)]) <= r.bound[std::size_t(n)]);
    }
  }
  CHECK(bad == 0);
  CHECK(cublas_bad == 0);
  CHECK(contains(message_of<InvalidArgument>([&] {
                   moe::shared_experts_cublas(cuda, device_weights, cview(x_d, tokens, dim),
                                              workspace, mview(out_d, tokens + 1, dim));
                 }),
                 "daedalus::moe::shared_experts_cublas: 'out' has extents"));
  // Wrong extents: the front's InvalidArgument.
  CHECK(contains(message_of<InvalidArgument>([&] {
                   moe::shared_experts(
                       cuda, device_weights, cview(x_d, tokens, dim),
                       TensorView<float, 2, DeviceMemory>(hidden_d.data(), {tokens, width + 1}),
                       mview(out_d, tokens, dim));
                 }),
                 "daedalus::moe::shared_experts: 'hidden' has extents"));
}

// ---------------------------------------------------------------------------------------------
// The layer.

/// The device layer and the host layer of the same seed on one batch:
///  - the device output against fp64 from the device's own ids and weights (the routing is
///    checked above) and the plan's kept slots, from the bf16-rounded weights and inputs: per
///    element within Σ |w_j| · bound(expert_j) + bound(shared) + the combine's fp32 rounding
///    (k + 1 terms summed: γ_{k+1} · Σ|terms|);
///  - the device ids equal the host layer's for every token that is not a near tie (near_tie);
///  - the device output against the host layer's within the bf16 tolerance those bounds imply
///    (triangle inequality through the fp64 references of bf16 and fp32 inputs), and normwise
///    within 2^-5 (three bf16 roundings per product path at u = 2^-8, with margin);
///  - the logits view is the batch's logits; a second forward gives the same bits.
template <class C>
void check_layer(const CudaBackend& cuda, index_t tokens, std::uint64_t seed,
                 const moe::PlanSettings& plan_settings) {
  constexpr index_t dim = C::dim, k = C::n_activated_experts, experts = C::n_routed_experts;
  auto host_layer = moe::MoeLayer<C>::random(seed, plan_settings);
  auto layer = moe::MoeLayer<C, CudaBackend>::random(cuda, seed, plan_settings);
  Random rng(seed + 100);
  const std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
  const auto x_d = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> out_d(x.size());
  layer.forward(cuda, cview(x_d, tokens, dim), mview(out_d, tokens, dim));
  const auto out = cuda::to_host(cuda, out_d);
  const auto ids = download(cuda, layer.topk_ids());
  const auto weights = download(cuda, layer.topk_weights());
  const auto logits = download(cuda, layer.logits());
  const auto plan = layer.plan().download(cuda);
  std::vector<float> host_out(x.size());
  host_layer.forward(CpuBackend(1), HostView<const float, 2>(x.data(), {tokens, dim}),
                     HostView<float, 2>(host_out.data(), {tokens, dim}));

  // The logits view holds this batch's logits: the device route from x gives the same bits.
  {
    const moe::DeviceGateWeights<C> gate(cuda, host_layer.gate());
    cuda::DeviceBuffer<float> l(std::size_t(tokens * experts)), w(std::size_t(tokens * k));
    cuda::DeviceBuffer<std::int32_t> i(std::size_t(tokens * k));
    moe::route(cuda, gate, cview(x_d, tokens, dim), mview(l, tokens, experts), mview(i, tokens, k),
               mview(w, tokens, k));
    CHECK(cuda::to_host(cuda, l) == logits);
    CHECK(cuda::to_host(cuda, i) == ids);
  }

  const auto& host_ids = host_layer.topk_ids();
  std::size_t differing = 0, unexcused = 0;
  std::vector<bool> same(std::size_t(tokens), true);
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t j = 0; j < k; ++j)
      if (ids[std::size_t(t * k + j)] != host_ids(t, j)) same[std::size_t(t)] = false;
    if (!same[std::size_t(t)]) {
      ++differing;
      unexcused += near_tie(host_layer.gate(), x.data() + t * dim) ? 0 : 1;
    }
  }
  CHECK(unexcused == 0);
  CHECK(differing <= std::size_t(tokens) / 8);
  // With a capacity, one token's different choice can move another's drop: compare with the
  // host layer only when every token chose alike.
  const bool compare_host = differing == 0 || plan_settings.capacity_factor == 0.0;

  std::size_t ref_bad = 0, host_bad = 0, compared = 0, kept_slots = 0;
  double diff2 = 0, host2 = 0;
  for (index_t t = 0; t < tokens; ++t) {
    const float* xt = x.data() + t * dim;
    BoundedRow dev = shared_row(host_layer.shared(), xt, true);
    BoundedRow fp32 = shared_row(host_layer.shared(), xt, false);
    std::vector<double> mag(static_cast<std::size_t>(dim));
    for (index_t n = 0; n < dim; ++n) mag[std::size_t(n)] = std::fabs(dev.value[std::size_t(n)]);
    for (index_t j = 0; j < k; ++j) {
      if (plan.slot_row[std::size_t(t * k + j)] < 0) continue;  // dropped by the capacity
      ++kept_slots;
      const int e = ids[std::size_t(t * k + j)];
      const double w = double(weights[std::size_t(t * k + j)]);
      const BoundedRow r = expert_row(host_layer.experts(), e, xt, true);
      const BoundedRow f = expert_row(host_layer.experts(), e, xt, false);
      for (index_t n = 0; n < dim; ++n) {
        const std::size_t i = std::size_t(n);
        dev.value[i] += w * r.value[i];
        dev.bound[i] += std::fabs(w) * r.bound[i];
        fp32.value[i] += w * f.value[i];
        fp32.bound[i] += std::fabs(w) * f.bound[i];
        mag[i] += std::fabs(w * r.value[i]);
      }
    }
    for (index_t n = 0; n < dim; ++n) {
      const std::size_t i = std::size_t(n), o = std::size_t(t * dim + n);
      // The combine: fp32 products w · y and k + 1 fp32 additions.
      const double combine = 1.01 * double(k + 2) * kFp32U * (mag[i] + dev.bound[i]);
      const double dev_bound = dev.bound[i] + combine;
      ref_bad += !(std::fabs(double(out[o]) - dev.value[i]) <= dev_bound);
      if (compare_host && same[std::size_t(t)]) {
        ++compared;
        const double tol = dev_bound + std::fabs(dev.value[i] - fp32.value[i]) + fp32.bound[i] +
                           1.01 * double(k + 2) * kFp32U * (mag[i] + fp32.bound[i]);
        host_bad += !(std::fabs(double(out[o]) - double(host_out[o])) <= tol);
        diff2 += (double(out[o]) - double(host_out[o])) * (double(out[o]) - double(host_out[o]));
        host2 += double(host_out[o]) * double(host_out[o]);
      }
    }
  }
  CHECK(ref_bad == 0);
  if (plan_settings.capacity_factor == 0.0) {
    CHECK(kept_slots == std::size_t(tokens * k));
  } else {
    CHECK(kept_slots < std::size_t(tokens * k));  // the capacity drops slots
    CHECK(plan.dropped == std::int32_t(std::size_t(tokens * k) - kept_slots));
  }
  if (compare_host) {
    CHECK(compared > 0);
    CHECK(host_bad == 0);
    CHECK(std::sqrt(diff2) <= 0x1p-5 * std::sqrt(host2));
  } else {
    MESSAGE("near ties with a capacity: the host layer comparison is skipped");
  }

  // A second forward of the same batch: the same bits.
  cuda::DeviceBuffer<float> again_d(x.size());
  layer.forward(cuda, cview(x_d, tokens, dim), mview(again_d, tokens, dim));
  CHECK(cuda::to_host(cuda, again_d) == out);
  CHECK(download(cuda, layer.topk_ids()) == ids);
  CHECK(download(cuda, layer.topk_weights()) == weights);

  // The routed experts reading the tokens through the plan: no dispatched copy, the same bits.
  layer.set_expert_path(moe::DeviceExpertPath::grouped_mma_permuted_read);
  cuda::DeviceBuffer<float> permuted_d(x.size());
  layer.forward(cuda, cview(x_d, tokens, dim), mview(permuted_d, tokens, dim));
  CHECK(cuda::to_host(cuda, permuted_d) == out);

  // cuBLAS for the routed and the shared experts: the same routing; the routed outputs carry
  // three more bf16 roundings (g, u and the expert output, u = 2^-8 each), the shared ones none,
  // so the output is normwise within 2^-5 of the mma path's (as the host comparison above), and
  // repeatable bit for bit.
  layer.set_expert_path(moe::DeviceExpertPath::cublas_grouped);
  cuda::DeviceBuffer<float> cublas_d(x.size());
  layer.forward(cuda, cview(x_d, tokens, dim), mview(cublas_d, tokens, dim));
  const auto via_cublas = cuda::to_host(cuda, cublas_d);
  CHECK(download(cuda, layer.topk_ids()) == ids);
  double cublas_diff2 = 0, out2 = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double d = double(via_cublas[i]) - double(out[i]);
    cublas_diff2 += d * d;
    out2 += double(out[i]) * double(out[i]);
  }
  CHECK(out2 > 0);
  CHECK(std::sqrt(cublas_diff2) <= 0x1p-5 * std::sqrt(out2));
  layer.forward(cuda, cview(x_d, tokens, dim), mview(cublas_d, tokens, dim));
  CHECK(cuda::to_host(cuda, cublas_d) == via_cublas);
}

/// forward_and_balance over three steps: the device bias after each step is, bit for bit, the
/// host BiasBalancer's update of the previous bias from the device's counts, which equal the
/// plan's routed counts; and the host layer, fed the same batches, has the same counts and the
/// same bias after every step in which both chose the same experts (at least the first).
template <class C>
void check_forward_and_balance(const CudaBackend& cuda, index_t tokens, std::uint64_t seed,
                               const moe::BalancerSettings& settings) {
  constexpr index_t dim = C::dim;
  constexpr int experts = C::n_routed_experts;
  auto host_layer = moe::MoeLayer<C>::random(seed);
  auto layer = moe::MoeLayer<C, CudaBackend>::random(cuda, seed);
  moe::LoadStats host_stats(experts);
  const moe::BiasBalancer host_balancer(experts, settings);
  moe::DeviceLoadStats stats(cuda, experts);
  const moe::DeviceBiasBalancer balancer(cuda, experts, settings);
  Random rng(seed + 7);
  std::vector<float> host_out(static_cast<std::size_t>(tokens * dim));
  cuda::DeviceBuffer<float> out_d(host_out.size());
  bool diverged = false;
  int host_steps = 0;
  for (int step = 0; step < 3; ++step) {
    // Shifted inputs, so that some experts are popular and the bias has work to do.
    std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
    for (index_t i = 0; i < tokens * dim; ++i) x[std::size_t(i)] += 0.3f;
    const auto x_d = cuda::to_device(cuda, x);
    std::vector<float> bias = layer.gate().download_bias(cuda);
    layer.forward_and_balance(cuda, cview(x_d, tokens, dim), mview(out_d, tokens, dim), stats,
                              balancer);
    const std::vector<std::int64_t> counts = stats.step_counts(cuda);
    const auto plan = layer.plan().download(cuda);
    CHECK(counts ==
          std::vector<std::int64_t>(plan.routed_counts.begin(), plan.routed_counts.end()));
    host_balancer.update(HostView<float, 1>(bias.data(), {experts}), counts);
    const std::vector<float> device_bias = layer.gate().download_bias(cuda);
    CHECK(device_bias == bias);

    const moe::GateWeights<C> gate_before = host_layer.gate();  // the bias this step routes with
    host_layer.forward_and_balance(CpuBackend(1), HostView<const float, 2>(x.data(), {tokens, dim}),
                                   HostView<float, 2>(host_out.data(), {tokens, dim}), host_stats,
                                   host_balancer);
    const auto ids = download(cuda, layer.topk_ids());
    const auto host_ids = host_layer.topk_ids();
    const bool same_ids =
        ids == std::vector<std::int32_t>(host_ids.data(), host_ids.data() + host_ids.size());
    // A near tie decided differently (see near_tie: cuBLAS sums the logits in another order than
    // the host GEMM) makes the two runs diverge from there on: the host layer is compared up to
    // that step, and only a near tie may cause the divergence.
    if (!diverged && !same_ids) {
      for (index_t t = 0; t < tokens; ++t) {
        if (!std::equal(ids.begin() + t * C::n_activated_experts,
                        ids.begin() + (t + 1) * C::n_activated_experts,
                        host_ids.data() + t * C::n_activated_experts))
          CHECK(near_tie(gate_before, x.data() + t * dim));
      }
    }
    if (!diverged && same_ids) {
      ++host_steps;
      CHECK(std::vector<std::int64_t>(host_stats.step_counts().begin(),
                                      host_stats.step_counts().end()) == counts);
      CHECK(device_bias == std::vector<float>(host_layer.gate().bias().data(),
                                              host_layer.gate().bias().data() + experts));
    } else {
      diverged = true;
    }
  }
  CHECK(stats.steps(cuda) == 3);
  if (!diverged) {
    CHECK(stats.total_counts(cuda) == std::vector<std::int64_t>(host_stats.total_counts().begin(),
                                                                host_stats.total_counts().end()));
  }
  if (host_steps == 0) MESSAGE("a near tie at the first step: no host step compared");
  // The bias moved: the balancing did something.
  const auto first = moe::GateWeights<C>::random(seed);
  CHECK(layer.gate().download_bias(cuda) !=
        std::vector<float>(first.bias().data(), first.bias().data() + first.bias().size()));
}

/// Bad input to the layer: wrong extents and a NaN in x throw the host layer's types and
/// messages; a bad capacity setting throws InvalidArgument; a bias the balancer refuses throws
/// before the forward; each time `out`, the last batch's state, the bias and the stats stay.
/// Then an empty batch, which is not an error.
inline void check_layer_bad_input(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr index_t dim = C::dim, experts = C::n_routed_experts;
  const index_t tokens = 10;
  auto host_layer = moe::MoeLayer<C>::random(8501);
  auto layer = moe::MoeLayer<C, CudaBackend>::random(cuda, 8501);
  Random rng(8502);
  std::vector<float> x = rng.uniform(std::size_t(tokens * dim));
  const auto x_d = cuda::to_device(cuda, x);
  auto out_d = cuda::to_device(cuda, rng.uniform(x.size()));
  layer.forward(cuda, cview(x_d, tokens, dim), mview(out_d, tokens, dim));
  const auto out_before = cuda::to_host(cuda, out_d);
  const auto ids_before = download(cuda, layer.topk_ids());
  const auto weights_before = download(cuda, layer.topk_weights());
  const auto logits_before = download(cuda, layer.logits());
  const auto bias_before = layer.gate().download_bias(cuda);
  const auto plan_before = layer.plan().download(cuda);
  moe::DeviceLoadStats stats(cuda, experts);
  const moe::DeviceBiasBalancer balancer(cuda, experts);
  const auto unchanged = [&] {
    CHECK(cuda::to_host(cuda, out_d) == out_before);
    CHECK(layer.topk_ids().extent(0) == tokens);
    CHECK(download(cuda, layer.topk_ids()) == ids_before);
    CHECK(download(cuda, layer.topk_weights()) == weights_before);
    CHECK(download(cuda, layer.logits()) == logits_before);
    CHECK(layer.gate().download_bias(cuda) == bias_before);
    CHECK(layer.plan().download(cuda).slot_row == plan_before.slot_row);
    CHECK(layer.plan().download(cuda).offsets == plan_before.offsets);
    CHECK(stats.steps(cuda) == 0);
  };
  std::vector<float> host_out(x.size());

  // Wrong extents: out with one token too few.
  const std::string extent_error = message_of<InvalidArgument>([&] {
    layer.forward(cuda, cview(x_d, tokens, dim),
                  TensorView<float, 2, DeviceMemory>(out_d.data(), {tokens - 1, dim}));
  });
  CHECK(contains(extent_error, "daedalus::moe::MoeLayer::forward: 'out' has extents"));
  CHECK(extent_error == message_of<InvalidArgument>([&] {
          host_layer.forward(CpuBackend(1), HostView<const float, 2>(x.data(), {tokens, dim}),
                             HostView<float, 2>(host_out.data(), {tokens - 1, dim}));
        }));
  unchanged();

  // A NaN in x (token 7): the gate's NumericError, as the host layer's.
  std::vector<float> bad_x = x;
  bad_x[std::size_t(7 * dim + 5)] = std::nanf("");
  const auto bad_x_d = cuda::to_device(cuda, bad_x);
  const std::string nan_error = message_of<NumericError>(
      [&] { layer.forward(cuda, cview(bad_x_d, tokens, dim), mview(out_d, tokens, dim)); });
  CHECK(contains(nan_error, "token 7 has a non-finite logit"));
  CHECK(nan_error == message_of<NumericError>([&] {
          host_layer.forward(CpuBackend(1), HostView<const float, 2>(bad_x.data(), {tokens, dim}),
                             HostView<float, 2>(host_out.data(), {tokens, dim}));
        }));
  unchanged();
  CHECK(message_of<NumericError>([&] {
          layer.forward_and_balance(cuda, cview(bad_x_d, tokens, dim), mview(out_d, tokens, dim),
                                    stats, balancer);
        }) == nan_error);
  unchanged();

  // A negative capacity factor: the plan's InvalidArgument.
  layer.set_plan_settings(moe::PlanSettings{-1.0, moe::DropPolicy::probs, 1});
  CHECK(contains(message_of<InvalidArgument>([&] {
                   layer.forward(cuda, cview(x_d, tokens, dim), mview(out_d, tokens, dim));
                 }),
                 "'capacity_factor' is -1"));
  layer.set_plan_settings({});
  unchanged();

  // Stats for another number of experts; a bias the multiplicative rule refuses (the additive
  // random bias has negative values): InvalidArgument before the forward.
  moe::DeviceLoadStats other_stats(cuda, experts + 1);
  CHECK(contains(message_of<InvalidArgument>([&] {
                   layer.forward_and_balance(cuda, cview(x_d, tokens, dim),
                                             mview(out_d, tokens, dim), other_stats, balancer);
                 }),
                 "'stats' and 'balancer' are for 13 and 12 experts; expected 12"));
  const moe::DeviceBiasBalancer multiplicative(
      cuda, experts, moe::BalancerSettings{moe::BiasUpdate::multiplicative, 0.01});
  const std::string bias_error = message_of<InvalidArgument>([&] {
    layer.forward_and_balance(cuda, cview(x_d, tokens, dim), mview(out_d, tokens, dim), stats,
                              multiplicative);
  });
  CHECK(contains(bias_error, "the multiplicative rule needs positive biases"));
  unchanged();

  // Settings for another config.
  moe::GateSettings wrong = moe::GateSettings::from_config<C>();
  wrong.topk = 2;
  CHECK(contains(message_of<InvalidArgument>([&] {
                   moe::MoeLayer<C, CudaBackend>(cuda, host_layer.gate(), host_layer.experts(),
                                                 host_layer.shared(), {}, wrong);
                 }),
                 "'gate_settings' routes 2 of 12 experts; expected 3 of 12"));
  unchanged();

  // A path that is not a DeviceExpertPath: refused, the layer keeps its path.
  CHECK(contains(message_of<InvalidArgument>(
                     [&] { layer.set_expert_path(static_cast<moe::DeviceExpertPath>(7)); }),
                 "daedalus::moe::MoeLayer::set_expert_path: 'path' is 7"));
  CHECK(layer.expert_path() == moe::DeviceExpertPath::grouped_mma);
  unchanged();

  // An empty batch is valid input: nothing to compute, and the layer then describes it.
  layer.forward(cuda, TensorView<const float, 2, DeviceMemory>(x_d.data(), {0, dim}),
                TensorView<float, 2, DeviceMemory>(out_d.data(), {0, dim}));
  CHECK(layer.topk_ids().extent(0) == 0);
  CHECK(layer.logits().extent(0) == 0);
  CHECK(cuda::to_host(cuda, out_d) == out_before);
}

}  // namespace daedalus::testing::moe_layer_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_layer_checks;
  namespace moe = daedalus::moe;
  TEST_CASE("device moe::route: logits within the fp32 GEMM bound, ids = host routing of them") {
    const daedalus::CudaBackend cuda;
    check_device_route<daedalus::Tiny>(cuda, 37, 8301);
    check_device_route<OddLayer>(cuda, 45, 8302);
    check_device_route<daedalus::DeepSeekV2Lite>(cuda, 19, 8303);  // softmax, no bias, dim 2048
    check_device_route<daedalus::DeepSeekV3>(cuda, 9, 8304);       // 256 experts, 8 groups
  }
  TEST_CASE("device moe::route bad input: the host route's errors, outputs unchanged") {
    check_device_route_bad_input(daedalus::CudaBackend{});
  }
  TEST_CASE("device compute_scores = host bits, within the fp64 bound, in place, NaN refused") {
    const daedalus::CudaBackend cuda;
    check_compute_scores(cuda, daedalus::ScoreFunc::softmax, 64, 8311);
    check_compute_scores(cuda, daedalus::ScoreFunc::sigmoid, 256, 8312);
    check_compute_scores(cuda, daedalus::ScoreFunc::softmax, 13, 8313);
  }
  TEST_CASE("device shared experts against fp64 at bf16 tolerance (Tiny, odd widths, none)") {
    const daedalus::CudaBackend cuda;
    check_shared_experts<daedalus::Tiny>(cuda, 37, 8321);
    check_shared_experts<OddLayer>(cuda, 70, 8322);
    check_shared_experts<TinyNoShared>(cuda, 5, 8323);
  }
  TEST_CASE("MoeLayer<C, CudaBackend> = host MoeLayer and fp64 (Tiny, OddLayer; capacity)") {
    const daedalus::CudaBackend cuda;
    check_layer<daedalus::Tiny>(cuda, 40, 8331, {});
    check_layer<OddLayer>(cuda, 67, 8332, {});
    check_layer<daedalus::Tiny>(cuda, 40, 8333, moe::PlanSettings{0.8, moe::DropPolicy::probs, 1});
    check_layer<OddLayer>(cuda, 53, 8334, moe::PlanSettings{1.0, moe::DropPolicy::position, 8});
    check_layer<TinyNoShared>(cuda, 21, 8335, {});
  }
  TEST_CASE("MoeLayer<C, CudaBackend>::forward_and_balance = the host layer's bias steps") {
    const daedalus::CudaBackend cuda;
    check_forward_and_balance<daedalus::Tiny>(cuda, 48, 8341, moe::BalancerSettings{});
    check_forward_and_balance<OddLayer>(cuda, 40, 8342,
                                        moe::BalancerSettings{moe::BiasUpdate::proportional, 0.01});
  }
  TEST_CASE("MoeLayer<C, CudaBackend> bad input: the host layer's errors, nothing changes") {
    check_layer_bad_input(daedalus::CudaBackend{});
  }
}
