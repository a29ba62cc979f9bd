// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies for the grouped SwiGLU experts on the GPU (moe/cuda/experts.cuh and its cuBLAS
// twin moe/cuda/experts_cublas.cuh, with cuBLAS's grouped GEMM itself), shared by
// daedalus_cuda_tests and daedalus_emulated_tests. Reference: fp64 from the same 16-bit-rounded
// weights and inputs, so the tolerance covers only what the device adds (fp32 accumulation, its
// exp, and each rounding to 16 bits), each bounded rigorously per element. Included by exactly
// one translation unit per binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <daedalus/moe/cuda/dispatch.cuh>
#include <daedalus/moe/cuda/experts.cuh>
#include <daedalus/moe/cuda/experts_cublas.cuh>
#include <daedalus/moe/cuda/routing_plan.cuh>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"
#include "support/tolerance.hpp"

namespace daedalus::testing::moe_experts_checks {

namespace moe = daedalus::moe;

/// Widths that are not multiples of the 64-row, 64-column, 32-deep tiles: dim 200 (four column
/// tiles, the last of 8), moe_inter_dim 72 (three 32-unit tiles, the last of 8; three k steps of
/// w2, the last of 8).
struct OddExperts : Tiny {
  static constexpr const char* name = "OddExperts";
  static constexpr int dim = 200;
  static constexpr int moe_inter_dim = 72;
  static constexpr int n_routed_experts = 6;
  static constexpr int n_activated_experts = 2;
  static constexpr int n_expert_groups = 2;
  static constexpr int n_limited_groups = 1;
};

/// Row lengths that 16-byte loads cannot cover: dim 203 (activations not a multiple of 4, weights
/// not of 8) and moe_inter_dim 37, so both projections take the element loads.
struct RaggedExperts : OddExperts {
  static constexpr const char* name = "RaggedExperts";
  static constexpr int dim = 203;
  static constexpr int moe_inter_dim = 37;
};

inline double bf16(double x) { return double(float(bfloat16(float(x)))); }

/// Unit j's gate and up products of token row x in fp64 from the inputs as `round` stores them,
/// and their magnitudes Σ|x·w| (what the fp32 sums' γ bounds scale).
struct GateUpFp64 {
  double g, u, g_mag, u_mag;
};
template <class W, class Round>
GateUpFp64 gate_up_fp64(const float* x, const W& w1, const W& w3, int j, int dim, Round round) {
  GateUpFp64 r{0, 0, 0, 0};
  for (int c = 0; c < dim; ++c) {
    const double xv = round(x[c]);
    r.g += xv * round(w1(j, c));
    r.u += xv * round(w3(j, c));
    r.g_mag += std::fabs(xv * round(w1(j, c)));
    r.u_mag += std::fabs(xv * round(w3(j, c)));
  }
  return r;
}

/// γ_n for an fp32 sum of n products on the tensor cores: 2·1.01·n·u, since they may truncate
/// rather than round (Fasi et al., 2021; kernel_checks.hpp), which doubles the unit roundoff.
inline double tensor_core_gamma(int n) { return 2.02 * n * 0x1p-24; }

/// Walks the first `rows` rows (the plan's rows(); its downloaded arrays may be longer) of a
/// downloaded plan: on_padding(r) for a padding row, on_kept(r, e, x_row) for a kept row (its
/// expert, its token's row of x). Returns how many rows were kept.
template <class HostPlan, class OnPadding, class OnKept>
std::size_t for_each_plan_row(const HostPlan& plan, index_t rows,
                              const std::vector<std::int32_t>& ids, const std::vector<float>& x,
                              int k, int dim, OnPadding on_padding, OnKept on_kept) {
  std::size_t kept = 0;
  for (std::size_t r = 0; r < std::size_t(rows); ++r) {
    const std::int32_t slot = plan.row_slot[r];
    if (slot < 0) {
      on_padding(r);
      continue;
    }
    ++kept;
    on_kept(r, ids[std::size_t(slot)], x.data() + std::size_t(slot / k) * dim);
  }
  return kept;
}

/// The routed experts over a plan with padding (pad_block 8; dropless unless `settings` set a
/// capacity) on random tokens, half of whose picks favour experts 0 and 1; and the permuted read
/// (routed_experts_from_tokens) against them bit for bit.
template <class C>
void check_routed_experts(const CudaBackend& cuda, int tokens, std::uint64_t stream,
                          const moe::PlanSettings& settings = {0.0, moe::DropPolicy::probs, 8}) {
  constexpr int experts = C::n_routed_experts, k = C::n_activated_experts;
  constexpr int dim = C::dim, inter = C::moe_inter_dim;
  const auto weights = moe::ExpertWeights<C>::random(stream);
  const moe::DeviceExpertWeights<C> device_weights(cuda, weights);

  Random rng(stream + 1);
  std::vector<std::int32_t> ids = moe_reference::distinct_ids(
      [&](int n) { return int(rng.integer(0, n - 1)); }, tokens, k, experts, 2);
  const std::vector<float> routing_weights = rng.uniform_in(ids.size(), 0.1, 1.0);
  const std::vector<float> x = rng.uniform(std::size_t(tokens) * dim);
  const auto ids_d = cuda::to_device(cuda, ids);
  const auto weights_d = cuda::to_device(cuda, routing_weights);
  const auto x_d = cuda::to_device(cuda, x);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {tokens, k}),
             TensorView<const float, 2, DeviceMemory>(weights_d.data(), {tokens, k}), experts,
             settings);
  const index_t rows = plan.rows();
  cuda::DeviceBuffer<float> in_d(std::size_t(rows) * dim), hidden_d(std::size_t(rows) * inter),
      out_d(std::size_t(rows) * dim);
  moe::dispatch(cuda, plan, TensorView<const float, 2, DeviceMemory>(x_d.data(), {tokens, dim}),
                TensorView<float, 2, DeviceMemory>(in_d.data(), {rows, dim}));
  moe::routed_experts(cuda, device_weights, plan,
                      TensorView<const float, 2, DeviceMemory>(in_d.data(), {rows, dim}),
                      TensorView<float, 2, DeviceMemory>(hidden_d.data(), {rows, inter}),
                      TensorView<float, 2, DeviceMemory>(out_d.data(), {rows, dim}));
  const auto hidden = cuda::to_host(cuda, hidden_d);
  const auto out = cuda::to_host(cuda, out_d);
  const auto host_plan = plan.download(cuda);

  // The permuted read: the same tiles from the token rows in place of the dispatched copy, so the
  // same bits (hidden and out overwritten with NaN first: every row is written again).
  {
    cuda::DeviceBuffer<float> hidden2_d(hidden.size()), out2_d(out.size());
    const std::vector<float> nan_hidden(hidden.size(), std::numeric_limits<float>::quiet_NaN());
    const std::vector<float> nan_out(out.size(), std::numeric_limits<float>::quiet_NaN());
    cuda::copy(cuda, hidden2_d, std::span<const float>(nan_hidden));
    cuda::copy(cuda, out2_d, std::span<const float>(nan_out));
    moe::routed_experts_from_tokens(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(x_d.data(), {tokens, dim}),
        TensorView<float, 2, DeviceMemory>(hidden2_d.data(), {rows, inter}),
        TensorView<float, 2, DeviceMemory>(out2_d.data(), {rows, dim}));
    CHECK(cuda::to_host(cuda, hidden2_d) == hidden);
    CHECK(cuda::to_host(cuda, out2_d) == out);
  }

  const double gamma_dim = tensor_core_gamma(dim), gamma_inter = tensor_core_gamma(inter);
  std::size_t hidden_bad = 0, out_bad = 0, padding_bad = 0;
  std::vector<double> h(inter), h_bound(inter);
  const auto padding = [&](std::size_t r) {
    for (int j = 0; j < inter; ++j) padding_bad += hidden[r * inter + j] != 0.0f;
    for (int n = 0; n < dim; ++n) padding_bad += out[r * dim + n] != 0.0f;
  };
  const std::size_t checked = for_each_plan_row(
      host_plan, rows, ids, x, k, dim, padding, [&](std::size_t r, int e, const float* xr) {
        const auto w1 = weights.w1(e), w3 = weights.w3(e), w2 = weights.w2(e);
        for (int j = 0; j < inter; ++j) {
          const auto [g, u, g_mag, u_mag] = gate_up_fp64(xr, w1, w3, j, dim, bf16);
          const double silu = g / (1.0 + std::exp(-g));
          h[std::size_t(j)] = silu * u;
          // d silu / dg is at most 1.1; the device's exp adds a relative 2^-20 at most.
          h_bound[std::size_t(j)] = 1.1 * std::fabs(u) * gamma_dim * g_mag +
                                    std::fabs(silu) * gamma_dim * u_mag +
                                    0x1p-20 * std::fabs(h[std::size_t(j)]) + 1e-30;
          hidden_bad += std::fabs(double(hidden[std::size_t(r) * inter + j]) - h[std::size_t(j)]) >
                        h_bound[std::size_t(j)];
        }
        for (int n = 0; n < dim; ++n) {
          double want = 0, bound = 0, mag = 0;
          for (int j = 0; j < inter; ++j) {
            const double w = bf16(w2(n, j));
            want += h[std::size_t(j)] * w;
            mag += std::fabs(h[std::size_t(j)] * w);
            // The device rounds its hidden value (within h_bound of h) to bf16: relative error at
            // most u = 2^-8 (8 significant bits, round to nearest).
            bound +=
                std::fabs(w) * (0x1p-8 * (std::fabs(h[std::size_t(j)]) + h_bound[std::size_t(j)]) +
                                h_bound[std::size_t(j)]);
          }
          bound += gamma_inter * 1.01 * mag + 1e-30;
          out_bad += std::fabs(double(out[std::size_t(r) * dim + n]) - want) > bound;
        }
      });
  if (settings.capacity_factor > 0) REQUIRE(host_plan.dropped > 0);  // experts 0, 1 overflow
  CHECK(checked == std::size_t(tokens) * k - std::size_t(host_plan.dropped));
  CHECK(hidden_bad == 0);
  CHECK(out_bad == 0);
  CHECK(padding_bad == 0);
}

