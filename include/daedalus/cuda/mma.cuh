// SPDX-License-Identifier: Apache-2.0
#pragma once

// The warp-level matrix product: the ONE place where daedalus kernels reach the tensor cores
// (mma.sync.aligned.m16n8k16 with fp32 accumulation, sm_80 and newer), and the fragment loads
// that feed it. Under the CUDA emulation layer the same call computes the same product from the
// same fragments, with the lane layout the PTX ISA documents, so a kernel that mixes up a
// fragment is wrong in CI as it would be on a GPU.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane >> 2 and t = lane % 4; registers hold two 16-bit elements each, the lower index in the
// low half:
//   A (16×16, row-major "row"):  a0,a1: (g, 2t..2t+1)    a2,a3: (g+8, 2t..2t+1)
//                                a4,a5: (g, 2t+8..2t+9)  a6,a7: (g+8, 2t+8..2t+9)
//   B (16×8, column-major "col"): b0,b1: (2t..2t+1, g)   b2,b3: (2t+8..2t+9, g)
//   C, D (16×8 fp32):            c0,c1: (g, 2t..2t+1)    c2,c3: (g+8, 2t..2t+1)

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "daedalus/core/traits.hpp"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// The 16-bit input types of mma_m16n8k16.
template <class T>
concept MmaElement = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

/// One lane's share of the 16×16 A operand: a0..a7 packed in pairs.
template <MmaElement T>
struct MmaFragmentA {
  std::uint32_t reg[4];
};

/// One lane's share of the 16×8 B operand: b0..b3 packed in pairs.
template <MmaElement T>
struct MmaFragmentB {
  std::uint32_t reg[2];
};

/// One lane's share of the 16×8 fp32 accumulator: c0..c3.
struct MmaAccumulator {
  float reg[4];
};

/// Row (0..15) of accumulator element `i` (0..3) held by `lane`.
__host__ __device__ __forceinline__ int accumulator_row(int lane, int i) {
  return (lane >> 2) + (i >= 2 ? 8 : 0);
}
/// Column (0..7) of accumulator element `i` (0..3) held by `lane`.
__host__ __device__ __forceinline__ int accumulator_col(int lane, int i) {
  return (lane % 4) * 2 + (i & 1);
}

