// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies shared by the device test binary (daedalus_cuda_tests, nvcc, a real GPU) and the
// emulated one (daedalus_emulated_tests, g++ against emulation/): the same
// kernels, the same host code (CudaBackend, DeviceBuffer, launch), the same references and
// tolerances. Each check_* function runs one kernel and states its expectations with doctest;
// the TEST_CASEs below call them, and the emulated binary calls them again under other
// schedules. Included by exactly one translation unit per binary.
//
// Tolerances. Inputs are drawn in [-1, 1] and never zero. For an fp32 sum of K terms s_j, in any
// order, |computed - exact| <= γ_K · Σ|s_j| with γ_K = K·u/(1 - K·u) <= 1.01·K·u (Higham,
// "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5 and Lemma 3.1): a rigorous
// bound, so a test cannot fail by bad luck, and still far below what a wrong element or a
// dropped term produces (of the size of one term, ~0.1-1).

#include <doctest/doctest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cuda/kernels/atomics.cuh"
#include "cuda/kernels/block_sum.cuh"
#include "cuda/kernels/mma_gemm.cuh"
#include "cuda/kernels/warp_ops.cuh"
#include "support/random.hpp"

namespace daedalus::testing::cuda_checks {

inline constexpr double fp32_u = 0x1p-24;

/// γ_K bound of an fp32 sum of K terms whose magnitudes add up to `magnitude`.
inline double fp32_sum_bound(std::int64_t terms, double magnitude) {
  return 1.01 * double(terms) * fp32_u * magnitude;
}

inline int blocks_for(int n, int threads) { return (n + threads - 1) / threads; }

// ---- element-wise ----------------------------------------------------------------------------

inline void check_vector_add(const CudaBackend& cuda) {
  constexpr int n = 1000;  // not a multiple of the block size: the bounds check matters
  constexpr int threads = 128;
  Random random(501);
  const std::vector<float> a = random.uniform(n), b = random.uniform(n);
  auto d_a = cuda::to_device(cuda, a);
  auto d_b = cuda::to_device(cuda, b);
  cuda::DeviceBuffer<float> d_c(n);
  cuda::launch(cuda, {dim3(blocks_for(n, threads)), dim3(threads)}, &kernels::vector_add,
               d_a.data(), d_b.data(), d_c.data(), n);
  const std::vector<float> c = cuda::to_host(cuda, d_c);
  int wrong = 0;
  // One fp32 addition on both sides, both rounded to nearest: identical results.
  for (int i = 0; i < n; ++i) wrong += c[i] != a[i] + b[i];
  CHECK(wrong == 0);
}

// ---- shared memory and barriers --------------------------------------------------------------

inline constexpr int kSumThreads = 256;

/// The fp64 sums block_sum must produce: block b sums x[i] for i ≡ b·256 + t (mod grid·256).
inline std::vector<double> block_sum_reference(const std::vector<float>& x, int grid,
                                               std::vector<double>* magnitudes) {
  std::vector<double> sums(grid, 0.0);
  magnitudes->assign(grid, 0.0);
  const int n = static_cast<int>(x.size());
  for (int i = 0; i < n; ++i) {
    const int b = (i % (grid * kSumThreads)) / kSumThreads;
    sums[b] += x[i];
    (*magnitudes)[b] += std::abs(double(x[i]));
  }
  return sums;
}

/// Runs block_sum<256, kSynchronised> over n values; returns the largest error divided by its
/// γ bound (<= 1 is correct).
template <bool kSynchronised>
double block_sum_error_ratio(const CudaBackend& cuda, int n, int grid, std::uint64_t stream) {
  Random random(stream);
  const std::vector<float> x = random.uniform(std::size_t(n));
  auto d_x = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> d_sums{std::size_t(grid)};
  cuda::launch(cuda, {dim3(grid), dim3(kSumThreads)},
               &kernels::block_sum<kSumThreads, kSynchronised>, d_x.data(), n, d_sums.data());
  const std::vector<float> sums = cuda::to_host(cuda, d_sums);
  std::vector<double> magnitudes;
  const std::vector<double> expected = block_sum_reference(x, grid, &magnitudes);
  double worst = 0.0;
  const std::int64_t terms = n / grid + kSumThreads;  // per-thread sums, then the tree
  for (int b = 0; b < grid; ++b) {
    if (!std::isfinite(sums[b])) return INFINITY;
    worst = std::max(worst, std::abs(sums[b] - expected[b]) /
                                fp32_sum_bound(terms, std::max(magnitudes[b], 1e-30)));
  }
  return worst;
}

inline void check_block_sum(const CudaBackend& cuda) {
  // 10007 values over 7 blocks: the last block's share is partial, some threads sum nothing.
  CHECK(block_sum_error_ratio<true>(cuda, 10007, 7, 502) <= 1.0);
  // Fewer values than threads in a block: most partial sums are exactly zero.
  CHECK(block_sum_error_ratio<true>(cuda, 77, 1, 503) <= 1.0);
}

/// 100,000 bytes of dynamic shared memory: more than the 48 KiB a kernel gets without opting in
/// (cuda::launch opts in), less than sm_80's 163 KiB.
inline void check_large_dynamic_shared(const CudaBackend& cuda) {
  constexpr int n = 25000;
  Random random(507);
  const std::vector<float> x = random.uniform(n);
  auto d_x = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> d_out(n);
  cuda::launch(cuda, {dim3(1), dim3(256), n * sizeof(float)}, &kernels::reverse_through_shared,
               d_x.data(), d_out.data(), n);
  const std::vector<float> out = cuda::to_host(cuda, d_out);
  int wrong = 0;
  for (int i = 0; i < n; ++i) wrong += out[i] != x[n - 1 - i];  // copies: exact
  CHECK(wrong == 0);
}

// ---- warp collectives ------------------------------------------------------------------------

inline void check_warp_ops(const CudaBackend& cuda) {
  constexpr int n = 32 * 12;  // 12 warps: 4 blocks of 3 warps
  constexpr int threads = 96;
  constexpr int warps = n / 32;
  Random random(504);
  const std::vector<float> x = random.uniform(n);
  auto d_x = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> d_sums(warps), d_butterfly(n), d_scan(n), d_broadcast(n);
  cuda::DeviceBuffer<unsigned> d_ballot(warps);
  cuda::DeviceBuffer<int> d_any_all(2 * warps);
  cuda::launch(cuda, {dim3(n / threads), dim3(threads)}, &kernels::warp_ops, d_x.data(),
               d_sums.data(), d_butterfly.data(), d_scan.data(), d_broadcast.data(),
               d_ballot.data(), d_any_all.data(), n);
  const auto sums = cuda::to_host(cuda, d_sums);
  const auto butterfly = cuda::to_host(cuda, d_butterfly);
  const auto scan = cuda::to_host(cuda, d_scan);
  const auto broadcast = cuda::to_host(cuda, d_broadcast);
  const auto ballot = cuda::to_host(cuda, d_ballot);
  const auto any_all = cuda::to_host(cuda, d_any_all);

  int wrong_sum = 0, wrong_butterfly = 0, wrong_scan = 0, wrong_broadcast = 0, wrong_vote = 0;
  for (int w = 0; w < warps; ++w) {
    double sum = 0.0, magnitude = 0.0;
    unsigned expected_ballot = 0;
    bool any_large = false, all_above = true;
    for (int l = 0; l < 32; ++l) {
      const float v = x[w * 32 + l];
      sum += v;
      magnitude += std::abs(double(v));
      // Prefix up to lane l: at most 32 terms.
      if (std::abs(scan[w * 32 + l] - sum) > fp32_sum_bound(32, magnitude)) ++wrong_scan;
      if (v > 0.0f) expected_ballot |= 1u << l;
      any_large = any_large || v > 0.5f;
      all_above = all_above && v > -0.9f;
      if (broadcast[w * 32 + l] != x[w * 32 + (l * 7 + 3) % 32]) ++wrong_broadcast;
    }
    const double bound = fp32_sum_bound(32, magnitude);
    if (std::abs(sums[w] - sum) > bound) ++wrong_sum;
    for (int l = 0; l < 32; ++l) {
      if (std::abs(butterfly[w * 32 + l] - sum) > bound) ++wrong_butterfly;
    }
    // The butterfly gives every lane the same additions in the same order... per lane pair
    // partners add in swapped order, which fp32 addition does not mind (it is commutative).
    for (int l = 1; l < 32; ++l) {
      if (butterfly[w * 32 + l] != butterfly[w * 32]) ++wrong_butterfly;
    }
    if (ballot[w] != expected_ballot) ++wrong_vote;
    if (any_all[2 * w] != int(any_large) || any_all[2 * w + 1] != int(all_above)) ++wrong_vote;
  }
  CHECK(wrong_sum == 0);
  CHECK(wrong_butterfly == 0);
  CHECK(wrong_scan == 0);
  CHECK(wrong_broadcast == 0);
  CHECK(wrong_vote == 0);
}

inline void check_half_warp_sums(const CudaBackend& cuda) {
  constexpr int n = 32 * 5;  // one block of 5 warps
  Random random(505);
  const std::vector<float> x = random.uniform(n);
  auto d_x = cuda::to_device(cuda, x);
  cuda::DeviceBuffer<float> d_half(n / 16);
  cuda::launch(cuda, {dim3(1), dim3(n)}, &kernels::half_warp_sums, d_x.data(), d_half.data(), n);
  const auto half = cuda::to_host(cuda, d_half);
  int wrong = 0;
  for (int h = 0; h < n / 16; ++h) {
    double sum = 0.0, magnitude = 0.0;
    for (int l = 0; l < 16; ++l) {
      sum += x[h * 16 + l];
      magnitude += std::abs(double(x[h * 16 + l]));
    }
    if (std::abs(half[h] - sum) > fp32_sum_bound(16, magnitude)) ++wrong;
  }
  CHECK(wrong == 0);
}

/// Built-in indices of a 3-D block (8×4×2 = 64 threads, two warps) in a 3×2 grid.
inline void check_thread_layout(const CudaBackend& cuda) {
  constexpr int threads = 64, blocks = 6;
  cuda::DeviceBuffer<int> d_out(2 * threads * blocks);
  cuda::launch(cuda, {dim3(3, 2), dim3(8, 4, 2)}, &kernels::thread_layout, d_out.data());
  const auto out = cuda::to_host(cuda, d_out);
  int wrong = 0;
  for (int t = 0; t < threads * blocks; ++t) {
    wrong += out[2 * t] != t;
    wrong += out[2 * t + 1] != (t % threads) / 32 * 32;
  }
  CHECK(wrong == 0);
}

// ---- atomics ---------------------------------------------------------------------------------

inline void check_atomics(const CudaBackend& cuda) {
  constexpr int n = 5000, threads = 128, bins = 13;
  Random random(506);
  const std::vector<float> x = random.uniform(n);
  std::vector<int> keys(n);
  for (int& k : keys) k = static_cast<int>(random.integer(-1000000, 1000000));
  auto d_x = cuda::to_device(cuda, x);
  auto d_keys = cuda::to_device(cuda, keys);
  auto d_histogram = cuda::to_device(cuda, std::vector<int>(bins, 0));
  auto d_total = cuda::to_device(cuda, std::vector<float>{0.0f});
  auto d_max = cuda::to_device(cuda, std::vector<int>{INT_MIN});
  auto d_claimed = cuda::to_device(cuda, std::vector<int>{0});
  cuda::DeviceBuffer<int> d_claims(n);
  cuda::launch(cuda, {dim3(blocks_for(n, threads)), dim3(threads)}, &kernels::atomics, d_x.data(),
               d_keys.data(), n, bins, d_histogram.data(), d_total.data(), d_max.data(),
               d_claimed.data(), d_claims.data());
  const auto histogram = cuda::to_host(cuda, d_histogram);
  const auto total = cuda::to_host(cuda, d_total);
  const auto max_key = cuda::to_host(cuda, d_max);
  const auto claimed = cuda::to_host(cuda, d_claimed);
  const auto claims = cuda::to_host(cuda, d_claims);

  std::vector<int> expected_histogram(bins, 0);
  double sum = 0.0, magnitude = 0.0;
  for (int i = 0; i < n; ++i) {
    // The same fp32 expression as the kernel, so that the bins agree at their edges.
    int bin = static_cast<int>((x[i] + 1.0f) * 0.5f * static_cast<float>(bins));
    bin = std::clamp(bin, 0, bins - 1);
    ++expected_histogram[bin];
    sum += x[i];
    magnitude += std::abs(double(x[i]));
  }
  CHECK(histogram == expected_histogram);
  // Atomic float additions happen in an unspecified order: any order is within γ_n.
  CHECK(std::abs(total[0] - sum) <= fp32_sum_bound(n, magnitude));
  CHECK(max_key[0] == *std::max_element(keys.begin(), keys.end()));
  // Exactly one thread won the compare-and-swap, and the word holds its index + 1.
  const auto winner = std::find(claims.begin(), claims.end(), 1);
  REQUIRE(winner != claims.end());
  CHECK(std::count(claims.begin(), claims.end(), 1) == 1);
  CHECK(claimed[0] == static_cast<int>(winner - claims.begin()) + 1);
}

// ---- tensor cores ----------------------------------------------------------------------------

/// Runs mma_gemm<device type of H> on random m×k and n×k inputs and compares with two fp64
/// references:
///  - fed with the same 16-bit-rounded inputs: the products are then exact in fp32 (8- or
///    11-bit significands), and the only error is the fp32 accumulation of k terms, bounded by
///    γ_k · Σ|a_ik·b_jk| per element. Tensor cores accumulate with truncation rather than
///    rounding (Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021), which
///    doubles the unit error: the bound used is 2·γ_k.
///  - fed with the fp32 inputs before rounding: each product then also carries the two
///    roundings of its operands to the 16-bit type, at most (2u + u²)·|a·b| with u the type's
///    unit roundoff (2^-8 bf16, 2^-11 fp16): the "storage tolerance" of the product.
/// Returns the largest error over its bound for each (<= 1 is correct).
template <class H, bool kSynchronised = true>
std::pair<double, double> mma_gemm_error_ratios(const CudaBackend& cuda, int m, int n, int k,
                                                std::uint64_t stream) {
  using D = cuda::device_storage_t<H>;
  const double u = std::is_same_v<H, daedalus::bfloat16> ? 0x1p-8 : 0x1p-11;
  Random random(stream);
  const std::vector<float> a32 = random.uniform(std::size_t(m) * k);
  const std::vector<float> b32 = random.uniform(std::size_t(n) * k);
  std::vector<H> a(a32.size()), b(b32.size());
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = H(a32[i]);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = H(b32[i]);
  auto d_a = cuda::to_device(cuda, a);
  auto d_b = cuda::to_device(cuda, b);
  cuda::DeviceBuffer<float> d_c(std::size_t(m) * n);
  using Traits = kernels::MmaGemmTraits;
  const kernels::MmaGemmParams<D> params{d_a.data(), d_b.data(), d_c.data(), m, n, k};
  cuda::launch(cuda,
               {dim3(blocks_for(n, Traits::block_n), blocks_for(m, Traits::block_m)),
                dim3(Traits::threads), Traits::template dynamic_shared_bytes<D>()},
               &kernels::mma_gemm<D, kSynchronised>, params);
  const std::vector<float> c = cuda::to_host(cuda, d_c);

  double rounded_ratio = 0.0, storage_ratio = 0.0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double exact_rounded = 0.0, exact = 0.0, magnitude = 0.0;
      for (int p = 0; p < k; ++p) {
        const double ar = static_cast<float>(a[std::size_t(i) * k + p]);
        const double br = static_cast<float>(b[std::size_t(j) * k + p]);
        exact_rounded += ar * br;
        exact += double(a32[std::size_t(i) * k + p]) * double(b32[std::size_t(j) * k + p]);
        magnitude += std::abs(ar * br);
      }
      const double got = c[std::size_t(i) * n + j];
      if (!std::isfinite(got)) return {INFINITY, INFINITY};
      const double accumulation = 2.0 * fp32_sum_bound(k, magnitude);
      // Σ|a32·b32| <= Σ|ar·br| / (1 - u)²: the operands' roundings move each by at most u.
      const double storage = (2.0 * u + u * u) * magnitude / ((1 - u) * (1 - u)) + accumulation;
      rounded_ratio = std::max(rounded_ratio, std::abs(got - exact_rounded) / accumulation);
      storage_ratio = std::max(storage_ratio, std::abs(got - exact) / storage);
    }
  }
  return {rounded_ratio, storage_ratio};
}