/// What the bad-input checks build plans and calls from: Tiny's experts on the device and the
/// ids and weights of 2 tokens × 3 slots (one slot per expert 0-5).
struct BadInputSetup {
  explicit BadInputSetup(const CudaBackend& cuda)
      : device_weights(cuda, moe::ExpertWeights<Tiny>::random(9)),
        ids(cuda::to_device(cuda, std::vector<std::int32_t>{0, 1, 2, 3, 4, 5})),
        weights(cuda::to_device(cuda, std::vector<float>(6, 0.5f))) {}
  moe::DeviceExpertWeights<Tiny> device_weights;
  cuda::DeviceBuffer<std::int32_t> ids;
  cuda::DeviceBuffer<float> weights;
};

/// Weights and plan from another backend or config are compile errors; a plan built for
/// another number of experts and wrong extents are typed errors.
inline void check_routed_experts_bad_input(const CudaBackend& cuda) {
  const BadInputSetup setup(cuda);
  const auto& device_weights = setup.device_weights;
  const auto& ids_d = setup.ids;
  const auto& w_d = setup.weights;
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 7);
  cuda::DeviceBuffer<float> a(6 * Tiny::dim), h(6 * Tiny::moe_inter_dim), o(6 * Tiny::dim);
  const auto run = [&](index_t rows_in) {
    moe::routed_experts(cuda, device_weights, plan,
                        TensorView<const float, 2, DeviceMemory>(a.data(), {rows_in, Tiny::dim}),
                        TensorView<float, 2, DeviceMemory>(h.data(), {6, Tiny::moe_inter_dim}),
                        TensorView<float, 2, DeviceMemory>(o.data(), {6, Tiny::dim}));
  };
  CHECK(contains(message_of<InvalidArgument>([&] { run(6); }),
                 "'plan' was built for 7 experts; expected 12"));
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 12);
  CHECK(contains(message_of<InvalidArgument>([&] { run(5); }), "'expert_in' has extents"));
  CHECK_NOTHROW(run(6));

  // The permuted read: x must be the plan's tokens.
  const auto from_tokens = [&](index_t tokens) {
    moe::routed_experts_from_tokens(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(a.data(), {tokens, Tiny::dim}),
        TensorView<float, 2, DeviceMemory>(h.data(), {6, Tiny::moe_inter_dim}),
        TensorView<float, 2, DeviceMemory>(o.data(), {6, Tiny::dim}));
  };
  CHECK(contains(message_of<InvalidArgument>([&] { from_tokens(3); }),
                 "daedalus::moe::routed_experts_from_tokens: 'x' has extents"));
  CHECK_NOTHROW(from_tokens(2));
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 7);
  CHECK(contains(message_of<InvalidArgument>([&] { from_tokens(2); }),
                 "'plan' was built for 7 experts; expected 12"));
}

