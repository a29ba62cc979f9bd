// SPDX-License-Identifier: Apache-2.0
#pragma once

// The kernels between the cuBLAS products of MLA's attention on the GPU: the naive
// (up-projection) path of prefill, DeepSeek-V3 MLA.forward with attn_impl = "naive" (gather the
// sequence's cached latent rows, build every head's keys [k_nope ; k_pe], a causal masked softmax
// over the scores), and the query split of the absorbed path. The products themselves are
// cuBLAS GEMMs (daedalus/cuda/blas.cuh), called from mla/cuda/attention.cuh.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"

namespace daedalus::mla::cuda {

inline constexpr int kGatherThreads = 128;

/// What `gather_latent_rows` copies: the first `length` cached rows of batch entry `entry`.
template <class Address, class T>
struct GatherRowsParams {
  ::daedalus::cuda::DeviceLatentBatch<Address> cache;
  int entry = 0;
  int length = 0;
  int latent_dim = 0;
  T* out = nullptr;  // [length, latent_dim]
};

/// out[pos] = the cached row of position pos of the entry, as stored (no conversion): one row
/// per block, read through the cache's addressing (block table or contiguous range).
template <class Address, class T>
__global__ void __launch_bounds__(kGatherThreads)
    gather_latent_rows(GatherRowsParams<Address, T> p) {
  const int pos = static_cast<int>(blockIdx.x);
  const T* src = reinterpret_cast<const T*>(p.cache.row(p.entry, pos));
  T* dst = p.out + std::int64_t(pos) * p.latent_dim;
  for (int j = static_cast<int>(threadIdx.x); j < p.latent_dim; j += kGatherThreads)
    dst[j] = src[j];
}

template <class T, class Address>
void launch_gather_rows(const CudaBackend& backend,
                        const ::daedalus::cuda::DeviceLatentBatch<Address>& cache, int entry,
                        index_t length, int latent_dim, T* out) {
  if (length == 0) return;
  ::daedalus::cuda::launch(
      backend, {dim3(unsigned(length)), dim3(kGatherThreads)}, &gather_latent_rows<Address, T>,
      GatherRowsParams<Address, T>{cache, entry, int(length), latent_dim, out});
}

/// What `assemble_keys` builds: keys [n_heads, length, nope + rope] (fp32) from the up-projected
/// kv [length, n_heads · (nope + v)] (fp32) and the cached rows [length, latent_dim] (T).
template <class T>
struct AssembleKeysParams {
  const float* kv = nullptr;
  const T* rows = nullptr;
  float* keys = nullptr;
  int length = 0;
  int n_heads = 0;
  int nope = 0;
  int rope = 0;
  int kv_b_rows_per_head = 0;  // nope + v_head_dim
  int kv_lora_rank = 0;
  int latent_dim = 0;
};

inline constexpr int kAssembleThreads = 256;

/// keys[h, t] = [k_nope_h(t) ; k_pe(t)]: head h's no-position key from the up-projection and the
/// shared, already rotated k_pe from the cache, widened exactly (MLA.forward, naive branch:
/// k = cat(k_nope, k_pe.expand(n_heads))).
template <class T>
__global__ void __launch_bounds__(kAssembleThreads) assemble_keys(AssembleKeysParams<T> p) {
  const int qk = p.nope + p.rope;
  const std::int64_t total = std::int64_t(p.n_heads) * p.length * qk;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int j = static_cast<int>(i % qk);
    const std::int64_t t = (i / qk) % p.length;
    const int h = static_cast<int>(i / (std::int64_t(qk) * p.length));
    p.keys[i] =
        j < p.nope
            ? p.kv[t * p.n_heads * p.kv_b_rows_per_head + h * p.kv_b_rows_per_head + j]
            : ::daedalus::cuda::to_float(p.rows[t * p.latent_dim + p.kv_lora_rank + (j - p.nope)]);
  }
}

template <class T>
void launch_assemble_keys(const CudaBackend& backend, const AssembleKeysParams<T>& p) {
  const std::int64_t total = std::int64_t(p.n_heads) * p.length * (p.nope + p.rope);
  if (total == 0) return;
  const std::int64_t blocks =
      std::min<std::int64_t>((total + kAssembleThreads - 1) / kAssembleThreads, 4096);
  ::daedalus::cuda::launch(backend, {dim3(unsigned(blocks)), dim3(kAssembleThreads)},
                           &assemble_keys<T>, p);
}

/// What `causal_softmax` normalises: scores [n_heads, rows, length] (fp32, in place), query row
/// i at absolute position first_position + i seeing keys t ≤ first_position + i.
struct CausalSoftmaxParams {
  float* scores = nullptr;
  int rows = 0;
  int length = 0;
  std::int64_t first_position = 0;  // may be negative: a row before position 0 sees nothing
  float scale = 1.0f;
};

