// SPDX-License-Identifier: Apache-2.0
#pragma once

// The element-wise kernels of the MLA projections on the GPU (MLA.forward steps 1-3): RMSNorm
// and RoPE with YaRN frequencies (rounding to the GEMMs' input type: cuda/convert_rows.cuh). Each
// computes what the CPU backend computes (mla/cpu/attention.hpp `rms_norm_rows`,
// `project_tokens`; mla/rope.hpp), in the same precision, so that the two backends differ only by
// the device's rounding of GEMM inputs.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/convert_rows.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::mla::cuda {

using ::daedalus::cuda::DeviceElement;

// ---- RMSNorm ------------------------------------------------------------------------------------

/// What `rms_norm_rows` reads and writes. `dst` may equal `src` (in place, same leading dim).
template <class Out>
struct RmsNormParams {
  const float* src = nullptr;
  std::int64_t src_ld = 0;
  Out* dst = nullptr;
  std::int64_t dst_ld = 0;
  const float* weight = nullptr;  // [width] fp32
  int width = 0;
  double eps = 0.0;
};

inline constexpr int kNormThreads = 128;

/// DeepSeek's RMSNorm of one row per block, the CPU's formula: the sum of squares in double (so
/// wide rows lose nothing and the result matches the host's), inv = fp32(1 / sqrt(mean + eps)),
/// then y_j = x_j · inv · w_j in fp32, rounded to Out. Each thread writes only the elements it
/// read, so the kernel may run in place.
template <DeviceElement Out>
__global__ void __launch_bounds__(kNormThreads) rms_norm_rows(RmsNormParams<Out> p) {
  __shared__ double partial[kNormThreads];
  const float* row = p.src + std::int64_t(blockIdx.x) * p.src_ld;
  Out* out = p.dst + std::int64_t(blockIdx.x) * p.dst_ld;
  const int t = static_cast<int>(threadIdx.x);
  double sum = 0.0;
  for (int j = t; j < p.width; j += kNormThreads) sum += double(row[j]) * double(row[j]);
  partial[t] = sum;
  __syncthreads();
  for (int half_size = kNormThreads / 2; half_size > 0; half_size /= 2) {
    if (t < half_size) partial[t] += partial[t + half_size];
    __syncthreads();
  }
  const float inv = static_cast<float>(1.0 / ::sqrt(partial[0] / double(p.width) + p.eps));
  for (int j = t; j < p.width; j += kNormThreads)
    out[j] = ::daedalus::cuda::from_float<Out>(row[j] * inv * p.weight[j]);
}

/// RMS-normalises the first `width` values of `rows` rows (device) with fp32 `weight`.
template <DeviceElement Out>
void launch_rms_norm(const CudaBackend& backend, const float* src, index_t rows, int width,
                     index_t src_ld, const float* weight, double eps, Out* dst, index_t dst_ld) {
  if (rows == 0) return;
  ::daedalus::cuda::launch(backend, {dim3(unsigned(rows)), dim3(kNormThreads)}, &rms_norm_rows<Out>,
                           RmsNormParams<Out>{src, src_ld, dst, dst_ld, weight, width, eps});
}

// ---- RoPE / YaRN --------------------------------------------------------------------------------

/// What `rotate_query_and_key` rotates: q [tokens, n_heads, qk_head_dim] (q_pe = the last `rope`
/// values of each head) and latent [tokens, latent_dim] (k_pe = the last `rope` values), token
/// t at position starts[t / q_len] + t % q_len.
struct RopeParams {
  float* q = nullptr;
  float* latent = nullptr;
  const double* frequencies = nullptr;   // [rope / 2] θ'_i (mla::rope_frequencies), device
  const std::int32_t* starts = nullptr;  // [tokens / q_len] first position of each entry
  std::int64_t tokens = 0;
  int q_len = 1;
  int n_heads = 0;
  int qk_head_dim = 0;
  int nope = 0;
  int latent_dim = 0;
  int kv_lora_rank = 0;
  int rope = 0;
};

inline constexpr int kRopeThreads = 64;

/// One token per block; each thread rotates pairs of the token's n_heads q_pe vectors and its
/// k_pe (MLA.forward: nothing else is rotated). The angle pos · θ'_i and its cos/sin are
/// computed in double and rounded to fp32, as RopeTable::angles does on the host; the rotation
/// itself is RopeTable::apply's fp32 complex multiply.
/// (A template on the pair layout: a kernel defined in a header must be a template, or every
/// translation unit that includes the header would define it again.)
template <bool kInterleaved>
__global__ void __launch_bounds__(kRopeThreads) rotate_query_and_key(RopeParams p) {
  const std::int64_t t = blockIdx.x;
  const int pairs = p.rope / 2;
  const double pos = double(p.starts[t / p.q_len]) + double(t % p.q_len);
  for (int k = static_cast<int>(threadIdx.x); k < (p.n_heads + 1) * pairs; k += kRopeThreads) {
    const int head = k / pairs;  // n_heads: the shared k_pe
    const int i = k % pairs;
    const double angle = pos * p.frequencies[i];
    const float c = static_cast<float>(::cos(angle));
    const float s = static_cast<float>(::sin(angle));
    float* x = head < p.n_heads ? p.q + (t * p.n_heads + head) * p.qk_head_dim + p.nope
                                : p.latent + t * p.latent_dim + p.kv_lora_rank;
    const int a = kInterleaved ? 2 * i : i;
    const int b = kInterleaved ? 2 * i + 1 : i + pairs;
    const float xa = x[a];
    const float xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xa * s + xb * c;
  }
}

/// Rotates q_pe and k_pe of `tokens` tokens (device q and latent) to their positions.
template <MlaConfig C>
void launch_rope(const CudaBackend& backend, float* q, float* latent, const double* frequencies,
                 const std::int32_t* starts, index_t q_len, index_t tokens) {
  if (tokens == 0) return;
  using S = MlaShape<C>;
  RopeParams p;
  p.q = q;
  p.latent = latent;
  p.frequencies = frequencies;
  p.starts = starts;
  p.tokens = tokens;
  p.q_len = int(q_len);
  p.n_heads = S::n_heads;
  p.qk_head_dim = S::qk_head_dim;
  p.nope = S::nope;
  p.latent_dim = S::latent_dim;
  p.kv_lora_rank = S::kv_lora_rank;
  p.rope = S::rope;
  // DeepSeek's interleaved (2i, 2i+1) pairs, or HF's (i, i + rope/2) halves.
  ::daedalus::cuda::launch(backend, {dim3(unsigned(tokens)), dim3(kRopeThreads)},
                           &rotate_query_and_key<C::rope_layout == RopeLayout::interleaved>, p);
}

}  // namespace daedalus::mla::cuda