// ---- the cuBLAS path ----------------------------------------------------------------------------

/// What rounding to the 16-bit type T costs: a relative u (round to nearest: 2^-8 for bf16's 8
/// significant bits, 2^-11 for fp16's 11) plus, for fp16, half its smallest subnormal (2^-25)
/// absolute for values below its normal range (bf16 has fp32's exponent range).
template <class T>
struct Rounding {
  static constexpr double u = std::is_same_v<T, bfloat16> ? tolerance::bf16_u : tolerance::fp16_u;
  static constexpr double tiny = std::is_same_v<T, bfloat16> ? 0.0 : 0x1p-25;
  static double round(double x) { return double(float(T(float(x)))); }
  /// A bound on |round(v) - x| for a value v within `err` of x.
  static double after(double x, double err) { return err + u * (std::fabs(x) + err) + tiny; }
};

/// cublasGemmGroupedBatchedEx called directly (column-major): three groups of different shapes
/// and transposes, one of two problems, one empty (n = 0), alpha and beta ≠ 0 over a preloaded
/// 16-bit C, against a double loop over the same 16-bit inputs; then the documented statuses of
/// bad input (a null array, a negative size, a leading dimension too small, fp32 C with 16-bit
/// inputs, a matrix outside device memory).
template <class T>
void check_grouped_gemm(const CudaBackend& cuda) {
  using D = cuda::device_storage_t<T>;
  constexpr cudaDataType type = cuda::blas_type<D>();
  using R = Rounding<T>;
  struct Group {
    cublasOperation_t ta, tb;
    int m, n, k, size;
    float alpha, beta;
  };
  const std::vector<Group> groups = {{CUBLAS_OP_T, CUBLAS_OP_N, 13, 7, 21, 2, 1.0f, 0.0f},
                                     {CUBLAS_OP_N, CUBLAS_OP_T, 9, 5, 17, 1, 0.75f, -1.25f},
                                     {CUBLAS_OP_T, CUBLAS_OP_N, 11, 0, 6, 1, 1.0f, 0.0f}};
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<float> alpha, beta;
  struct Problem {
    int group;
    std::vector<T> a, b, c0;  // column-major, as stored
  };
  std::vector<Problem> problems;
  Random rng(8301);
  const auto draw = [&](std::size_t count) {
    std::vector<T> v;
    for (const float x : rng.uniform(count)) v.push_back(T(x));
    return v;
  };
  for (int g = 0; g < int(groups.size()); ++g) {
    const Group& gr = groups[std::size_t(g)];
    ta.push_back(gr.ta);
    tb.push_back(gr.tb);
    m.push_back(gr.m);
    n.push_back(gr.n);
    k.push_back(gr.k);
    lda.push_back((gr.ta == CUBLAS_OP_N ? gr.m : gr.k) + 1);  // padded leading dimensions
    ldb.push_back(gr.tb == CUBLAS_OP_N ? gr.k : gr.n);
    ldc.push_back(gr.m + 2);
    size.push_back(gr.size);
    alpha.push_back(gr.alpha);
    beta.push_back(gr.beta);
    for (int p = 0; p < gr.size; ++p) {
      const int a_cols = gr.ta == CUBLAS_OP_N ? gr.k : gr.m;
      const int b_cols = gr.tb == CUBLAS_OP_N ? gr.n : gr.k;
      problems.push_back({g, draw(std::size_t(lda.back()) * a_cols),
                          draw(std::size_t(ldb.back()) * std::size_t(std::max(b_cols, 1))),
                          draw(std::size_t(ldc.back()) * std::size_t(std::max(gr.n, 1)))});
    }
  }
  std::vector<cuda::DeviceBuffer<D>> d_a, d_b, d_c;
  std::vector<const void*> a_ptr, b_ptr;
  std::vector<void*> c_ptr;
  for (const Problem& p : problems) {
    d_a.push_back(cuda::to_device(cuda, p.a));
    d_b.push_back(cuda::to_device(cuda, p.b));
    d_c.push_back(cuda::to_device(cuda, p.c0));
    a_ptr.push_back(d_a.back().data());
    b_ptr.push_back(d_b.back().data());
    c_ptr.push_back(d_c.back().data());
  }
  const auto a_arr = cuda::to_device(cuda, a_ptr);
  const auto b_arr = cuda::to_device(cuda, b_ptr);
  const auto c_arr = cuda::to_device(cuda, c_ptr);
  const int count = int(groups.size());
  cublasHandle_t handle = cuda::blas_handle(cuda);
  const auto call = [&](const int* m_array, const int* lda_array, const void* const* a_array,
                        cudaDataType c_type) {
    return cublasGemmGroupedBatchedEx(handle, ta.data(), tb.data(), m_array, n.data(), k.data(),
                                      alpha.data(), a_array, type, lda_array, b_arr.data(), type,
                                      ldb.data(), beta.data(), c_arr.data(), c_type, ldc.data(),
                                      count, size.data(), CUBLAS_COMPUTE_32F);
  };
  DAEDALUS_CUBLAS_CHECK(call(m.data(), lda.data(), a_arr.data(), type));
  int wrong = 0;
  for (std::size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    const Group& gr = groups[std::size_t(p.group)];
    const int g = p.group;
    const std::vector<T> c = cuda::to_host(cuda, d_c[i]);
    for (int col = 0; col < std::max(gr.n, 1); ++col) {
      for (int row = 0; row < ldc[std::size_t(g)]; ++row) {
        const std::size_t at =
            std::size_t(row) + std::size_t(col) * std::size_t(ldc[std::size_t(g)]);
        if (row >= gr.m || col >= gr.n) {  // outside C (or an empty problem): untouched
          wrong += std::memcmp(&c[at], &p.c0[at], sizeof(T)) != 0;
          continue;
        }
        double exact = 0.0, magnitude = 0.0;
        for (int q = 0; q < gr.k; ++q) {
          const auto lda_g = std::size_t(lda[std::size_t(g)]),
                     ldb_g = std::size_t(ldb[std::size_t(g)]);
          const double av =
              double(float(p.a[gr.ta == CUBLAS_OP_N ? std::size_t(row) + std::size_t(q) * lda_g
                                                    : std::size_t(q) + std::size_t(row) * lda_g]));
          const double bv =
              double(float(p.b[gr.tb == CUBLAS_OP_N ? std::size_t(q) + std::size_t(col) * ldb_g
                                                    : std::size_t(col) + std::size_t(q) * ldb_g]));
          exact += av * bv;
          magnitude += std::fabs(av * bv);
        }
        const double c_in = double(float(p.c0[at]));
        const double expected = double(gr.alpha) * exact + double(gr.beta) * c_in;
        // fp32 accumulation (γ bound, Higham Lemma 3.1), then one rounding to T.
        const double acc = 1.01 * double(gr.k + 2) * tolerance::fp32_u *
                               (std::fabs(gr.alpha) * magnitude + std::fabs(gr.beta * c_in)) +
                           1e-30;
        wrong += !(std::fabs(double(float(c[at])) - expected) <= R::after(expected, acc));
      }
    }
  }
  CHECK(wrong == 0);

  // Bad input: the documented statuses, and C untouched.
  const std::vector<T> before = cuda::to_host(cuda, d_c[0]);
  std::vector<int> negative = m;
  negative[1] = -1;
  std::vector<int> short_lda = lda;
  short_lda[0] = groups[0].k - 1;  // A is stored k × m for CUBLAS_OP_T
  CHECK(call(negative.data(), lda.data(), a_arr.data(), type) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(call(m.data(), short_lda.data(), a_arr.data(), type) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(call(m.data(), lda.data(), a_arr.data(), CUDA_R_32F) == CUBLAS_STATUS_NOT_SUPPORTED);
#if defined(DAEDALUS_CUDA_EMULATION)
  // The emulation's own checks: a null host array (which cuBLAS may dereference before any
  // check), and matrices a GPU would fault on (losing the context).
  CHECK(call(nullptr, lda.data(), a_arr.data(), type) == CUBLAS_STATUS_INVALID_VALUE);
  std::vector<const void*> overrun = a_ptr;
  overrun[0] = static_cast<const D*>(a_ptr[0]) + lda[0];  // one column past the allocation
  const auto overrun_arr = cuda::to_device(cuda, overrun);
  CHECK(call(m.data(), lda.data(), overrun_arr.data(), type) == CUBLAS_STATUS_EXECUTION_FAILED);
  CHECK(call(m.data(), lda.data(), a_ptr.data(), type) ==
        CUBLAS_STATUS_EXECUTION_FAILED);  // the pointer array in host memory
#endif
  const std::vector<T> after = cuda::to_host(cuda, d_c[0]);
  CHECK(std::memcmp(before.data(), after.data(), before.size() * sizeof(T)) == 0);
}

/// What one check of the cuBLAS routed experts builds: routing, plan settings, the calls.
struct CublasCase {
  int tokens;
  std::uint64_t stream;
  moe::PlanSettings settings;
  /// Experts the tokens are routed among (the others get no rows); 0: all.
  int used_experts = 0;
  /// Experts 0 .. favoured − 1 get about half of the picks (over capacity when one is set).
  int favoured = 0;
  moe::CublasExpertCalls calls = moe::CublasExpertCalls::grouped;
};

/// routed_experts_cublas against the fp64 reference of check_routed_experts, its tolerance widened
/// by exactly what this path adds: g and u rounded to T before silu (relative u_T each), and the
/// output rounded to T (relative u_T); the hidden activations are rounded to T in both paths.
/// Padding rows (a NaN-filled output beforehand) must be zeros; a second call with the same
/// workspace must give the same bits.
template <class C, class T>
void check_routed_experts_cublas(const CudaBackend& cuda, const CublasCase& tc) {
  constexpr int experts = C::n_routed_experts, k = C::n_activated_experts;
  constexpr int dim = C::dim, inter = C::moe_inter_dim;
  using R = Rounding<T>;
  CAPTURE(tc.tokens);
  CAPTURE(tc.stream);
  const auto weights = moe::ExpertWeights<C>::random(tc.stream);
  const moe::DeviceExpertWeights<C, T> device_weights(cuda, weights);

  Random rng(tc.stream + 1);
  const int used = tc.used_experts > 0 ? tc.used_experts : experts;
  std::vector<std::int32_t> ids = moe_reference::distinct_ids(
      [&](int n) { return int(rng.integer(0, n - 1)); }, tc.tokens, k, used, tc.favoured);
  const std::vector<float> routing_weights = rng.uniform_in(ids.size(), 0.1, 1.0);
  const std::vector<float> x = rng.uniform(std::size_t(tc.tokens) * dim);
  const auto ids_d = cuda::to_device(cuda, ids);
  const auto weights_d = cuda::to_device(cuda, routing_weights);
  const auto x_d = cuda::to_device(cuda, x);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {tc.tokens, k}),
             TensorView<const float, 2, DeviceMemory>(weights_d.data(), {tc.tokens, k}), experts,
             tc.settings);
  const index_t rows = plan.rows();
  cuda::DeviceBuffer<float> in_d(std::size_t(rows) * dim), out_d(std::size_t(rows) * dim);
  if (rows > 0)
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out_d.data(), 0xFF, out_d.bytes(), cuda.stream()));
  moe::dispatch(cuda, plan, TensorView<const float, 2, DeviceMemory>(x_d.data(), {tc.tokens, dim}),
                TensorView<float, 2, DeviceMemory>(in_d.data(), {rows, dim}));
  moe::CublasExpertWorkspace workspace;
  const auto run = [&] {
    moe::routed_experts_cublas(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(in_d.data(), {rows, dim}), workspace,
        TensorView<float, 2, DeviceMemory>(out_d.data(), {rows, dim}), tc.calls);
  };
  run();
  const auto out = cuda::to_host(cuda, out_d);
  run();  // the same workspace, now grown: the same bits
  const auto again = cuda::to_host(cuda, out_d);
  CHECK(std::memcmp(out.data(), again.data(), out.size() * sizeof(float)) == 0);
  const auto host_plan = plan.download(cuda);

  // cuBLAS's tensor-core sums may truncate, as the mma kernel's (check_routed_experts).
  const double gamma_dim = tensor_core_gamma(dim), gamma_inter = tensor_core_gamma(inter);
  std::size_t out_bad = 0, padding_bad = 0;
  std::vector<double> h(inter), h_bound(inter);
  const auto padding = [&](std::size_t r) {
    for (int n = 0; n < dim; ++n) padding_bad += out[r * dim + n] != 0.0f;
  };
  const std::size_t checked = for_each_plan_row(
      host_plan, rows, ids, x, k, dim, padding, [&](std::size_t r, int e, const float* xr) {
        const auto w1 = weights.w1(e), w3 = weights.w3(e), w2 = weights.w2(e);
        for (int j = 0; j < inter; ++j) {
          const auto [g, u, g_mag, u_mag] = gate_up_fp64(xr, w1, w3, j, dim, &R::round);
          // The fp32 sums (γ bounds as in check_routed_experts), then what this path adds: g and u
          // stored as T (relative u_T each, R::after).
          const double g_err = R::after(g, gamma_dim * g_mag);
          const double u_err = R::after(u, gamma_dim * u_mag);
          const double silu = g / (1.0 + std::exp(-g));
          h[std::size_t(j)] = silu * u;
          // d silu / dg is at most 1.1; the device's exp and its three fp32 operations add a
          // relative 2^-20 at most.
          h_bound[std::size_t(j)] = 1.1 * g_err * (std::fabs(u) + u_err) + std::fabs(silu) * u_err +
                                    0x1p-20 * (std::fabs(h[std::size_t(j)]) + 1.1 * g_err * u_err) +
                                    1e-30;
        }
        for (int n = 0; n < dim; ++n) {
          double want = 0, bound = 0, mag = 0;
          for (int j = 0; j < inter; ++j) {
            const double w = R::round(w2(n, j));
            want += h[std::size_t(j)] * w;
            // The hidden value (within h_bound of h) stored as T, as in routed_experts; the fp32
            // sum's γ bound then takes the magnitudes of the stored values.
            const double stored_err = R::after(h[std::size_t(j)], h_bound[std::size_t(j)]);
            bound += std::fabs(w) * stored_err;
            mag += (std::fabs(h[std::size_t(j)]) + stored_err) * std::fabs(w);
          }
          bound += gamma_inter * mag + 1e-30;
          // What this path adds at the end: the fp32 result stored as T.
          bound = R::after(want, bound);
          out_bad += !(std::fabs(double(out[std::size_t(r) * dim + n]) - want) <= bound);
        }
      });
  std::size_t kept = 0;
  for (const std::int32_t row : host_plan.slot_row) kept += row >= 0;
  CHECK(checked == kept);
  CHECK(out_bad == 0);
  CHECK(padding_bad == 0);
  if (tc.settings.capacity_factor > 0.0) CHECK(kept < std::size_t(tc.tokens) * k);  // drops
}