template <class H>
void check_mma_gemm(const CudaBackend& cuda) {
  struct Shape {
    int m, n, k;
  };
  // One exact mma; edges in every dimension (none a multiple of 32, 16 or 8); several k steps
  // and blocks; a 1×1×1 product padded to whole tiles.
  const Shape shapes[] = {{16, 8, 16}, {77, 45, 100}, {33, 9, 17}, {128, 96, 256}, {1, 1, 1}};
  std::uint64_t stream = 510;
  for (const Shape& s : shapes) {
    CAPTURE(s.m);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const auto [rounded, storage] = mma_gemm_error_ratios<H>(cuda, s.m, s.n, s.k, stream++);
    CHECK(rounded <= 1.0);
    CHECK(storage <= 1.0);
  }
}

/// The fragment loaders put every element where the PTX ISA says (see daedalus/cuda/mma.cuh).
inline void check_fragment_layout(const CudaBackend& cuda) {
  std::vector<daedalus::bfloat16> a_codes(256), b_codes(128);
  for (int i = 0; i < 256; ++i) a_codes[i] = daedalus::bfloat16(float(i));  // exact up to 256
  for (int i = 0; i < 128; ++i) b_codes[i] = daedalus::bfloat16(float(i));
  auto d_a = cuda::to_device(cuda, a_codes);
  auto d_b = cuda::to_device(cuda, b_codes);
  cuda::DeviceBuffer<float> d_a_out(32 * 8), d_b_out(32 * 4);
  cuda::DeviceBuffer<int> d_c_out(32 * 4 * 2);
  cuda::launch(cuda, {dim3(1), dim3(32)}, &kernels::fragment_coordinates, d_a.data(), d_b.data(),
               d_a_out.data(), d_b_out.data(), d_c_out.data());
  const auto a_out = cuda::to_host(cuda, d_a_out);
  const auto b_out = cuda::to_host(cuda, d_b_out);
  const auto c_out = cuda::to_host(cuda, d_c_out);
  // Lanes 0 and 5 as printed in the PTX ISA's figures for m16n8k16 (A: rows g and g+8, columns
  // 2t, 2t+1, 2t+8, 2t+9; B: rows 2t, 2t+1, 2t+8, 2t+9 of column g; C: rows g, g+8, columns
  // 2t, 2t+1), with g = lane / 4, t = lane % 4.
  const std::vector<float> lane0_a = {0 * 16 + 0, 0 * 16 + 1, 8 * 16 + 0, 8 * 16 + 1,
                                      0 * 16 + 8, 0 * 16 + 9, 8 * 16 + 8, 8 * 16 + 9};
  const std::vector<float> lane5_a = {1 * 16 + 2,  1 * 16 + 3,  9 * 16 + 2,  9 * 16 + 3,
                                      1 * 16 + 10, 1 * 16 + 11, 9 * 16 + 10, 9 * 16 + 11};
  const std::vector<float> lane5_b = {2 * 8 + 1, 3 * 8 + 1, 10 * 8 + 1, 11 * 8 + 1};
  const std::vector<int> lane5_c = {1, 2, 1, 3, 9, 2, 9, 3};
  CHECK(std::vector<float>(a_out.begin(), a_out.begin() + 8) == lane0_a);
  CHECK(std::vector<float>(a_out.begin() + 40, a_out.begin() + 48) == lane5_a);
  CHECK(std::vector<float>(b_out.begin() + 20, b_out.begin() + 24) == lane5_b);
  CHECK(std::vector<int>(c_out.begin() + 40, c_out.begin() + 48) == lane5_c);
  // Over all lanes, each operand's elements are covered exactly once.
  std::vector<int> a_seen(256, 0), b_seen(128, 0), c_seen(128, 0);
  for (float v : a_out) ++a_seen[static_cast<int>(v)];
  for (float v : b_out) ++b_seen[static_cast<int>(v)];
  for (int e = 0; e < 128; ++e) ++c_seen[c_out[2 * e] * 8 + c_out[2 * e + 1]];
  CHECK(std::count(a_seen.begin(), a_seen.end(), 1) == 256);
  CHECK(std::count(b_seen.begin(), b_seen.end(), 1) == 128);
  CHECK(std::count(c_seen.begin(), c_seen.end(), 1) == 128);
}

