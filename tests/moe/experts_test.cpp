// SPDX-License-Identifier: Apache-2.0
// moe::ExpertWeights / SharedExpertWeights and the SwiGLU kernels: weights keep DeepSeek's
// [out, in] layout; every routed row and every shared-expert row matches the fp64 reference
// (support/reference/moe_layer_reference.hpp) at V2-Lite widths and Tiny sizes; padding rows are
// zero; results are bitwise identical across thread counts; bad input throws naming the argument.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"
#include "support/reference/moe_layer_reference.hpp"
#include "support/tolerance.hpp"

namespace daedalus::testing {

/// V2-Lite's widths (dim 2048, moe_inter_dim 1408, 2 shared experts, top-6) with 8 routed experts
/// instead of 64, so that a test draws 0.3 GB of weights rather than 2.2 GB.
struct V2LiteFewExperts : daedalus::DeepSeekV2Lite {
  static constexpr const char* name = "V2LiteFewExperts";
  static constexpr int n_routed_experts = 8;
};

/// Tiny's experts at widths that are multiples of no vector length (dim 93, moe_inter_dim 21),
/// so every kernel's remainder handling runs.
struct TinyOddWidths : daedalus::Tiny {
  static constexpr const char* name = "TinyOddWidths";
  static constexpr int dim = 93;
  static constexpr int moe_inter_dim = 21;
};

/// One MoE layer's expert arrays in checkpoint layout, uniform in ±1/sqrt(in), and the daedalus
/// weights built from them.
template <class C>
struct ExpertArrays {
  static constexpr std::size_t E = C::n_routed_experts, dim = C::dim, inter = C::moe_inter_dim;
  static constexpr std::size_t shared = std::size_t(C::n_shared_experts) * C::moe_inter_dim;
  std::vector<float> w1, w3, w2, s1, s3, s2;

  explicit ExpertArrays(std::uint64_t stream) {
    Random rng(stream);
    const double in_dim = 1.0 / std::sqrt(double(dim));
    w1 = rng.uniform(E * inter * dim, in_dim);
    w3 = rng.uniform(E * inter * dim, in_dim);
    w2 = rng.uniform(E * dim * inter, 1.0 / std::sqrt(double(inter)));
    s1 = rng.uniform(shared * dim, in_dim);
    s3 = rng.uniform(shared * dim, in_dim);
    s2 = rng.uniform(dim * shared, 1.0 / std::sqrt(double(std::max<std::size_t>(shared, 1))));
  }
  moe_reference::Mlp expert(int e) const {
    return {w1.data() + e * inter * dim, w3.data() + e * inter * dim, w2.data() + e * dim * inter,
            int(inter)};
  }
  moe_reference::Mlp shared_mlp() const { return {s1.data(), s3.data(), s2.data(), int(shared)}; }
  std::vector<moe_reference::Mlp> experts() const {
    std::vector<moe_reference::Mlp> all;
    for (int e = 0; e < int(E); ++e) all.push_back(expert(e));
    return all;
  }
};

}  // namespace daedalus::testing