/// The cuBLAS path's bad input gets routed_experts' errors, naming routed_experts_cublas, and
/// leaves the output unchanged.
inline void check_routed_experts_cublas_bad_input(const CudaBackend& cuda) {
  const BadInputSetup setup(cuda);
  const auto& device_weights = setup.device_weights;
  const auto& ids_d = setup.ids;
  const auto& w_d = setup.weights;
  moe::DeviceRoutingPlan plan;
  moe::CublasExpertWorkspace workspace;
  const std::vector<float> sentinel(6 * Tiny::dim, 3.0f);
  auto a = cuda::to_device(cuda, std::vector<float>(6 * Tiny::dim, 0.25f));
  auto o = cuda::to_device(cuda, sentinel);
  const auto run = [&](index_t rows_in, index_t rows_out) {
    moe::routed_experts_cublas(
        cuda, device_weights, plan,
        TensorView<const float, 2, DeviceMemory>(a.data(), {rows_in, Tiny::dim}), workspace,
        TensorView<float, 2, DeviceMemory>(o.data(), {rows_out, Tiny::dim}));
  };
  CHECK(message_of<InvalidArgument>([&] { run(6, 6); }) ==
        "daedalus::moe::routed_experts_cublas: 'plan' is empty; expected a built RoutingPlan");
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 7);
  CHECK(message_of<InvalidArgument>([&] { run(6, 6); }) ==
        "daedalus::moe::routed_experts_cublas: 'plan' was built for 7 experts; expected 12 for "
        "Tiny");
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {2, 3}),
             TensorView<const float, 2, DeviceMemory>(w_d.data(), {2, 3}), 12);
  CHECK(message_of<InvalidArgument>([&] { run(5, 6); }) ==
        "daedalus::moe::routed_experts_cublas: 'expert_in' has extents [5,96]; expected [6,96]");
  CHECK(message_of<InvalidArgument>([&] { run(6, 4); }) ==
        "daedalus::moe::routed_experts_cublas: 'expert_out' has extents [4,96]; expected [6,96]");
  CHECK(workspace.device_bytes() == 0);  // nothing was allocated for the failed calls
  const auto unchanged = cuda::to_host(cuda, o);
  CHECK(std::memcmp(unchanged.data(), sentinel.data(), sentinel.size() * sizeof(float)) == 0);
  CHECK_NOTHROW(run(6, 6));
  CHECK(workspace.device_bytes() > 0);
}