// ---- host side: backend, buffers, copies, errors ---------------------------------------------

inline void check_buffers_and_copies(const CudaBackend& cuda) {
  static_assert(Backend<CudaBackend>);
  static_assert(std::is_same_v<CudaBackend::memory_space, DeviceMemory>);
  Random random(520);
  const std::vector<float> x = random.uniform(37);
  auto d_x = cuda::to_device(cuda, x);
  CHECK(d_x.size() == 37);
  CHECK(cuda::to_host(cuda, d_x) == x);

  // Moving transfers ownership; the source is left empty.
  cuda::DeviceBuffer<float> moved = std::move(d_x);
  CHECK(moved.size() == 37);
  CHECK(d_x.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  CHECK(cuda::to_host(cuda, moved) == x);

  // Device to device through views, then back.
  cuda::DeviceBuffer<float> copy_of(37);
  cuda::copy(cuda, copy_of.view<1>({37}), std::as_const(moved).view<1>({37}));
  CHECK(cuda::to_host(cuda, copy_of) == x);
  // Host view to device view, 2-D.
  std::vector<float> host2(6 * 7);
  for (std::size_t i = 0; i < host2.size(); ++i) host2[i] = float(i) + 0.5f;
  cuda::DeviceBuffer<float> grid(42);
  cuda::copy(cuda, grid.view<2>({6, 7}), TensorView<const float, 2>(host2.data(), {6, 7}));
  CHECK(cuda::to_host(cuda, grid) == host2);

  // Bad input: typed errors naming the argument; the destination is untouched.
  std::vector<float> too_short(36, -1.0f);
  CHECK_THROWS_WITH_AS(cuda::copy(cuda, moved, std::span<const float>(too_short)),
                       "daedalus::cuda::copy: 'src' has 36 elements; expected 37 (the size of "
                       "'dst')",
                       InvalidArgument);
  CHECK(cuda::to_host(cuda, moved) == x);
  CHECK_THROWS_WITH_AS(static_cast<void>(grid.view<2>({6, 6})),
                       "daedalus::cuda::DeviceBuffer::view: 'extents' [6,6] hold 36 elements; "
                       "expected 42 (the buffer's size)",
                       InvalidArgument);
  CHECK_THROWS_WITH_AS(
      cuda::copy(cuda, grid.view<2>({7, 6}), TensorView<const float, 2>(host2.data(), {6, 7})),
      "daedalus::cuda::copy: 'src' has extents [6,7]; expected [7,6] (the "
      "extents of 'dst')",
      InvalidArgument);

  // bf16 host storage copies bit for bit into the device type.
  std::vector<daedalus::bfloat16> h16(9);
  for (std::size_t i = 0; i < h16.size(); ++i) h16[i] = daedalus::bfloat16(float(i) - 4.25f);
  auto d16 = cuda::to_device(cuda, h16);
  static_assert(std::is_same_v<decltype(d16), cuda::DeviceBuffer<__nv_bfloat16>>);
  const auto back16 = cuda::to_host(cuda, d16);
  for (std::size_t i = 0; i < h16.size(); ++i) CHECK(float(back16[i]) == float(h16[i]));

  // A zero-sized buffer allocates nothing and copies nothing.
  cuda::DeviceBuffer<float> empty(0);
  CHECK(empty.data() == nullptr);
  CHECK(cuda::to_host(cuda, empty).empty());
}

/// cuda::thread_scratch: the calling thread keeps one buffer per device and reuses it; a larger
/// request grows it (and the grown buffer holds that many elements); another thread gets its own.
inline void check_thread_scratch(const CudaBackend& cuda) {
  int* first = cuda::thread_scratch<int>(2);
  REQUIRE(first != nullptr);
  CHECK(cuda::thread_scratch<int>(1) == first);  // reused, not reallocated
  CHECK(cuda::thread_scratch<int>(2) == first);
  constexpr std::size_t grown = 1000;
  int* large = cuda::thread_scratch<int>(grown);
  std::vector<int> values(grown);
  for (std::size_t i = 0; i < grown; ++i) values[i] = int(i * 7 + 3);
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(large, values.data(), grown * sizeof(int),
                                      cudaMemcpyHostToDevice, cuda.stream()));
  std::vector<int> back(grown, -1);
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(back.data(), large, grown * sizeof(int),
                                      cudaMemcpyDeviceToHost, cuda.stream()));
  cuda.synchronize();
  CHECK(back == values);
  CHECK(cuda::thread_scratch<int>(grown) == large);
  int* other_thread = nullptr;
  std::thread([&] { other_thread = cuda::thread_scratch<int>(2); }).join();
  CHECK(other_thread != nullptr);
  CHECK(other_thread != large);
}

