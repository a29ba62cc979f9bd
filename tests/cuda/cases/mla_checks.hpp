// SPDX-License-Identifier: Apache-2.0
#pragma once

// MLA on the GPU: test bodies shared by daedalus_cuda_tests (nvcc, a real device) and
// daedalus_emulated_tests (g++ against emulation/). The cuBLAS subset against
// plain loops, the norm and RoPE kernels against the CPU backend's, and whole MLA layers on
// CudaBackend against the same calls on CpuBackend. Included by exactly one translation unit per
// binary.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "support/errors.hpp"
#include "support/mla_fixture.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace daedalus::testing::mla_checks {

namespace dcuda = ::daedalus::cuda;
namespace tol = ::daedalus::testing::tolerance;

/// γ_K bound of an fp32 sum of K products (each exact in fp32 or fp64 then rounded once):
/// |computed - exact| ≤ γ_K · Σ|terms| with γ_K ≤ 1.01·K·u (Higham, "Accuracy and Stability of
/// Numerical Algorithms", Lemma 3.1 and eq. 3.5). Rigorous, so a correct GEMM never fails it,
/// whatever order cuBLAS sums in; a wrong element or a dropped term is of the size of one term.
inline double fp32_sum_bound(std::int64_t terms, double magnitude) {
  return 1.01 * double(terms + 2) * tol::fp32_u * magnitude + 1e-30;
}

/// Random values rounded to T (so the loop and the device see the same inputs), as T and as
/// double.
template <class T>
struct RoundedValues {
  std::vector<T> stored;
  std::vector<double> exact;
  RoundedValues(Random& random, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      const T v = T(static_cast<float>(random.next(-1.0, 1.0)));
      stored.push_back(v);
      exact.push_back(static_cast<double>(static_cast<float>(v)));
    }
  }
};

// ---- cuBLAS, column-major as documented --------------------------------------------------------