/// DeviceExpertWeights taking device arrays: the arrays are used as they are (the same products
/// as the upload of the same values), and a wrong size throws, naming the array, without taking
/// either buffer.
inline void check_device_expert_weights_from_buffers(const CudaBackend& cuda) {
  using W = moe::DeviceExpertWeights<Tiny>;
  constexpr std::size_t per = std::size_t(Tiny::moe_inter_dim) * Tiny::dim;
  const auto weights = moe::ExpertWeights<Tiny>::random(31);
  const W uploaded(cuda, weights);
  std::vector<bfloat16> w13, w2;
  for (int e = 0; e < Tiny::n_routed_experts; ++e) {
    const moe::SwigluView v = weights.swiglu(e);
    for (std::size_t i = 0; i < 2 * per; ++i) w13.push_back(bfloat16(v.w13[i]));
    for (std::size_t i = 0; i < per; ++i) w2.push_back(bfloat16(v.w2[i]));
  }
  auto w13_d = cuda::to_device(cuda, w13);
  auto w2_d = cuda::to_device(cuda, w2);
  cuda::DeviceBuffer<W::device_type> short_w2(per);
  CHECK(message_of<InvalidArgument>([&] {
          static_cast<void>(W(std::move(w13_d), std::move(short_w2)));
        }) == "daedalus::moe::DeviceExpertWeights: 'w2' has " + std::to_string(per) +
                  " values; expected " + std::to_string(per * Tiny::n_routed_experts) +
                  " for Tiny");
  CHECK(w13_d.size() == 2 * per * Tiny::n_routed_experts);  // not taken
  const W::device_type* w13_data = w13_d.data();
  const W adopted(std::move(w13_d), std::move(w2_d));
  CHECK(adopted.w13() == w13_data);  // taken, not copied
  CHECK(w13_d.empty());
  // Same weights, same plan, same input: the same output bits.
  const std::vector<std::int32_t> ids = {0, 5, 11, 3, 5, 7, 2, 9, 11};
  const std::vector<float> rw(ids.size(), 0.5f);
  const auto ids_d = cuda::to_device(cuda, ids);
  const auto rw_d = cuda::to_device(cuda, rw);
  moe::DeviceRoutingPlan plan;
  plan.build(cuda, TensorView<const std::int32_t, 2, DeviceMemory>(ids_d.data(), {3, 3}),
             TensorView<const float, 2, DeviceMemory>(rw_d.data(), {3, 3}), Tiny::n_routed_experts);
  const index_t rows = plan.rows();
  Random rng(8241);
  const auto in_d = cuda::to_device(cuda, rng.uniform(std::size_t(rows) * Tiny::dim));
  moe::CublasExpertWorkspace workspace;
  const auto run = [&](const W& w) {
    cuda::DeviceBuffer<float> out_d(std::size_t(rows) * Tiny::dim);
    moe::routed_experts_cublas(
        cuda, w, plan, TensorView<const float, 2, DeviceMemory>(in_d.data(), {rows, Tiny::dim}),
        workspace, TensorView<float, 2, DeviceMemory>(out_d.data(), {rows, Tiny::dim}));
    return cuda::to_host(cuda, out_d);
  };
  const auto a = run(uploaded), b = run(adopted);
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

}  // namespace daedalus::testing::moe_experts_checks