inline constexpr int kSoftmaxThreads = 128;

/// Softmax in fp32 over the visible keys of one score row per block (the bottom-right causal mask
/// of docs/architecture.md, "Causality"): p_t = exp(s_t·scale - max) / Σ exp(...), masked keys get
/// exactly 0, and a row that sees no key becomes all zeros (as the CPU backend's rows without
/// keys). kThreads is the block size (a template: a kernel defined in a header must be one).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) causal_softmax(CausalSoftmaxParams p) {
  __shared__ float reduce[kThreads];
  const std::int64_t row_index = blockIdx.x;  // h · rows + i
  const int i = static_cast<int>(row_index % p.rows);
  float* row = p.scores + row_index * p.length;
  const std::int64_t last = p.first_position + i;  // the last visible key
  const int visible = last < 0 ? 0 : (last + 1 < p.length ? static_cast<int>(last + 1) : p.length);
  const int t0 = static_cast<int>(threadIdx.x);
  float m = -INFINITY;
  for (int t = t0; t < visible; t += kThreads) m = fmaxf(m, row[t] * p.scale);
  reduce[t0] = m;
  __syncthreads();
  for (int half_size = kThreads / 2; half_size > 0; half_size /= 2) {
    if (t0 < half_size) reduce[t0] = fmaxf(reduce[t0], reduce[t0 + half_size]);
    __syncthreads();
  }
  const float row_max = reduce[0];
  __syncthreads();  // every thread has read the max before the slots are reused
  float sum = 0.0f;
  for (int t = t0; t < visible; t += kThreads) {
    const float e = expf(row[t] * p.scale - row_max);
    row[t] = e;
    sum += e;
  }
  reduce[t0] = sum;
  __syncthreads();
  for (int half_size = kThreads / 2; half_size > 0; half_size /= 2) {
    if (t0 < half_size) reduce[t0] += reduce[t0 + half_size];
    __syncthreads();
  }
  const float total = reduce[0];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int t = t0; t < p.length; t += kThreads) row[t] = t < visible ? row[t] * inv : 0.0f;
}

inline void launch_causal_softmax(const CudaBackend& backend, float* scores, int n_heads,
                                  index_t rows, index_t length, std::int64_t first_position,
                                  float scale) {
  if (rows == 0 || length == 0) return;
  ::daedalus::cuda::launch(
      backend, {dim3(unsigned(std::int64_t(n_heads) * rows)), dim3(kSoftmaxThreads)},
      &causal_softmax<kSoftmaxThreads>,
      CausalSoftmaxParams{scores, int(rows), int(length), first_position, scale});
}

/// What `split_query` writes for the absorbed path: from q [tokens, n_heads, nope + rope] (fp32),
/// q_nope [tokens, n_heads, nope] rounded to T (the input of the W_UK product) and the rotated
/// q_pe copied to columns [kv_lora_rank, latent_dim) of q_abs [tokens, n_heads, latent_dim]
/// (the W_UK product fills columns [0, kv_lora_rank)).
template <class T>
struct SplitQueryParams {
  const float* q = nullptr;
  T* q_nope = nullptr;
  float* q_abs = nullptr;
  std::int64_t tokens = 0;
  int n_heads = 0;
  int nope = 0;
  int rope = 0;
  int kv_lora_rank = 0;
};

inline constexpr int kSplitThreads = 256;

template <class T>
__global__ void __launch_bounds__(kSplitThreads) split_query(SplitQueryParams<T> p) {
  const int qk = p.nope + p.rope;
  const int latent_dim = p.kv_lora_rank + p.rope;
  const std::int64_t total = p.tokens * p.n_heads * qk;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int j = static_cast<int>(i % qk);
    const std::int64_t th = i / qk;  // token · n_heads + head
    if (j < p.nope)
      p.q_nope[th * p.nope + j] = ::daedalus::cuda::from_float<T>(p.q[i]);
    else
      p.q_abs[th * latent_dim + p.kv_lora_rank + (j - p.nope)] = p.q[i];
  }
}

template <class T>
void launch_split_query(const CudaBackend& backend, const SplitQueryParams<T>& p) {
  const std::int64_t total = p.tokens * p.n_heads * (p.nope + p.rope);
  if (total == 0) return;
  const std::int64_t blocks =
      std::min<std::int64_t>((total + kSplitThreads - 1) / kSplitThreads, 4096);
  ::daedalus::cuda::launch(backend, {dim3(unsigned(blocks)), dim3(kSplitThreads)}, &split_query<T>,
                           p);
}

}  // namespace daedalus::mla::cuda