/// cublasGemmStridedBatchedEx and cublasGemmEx called directly (column-major) for every pair of
/// transposes, padded leading dimensions and batch strides (one of them 0: a broadcast operand),
/// alpha and beta ≠ 0 over a preloaded C, against a double loop over the same inputs. Then beta =
/// 0 over a C full of NaN (C must not be read), and the statuses of bad arguments.
template <class T>
void check_raw_gemm(const CudaBackend& cuda) {
  using E = dcuda::device_storage_t<T>;
  constexpr cudaDataType type = dcuda::blas_type<E>();
  constexpr int m = 13, n = 7, k = 21, batch = 3;
  const float alpha = 0.75f, beta = -1.25f;
  Random random(7001);
  for (const cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T}) {
    for (const cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      CAPTURE(int(ta));
      CAPTURE(int(tb));
      const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
      const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
      const int lda = a_rows + 3, ldb = b_rows + 1, ldc = m + 2;
      const long long stride_a = std::int64_t(lda) * a_cols + 5;
      const long long stride_b = 0;  // one B for every batch
      const long long stride_c = std::int64_t(ldc) * n + 1;
      const RoundedValues<T> a(random, std::size_t(stride_a * batch));
      const RoundedValues<T> b(random, std::size_t(std::int64_t(ldb) * b_cols));
      std::vector<float> c0 = random.uniform(std::size_t(stride_c * batch));
      auto d_a = dcuda::to_device(cuda, a.stored);
      auto d_b = dcuda::to_device(cuda, b.stored);
      auto d_c = dcuda::to_device(cuda, c0);
      for (const bool batched : {false, true}) {
        CAPTURE(batched);
        DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(d_c.data(), c0.data(), c0.size() * sizeof(float),
                                            cudaMemcpyHostToDevice, cuda.stream()));
        cublasHandle_t handle = dcuda::blas_handle(cuda);
        if (batched) {
          DAEDALUS_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              handle, ta, tb, m, n, k, &alpha, d_a.data(), type, lda, stride_a, d_b.data(), type,
              ldb, stride_b, &beta, d_c.data(), CUDA_R_32F, ldc, stride_c, batch,
              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        } else {
          DAEDALUS_CUBLAS_CHECK(cublasGemmEx(handle, ta, tb, m, n, k, &alpha, d_a.data(), type, lda,
                                             d_b.data(), type, ldb, &beta, d_c.data(), CUDA_R_32F,
                                             ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        const std::vector<float> c = dcuda::to_host(cuda, d_c);
        int wrong = 0;
        for (int bi = 0; bi < batch; ++bi) {
          for (std::int64_t idx = 0; idx < stride_c; ++idx) {
            const std::int64_t at = bi * stride_c + idx;
            const int i = int(idx % ldc), j = int(idx / ldc);
            if (i >= m || j >= n || (!batched && bi > 0)) {
              wrong += std::memcmp(&c[std::size_t(at)], &c0[std::size_t(at)], 4) != 0;  // untouched
              continue;
            }
            double exact = 0.0, magnitude = 0.0;
            for (int p = 0; p < k; ++p) {
              const double av = a.exact[std::size_t(
                  bi * stride_a +
                  (ta == CUBLAS_OP_N ? i + std::int64_t(p) * lda : p + std::int64_t(i) * lda))];
              const double bv = b.exact[std::size_t(tb == CUBLAS_OP_N ? p + std::int64_t(j) * ldb
                                                                      : j + std::int64_t(p) * ldb)];
              exact += av * bv;
              magnitude += std::abs(av * bv);
            }
            const double c_in = c0[std::size_t(at)];
            const double expected = alpha * exact + beta * c_in;
            const double bound =
                fp32_sum_bound(k, std::abs(alpha) * magnitude + std::abs(beta * c_in));
            wrong += !(std::abs(c[std::size_t(at)] - expected) <= bound);
          }
        }
        CHECK(wrong == 0);
      }
    }
  }
  // beta = 0: C is written, never read (it is full of NaN here).
  {
    const RoundedValues<T> a(random, std::size_t(m) * k), b(random, std::size_t(k) * n);
    auto d_a = dcuda::to_device(cuda, a.stored);
    auto d_b = dcuda::to_device(cuda, b.stored);
    dcuda::DeviceBuffer<float> d_c(std::size_t(m) * n);
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(d_c.data(), 0xFF, d_c.bytes(), cuda.stream()));
    const float one = 1.0f, zero = 0.0f;
    DAEDALUS_CUBLAS_CHECK(cublasGemmEx(dcuda::blas_handle(cuda), CUBLAS_OP_N, CUBLAS_OP_N, m, n, k,
                                       &one, d_a.data(), type, m, d_b.data(), type, k, &zero,
                                       d_c.data(), CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    const std::vector<float> c = dcuda::to_host(cuda, d_c);
    CHECK(std::all_of(c.begin(), c.end(), [](float v) { return std::isfinite(v); }));
  }
  // Bad arguments: the documented statuses.
  {
    dcuda::DeviceBuffer<E> d_a(16), d_b(16);
    dcuda::DeviceBuffer<float> d_c(16);
    const float one = 1.0f;
    cublasHandle_t handle = dcuda::blas_handle(cuda);
    CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, -1, 2, 2, &one, d_a.data(), type, 2,
                       d_b.data(), type, 2, &one, d_c.data(), CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
    // lda smaller than the rows of A as stored (k = 4 rows for CUBLAS_OP_T).
    CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, 2, 2, 4, &one, d_a.data(), type, 2,
                       d_b.data(), type, 4, &one, d_c.data(), CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
    CHECK(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d_a.data(),
                                     type, 2, 4, d_b.data(), type, 2, 4, &one, d_c.data(),
                                     CUDA_R_32F, 2, 4, -1, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
  }
}

/// The row-major helpers of blas.cuh (gemm_strided_batched with both weight layouts, padded
/// rows, per-batch strides; linear) against a double loop.
template <class T>
void check_row_major_gemm(const CudaBackend& cuda) {
  using E = dcuda::device_storage_t<T>;
  constexpr index_t m = 11, n = 9, k = 19, batch = 4;
  Random random(7002);
  for (const dcuda::Weight layout : {dcuda::Weight::transposed, dcuda::Weight::as_stored}) {
    CAPTURE(int(layout));
    const index_t ldx = k + 2, ldy = n + 3;
    const index_t w_rows = layout == dcuda::Weight::transposed ? n : k;
    const index_t w_cols = layout == dcuda::Weight::transposed ? k : n;
    const index_t ldw = w_cols + 1;
    const index_t stride_x = m * ldx + 1, stride_w = w_rows * ldw + 3, stride_y = m * ldy;
    const RoundedValues<T> x(random, std::size_t(stride_x * batch));
    const RoundedValues<T> w(random, std::size_t(stride_w * batch));
    auto d_x = dcuda::to_device(cuda, x.stored);
    auto d_w = dcuda::to_device(cuda, w.stored);
    dcuda::DeviceBuffer<float> d_y(std::size_t(stride_y * batch));
    dcuda::gemm_strided_batched<E>(cuda, batch, m, n, k, {d_x.data(), ldx, stride_x},
                                   {d_w.data(), ldw, stride_w}, layout,
                                   {d_y.data(), ldy, stride_y});
    const std::vector<float> y = dcuda::to_host(cuda, d_y);
    int wrong = 0;
    for (index_t b = 0; b < batch; ++b) {
      for (index_t i = 0; i < m; ++i) {
        for (index_t j = 0; j < n; ++j) {
          double exact = 0.0, magnitude = 0.0;
          for (index_t p = 0; p < k; ++p) {
            const double xv = x.exact[std::size_t(b * stride_x + i * ldx + p)];
            const double wv = w.exact[std::size_t(
                b * stride_w + (layout == dcuda::Weight::transposed ? j * ldw + p : p * ldw + j))];
            exact += xv * wv;
            magnitude += std::abs(xv * wv);
          }
          wrong += !(std::abs(y[std::size_t(b * stride_y + i * ldy + j)] - exact) <=
                     fp32_sum_bound(k, magnitude));
        }
      }
    }
    CHECK(wrong == 0);
  }
  // linear: packed x [m, k] · w[n, k]ᵀ.
  const RoundedValues<T> x(random, std::size_t(m * k)), w(random, std::size_t(n * k));
  auto d_x = dcuda::to_device(cuda, x.stored);
  auto d_w = dcuda::to_device(cuda, w.stored);
  dcuda::DeviceBuffer<float> d_y(std::size_t(m * n));
  dcuda::linear<E>(cuda, d_x.data(), m, k, d_w.data(), n, d_y.data());
  const std::vector<float> y = dcuda::to_host(cuda, d_y);
  int wrong = 0;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < n; ++j) {
      double exact = 0.0, magnitude = 0.0;
      for (index_t p = 0; p < k; ++p) {
        exact += x.exact[std::size_t(i * k + p)] * w.exact[std::size_t(j * k + p)];
        magnitude += std::abs(x.exact[std::size_t(i * k + p)] * w.exact[std::size_t(j * k + p)]);
      }
      wrong += !(std::abs(y[std::size_t(i * n + j)] - exact) <= fp32_sum_bound(k, magnitude));
    }
  }
  CHECK(wrong == 0);
}

/// A refused cuBLAS call surfaces as CublasError (a CudaError) naming the call and the status.
inline void check_blas_errors(const CudaBackend& cuda) {
  dcuda::DeviceBuffer<float> d(64);
  // ldw = 2 < k = 4 for a transposed [n, k] weight: cuBLAS's lda check.
  const std::string what = message_of<dcuda::CublasError>([&] {
    dcuda::gemm<float>(cuda, 2, 2, 4, {d.data(), 4}, {d.data(), 2}, dcuda::Weight::transposed,
                       {d.data(), 2});
  });
  CHECK(contains(what, "cublasGemmEx"));
  CHECK(contains(what, "CUBLAS_STATUS_INVALID_VALUE"));
  CHECK_THROWS_AS(dcuda::gemm<float>(cuda, -1, 2, 2, {d.data(), 2}, {d.data(), 2},
                                     dcuda::Weight::transposed, {d.data(), 2}),
                  InvalidArgument);
  static_assert(std::is_base_of_v<CudaError, dcuda::CublasError>);
}

// ---- norm and RoPE kernels against the CPU
// -------------------------------------------------------

/// RMSNorm of rows with a leading dimension wider than the normed width, in place in fp32 and
/// out of place rounded to bf16, against MlaImpl<C, CpuBackend>::rms_norm_rows.
template <MlaConfig C>
void check_rms_norm(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  constexpr index_t rows = 7, width = S::kv_lora_rank, ld = S::latent_dim;
  Random random(7003);
  std::vector<float> x = random.uniform(std::size_t(rows * ld), 3.0);
  const std::vector<float> weight = random.uniform_in(std::size_t(width), 0.5, 1.5);
  auto d_x = dcuda::to_device(cuda, x);
  auto d_w = dcuda::to_device(cuda, weight);
  dcuda::DeviceBuffer<__nv_bfloat16> d_bf16(std::size_t(rows * width));
  mla::cuda::launch_rms_norm(cuda, d_x.data(), rows, int(width), ld, d_w.data(), C::norm_eps,
                             d_bf16.data(), width);
  mla::cuda::launch_rms_norm(cuda, d_x.data(), rows, int(width), ld, d_w.data(), C::norm_eps,
                             d_x.data(), ld);
  const std::vector<float> got = dcuda::to_host(cuda, d_x);
  const std::vector<bfloat16> got_bf16 = dcuda::to_host(cuda, d_bf16);
  std::vector<float> expected = x;
  mla::detail::MlaImpl<C, CpuBackend>::rms_norm_rows(expected.data(), rows, width, ld,
                                                     weight.data());
  // Both sum the squares in double and apply the same fp32 operations; the sums' order differs,
  // which can move the fp32 inverse norm by one ulp (2^-23 relative) and nothing else.
  CHECK(tol::row_relative_error(got, expected, std::size_t(ld)) <= 2.0 * 0x1p-23);
  // The columns past the width are not touched.
  int touched = 0;
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = width; j < ld; ++j)
      touched += got[std::size_t(r * ld + j)] != x[std::size_t(r * ld + j)];
  CHECK(touched == 0);
  // bf16 output: the same value rounded once more (≤ u_bf16 relative).
  std::vector<float> expected_packed, got_packed;
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < width; ++j) {
      expected_packed.push_back(expected[std::size_t(r * ld + j)]);
      got_packed.push_back(static_cast<float>(got_bf16[std::size_t(r * width + j)]));
    }
  CHECK(tol::row_relative_error(got_packed, expected_packed, std::size_t(width)) <=
        tol::bf16_u + 4.0 * tol::fp32_u);
}