TEST_SUITE("cuda moe") {
  using namespace daedalus::testing::moe_experts_checks;
  TEST_CASE(
      "grouped SwiGLU experts on the tensor cores against fp64 (Tiny, odd and ragged widths)") {
    const daedalus::CudaBackend cuda;
    check_routed_experts<daedalus::Tiny>(cuda, 45, 8201);
    check_routed_experts<OddExperts>(cuda, 83, 8202);
    check_routed_experts<RaggedExperts>(cuda, 29, 8203);
  }
  TEST_CASE("grouped SwiGLU experts with capacity drops; the permuted read = dispatch + experts") {
    const daedalus::CudaBackend cuda;
    const daedalus::moe::PlanSettings capacity{0.7, daedalus::moe::DropPolicy::probs, 8};
    check_routed_experts<daedalus::Tiny>(cuda, 50, 8211, capacity);
    check_routed_experts<OddExperts>(cuda, 71, 8212, capacity);
  }
  TEST_CASE("grouped SwiGLU experts: bad input gets typed errors") {
    check_routed_experts_bad_input(daedalus::CudaBackend{});
  }
  TEST_CASE("cuBLAS grouped batched GEMM (groups of different shapes, empty problems) vs a loop") {
    check_grouped_gemm<daedalus::bfloat16>(daedalus::CudaBackend{});
    check_grouped_gemm<daedalus::half>(daedalus::CudaBackend{});
  }
  TEST_CASE("SwiGLU experts through cuBLAS against fp64 (Tiny, odd widths, bf16 and fp16)") {
    const daedalus::CudaBackend cuda;
    namespace moe = daedalus::moe;
    const moe::PlanSettings padded{0.0, moe::DropPolicy::probs, 8};
    check_routed_experts_cublas<daedalus::Tiny, daedalus::bfloat16>(cuda, {45, 8211, padded});
    check_routed_experts_cublas<daedalus::Tiny, daedalus::half>(cuda, {45, 8212, padded});
    check_routed_experts_cublas<OddExperts, daedalus::bfloat16>(cuda, {37, 8213, padded});
    check_routed_experts_cublas<OddExperts, daedalus::half>(cuda, {37, 8214, padded});
  }
  TEST_CASE("SwiGLU experts through cuBLAS: capacity drops, idle experts, zero tokens") {
    const daedalus::CudaBackend cuda;
    namespace moe = daedalus::moe;
    // Capacity 1.0 with experts 0 and 1 favoured: both drop slots; experts 10 and 11 get none.
    const moe::PlanSettings capped{1.0, moe::DropPolicy::probs, 8};
    check_routed_experts_cublas<daedalus::Tiny, daedalus::bfloat16>(cuda,
                                                                    {40, 8221, capped, 10, 2});
    // Zero tokens: every row is padding (12 experts · 7 rows), every group empty.
    check_routed_experts_cublas<daedalus::Tiny, daedalus::half>(
        cuda, {0, 8222, moe::PlanSettings{0.0, moe::DropPolicy::probs, 8}});
    check_routed_experts_cublas<daedalus::Tiny, daedalus::bfloat16>(cuda, {0, 8223, {}});
  }
  TEST_CASE("SwiGLU experts through cuBLAS, one cublasGemmEx per expert (older toolkits)") {
    const daedalus::CudaBackend cuda;
    namespace moe = daedalus::moe;
    const moe::PlanSettings capped{1.0, moe::DropPolicy::probs, 8};
    check_routed_experts_cublas<daedalus::Tiny, daedalus::bfloat16>(
        cuda, {40, 8231, capped, 10, 2, moe::CublasExpertCalls::per_expert});
    check_routed_experts_cublas<OddExperts, daedalus::half>(
        cuda, {29, 8232, moe::PlanSettings{0.0, moe::DropPolicy::probs, 8}, 0, 0,
               moe::CublasExpertCalls::per_expert});
  }
  TEST_CASE("DeviceExpertWeights takes device arrays of the right size as they are") {
    check_device_expert_weights_from_buffers(daedalus::CudaBackend{});
  }
  TEST_CASE("SwiGLU experts through cuBLAS: bad input gets routed_experts' typed errors") {
    check_routed_experts_cublas_bad_input(daedalus::CudaBackend{});
  }
}