namespace {

using daedalus::CpuBackend;
using daedalus::HostView;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace moe = daedalus::moe;
namespace tol = daedalus::testing::tolerance;

/// An expert's output chains two fp32 accumulations (K = dim, then K = moe_inter_dim) around a
/// silu whose exp adds a few u: within K·u each relative to the row (tolerance.hpp), so
/// 4·max(dim, inter)·u bounds the pair with room to spare; a wrong layout or a missing w3 gives
/// errors of order 1.
template <class C>
double expert_tolerance() {
  return tol::fp32_vs_reference(std::max(C::dim, C::moe_inter_dim));
}

template <class C>
struct RoutedRun {
  moe::RoutingPlan plan;
  std::vector<float> x, expert_in, hidden, expert_out;
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

template <class C>
RoutedRun<C> run_routed(const CpuBackend& cpu, const moe::ExpertWeights<C>& weights, int tokens,
                        std::uint64_t stream, const moe::PlanSettings& settings) {
  RoutedRun<C> run;
  dt::Random rng(stream);
  const int k = C::n_activated_experts;
  run.ids = moe_reference::distinct_ids([&](int n) { return int(rng.integer(0, n - 1)); }, tokens,
                                        k, C::n_routed_experts, 2);
  run.weights = rng.uniform_in(run.ids.size(), 0.01, 1.0);
  run.x = rng.uniform(std::size_t(tokens) * C::dim);
  run.plan.build(HostView<const std::int32_t, 2>(run.ids.data(), {tokens, k}),
                 HostView<const float, 2>(run.weights.data(), {tokens, k}), C::n_routed_experts,
                 settings);
  const index_t rows = run.plan.rows();
  run.expert_in.resize(std::size_t(rows) * C::dim);
  run.hidden.assign(std::size_t(rows) * C::moe_inter_dim, 3.0f);
  run.expert_out.assign(std::size_t(rows) * C::dim, 3.0f);  // 3: catches unwritten rows
  moe::dispatch(cpu, run.plan, HostView<const float, 2>(run.x.data(), {tokens, C::dim}),
                HostView<float, 2>(run.expert_in.data(), {rows, C::dim}));
  moe::routed_experts(cpu, weights, run.plan,
                      HostView<const float, 2>(run.expert_in.data(), {rows, C::dim}),
                      HostView<float, 2>(run.hidden.data(), {rows, C::moe_inter_dim}),
                      HostView<float, 2>(run.expert_out.data(), {rows, C::dim}));
  return run;
}

using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("expert weights keep DeepSeek's [out, in] layout", C, daedalus::Tiny,
                   dt::V2LiteFewExperts) {
  const dt::ExpertArrays<C> a(8100);
  const auto w = moe::ExpertWeights<C>::from_arrays(a.w1, a.w3, a.w2);
  const auto s = moe::SharedExpertWeights<C>::from_arrays(a.s1, a.s3, a.s2);
  for (int e : {0, C::n_routed_experts - 1}) {
    const auto ref = a.expert(e);
    CHECK(w.w1(e).extent(0) == C::moe_inter_dim);
    CHECK(w.w1(e).extent(1) == C::dim);
    CHECK(w.w2(e).extent(0) == C::dim);
    for (index_t i : {index_t(0), index_t(C::moe_inter_dim - 1)}) {
      for (index_t d : {index_t(0), index_t(C::dim - 1)}) {
        CHECK(w.w1(e)(i, d) == ref.w1[i * C::dim + d]);
        CHECK(w.w3(e)(i, d) == ref.w3[i * C::dim + d]);
        CHECK(w.w2(e)(d, i) == ref.w2[d * C::moe_inter_dim + i]);
      }
    }
  }
  CHECK(s.w1().extent(0) == index_t(C::n_shared_experts) * C::moe_inter_dim);
  CHECK(std::equal(a.s3.begin(), a.s3.end(), s.w3().data()));
  CHECK(std::equal(a.s2.begin(), a.s2.end(), s.w2().data()));
}

TEST_CASE_TEMPLATE("routed experts: every kept row against the fp64 reference", C, daedalus::Tiny,
                   dt::TinyOddWidths, dt::V2LiteFewExperts) {
  const CpuBackend cpu(2);
  const dt::ExpertArrays<C> a(8200);
  const auto w = moe::ExpertWeights<C>::from_arrays(a.w1, a.w3, a.w2);
  // Tiny-sized: ~11 rows per expert, some segments of at most CpuExpertTraits::small_rows (the
  // streaming path), most above (the GEMM path); V2-Lite widths: 6-7 rows per expert.
  const int tokens = C::dim < 100 ? 45 : 9;
  for (moe::PlanSettings settings :
       {moe::PlanSettings{}, moe::PlanSettings{.capacity_factor = 0.8, .pad_block = 8}}) {
    const RoutedRun<C> run = run_routed(cpu, w, tokens, 8201, settings);
    std::vector<double> want(run.expert_out.size(), 0.0);
    for (index_t r = 0; r < run.plan.rows(); ++r) {
      const std::int32_t s = run.plan.row_slot()[std::size_t(r)];
      if (s < 0) continue;  // padding: expected 0
      const auto y = moe_reference::swiglu(run.x.data() + (s / C::n_activated_experts) * C::dim,
                                           C::dim, a.expert(run.ids[std::size_t(s)]));
      std::copy(y.begin(), y.end(), want.begin() + r * C::dim);
    }
    CHECK(tol::row_relative_error(run.expert_out, want, C::dim) <= expert_tolerance<C>());
  }
}

TEST_CASE_TEMPLATE("shared experts: every token against the fp64 reference", C, daedalus::Tiny,
                   dt::TinyOddWidths, dt::V2LiteFewExperts) {
  const CpuBackend cpu(2);
  const dt::ExpertArrays<C> a(8300);
  const auto s = moe::SharedExpertWeights<C>::from_arrays(a.s1, a.s3, a.s2);
  constexpr index_t width = moe::SharedExpertWeights<C>::width;
  // 1 token is a GEMV, 7 take the streaming path, 23 the GEMM path (CpuExpertTraits::small_rows =
  // 8).
  for (int tokens : {1, 7, 23}) {
    CAPTURE(tokens);
    dt::Random rng(8301);
    const std::vector<float> x = rng.uniform(std::size_t(tokens) * C::dim);
    std::vector<float> hidden(std::size_t(tokens) * width), out(std::size_t(tokens) * C::dim, 3.0f);
    moe::shared_experts(cpu, s, HostView<const float, 2>(x.data(), {tokens, C::dim}),
                        HostView<float, 2>(hidden.data(), {tokens, width}),
                        HostView<float, 2>(out.data(), {tokens, C::dim}));
    std::vector<double> want;
    for (int t = 0; t < tokens; ++t) {
      const auto y = moe_reference::swiglu(x.data() + t * C::dim, C::dim, a.shared_mlp());
      want.insert(want.end(), y.begin(), y.end());
    }
    CHECK(tol::row_relative_error(out, want, C::dim) <=
          tol::fp32_vs_reference(std::max<index_t>(C::dim, width)));
  }
}

TEST_CASE("routed experts: bitwise identical for 1, 2 and 3 threads and any buffer alignment") {
  using C = daedalus::Tiny;
  const dt::ExpertArrays<C> a(8400);
  const auto w = moe::ExpertWeights<C>::from_arrays(a.w1, a.w3, a.w2);
  const auto run = run_routed(CpuBackend(1), w, 150, 8401, {.pad_block = 4});
  const index_t rows = run.plan.rows();
  // The same inputs through buffers shifted by 0-3 floats: a kernel whose rounding depends on
  // where its buffers lie (vector vs scalar code for the unaligned head) would differ.
  for (int threads : {1, 2, 3}) {
    for (int shift : {0, 1, 3}) {
      CAPTURE(threads);
      CAPTURE(shift);
      std::vector<float> in(std::size_t(rows) * C::dim + 3), hidden(std::size_t(rows) * 20 + 3),
          out(std::size_t(rows) * C::dim + 3);
      std::copy(run.expert_in.begin(), run.expert_in.end(), in.begin() + shift);
      moe::routed_experts(CpuBackend(threads), w, run.plan,
                          HostView<const float, 2>(in.data() + shift, {rows, C::dim}),
                          HostView<float, 2>(hidden.data() + shift, {rows, C::moe_inter_dim}),
                          HostView<float, 2>(out.data() + shift, {rows, C::dim}));
      CHECK(std::memcmp(out.data() + shift, run.expert_out.data(),
                        run.expert_out.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("experts: bad input throws naming the argument") {
  using C = daedalus::Tiny;
  const CpuBackend cpu(2);
  const dt::ExpertArrays<C> a(8500);
  std::vector<float> short_w3(a.w3.begin(), a.w3.end() - 1);
  auto msg = message_of<daedalus::InvalidArgument>(
      [&] { (void)moe::ExpertWeights<C>::from_arrays(a.w1, short_w3, a.w2); });
  CHECK(contains(msg, "daedalus::moe::ExpertWeights::from_arrays: 'w3' has " +
                          std::to_string(short_w3.size()) + " values; expected " +
                          std::to_string(a.w3.size()) + " for Tiny"));
  msg = message_of<daedalus::InvalidArgument>(
      [&] { (void)moe::SharedExpertWeights<C>::from_arrays(a.s1, a.s3, short_w3); });
  CHECK(contains(msg, "'w2' has"));

  const auto w = moe::ExpertWeights<C>::from_arrays(a.w1, a.w3, a.w2);
  std::vector<std::int32_t> ids = {0, 1, 2, 3, 4, 5};
  std::vector<float> weights(6, 0.5f);
  moe::RoutingPlan plan;
  plan.build(HostView<const std::int32_t, 2>(ids.data(), {2, 3}),
             HostView<const float, 2>(weights.data(), {2, 3}), 13);
  std::vector<float> in(6 * 96), hidden(6 * 20), out(6 * 96, 3.0f);
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::routed_experts(cpu, w, plan, HostView<const float, 2>(in.data(), {6, 96}),
                        HostView<float, 2>(hidden.data(), {6, 20}),
                        HostView<float, 2>(out.data(), {6, 96}));
  });
  CHECK(contains(msg, "'plan' was built for 13 experts; expected 12 for Tiny"));
  plan.build(HostView<const std::int32_t, 2>(ids.data(), {2, 3}),
             HostView<const float, 2>(weights.data(), {2, 3}), 12);
  msg = message_of<daedalus::InvalidArgument>([&] {
    moe::routed_experts(cpu, w, plan, HostView<const float, 2>(in.data(), {6, 96}),
                        HostView<float, 2>(hidden.data(), {6, 19}),
                        HostView<float, 2>(out.data(), {6, 96}));
  });
  CHECK(contains(msg, "'hidden' has extents [6,19]; expected [6,20]"));
  CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == 3.0f; }));
}