/// RoPE of q_pe (every head) and k_pe for a batch of two entries of q_len tokens at starts past
/// the original context (YaRN's interpolated frequencies matter), against RopeTable::rotate.
template <MlaConfig C>
void check_rope(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  const std::vector<index_t> starts = {3, C::original_seq_len + 37};
  constexpr index_t q_len = 5;
  const index_t tokens = index_t(starts.size()) * q_len;
  Random random(7004);
  const std::vector<float> q = random.uniform(std::size_t(tokens * S::n_heads * S::qk_head_dim));
  const std::vector<float> latent = random.uniform(std::size_t(tokens * S::latent_dim));
  auto d_q = dcuda::to_device(cuda, q);
  auto d_latent = dcuda::to_device(cuda, latent);
  const auto freqs = mla::rope_frequencies<C>();
  auto d_freqs = dcuda::to_device(cuda, std::span<const double>(freqs));
  const std::vector<std::int32_t> starts32(starts.begin(), starts.end());
  auto d_starts = dcuda::to_device(cuda, starts32);
  mla::cuda::launch_rope<C>(cuda, d_q.data(), d_latent.data(), d_freqs.data(), d_starts.data(),
                            q_len, tokens);
  const std::vector<float> got_q = dcuda::to_host(cuda, d_q);
  const std::vector<float> got_latent = dcuda::to_host(cuda, d_latent);
  std::vector<float> expected_q = q, expected_latent = latent;
  const mla::RopeTable<C> rope;
  for (index_t t = 0; t < tokens; ++t) {
    const index_t pos = starts[std::size_t(t / q_len)] + t % q_len;
    for (index_t h = 0; h < S::n_heads; ++h)
      rope.rotate(expected_q.data() + (t * S::n_heads + h) * S::qk_head_dim + S::nope, pos);
    rope.rotate(expected_latent.data() + t * S::latent_dim + S::kv_lora_rank, pos);
  }
  // The same cos and sin (computed in double, rounded to fp32); the device may fuse the complex
  // multiply's product and sum (one rounding instead of two), and its double cos/sin may differ
  // from the host's by an ulp of double before the rounding to fp32: a few fp32 ulps of the
  // rotated pair's magnitude at most.
  CHECK(tol::row_relative_error(got_q, expected_q, std::size_t(S::qk_head_dim)) <=
        8.0 * tol::fp32_u);
  CHECK(tol::row_relative_error(got_latent, expected_latent, std::size_t(S::latent_dim)) <=
        8.0 * tol::fp32_u);
  // q_nope and the latent are not rotated: bit for bit as they were.
  int changed = 0;
  for (index_t th = 0; th < tokens * S::n_heads; ++th)
    for (index_t j = 0; j < S::nope; ++j)
      changed +=
          got_q[std::size_t(th * S::qk_head_dim + j)] != q[std::size_t(th * S::qk_head_dim + j)];
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < S::kv_lora_rank; ++j)
      changed += got_latent[std::size_t(t * S::latent_dim + j)] !=
                 latent[std::size_t(t * S::latent_dim + j)];
  CHECK(changed == 0);
}

// ---- whole layers on CudaBackend against CpuBackend -------------------------------------------

/// Tolerance of a layer's output on the device against the CPU backend run with the same
/// bf16-rounded weights (DeviceMlaWeights::rounded) and a bf16 cache. What differs is the
/// device's rounding of activations to bf16 before its GEMMs: x, the normed q_a, q_nope (before
/// W_UK), the latent output (before W_UV) and the attention output (before wo), and inside the
/// absorbed decode kernel q and p (the CPU does the same only with AVX512-BF16). Each rounding
/// perturbs one GEMM's inputs by ≤ u = 2^-8 relative with random signs, so its output by about u
/// relative; the perturbation of q also moves the scores, which the softmax can amplify by a few
/// (the same effect tolerance::cache_effect quantifies for a bf16 cache: up to 3.6·u observed).
/// Seven roundings of about u each, two of them through the scores. Observed under emulation
/// over seeds 1-8 on Tiny and TinyNoQLora: at most 4.6·u (0.018); 12·u leaves a margin of 2.6
/// and is still far below what a wrong head, position, mask or norm gives (errors of order 1;
/// the naive attention core, which has no activation rounding, is checked at fp32 level below).
inline constexpr double kLayerTolerance = 12.0 * tol::bf16_u;

/// Cache rows written on the device against the CPU's: each is a latent computed from
/// differently rounded x, within ~u of the other before both are rounded to bf16 (≤ u more
/// each).
inline constexpr double kRowsTolerance = 4.0 * tol::bf16_u;

template <MlaConfig C>
std::vector<float> device_prefill(const CudaBackend& cuda, const mla::DeviceMlaWeights<C>& w,
                                  auto& cache, index_t seq, index_t start_pos,
                                  const std::vector<float>& x, mla::AttentionMode mode) {
  using S = MlaShape<C>;
  const index_t tokens = index_t(x.size()) / S::dim;
  auto d_x = dcuda::to_device(cuda, x);
  dcuda::DeviceBuffer<float> d_out(x.size());
  mla::prefill(cuda, w, cache, seq, start_pos,
               TensorView<const float, 2, DeviceMemory>(d_x.data(), {tokens, S::dim}),
               d_out.view<2>({tokens, S::dim}), mode);
  return dcuda::to_host(cuda, d_out);
}

template <MlaConfig C>
std::vector<float> host_prefill(const CpuBackend& cpu, const mla::MlaWeights<C>& w, auto& cache,
                                index_t seq, index_t start_pos, const std::vector<float>& x,
                                mla::AttentionMode mode) {
  using S = MlaShape<C>;
  const index_t tokens = index_t(x.size()) / S::dim;
  std::vector<float> out(x.size());
  mla::prefill(cpu, w, cache, seq, start_pos, HostView<const float, 2>(x.data(), {tokens, S::dim}),
               HostView<float, 2>(out.data(), {tokens, S::dim}), mode);
  return out;
}