namespace detail {

/// Two consecutive 16-bit elements (p[0] in the low half) as one 32-bit register. `p` must be
/// 4-byte aligned: an even column of a row whose start is 4-byte aligned.
template <MmaElement T>
__device__ __forceinline__ std::uint32_t load_pair(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const std::uint32_t*>(p);
#else
  std::uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return bits;
#endif
}

/// Two 16-bit elements as one register, `low` in the low half.
template <MmaElement T>
__device__ __forceinline__ std::uint32_t pack_pair(T low, T high) {
  std::uint16_t lo, hi;
  std::memcpy(&lo, &low, sizeof(lo));
  std::memcpy(&hi, &high, sizeof(hi));
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

}  // namespace detail

/// Loads `lane`'s fragment of the 16×16 A tile at `tile` (row-major, leading dimension `ld`
/// elements, `ld` even and `tile` 4-byte aligned).
template <MmaElement T>
__device__ __forceinline__ MmaFragmentA<T> load_fragment_a(const T* tile, int ld, int lane) {
  const int g = lane >> 2, t = lane % 4;
  MmaFragmentA<T> f;
  f.reg[0] = detail::load_pair(tile + g * ld + 2 * t);
  f.reg[1] = detail::load_pair(tile + (g + 8) * ld + 2 * t);
  f.reg[2] = detail::load_pair(tile + g * ld + 2 * t + 8);
  f.reg[3] = detail::load_pair(tile + (g + 8) * ld + 2 * t + 8);
  return f;
}

/// Loads `lane`'s fragment of a 16×8 B tile stored transposed: `tile` is [8 (n)][16 (k)]
/// row-major with leading dimension `ld` (the natural layout of keys or of nn.Linear weights,
/// for products x·Wᵀ). `ld` even and `tile` 4-byte aligned.
template <MmaElement T>
__device__ __forceinline__ MmaFragmentB<T> load_fragment_b_transposed(const T* tile, int ld,
                                                                      int lane) {
  const int g = lane >> 2, t = lane % 4;
  MmaFragmentB<T> f;
  f.reg[0] = detail::load_pair(tile + g * ld + 2 * t);
  f.reg[1] = detail::load_pair(tile + g * ld + 2 * t + 8);
  return f;
}

/// Loads `lane`'s fragment of a 16×8 B tile stored as is: `tile` is [16 (k)][8 (n)] row-major
/// with leading dimension `ld` (the layout of values, for p·V).
template <MmaElement T>
__device__ __forceinline__ MmaFragmentB<T> load_fragment_b(const T* tile, int ld, int lane) {
  const int g = lane >> 2, t = lane % 4;
  MmaFragmentB<T> f;
  f.reg[0] = detail::pack_pair(tile[(2 * t) * ld + g], tile[(2 * t + 1) * ld + g]);
  f.reg[1] = detail::pack_pair(tile[(2 * t + 8) * ld + g], tile[(2 * t + 9) * ld + g]);
  return f;
}

/// Two B fragments side by side: the 16×8 tiles of columns n0..n0+7 and n0+8..n0+15.
template <MmaElement T>
struct MmaFragmentB2 {
  MmaFragmentB<T> tile[2];
};

namespace detail {

/// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l names row l % 8 of 8×8 matrix l / 8
/// (16 bytes, 16-byte aligned, in shared memory) and receives, for each matrix k, register k:
/// without .trans the pair (row l / 4, columns 2·(l % 4), +1), with .trans the pair (rows
/// 2·(l % 4) and 2·(l % 4) + 1, column l / 4) (PTX ISA, "Warp-level matrix load instruction:
/// ldmatrix"). All 32 lanes call it together. Under the emulation the same row addresses are
/// exchanged between the lanes with shuffles and read as the instruction reads them, so a wrong
/// address shows there too.
template <bool Transposed, MmaElement T>
__device__ __forceinline__ void load_matrices_x4(const T* row, int lane, std::uint32_t (&reg)[4]) {
#if defined(__CUDA_ARCH__)
  (void)lane;
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Transposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(address));
  }
#elif defined(DAEDALUS_CUDA_EMULATION)
  for (int k = 0; k < 4; ++k) {
    if constexpr (Transposed) {
      const T* low = __shfl_sync(0xffffffffu, row, 8 * k + 2 * (lane % 4));
      const T* high = __shfl_sync(0xffffffffu, row, 8 * k + 2 * (lane % 4) + 1);
      reg[k] = pack_pair(low[lane / 4], high[lane / 4]);
    } else {
      const T* source = __shfl_sync(0xffffffffu, row, 8 * k + lane / 4);
      reg[k] = load_pair(source + 2 * (lane % 4));
    }
  }
#else
  // The host pass of nvcc: device-only code, never run on the host.
  (void)row;
  (void)lane;
  reg[0] = reg[1] = reg[2] = reg[3] = 0;
#endif
}

}  // namespace detail

/// The A fragment of the 16×16 tile at `tile` (row-major, leading dimension `ld`) with one
/// ldmatrix.x4 instead of four loads per lane: the same registers as load_fragment_a. `tile` in
/// shared memory, 16-byte aligned, `ld` a multiple of 8; all 32 lanes call it together.
template <MmaElement T>
__device__ __forceinline__ MmaFragmentA<T> load_fragment_a_x4(const T* tile, int ld, int lane) {
  // Matrices 0..3: rows 0-7 / 8-15 (k % 2) of columns 0-7 / 8-15 (k / 2), as a0..a7 lie.
  const int k = lane / 8;
  MmaFragmentA<T> f;
  detail::load_matrices_x4<false>(tile + ((k % 2) * 8 + lane % 8) * ld + (k / 2) * 8, lane, f.reg);
  return f;
}

