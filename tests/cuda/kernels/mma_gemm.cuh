// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test kernel: a tiled GEMM on the tensor cores through daedalus::cuda::mma_m16n8k16,
// c = a · bᵀ (nn.Linear's product), for any m, n, k (edges are zero-padded in shared memory).
// The static checks (scripts/cuda-static-check.sh) compile this kernel for sm_80 and sm_90a and
// require HMMA instructions and no local-memory spills.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda/element.cuh>
#include <daedalus/cuda/mma.cuh>
#include <daedalus/cuda/platform.cuh>
#include <daedalus/cuda/shared_memory.cuh>

namespace daedalus::testing::kernels {

/// Tiling of mma_gemm: a block of 4 warps computes a 32×32 tile of c, each warp 16×16 (two
/// m16n8 accumulators), in k steps of 32. Shared rows are padded by 8 elements: 80-byte rows keep
/// the 4-byte alignment of element pairs and spread a warp's fragment loads over the banks.
struct MmaGemmTraits {
  static constexpr int block_m = 32;
  static constexpr int block_n = 32;
  static constexpr int block_k = 32;
  static constexpr int threads = 128;
  static constexpr int shared_ld = block_k + 8;
  /// Dynamic shared memory of one block: the bᵀ tile.
  template <class T>
  static constexpr std::size_t dynamic_shared_bytes() {
    return std::size_t(block_n) * shared_ld * sizeof(T);
  }
};

template <class T>
struct MmaGemmParams {
  const T* a;    // [m, k] row-major
  const T* b_t;  // [n, k] row-major (b transposed)
  float* c;      // [m, n] row-major
  int m, n, k;
};

/// c = a · b_tᵀ. Grid (ceil(n / 32), ceil(m / 32)), MmaGemmTraits::threads threads,
/// MmaGemmTraits::dynamic_shared_bytes<T>() bytes of dynamic shared memory. The a tile lives in
/// static shared memory, the b tile in dynamic shared memory, so both kinds are exercised.
/// kSynchronised = false leaves out the two __syncthreads of each k step (a test shows that the
/// emulation then gives a wrong result).
template <class T, bool kSynchronised = true>
__global__ void __launch_bounds__(MmaGemmTraits::threads) mma_gemm(MmaGemmParams<T> p) {
  using Traits = MmaGemmTraits;
  constexpr int ld = Traits::shared_ld;
  __shared__ __align__(16) T a_tile[Traits::block_m * ld];  // [block_m, ld]
  T* b_tile = daedalus::cuda::dynamic_shared_memory<T>();   // [block_n, ld]

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int row0 = static_cast<int>(blockIdx.y) * Traits::block_m;
  const int col0 = static_cast<int>(blockIdx.x) * Traits::block_n;
  const T zero = daedalus::cuda::from_float<T>(0.0f);

  daedalus::cuda::MmaAccumulator acc[2] = {};
  for (int k0 = 0; k0 < p.k; k0 += Traits::block_k) {
    for (int e = tid; e < Traits::block_m * Traits::block_k; e += Traits::threads) {
      const int r = e / Traits::block_k, c = e % Traits::block_k;
      const int gr = row0 + r, gc = k0 + c;
      a_tile[r * ld + c] = (gr < p.m && gc < p.k) ? p.a[gr * p.k + gc] : zero;
    }
    for (int e = tid; e < Traits::block_n * Traits::block_k; e += Traits::threads) {
      const int r = e / Traits::block_k, c = e % Traits::block_k;
      const int gr = col0 + r, gc = k0 + c;
      b_tile[r * ld + c] = (gr < p.n && gc < p.k) ? p.b_t[gr * p.k + gc] : zero;
    }
    if constexpr (kSynchronised) __syncthreads();
    for (int kk = 0; kk < Traits::block_k; kk += 16) {
      const auto fa = daedalus::cuda::load_fragment_a(a_tile + warp_m * 16 * ld + kk, ld, lane);
      for (int j = 0; j < 2; ++j) {
        const auto fb = daedalus::cuda::load_fragment_b_transposed(
            b_tile + (warp_n * 16 + j * 8) * ld + kk, ld, lane);
        daedalus::cuda::mma_m16n8k16(acc[j], fa, fb);
      }
    }
    if constexpr (kSynchronised) __syncthreads();
  }
  for (int j = 0; j < 2; ++j) {
    const int r0 = row0 + warp_m * 16, c0 = col0 + warp_n * 16 + j * 8;
    daedalus::cuda::store_accumulator(p.c + r0 * p.n + c0, p.n, lane, acc[j], p.m - r0, p.n - c0);
  }
}

/// Writes, for every lane of one warp, the 16×16 tile coordinates its A fragment holds, and the
/// 16×8 coordinates of its B and accumulator fragments, by loading fragments of tiles whose
/// elements encode their own position (row·16 + col, exact in bf16 up to 256). One warp.
__global__ void fragment_coordinates(const __nv_bfloat16* a_codes,  // [16, 16]: r·16 + c
                                     const __nv_bfloat16* b_codes,  // [16, 8]: r·8 + c
                                     float* a_out,                  // [32, 8]
                                     float* b_out,                  // [32, 4]
                                     int* c_out) {                  // [32, 4, 2]
  const int lane = static_cast<int>(threadIdx.x);
  const auto fa = daedalus::cuda::load_fragment_a(a_codes, 16, lane);
  const auto fb = daedalus::cuda::load_fragment_b(b_codes, 8, lane);
  for (int i = 0; i < 8; ++i) {
    const auto bits = static_cast<std::uint16_t>(fa.reg[i / 2] >> (16 * (i % 2)));
    __nv_bfloat16 v;
    std::memcpy(static_cast<void*>(&v), &bits, sizeof(v));
    a_out[lane * 8 + i] = daedalus::cuda::to_float(v);
  }
  for (int i = 0; i < 4; ++i) {
    const auto bits = static_cast<std::uint16_t>(fb.reg[i / 2] >> (16 * (i % 2)));
    __nv_bfloat16 v;
    std::memcpy(static_cast<void*>(&v), &bits, sizeof(v));
    b_out[lane * 4 + i] = daedalus::cuda::to_float(v);
    c_out[(lane * 4 + i) * 2] = daedalus::cuda::accumulator_row(lane, i);
    c_out[(lane * 4 + i) * 2 + 1] = daedalus::cuda::accumulator_col(lane, i);
  }
}

}  // namespace daedalus::testing::kernels