template <MlaConfig C>
std::vector<float> device_decode(const CudaBackend& cuda, const mla::DeviceMlaWeights<C>& w,
                                 auto& cache, const std::vector<index_t>& seqs, index_t q_len,
                                 const std::vector<float>& x, mla::AttentionMode mode) {
  using S = MlaShape<C>;
  const index_t batch = index_t(seqs.size());
  auto d_x = dcuda::to_device(cuda, x);
  dcuda::DeviceBuffer<float> d_out(x.size());
  mla::decode(cuda, w, cache, std::span<const index_t>(seqs),
              TensorView<const float, 3, DeviceMemory>(d_x.data(), {batch, q_len, S::dim}),
              d_out.view<3>({batch, q_len, S::dim}), mode);
  return dcuda::to_host(cuda, d_out);
}

template <MlaConfig C>
std::vector<float> host_decode(const CpuBackend& cpu, const mla::MlaWeights<C>& w, auto& cache,
                               const std::vector<index_t>& seqs, index_t q_len,
                               const std::vector<float>& x, mla::AttentionMode mode) {
  using S = MlaShape<C>;
  const index_t batch = index_t(seqs.size());
  std::vector<float> out(x.size());
  mla::decode(cpu, w, cache, std::span<const index_t>(seqs),
              HostView<const float, 3>(x.data(), {batch, q_len, S::dim}),
              HostView<float, 3>(out.data(), {batch, q_len, S::dim}), mode);
  return out;
}

/// One layer on both backends over paged bf16 caches of block size 16: two sequences (45 and
/// 23 tokens) each prefilled in two chunks (the second at start_pos > 0, crossing a block), then
/// decode steps of the varlen batch {1, 0}: three of one token and one of two tokens. Every
/// output and, at the end, every cached row is compared. Then the attention cores on the final
/// caches: absorbed_attention and naive_attention over device PagedLatentViews against the CPU's
/// over host views.
template <MlaConfig C>
void check_layer_against_cpu(const CudaBackend& cuda, mla::AttentionMode prefill_mode) {
  using S = MlaShape<C>;
  constexpr int kBlock = 16;
  const CpuBackend cpu(2);
  const auto& model = SharedModel<C>::get();
  const mla::MlaWeights<C> host_w = mla::DeviceMlaWeights<C>::rounded(model.weights);
  const mla::DeviceMlaWeights<C> dev_w(cuda, model.weights);
  BlockAllocator host_alloc(16, kBlock), dev_alloc(16, kBlock);
  PagedLatentCache<C, CpuBackend, bfloat16, kBlock> host_cache(host_alloc);
  PagedLatentCache<C, CudaBackend, bfloat16, kBlock> dev_cache(dev_alloc, cuda);
  for (int s = 0; s < 2; ++s) {
    REQUIRE(host_alloc.add_sequence() == s);
    REQUIRE(dev_alloc.add_sequence() == s);
  }
  double worst = 0.0;
  const index_t prompt[2] = {45, 23}, first_chunk[2] = {30, 9};
  std::uint64_t offset = 7100;
  for (index_t seq = 0; seq < 2; ++seq) {
    for (const auto& [start, count] :
         {std::pair{index_t(0), first_chunk[seq]},
          std::pair{first_chunk[seq], prompt[seq] - first_chunk[seq]}}) {
      const std::vector<float> x = random_tokens(std::size_t(count), S::dim, ++offset);
      const auto got = device_prefill<C>(cuda, dev_w, dev_cache, seq, start, x, prefill_mode);
      const auto expected = host_prefill<C>(cpu, host_w, host_cache, seq, start, x, prefill_mode);
      worst = std::max(worst, tol::row_relative_error(got, expected, std::size_t(S::dim)));
    }
  }
  const std::vector<index_t> batch = {1, 0};
  for (const index_t q_len : {1, 1, 1, 2}) {
    const std::vector<float> x = random_tokens(batch.size() * std::size_t(q_len), S::dim, ++offset);
    const auto got =
        device_decode<C>(cuda, dev_w, dev_cache, batch, q_len, x, mla::AttentionMode::absorbed);
    const auto expected =
        host_decode<C>(cpu, host_w, host_cache, batch, q_len, x, mla::AttentionMode::absorbed);
    worst = std::max(worst, tol::row_relative_error(got, expected, std::size_t(S::dim)));
  }
  MESSAGE("layer on CUDA vs CPU (bf16-rounded weights): worst row-relative error "
          << worst << " (bound " << kLayerTolerance << ")");
  CHECK(worst <= kLayerTolerance);
  for (index_t seq = 0; seq < 2; ++seq) {
    CHECK(dev_cache.length(seq) == prompt[seq] + 5);
    CHECK(tol::row_relative_error(dev_cache.rows(seq), host_cache.rows(seq),
                                  std::size_t(S::latent_dim)) <= kRowsTolerance);
  }

  // The attention cores over the final caches, the host side reading a copy of the device's pool
  // (a host cache over the device cache's allocator), so both read identical keys.
  PagedLatentCache<C, CpuBackend, bfloat16, kBlock> mirror(dev_alloc);
  dev_cache.download(mirror);
  const index_t q_len = 2;
  const index_t n = index_t(batch.size());
  const double scale = mla::softmax_scale<C>();
  DeviceBlockTable dev_table;
  BlockTable host_table;
  const auto dev_view = dev_cache.view(batch, dev_table);
  const auto host_view = mirror.view(batch, host_table);
  {
    Random random(7200);
    const std::vector<float> q =
        random.uniform(std::size_t(n * q_len * S::n_heads * S::latent_dim), 4.0);
    auto d_q = dcuda::to_device(cuda, q);
    dcuda::DeviceBuffer<float> d_out(std::size_t(n * q_len * S::n_heads * S::kv_lora_rank));
    mla::absorbed_attention(
        cuda, dev_view,
        TensorView<const float, 4, DeviceMemory>(d_q.data(), {n, q_len, S::n_heads, S::latent_dim}),
        scale, d_out.view<4>({n, q_len, S::n_heads, S::kv_lora_rank}));
    std::vector<float> expected(d_out.size());
    mla::absorbed_attention(
        cpu, host_view, HostView<const float, 4>(q.data(), {n, q_len, S::n_heads, S::latent_dim}),
        scale, HostView<float, 4>(expected.data(), {n, q_len, S::n_heads, S::kv_lora_rank}));
    // The kernel rounds q and p to bf16 (≤ u each, accumulation in fp32): the cache_effect
    // argument for a perturbation of u in the scores and in the weights.
    const double err = tol::row_relative_error(dcuda::to_host(cuda, d_out), expected,
                                               std::size_t(S::kv_lora_rank));
    MESSAGE("absorbed_attention CUDA vs CPU: " << err);
    CHECK(err <= tol::cache_effect<bfloat16>());
  }
  {
    Random random(7201);
    const std::vector<float> q =
        random.uniform(std::size_t(n * q_len * S::n_heads * S::qk_head_dim), 4.0);
    auto d_q = dcuda::to_device(cuda, q);
    dcuda::DeviceBuffer<float> d_out(std::size_t(n * q_len * S::n_heads * S::v_head_dim));
    mla::naive_attention(cuda, dev_w, dev_view,
                         TensorView<const float, 4, DeviceMemory>(
                             d_q.data(), {n, q_len, S::n_heads, S::qk_head_dim}),
                         scale, d_out.view<4>({n, q_len, S::n_heads, S::v_head_dim}));
    std::vector<float> expected(d_out.size());
    mla::naive_attention(
        cpu, host_w, host_view,
        HostView<const float, 4>(q.data(), {n, q_len, S::n_heads, S::qk_head_dim}), scale,
        HostView<float, 4>(expected.data(), {n, q_len, S::n_heads, S::v_head_dim}));
    // Same inputs exactly (bf16 rows, bf16-rounded weights, fp32 q): the up-projection, scores,
    // softmax and P·V are fp32 on both sides, in different orders.
    const double err =
        tol::row_relative_error(dcuda::to_host(cuda, d_out), expected, std::size_t(S::v_head_dim));
    MESSAGE("naive_attention CUDA vs CPU: " << err);
    CHECK(err <= tol::fp32_vs_fp32(accumulation_length<C>(prompt[0] + 5)));
  }
}