/// cuda::grow: never empty, never shrinks, keeps a buffer that is large enough (the same
/// pointer), and sizes a replacement exactly or by doubling.
inline void check_grow() {
  cuda::DeviceBuffer<float> buffer;
  float* one = cuda::grow(buffer, 0);
  CHECK(one != nullptr);
  CHECK(buffer.size() == 1);
  CHECK(cuda::grow(buffer, 1) == one);
  cuda::grow(buffer, 10);
  CHECK(buffer.size() == 10);
  float* ten = buffer.data();
  CHECK(cuda::grow(buffer, 4) == ten);  // large enough: kept, not shrunk
  CHECK(buffer.size() == 10);
  cuda::grow(buffer, 11, cuda::Growth::doubling);
  CHECK(buffer.size() == 20);
  cuda::grow(buffer, 50, cuda::Growth::doubling);
  CHECK(buffer.size() == 50);  // more than twice the old size: the count asked for
  cuda::grow(buffer, 51);
  CHECK(buffer.size() == 51);
}

inline void check_errors(const CudaBackend& cuda) {
  // A failed runtime call: CudaError with file:line, the call as written, CUDA's name and text.
  void* pointer = nullptr;
  try {
    DAEDALUS_CUDA_CHECK(cudaMalloc(&pointer, std::size_t{1} << 62));
    FAIL("cudaMalloc of 2^62 bytes succeeded");
  } catch (const CudaError& e) {
    const std::string what = e.what();
    CHECK(what.find("kernel_checks.hpp:") != std::string::npos);
    CHECK(what.find("cudaMalloc(&pointer, std::size_t{1} << 62) failed") != std::string::npos);
    CHECK(what.find("cudaErrorMemoryAllocation") != std::string::npos);
  }
  CHECK_THROWS_AS(cuda::DeviceBuffer<float>(std::size_t{1} << 61), CudaError);

  // A launch CUDA rejects (2048 threads per block): CudaError naming the caller's line and shape.
  cuda::DeviceBuffer<float> out(4);
  try {
    cuda::launch(cuda, {dim3(1), dim3(2048)}, &kernels::vector_add,
                 static_cast<const float*>(out.data()), static_cast<const float*>(out.data()),
                 out.data(), 4);
    FAIL("a launch of 2048 threads per block succeeded");
  } catch (const CudaError& e) {
    const std::string what = e.what();
    CHECK(what.find("kernel_checks.hpp:") != std::string::npos);
    CHECK(what.find("block (2048,1,1)") != std::string::npos);
    CHECK(what.find("cudaErrorInvalidConfiguration") != std::string::npos);
  }
  // The error was consumed: the next launch is fine.
  const std::vector<float> ones(4, 1.0f);
  auto d_ones = cuda::to_device(cuda, ones);
  cuda::launch(cuda, {dim3(1), dim3(32)}, &kernels::vector_add,
               static_cast<const float*>(d_ones.data()), static_cast<const float*>(d_ones.data()),
               out.data(), 4);
  CHECK(cuda::to_host(cuda, out) == std::vector<float>(4, 2.0f));
}

inline void check_streams() {
  cuda::Stream stream;
  const CudaBackend cuda = CudaBackend{}.on(stream);
  CHECK(cuda.stream() == stream.get());
  CHECK(cuda.stream() != nullptr);
  check_vector_add(cuda);
  check_mma_gemm<daedalus::bfloat16>(cuda);
  cuda.synchronize();
}

}  // namespace daedalus::testing::cuda_checks