/// The B fragments of two adjacent 16×8 tiles stored transposed ([16 (n)][16 (k)] row-major at
/// `tile`, as load_fragment_b_transposed reads one), with one ldmatrix.x4. Alignment as
/// load_fragment_a_x4.
template <MmaElement T>
__device__ __forceinline__ MmaFragmentB2<T> load_fragments_b_transposed_x4(const T* tile, int ld,
                                                                           int lane) {
  // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  const int k = lane / 8;
  std::uint32_t reg[4];
  detail::load_matrices_x4<false>(tile + ((k / 2) * 8 + lane % 8) * ld + (k % 2) * 8, lane, reg);
  MmaFragmentB2<T> f;
  f.tile[0].reg[0] = reg[0];
  f.tile[0].reg[1] = reg[1];
  f.tile[1].reg[0] = reg[2];
  f.tile[1].reg[1] = reg[3];
  return f;
}

/// The B fragments of two adjacent 16×8 tiles stored as is ([16 (k)][16 (n)] row-major at `tile`,
/// as load_fragment_b reads one), with one ldmatrix.x4.trans. Alignment as load_fragment_a_x4.
template <MmaElement T>
__device__ __forceinline__ MmaFragmentB2<T> load_fragments_b_x4(const T* tile, int ld, int lane) {
  // Matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), transposed.
  const int k = lane / 8;
  std::uint32_t reg[4];
  detail::load_matrices_x4<true>(tile + ((k % 2) * 8 + lane % 8) * ld + (k / 2) * 8, lane, reg);
  MmaFragmentB2<T> f;
  f.tile[0].reg[0] = reg[0];
  f.tile[0].reg[1] = reg[1];
  f.tile[1].reg[0] = reg[2];
  f.tile[1].reg[1] = reg[3];
  return f;
}

/// acc += A·B for the warp's 16×16 A and 16×8 B fragments, fp32 accumulation. All 32 lanes of
/// the warp must call it together (converged), as mma.sync.aligned requires.
template <MmaElement T>
__device__ __forceinline__ void mma_m16n8k16(MmaAccumulator& acc, const MmaFragmentA<T>& a,
                                             const MmaFragmentB<T>& b) {
#if defined(DAEDALUS_CUDA_EMULATION)
  ::daedalus::cuda_emulation::warp_mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, a.reg, b.reg,
                                                acc.reg);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(acc.reg[0]), "+f"(acc.reg[1]), "+f"(acc.reg[2]), "+f"(acc.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(acc.reg[0]), "+f"(acc.reg[1]), "+f"(acc.reg[2]), "+f"(acc.reg[3])
        : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]));
  }
#elif defined(__CUDA_ARCH__)
  static_assert(::daedalus::detail::dependent_false<T>,
                "daedalus::cuda::mma_m16n8k16 needs sm_80 or newer: build for sm_80/sm_90a");
#else
  // The host pass of nvcc: device-only code, never run on the host.
  (void)acc;
  (void)a;
  (void)b;
#endif
}

/// Stores `lane`'s accumulator elements into the 16×8 fp32 tile at `out` (row-major, leading
/// dimension `ld`), skipping rows >= `rows` and columns >= `cols` (edges of a matrix whose
/// sizes are not multiples of the tile).
__device__ __forceinline__ void store_accumulator(float* out, int ld, int lane,
                                                  const MmaAccumulator& acc, int rows = 16,
                                                  int cols = 8) {
  for (int i = 0; i < 4; ++i) {
    const int r = accumulator_row(lane, i), c = accumulator_col(lane, i);
    if (r < rows && c < cols) out[r * ld + c] = acc.reg[i];
  }
}

}  // namespace daedalus::cuda