/// Prefill of one prompt in naive and absorbed mode on the device, over contiguous bf16 caches:
/// the two forms of MLA agree (both against each other and each against the CPU's own pair).
/// Two layers on one allocator per backend, stepped with one SlotReservation per step: a prompt
/// per sequence reserved and prefilled by both layers, then decode steps of the batch {1, 0}.
/// Lengths advance once per step on both; each device layer's output and rows match the CPU's
/// (the layer bound per layer); a reservation made stale by a later change of its sequence gets
/// the same typed error on both backends and changes neither.
template <MlaConfig C>
void check_reserved_steps_against_cpu(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  constexpr int kBlock = 16;
  constexpr int kLayers = 2;
  using HostCache = PagedLatentCache<C, CpuBackend, bfloat16, kBlock>;
  using DeviceCache = PagedLatentCache<C, CudaBackend, bfloat16, kBlock>;
  const CpuBackend cpu(2);
  std::vector<mla::MlaWeights<C>> host_w;
  std::vector<mla::DeviceMlaWeights<C>> dev_w;
  dev_w.reserve(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    const mla::MlaWeights<C> w = WeightArrays<C>::random(0x5E5Au + std::uint64_t(l)).weights();
    host_w.push_back(mla::DeviceMlaWeights<C>::rounded(w));
    dev_w.emplace_back(cuda, w);
  }
  BlockAllocator host_alloc = HostCache::make_allocator(16);
  BlockAllocator dev_alloc = DeviceCache::make_allocator(16);
  std::vector<HostCache> host_caches;
  std::vector<DeviceCache> dev_caches;
  for (int l = 0; l < kLayers; ++l) {
    host_caches.emplace_back(host_alloc);
    dev_caches.emplace_back(dev_alloc, cuda);
  }
  for (int s = 0; s < 2; ++s) {
    REQUIRE(host_alloc.add_sequence() == s);
    REQUIRE(dev_alloc.add_sequence() == s);
  }
  double worst = 0.0;
  std::uint64_t offset = 7300;
  const index_t prompt[2] = {37, 20};
  for (index_t seq = 0; seq < 2; ++seq) {
    const index_t seqs[] = {seq};
    const SlotReservation host_slots = host_alloc.reserve(seqs, prompt[seq]);
    const SlotReservation dev_slots = dev_alloc.reserve(seqs, prompt[seq]);
    std::vector<float> host_x = random_tokens(std::size_t(prompt[seq]), S::dim, ++offset);
    std::vector<float> dev_x = host_x;
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> host_out(host_x.size());
      mla::prefill(cpu, host_w[std::size_t(l)], host_caches[std::size_t(l)], host_slots,
                   HostView<const float, 2>(host_x.data(), {prompt[seq], S::dim}),
                   HostView<float, 2>(host_out.data(), {prompt[seq], S::dim}));
      auto d_x = dcuda::to_device(cuda, dev_x);
      dcuda::DeviceBuffer<float> d_out(dev_x.size());
      mla::prefill(cuda, dev_w[std::size_t(l)], dev_caches[std::size_t(l)], dev_slots,
                   TensorView<const float, 2, DeviceMemory>(d_x.data(), {prompt[seq], S::dim}),
                   d_out.view<2>({prompt[seq], S::dim}));
      dev_x = dcuda::to_host(cuda, d_out);
      host_x = std::move(host_out);
      worst = std::max(worst, tol::row_relative_error(dev_x, host_x, std::size_t(S::dim)));
      // Each layer is compared from the same input, so the bound stays one layer's.
      dev_x = host_x;
    }
  }
  const std::vector<index_t> batch = {1, 0};
  const index_t n = index_t(batch.size());
  for (const index_t q_len : {1, 2, 1}) {
    const SlotReservation host_slots = host_alloc.reserve(batch, q_len);
    const SlotReservation dev_slots = dev_alloc.reserve(batch, q_len);
    std::vector<float> host_x = random_tokens(std::size_t(n * q_len), S::dim, ++offset);
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> host_out(host_x.size());
      mla::decode(cpu, host_w[std::size_t(l)], host_caches[std::size_t(l)], host_slots,
                  HostView<const float, 3>(host_x.data(), {n, q_len, S::dim}),
                  HostView<float, 3>(host_out.data(), {n, q_len, S::dim}));
      auto d_x = dcuda::to_device(cuda, host_x);
      dcuda::DeviceBuffer<float> d_out(host_x.size());
      mla::decode(cuda, dev_w[std::size_t(l)], dev_caches[std::size_t(l)], dev_slots,
                  TensorView<const float, 3, DeviceMemory>(d_x.data(), {n, q_len, S::dim}),
                  d_out.view<3>({n, q_len, S::dim}));
      worst = std::max(worst, tol::row_relative_error(dcuda::to_host(cuda, d_out), host_out,
                                                      std::size_t(S::dim)));
      host_x = std::move(host_out);
    }
  }
  MESSAGE("reserved steps on CUDA vs CPU, per layer: worst row-relative error " << worst);
  CHECK(worst <= kLayerTolerance);
  for (index_t seq = 0; seq < 2; ++seq) {
    CHECK(dev_alloc.length(seq) == prompt[seq] + 4);
    CHECK(host_alloc.length(seq) == prompt[seq] + 4);
    for (int l = 0; l < kLayers; ++l)
      CHECK(tol::row_relative_error(dev_caches[std::size_t(l)].rows(seq),
                                    host_caches[std::size_t(l)].rows(seq),
                                    std::size_t(S::latent_dim)) <= kRowsTolerance);
  }
  // A stale reservation: the same error on both backends, nothing changed.
  const index_t one[] = {0};
  const SlotReservation host_stale = host_alloc.reserve(one, 1);
  const SlotReservation dev_stale = dev_alloc.reserve(one, 1);
  host_alloc.truncate(0, 10);
  dev_alloc.truncate(0, 10);
  const std::vector<float> x = random_tokens(1, S::dim, ++offset);
  auto d_x = dcuda::to_device(cuda, x);
  dcuda::DeviceBuffer<float> d_out(x.size());
  std::vector<float> out(x.size());
  const auto dev_rows = dev_caches[1].rows(0);
  const std::string dev_error = message_of<InvalidArgument>([&] {
    mla::decode(cuda, dev_w[1], dev_caches[1], dev_stale,
                TensorView<const float, 3, DeviceMemory>(d_x.data(), {1, 1, S::dim}),
                d_out.view<3>({1, 1, S::dim}));
  });
  const std::string host_error = message_of<InvalidArgument>([&] {
    mla::decode(cpu, host_w[1], host_caches[1], host_stale,
                HostView<const float, 3>(x.data(), {1, 1, S::dim}),
                HostView<float, 3>(out.data(), {1, 1, S::dim}));
  });
  CHECK(contains(dev_error, "daedalus::mla::decode: 'slots' is stale"));
  CHECK(dev_error == host_error);
  CHECK(dev_alloc.length(0) == 10);
  CHECK(dev_caches[1].rows(0) == dev_rows);
}

template <MlaConfig C>
void check_naive_equals_absorbed(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  const auto& model = SharedModel<C>::get();
  const mla::DeviceMlaWeights<C> dev_w(cuda, model.weights);
  constexpr index_t tokens = 37;
  const std::vector<float> x = random_tokens(std::size_t(tokens), S::dim, 7300);
  ContiguousLatentCache<C, CudaBackend, bfloat16> naive_cache(1, tokens, cuda),
      absorbed_cache(1, tokens, cuda);
  const auto naive =
      device_prefill<C>(cuda, dev_w, naive_cache, 0, 0, x, mla::AttentionMode::naive);
  const auto absorbed =
      device_prefill<C>(cuda, dev_w, absorbed_cache, 0, 0, x, mla::AttentionMode::absorbed);
  const double err = tol::row_relative_error(absorbed, naive, std::size_t(S::dim));
  MESSAGE("CUDA absorbed vs naive prefill: " << err);
  // Both paths round x, q_a and the output to bf16 identically; the absorbed one rounds q_nope,
  // the latent output and (in the kernel) q and p as well: fewer roundings than kLayerTolerance
  // covers.
  CHECK(err <= kLayerTolerance);
  CHECK(naive_cache.rows(0) == absorbed_cache.rows(0));  // the same projection writes the rows
}

/// mla::project on the device against the CPU's project with the bf16-rounded weights, at a
/// start_pos past the original context. The device rounds x (and, with query LoRA, the normed
/// q_a) to bf16 before the GEMMs: one or two roundings of about u = 2^-8 each, through a linear
/// map (q) or a linear map and a norm (the latent): 4·u bounds them; observed below 2·u.
template <MlaConfig C>
void check_project(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  const CpuBackend cpu(2);
  const auto& model = SharedModel<C>::get();
  const mla::MlaWeights<C> host_w = mla::DeviceMlaWeights<C>::rounded(model.weights);
  const mla::DeviceMlaWeights<C> dev_w(cuda, model.weights);
  constexpr index_t tokens = 9, start_pos = C::original_seq_len + 5;
  const std::vector<float> x = random_tokens(std::size_t(tokens), S::dim, 7500);
  std::vector<float> q(std::size_t(tokens * S::n_heads * S::qk_head_dim));
  std::vector<float> latent(std::size_t(tokens * S::latent_dim));
  mla::project(cpu, host_w, start_pos, HostView<const float, 2>(x.data(), {tokens, S::dim}),
               HostView<float, 3>(q.data(), {tokens, S::n_heads, S::qk_head_dim}),
               HostView<float, 2>(latent.data(), {tokens, S::latent_dim}));
  auto d_x = dcuda::to_device(cuda, x);
  dcuda::DeviceBuffer<float> d_q(q.size()), d_latent(latent.size());
  mla::project(cuda, dev_w, start_pos,
               TensorView<const float, 2, DeviceMemory>(d_x.data(), {tokens, S::dim}),
               d_q.view<3>({tokens, S::n_heads, S::qk_head_dim}),
               d_latent.view<2>({tokens, S::latent_dim}));
  const double q_err =
      tol::row_relative_error(dcuda::to_host(cuda, d_q), q, std::size_t(S::qk_head_dim));
  const double latent_err =
      tol::row_relative_error(dcuda::to_host(cuda, d_latent), latent, std::size_t(S::latent_dim));
  MESSAGE("project CUDA vs CPU: q " << q_err << ", latent " << latent_err);
  CHECK(q_err <= 4.0 * tol::bf16_u);
  CHECK(latent_err <= 4.0 * tol::bf16_u);
}

/// Prefill then decode over device ContiguousLatentCaches on a stream of their own (the backend
/// `.on(stream)`), naive and absorbed, against the CPU's contiguous bf16 cache; the attention
/// cores over the contiguous caches; and a cache built on another stream than the call's is
/// refused before anything changes.
template <MlaConfig C>
void check_contiguous_on_stream() {
  using S = MlaShape<C>;
  dcuda::Stream stream;
  const CudaBackend cuda = CudaBackend{}.on(stream);
  const CpuBackend cpu(2);
  const auto& model = SharedModel<C>::get();
  const mla::MlaWeights<C> host_w = mla::DeviceMlaWeights<C>::rounded(model.weights);
  const mla::DeviceMlaWeights<C> dev_w(cuda, model.weights);
  for (const auto mode : {mla::AttentionMode::naive, mla::AttentionMode::absorbed}) {
    CAPTURE(int(mode));
    ContiguousLatentCache<C, CudaBackend, bfloat16> dev_cache(std::vector<index_t>{40, 24}, cuda);
    ContiguousLatentCache<C, CpuBackend, bfloat16> host_cache(std::vector<index_t>{40, 24});
    double worst = 0.0;
    const index_t prompt[2] = {29, 17};
    for (index_t seq = 0; seq < 2; ++seq) {
      const auto x = random_tokens(std::size_t(prompt[seq]), S::dim, 7600 + std::uint64_t(seq));
      worst = std::max(
          worst, tol::row_relative_error(device_prefill<C>(cuda, dev_w, dev_cache, seq, 0, x, mode),
                                         host_prefill<C>(cpu, host_w, host_cache, seq, 0, x, mode),
                                         std::size_t(S::dim)));
    }
    for (const index_t q_len : {1, 2}) {
      const std::vector<index_t> seqs = {0, 1};
      const auto x = random_tokens(2 * std::size_t(q_len), S::dim, 7610 + std::uint64_t(q_len));
      worst = std::max(worst, tol::row_relative_error(
                                  device_decode<C>(cuda, dev_w, dev_cache, seqs, q_len, x, mode),
                                  host_decode<C>(cpu, host_w, host_cache, seqs, q_len, x, mode),
                                  std::size_t(S::dim)));
    }
    MESSAGE("contiguous caches on a stream, CUDA vs CPU: " << worst);
    CHECK(worst <= kLayerTolerance);
    CHECK(dev_cache.length(0) == 32);
    CHECK(dev_cache.length(1) == 20);
    // The attention cores over the contiguous caches: the host side reads a copy of the device's
    // rows, so both see identical keys (tolerances as in check_layer_against_cpu).
    {
      ContiguousLatentCache<C, CpuBackend, bfloat16> mirror(std::vector<index_t>{40, 24});
      dev_cache.download(mirror);
      const std::vector<index_t> seqs = {1, 0};
      constexpr index_t q_len = 2, n = 2;
      const double scale = mla::softmax_scale<C>();
      Random random(7630);
      const auto q_abs = random.uniform(std::size_t(n * q_len * S::n_heads * S::latent_dim), 4.0);
      auto d_q_abs = dcuda::to_device(cuda, q_abs);
      dcuda::DeviceBuffer<float> d_lat(std::size_t(n * q_len * S::n_heads * S::kv_lora_rank));
      mla::absorbed_attention(cuda, dev_cache, std::span<const index_t>(seqs),
                              TensorView<const float, 4, DeviceMemory>(
                                  d_q_abs.data(), {n, q_len, S::n_heads, S::latent_dim}),
                              scale, d_lat.view<4>({n, q_len, S::n_heads, S::kv_lora_rank}));
      std::vector<float> lat(d_lat.size());
      mla::absorbed_attention(
          cpu, mirror, std::span<const index_t>(seqs),
          HostView<const float, 4>(q_abs.data(), {n, q_len, S::n_heads, S::latent_dim}), scale,
          HostView<float, 4>(lat.data(), {n, q_len, S::n_heads, S::kv_lora_rank}));
      CHECK(tol::row_relative_error(dcuda::to_host(cuda, d_lat), lat,
                                    std::size_t(S::kv_lora_rank)) <= tol::cache_effect<bfloat16>());
      const auto q = random.uniform(std::size_t(n * q_len * S::n_heads * S::qk_head_dim), 4.0);
      auto d_q = dcuda::to_device(cuda, q);
      dcuda::DeviceBuffer<float> d_o(std::size_t(n * q_len * S::n_heads * S::v_head_dim));
      mla::naive_attention(cuda, dev_w, dev_cache, std::span<const index_t>(seqs),
                           TensorView<const float, 4, DeviceMemory>(
                               d_q.data(), {n, q_len, S::n_heads, S::qk_head_dim}),
                           scale, d_o.view<4>({n, q_len, S::n_heads, S::v_head_dim}));
      std::vector<float> o(d_o.size());
      mla::naive_attention(
          cpu, host_w, mirror, std::span<const index_t>(seqs),
          HostView<const float, 4>(q.data(), {n, q_len, S::n_heads, S::qk_head_dim}), scale,
          HostView<float, 4>(o.data(), {n, q_len, S::n_heads, S::v_head_dim}));
      CHECK(tol::row_relative_error(dcuda::to_host(cuda, d_o), o, std::size_t(S::v_head_dim)) <=
            tol::fp32_vs_fp32(accumulation_length<C>(40)));
    }
    // The call's backend on the default stream, the cache on `stream`: refused, nothing written.
    const auto before = dev_cache.rows(0);
    const std::string what = message_of<InvalidArgument>([&] {
      device_decode<C>(CudaBackend{}, dev_w, dev_cache, {0}, 1, random_tokens(1, S::dim, 7620),
                       mode);
    });
    CHECK(contains(what, "daedalus::mla::decode: 'cache' issues its work to another CUDA stream"));
    CHECK(dev_cache.length(0) == 32);
    CHECK(dev_cache.rows(0) == before);
  }
}

/// Bad input with CudaBackend: the typed errors and messages of the CPU backend (the fronts are
/// shared), NaN in x found on the device, and nothing changed: lengths, block lists and rows.
template <MlaConfig C>
void check_bad_input(const CudaBackend& cuda) {
  using S = MlaShape<C>;
  constexpr int kBlock = 16;
  const auto& model = SharedModel<C>::get();
  const mla::DeviceMlaWeights<C> w(cuda, model.weights);
  BlockAllocator alloc(8, kBlock);
  PagedLatentCache<C, CudaBackend, bfloat16, kBlock> cache(alloc, cuda);
  ContiguousLatentCache<C, CudaBackend, bfloat16> contiguous(2, 12, cuda);
  for (int s = 0; s < 2; ++s) REQUIRE(alloc.add_sequence() == s);
  device_prefill<C>(cuda, w, cache, 0, 0, random_tokens(20, S::dim, 7400),
                    mla::AttentionMode::naive);
  device_prefill<C>(cuda, w, cache, 1, 0, random_tokens(5, S::dim, 7401),
                    mla::AttentionMode::naive);
  device_prefill<C>(cuda, w, contiguous, 0, 0, random_tokens(7, S::dim, 7402),
                    mla::AttentionMode::naive);
  const auto snapshot = [&] {
    std::vector<std::vector<float>> state;
    for (index_t s = 0; s < 2; ++s) {
      state.push_back(cache.rows(s));
      const auto blocks = alloc.blocks(s);
      state.emplace_back(blocks.begin(), blocks.end());
      state.push_back(contiguous.rows(s));
    }
    state.push_back({float(alloc.num_free_blocks())});
    return state;
  };
  const auto before = snapshot();

  std::vector<float> x = random_tokens(3, S::dim, 7403);
  x[std::size_t(2 * S::dim + 4)] = std::numeric_limits<float>::quiet_NaN();
  for (const auto mode : {mla::AttentionMode::naive, mla::AttentionMode::absorbed}) {
    std::string what =
        message_of<NumericError>([&] { device_prefill<C>(cuda, w, cache, 0, 20, x, mode); });
    CHECK(contains(what,
                   "daedalus::mla::prefill: 'x' holds a non-finite value (nan) at row 2, "
                   "column 4"));
    // Overwriting cached tokens must not have started either.
    CHECK_THROWS_AS(device_prefill<C>(cuda, w, cache, 0, 3, x, mode), NumericError);
    CHECK_THROWS_AS(device_prefill<C>(cuda, w, contiguous, 0, 2, x, mode), NumericError);
    // Decode of x as [batch 1, q_len 3]: row 2 is its third token.
    what = message_of<NumericError>([&] { device_decode<C>(cuda, w, cache, {1}, 3, x, mode); });
    CHECK(contains(what,
                   "daedalus::mla::decode: 'x' holds a non-finite value (nan) at row 2, "
                   "column 4"));
  }
  x = random_tokens(3, S::dim, 7404);
  // Shapes and ids: the CPU backend's messages, from the shared front.
  {
    auto d_x = dcuda::to_device(cuda, x);
    dcuda::DeviceBuffer<float> d_out(x.size());
    const std::string what = message_of<InvalidArgument>([&] {
      mla::prefill(cuda, w, cache, 0, 20,
                   TensorView<const float, 2, DeviceMemory>(d_x.data(), {1, 3 * S::dim}),
                   TensorView<float, 2, DeviceMemory>(d_out.data(), {1, 3 * S::dim}));
    });
    CHECK(contains(what, "'x' has extents [1," + std::to_string(3 * S::dim) + "]; expected [1," +
                             std::to_string(S::dim) + "]"));
  }
  CHECK(contains(message_of<InvalidArgument>([&] {
                   device_decode<C>(cuda, w, cache, {0, 1, 0}, 1, x, mla::AttentionMode::absorbed);
                 }),
                 "sequence 0 twice (entries 0 and 2)"));
  CHECK(contains(message_of<OutOfRange>([&] {
                   device_decode<C>(cuda, w, cache, {0, 7, 1}, 1, x, mla::AttentionMode::absorbed);
                 }),
                 "'seqs[1]' is 7"));
  CHECK_THROWS_AS(device_prefill<C>(cuda, w, cache, 1, 6, x, mla::AttentionMode::naive),
                  OutOfRange);
  // Sequence 0 of the contiguous cache holds 7 of its 12 tokens: 6 more do not fit.
  CHECK_THROWS_AS(device_prefill<C>(cuda, w, contiguous, 0, 7, random_tokens(6, S::dim, 7406),
                                    mla::AttentionMode::naive),
                  CapacityError);
  // The pool has 8 blocks of 16, 5 free: 205 tokens of sequence 1 need 13 blocks, 12 new.
  CHECK_THROWS_AS(device_prefill<C>(cuda, w, cache, 1, 5, random_tokens(200, S::dim, 7405),
                                    mla::AttentionMode::naive),
                  CapacityError);
  {
    // An attention core with a q of the wrong extents.
    DeviceBlockTable table;
    const std::vector<index_t> seqs = {0, 1};
    const auto view = cache.view(seqs, table);
    dcuda::DeviceBuffer<float> d_q(std::size_t(2 * S::n_heads * S::latent_dim));
    dcuda::DeviceBuffer<float> d_out(std::size_t(2 * S::n_heads * S::kv_lora_rank));
    const std::string what = message_of<InvalidArgument>([&] {
      mla::absorbed_attention(
          cuda, view,
          TensorView<const float, 4, DeviceMemory>(d_q.data(), {1, 2, S::n_heads, S::latent_dim}),
          mla::softmax_scale<C>(), d_out.view<4>({1, 2, S::n_heads, S::kv_lora_rank}));
    });
    CHECK(contains(what, "daedalus::mla::absorbed_attention: 'q' has extents"));
  }
  CHECK(snapshot() == before);
}

}  // namespace daedalus::testing::mla_checks

TEST_SUITE("cuda mla") {
  using namespace daedalus::testing::mla_checks;
  TEST_CASE("cuBLAS GEMMs (column-major, transposes, strides, alpha/beta) against a loop") {
    check_raw_gemm<float>(daedalus::CudaBackend{});
    check_raw_gemm<daedalus::bfloat16>(daedalus::CudaBackend{});
    check_raw_gemm<daedalus::half>(daedalus::CudaBackend{});
  }
  TEST_CASE("row-major GEMM helpers (both weight layouts, batched, linear) against a loop") {
    check_row_major_gemm<float>(daedalus::CudaBackend{});
    check_row_major_gemm<daedalus::bfloat16>(daedalus::CudaBackend{});
    check_row_major_gemm<daedalus::half>(daedalus::CudaBackend{});
    check_blas_errors(daedalus::CudaBackend{});
  }
  TEST_CASE("RMSNorm kernel equals the CPU backend's RMSNorm (fp32 in place, bf16 out)") {
    check_rms_norm<daedalus::Tiny>(daedalus::CudaBackend{});
  }
  TEST_CASE("RoPE/YaRN kernel equals RopeTable::rotate in both layouts") {
    check_rope<daedalus::Tiny>(daedalus::CudaBackend{});
    check_rope<daedalus::testing::TinyHalf>(daedalus::CudaBackend{});
  }
  TEST_CASE_TEMPLATE("MLA layer on CUDA (chunked prefill, varlen decode, paged bf16) vs the CPU", C,
                     daedalus::Tiny, daedalus::TinyNoQLora) {
    check_layer_against_cpu<C>(daedalus::CudaBackend{}, daedalus::mla::AttentionMode::naive);
  }
  TEST_CASE("MLA layer on CUDA with absorbed prefill vs the CPU") {
    check_layer_against_cpu<daedalus::Tiny>(daedalus::CudaBackend{},
                                            daedalus::mla::AttentionMode::absorbed);
  }
  TEST_CASE_TEMPLATE("mla::project on CUDA equals the CPU's with bf16-rounded weights", C,
                     daedalus::Tiny, daedalus::TinyNoQLora) {
    check_project<C>(daedalus::CudaBackend{});
  }
  TEST_CASE(
      "MLA on CUDA over contiguous caches on an owned stream, naive and absorbed, vs the CPU") {
    check_contiguous_on_stream<daedalus::Tiny>();
  }
  TEST_CASE_TEMPLATE("MLA layers on CUDA stepped with one slot reservation per step vs the CPU", C,
                     daedalus::Tiny, daedalus::TinyNoQLora) {
    check_reserved_steps_against_cpu<C>(daedalus::CudaBackend{});
  }
  TEST_CASE("CUDA naive and absorbed prefill agree") {
    check_naive_equals_absorbed<daedalus::Tiny>(daedalus::CudaBackend{});
  }
  TEST_CASE_TEMPLATE("MLA on CUDA: bad input gets the CPU's typed errors and changes nothing", C,
                     daedalus::Tiny, daedalus::TinyNoQLora) {
    check_bad_input<C>(daedalus::CudaBackend{});
  }
}
