// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/mma.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/moe/cuda/routing_plan.cuh"
#include "daedalus/moe/experts.hpp"

/// SwiGLU experts on the GPU: every routed expert over its segment of a DeviceRoutingPlan as one
/// grouped GEMM launch per projection (tiles are scheduled over (expert, row block) pairs read
/// from the plan on the device, so no host round trip decides the segment sizes), on the tensor
/// cores through daedalus::cuda::mma_m16n8k16: activations rounded to the weights' 16-bit type,
/// fp32 accumulation, the SwiGLU product in fp32.
namespace daedalus::moe {

namespace detail {

/// Rounds one SwiGLU MLP `v` (w13: w1's then w3's rows, 2·per values; w2: per values) to T
/// (nearest even) and uploads it to `w13` and `w2` (device, of T's device type: the same bits)
/// through `staging` (at least 2·per elements, reused: the stream is synchronised after each copy,
/// so the host holds one MLP's 16-bit copy at a time).
template <class T, class Device>
void upload_rounded_swiglu(const CudaBackend& backend, const SwigluView& v, std::size_t per,
                           Device* w13, Device* w2, std::vector<T>& staging) {
  static_assert(sizeof(Device) == sizeof(T), "the device type holds T's bits");
  const auto upload = [&](const float* src, std::size_t count, Device* dst) {
    if (count == 0) return;
    std::transform(src, src + count, staging.begin(), [](float x) { return T(x); });
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst, staging.data(), count * sizeof(T),
                                        cudaMemcpyHostToDevice, backend.stream()));
    backend.synchronize();  // the staging buffer is reused by the next copy
  };
  upload(v.w13, 2 * per, w13);
  upload(v.w2, per, w2);
}

}  // namespace detail

/// The routed experts of one layer in device memory, in 16-bit storage T (bfloat16 or half):
/// w13 [E, 2 · inter, dim] (w1's rows then w3's, as ExpertWeights) and w2 [E, dim, inter].
template <MoeConfig C, class T = bfloat16>
class DeviceExpertWeights {
  static_assert(std::is_same_v<T, bfloat16> || std::is_same_v<T, half>,
                "daedalus::moe::DeviceExpertWeights: T must be bfloat16 or half (the tensor "
                "cores' 16-bit inputs)");

 public:
  using config = C;
  using memory_space = DeviceMemory;
  using storage_type = T;
  using device_type = cuda::device_storage_t<T>;
  static constexpr int num_experts = C::n_routed_experts;
  static constexpr index_t dim = C::dim;
  static constexpr index_t inter = C::moe_inter_dim;

  /// Rounds `host` to T (nearest even) and uploads it, one expert at a time (the host never holds
  /// a second copy of all experts).
  DeviceExpertWeights(const CudaBackend& backend, const ExpertWeights<C>& host)
      : w13_(std::size_t(num_experts) * 2 * inter * dim),
        w2_(std::size_t(num_experts) * dim * inter) {
    const std::size_t per = std::size_t(inter) * std::size_t(dim);
    std::vector<T> staging(2 * per);
    for (int e = 0; e < num_experts; ++e) {
      detail::upload_rounded_swiglu(backend, host.swiglu(e), per,
                                    w13_.data() + std::size_t(e) * 2 * per,
                                    w2_.data() + std::size_t(e) * per, staging);
    }
  }

  /// Takes device arrays already in this layout and type: w13 [E, 2 · inter, dim] (w1's rows then
  /// w3's per expert) and w2 [E, dim, inter], e.g. a checkpoint read straight into device memory
  /// or values drawn on the device (a DeepSeek-V3 layer's experts are 45 GB in fp32 on the host).
  /// @throws InvalidArgument when a size differs from the config's (nothing is taken).
  DeviceExpertWeights(cuda::DeviceBuffer<device_type>&& w13, cuda::DeviceBuffer<device_type>&& w2)
      // Both sizes are checked before either buffer is moved from.
      : w13_((check_size(w13, "w13", 2), check_size(w2, "w2", 1), std::move(w13))),
        w2_(std::move(w2)) {}

  /// [E, 2 · inter, dim] and [E, dim, inter], device.
  [[nodiscard]] const device_type* w13() const { return w13_.data(); }
  [[nodiscard]] const device_type* w2() const { return w2_.data(); }

 private:
  static void check_size(const cuda::DeviceBuffer<device_type>& buffer, const char* name,
                         std::size_t matrices) {
    const std::size_t expected =
        std::size_t(num_experts) * matrices * std::size_t(inter) * std::size_t(dim);
    daedalus::detail::require<InvalidArgument>(
        buffer.size() == expected, "daedalus::moe::DeviceExpertWeights: '", name, "' has ",
        buffer.size(), " values; expected ", expected, " for ", config_name<C>());
  }

  cuda::DeviceBuffer<device_type> w13_, w2_;
};

/// The shared experts of one layer in device memory, in 16-bit storage T (bfloat16 or half): w13
/// [2 · width, dim] (w1's rows then w3's, as SharedExpertWeights) and w2 [dim, width], width =
/// n_shared_experts · moe_inter_dim (none for a config without shared experts).
template <MoeConfig C, class T = bfloat16>
class DeviceSharedExpertWeights {
  static_assert(std::is_same_v<T, bfloat16> || std::is_same_v<T, half>,
                "daedalus::moe::DeviceSharedExpertWeights: T must be bfloat16 or half (the "
                "tensor cores' 16-bit inputs)");

 public:
  using config = C;
  using memory_space = DeviceMemory;
  using storage_type = T;
  using device_type = cuda::device_storage_t<T>;
  static constexpr index_t dim = C::dim;
  static constexpr index_t width = SharedExpertWeights<C>::width;

  /// Rounds `host` to T (nearest even) and uploads it (synchronises the backend's stream).
  DeviceSharedExpertWeights(const CudaBackend& backend, const SharedExpertWeights<C>& host)
      : w13_(std::size_t(2 * width * dim)), w2_(std::size_t(dim * width)) {
    const std::size_t per = std::size_t(width) * std::size_t(dim);
    std::vector<T> staging(2 * per);
    detail::upload_rounded_swiglu(backend, host.swiglu(), per, w13_.data(), w2_.data(), staging);
  }

  /// [2 · width, dim] and [dim, width], device.
  [[nodiscard]] const device_type* w13() const { return w13_.data(); }
  [[nodiscard]] const device_type* w2() const { return w2_.data(); }

 private:
  cuda::DeviceBuffer<device_type> w13_, w2_;
};

namespace detail::expert_kernels {

/// Tiling of the grouped GEMM: a block of 4 warps computes a 64 × 64 tile of x · Wᵀ, each warp
/// 16 rows × 64 columns (eight m16n8 accumulators), in k steps of 32, two shared stages (the
/// next step's tiles are loaded into registers, 16 bytes per load, while the tensor cores work
/// on the current one; one barrier per step), fragments read with ldmatrix.x4. Shared rows are
/// padded by 8 elements, as in the other mma kernels: 80-byte rows keep every 8-element piece
/// 16-byte aligned, and the eight rows one ldmatrix matrix reads fall on eight distinct groups
/// of four banks.
struct GroupedGemmTraits {
  // block_m equals DeviceRoutingPlan::kRowBlock: the plan's build lays out the row blocks.
  static constexpr int block_m = 64;
  static constexpr int block_n = 64;
  static constexpr int block_k = 32;
  static constexpr int threads = 128;
  static constexpr int shared_ld = block_k + 8;
};

/// Which projection a launch computes.
enum class Projection : int {
  /// hidden = silu(x · w1ᵀ) ⊙ (x · w3ᵀ): a tile's 64 columns are 32 hidden units' w1 rows then
  /// the same 32 units' w3 rows, so the SwiGLU product is formed in registers.
  gate_up = 0,
  /// out = hidden · w2ᵀ.
  down = 1,
};

template <class T>
struct GroupedGemmParams {
  const float* a;                  // [rows, k] fp32 activations (expert_in or hidden), or with
                                   // a_slot the [tokens, k] token rows
  const std::int32_t* a_slot;      // null: row r of a is row r; else the plan's row_slot: row r
                                   // is token a_slot[r] / a_topk of a (a permuted read)
  int a_topk;                      // slots per token (with a_slot)
  const T* w;                      // [experts, w_rows, k] 16-bit weights
  float* out;                      // [rows, n]: hidden (gate_up, n = inter) or expert_out (n = dim)
  const std::int32_t* offsets;     // [experts + 1] segment starts; null: one segment
  const std::int32_t* counts;      // [experts] kept rows
  const std::int32_t* tile_start;  // [experts + 1] the plan's row_block_starts
  int experts;
  int single_rows;  // with offsets null: the rows of the one segment (expert 0, from row 0)
  int k;            // reduction length
  int n;            // output columns
  int w_rows;       // rows of one expert's weight (2 · inter for gate_up, dim for down)
  int a_vector;     // 1: k % 4 == 0 and a 16-byte aligned (16-byte loads of activations)
  int w_vector;     // 1: k % 8 == 0 and w 16-byte aligned (16-byte loads of weights)
};

/// 1 when rows of `k` elements starting at `base` may be read 16 bytes (`per_16_bytes` elements)
/// at a time: k a multiple of it and `base` 16-byte aligned; else 0 (element loads).
inline int vector_rows(const void* base, int k, int per_16_bytes) {
  return k % per_16_bytes == 0 && reinterpret_cast<std::uintptr_t>(base) % 16 == 0 ? 1 : 0;
}

/// One 64 × 64 output tile of one expert's segment. blockIdx.x: the row-block tile over all
/// experts (tiles past the last expert's exit), blockIdx.y: the column tile. Without a plan
/// (offsets null) the rows are one segment of expert 0: the shared experts.
template <class T, Projection kProjection>
__global__ void __launch_bounds__(GroupedGemmTraits::threads)
    grouped_swiglu_gemm(GroupedGemmParams<T> p) {
  using Traits = GroupedGemmTraits;
  constexpr int ld = Traits::shared_ld;
  // Two stages: the tiles of step k0 are multiplied while the next step's are in registers.
  __shared__ __align__(16) T a_tile[2][Traits::block_m * ld];
  __shared__ __align__(16) T w_tile[2][Traits::block_n * ld];

  const int tile = static_cast<int>(blockIdx.x);
  int e = 0, row0 = tile * Traits::block_m, row_end = p.single_rows;
  if (p.offsets != nullptr) {
    if (tile >= p.tile_start[p.experts]) return;
    // The expert whose row blocks contain this tile: the last e with tile_start[e] <= tile.
    int lo = 0, hi = p.experts - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.tile_start[mid] <= tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    e = lo;
    row0 = p.offsets[e] + (tile - p.tile_start[e]) * Traits::block_m;
    row_end = p.offsets[e] + p.counts[e];
  } else if (row0 >= row_end) {
    return;
  }
  // Columns of the tile: for gate_up, 32 hidden units (w1 rows u0.., then w3 rows inter + u0..).
  const int col0 = static_cast<int>(blockIdx.y) *
                   (kProjection == Projection::gate_up ? Traits::block_n / 2 : Traits::block_n);
  const T* w = p.w + std::int64_t(e) * p.w_rows * p.k;

  namespace dc = ::daedalus::cuda;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const T zero = dc::from_float<T>(0.0f);
  dc::MmaAccumulator acc[8] = {};

  // Each thread moves four 4-column pieces of the A tile (rows tid / 8 + 16·i, columns
  // 4·(tid % 8)..) and two 8-column pieces of the W tile (rows tid / 4 + 32·j, columns
  // 8·(tid % 4)..): one 16-byte load each where the rows allow it.
  constexpr int a_pieces = Traits::block_m * Traits::block_k / 4 / Traits::threads;
  constexpr int w_pieces = Traits::block_n * Traits::block_k / 8 / Traits::threads;
  static_assert(a_pieces == 4 && w_pieces == 2, "the piece layout assumes 64 x 32 tiles");
  const int a_col = 4 * (tid % 8), w_col = 8 * (tid % 4);
  // The source row of each A piece, -1 past the segment. Rows below row_end are kept rows;
  // through the plan each holds a slot (>= 0) whose token row is read in place of a dispatched
  // copy.
  std::int64_t a_src[a_pieces];
  for (int i = 0; i < a_pieces; ++i) {
    const int gr = row0 + tid / 8 + 16 * i;
    a_src[i] = gr >= row_end ? -1 : p.a_slot == nullptr ? gr : p.a_slot[gr] / p.a_topk;
  }
  // The weight row of each W piece, null past the matrix.
  const T* w_src[w_pieces];
  for (int j = 0; j < w_pieces; ++j) {
    const int r = tid / 4 + 32 * j;
    int w_row;
    bool valid;
    if constexpr (kProjection == Projection::gate_up) {
      const int unit = col0 + r % (Traits::block_n / 2);
      const int inter = p.w_rows / 2;
      w_row = r < Traits::block_n / 2 ? unit : inter + unit;
      valid = unit < inter;
    } else {
      w_row = col0 + r;
      valid = w_row < p.w_rows;
    }
    w_src[j] = valid ? w + std::int64_t(w_row) * p.k : nullptr;
  }

  float4 a_next[a_pieces];
  dc::Bytes16 w_next[w_pieces];
  // Step k0's pieces into registers; zeros past the matrix.
  const auto load = [&](int k0) {
    for (int i = 0; i < a_pieces; ++i) {
      const int c = k0 + a_col;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (a_src[i] >= 0 && c < p.k) {
        const float* src = p.a + a_src[i] * p.k + c;
        if (p.a_vector != 0) {  // k % 4 == 0: the whole piece is inside the row
          const float4 q = *reinterpret_cast<const float4*>(src);
          v[0] = q.x;
          v[1] = q.y;
          v[2] = q.z;
          v[3] = q.w;
        } else {
          for (int e4 = 0; e4 < 4 && c + e4 < p.k; ++e4) v[e4] = src[e4];
        }
      }
      a_next[i] = make_float4(v[0], v[1], v[2], v[3]);
    }
    for (int j = 0; j < w_pieces; ++j) {
      const int c = k0 + w_col;
      if (w_src[j] != nullptr && c < p.k && p.w_vector != 0) {  // k % 8 == 0
        w_next[j] = *reinterpret_cast<const dc::Bytes16*>(w_src[j] + c);
      } else {
        T v[8];
        for (int e8 = 0; e8 < 8; ++e8)
          v[e8] = w_src[j] != nullptr && c + e8 < p.k ? w_src[j][c + e8] : zero;
        for (int h = 0; h < 4; ++h)
          w_next[j].word[h] = dc::detail::pack_pair(v[2 * h], v[2 * h + 1]);
      }
    }
  };
  // The registers into stage `stage`, A rounded to T (nearest even).
  const auto store = [&](int stage) {
    for (int i = 0; i < a_pieces; ++i) {
      T* dst = &a_tile[stage][(tid / 8 + 16 * i) * ld + a_col];
      dc::detail::store_pair(dst, dc::detail::pack_pair(dc::from_float<T>(a_next[i].x),
                                                        dc::from_float<T>(a_next[i].y)));
      dc::detail::store_pair(dst + 2, dc::detail::pack_pair(dc::from_float<T>(a_next[i].z),
                                                            dc::from_float<T>(a_next[i].w)));
    }
    for (int j = 0; j < w_pieces; ++j)
      dc::detail::store_16(&w_tile[stage][(tid / 4 + 32 * j) * ld + w_col], w_next[j]);
  };

  load(0);
  int stage = 0;
  for (int k0 = 0; k0 < p.k; k0 += Traits::block_k) {
    // One barrier per step: a thread writing stage s here has passed the previous step's
    // barrier, which every thread reached only after multiplying stage s two steps ago.
    store(stage);
    __syncthreads();
    if (k0 + Traits::block_k < p.k) load(k0 + Traits::block_k);  // in flight during the products
    const T* a_rows = a_tile[stage] + warp * 16 * ld;
    for (int kk = 0; kk < Traits::block_k; kk += 16) {
      const auto fa = dc::load_fragment_a_x4(a_rows + kk, ld, lane);
      for (int j = 0; j < 4; ++j) {
        const auto fb =
            dc::load_fragments_b_transposed_x4(w_tile[stage] + j * 16 * ld + kk, ld, lane);
        dc::mma_m16n8k16(acc[2 * j], fa, fb.tile[0]);
        dc::mma_m16n8k16(acc[2 * j + 1], fa, fb.tile[1]);
      }
    }
    stage ^= 1;
  }

  for (int j = 0; j < (kProjection == Projection::gate_up ? 4 : 8); ++j) {
    for (int i = 0; i < 4; ++i) {
      const int r = row0 + warp * 16 + ::daedalus::cuda::accumulator_row(lane, i);
      const int c = col0 + j * 8 + ::daedalus::cuda::accumulator_col(lane, i);
      if (r >= row_end || c >= p.n) continue;
      float value = acc[j].reg[i];
      if constexpr (kProjection == Projection::gate_up) {
        // Accumulator j + 4 holds the same (row, unit) of x · w3ᵀ: silu(g) · u.
        const float g = value;
        // expf (within 2 ulp), not the approximate __expf (2 + 1.16·|g| ulp): close to the
        // CPU's std::exp, and within the bound the tests assume.
        value = g / (1.0f + expf(-g)) * acc[j + 4].reg[i];
      }
      p.out[std::int64_t(r) * p.n + c] = value;
    }
  }
}

struct ZeroPaddingParams {
  const std::int32_t* row_slot;  // [rows] -1 for padding rows
  float* hidden;                 // [rows, inter]
  float* out;                    // [rows, dim]
  int inter;
  int dim;
};

/// Padding rows of `hidden` and `expert_out` become zeros (what an expert gives for dispatch's
/// zero rows, as on the CPU). One block per row.
// Kernels are templates (`template <int = 0>` where nothing else varies), so that every
// translation unit that includes this header may define them without breaking the ODR.
template <int = 0>
__global__ void zero_padding_rows(ZeroPaddingParams p) {
  const std::int64_t row = blockIdx.x;
  if (p.row_slot[row] >= 0) return;
  for (int i = static_cast<int>(threadIdx.x); i < p.inter; i += static_cast<int>(blockDim.x))
    p.hidden[row * p.inter + i] = 0.0f;
  for (int i = static_cast<int>(threadIdx.x); i < p.dim; i += static_cast<int>(blockDim.x))
    p.out[row * p.dim + i] = 0.0f;
}

}  // namespace detail::expert_kernels

namespace detail {

/// The routed experts on the GPU: schedule, gate/up with SwiGLU, down, padding rows zeroed.
template <>
struct ExpertsImpl<CudaBackend> {
  template <MoeConfig C, class T>
  static void routed(const CudaBackend& cuda, const DeviceExpertWeights<C, T>& weights,
                     const DeviceRoutingPlan& plan, TensorView<const float, 2, DeviceMemory> in,
                     TensorView<float, 2, DeviceMemory> hidden,
                     TensorView<float, 2, DeviceMemory> out) {
    grouped(cuda, weights, plan, in.data(), nullptr, hidden, out);
  }

  /// routed() with the gate/up GEMM reading each kept row's token from x through the plan's
  /// row_slot (padding rows read nothing): no [rows, dim] dispatched copy is written or read.
  template <MoeConfig C, class T>
  static void routed_from_tokens(const CudaBackend& cuda, const DeviceExpertWeights<C, T>& weights,
                                 const DeviceRoutingPlan& plan,
                                 TensorView<const float, 2, DeviceMemory> x,
                                 TensorView<float, 2, DeviceMemory> hidden,
                                 TensorView<float, 2, DeviceMemory> out) {
    grouped(cuda, weights, plan, x.data(), plan.row_slot(), hidden, out);
  }

  /// Schedule, gate/up with SwiGLU, down, padding rows zeroed. `a` is the dispatched rows
  /// (a_slot null) or the token rows read through a_slot.
  template <MoeConfig C, class T>
  static void grouped(const CudaBackend& cuda, const DeviceExpertWeights<C, T>& weights,
                      const DeviceRoutingPlan& plan, const float* a, const std::int32_t* a_slot,
                      TensorView<float, 2, DeviceMemory> hidden,
                      TensorView<float, 2, DeviceMemory> out) {
    namespace ek = expert_kernels;
    using Traits = ek::GroupedGemmTraits;
    using D = typename DeviceExpertWeights<C, T>::device_type;
    const int experts = C::n_routed_experts;
    const int dim = int(C::dim), inter = int(C::moe_inter_dim);
    const index_t rows = plan.rows();
    if (rows == 0) return;
    static_assert(Traits::block_m == DeviceRoutingPlan::kRowBlock,
                  "the plan schedules row blocks of the GEMM's block_m rows");
    // At most one partial row block per expert on top of the full ones.
    const auto row_tiles = unsigned((rows + Traits::block_m - 1) / Traits::block_m + experts);
    const auto unit_tiles = unsigned((inter + Traits::block_n / 2 - 1) / (Traits::block_n / 2));
    const auto dim_tiles = unsigned((dim + Traits::block_n - 1) / Traits::block_n);
    cuda::launch(cuda, {dim3(row_tiles, unit_tiles), dim3(Traits::threads)},
                 ek::grouped_swiglu_gemm<D, ek::Projection::gate_up>,
                 ek::GroupedGemmParams<D>{
                     a, a_slot, int(plan.k()), weights.w13(), hidden.data(), plan.offsets(),
                     plan.counts(), plan.row_block_starts(), experts, 0, dim, inter, 2 * inter,
                     ek::vector_rows(a, dim, 4), ek::vector_rows(weights.w13(), dim, 8)});
    cuda::launch(
        cuda, {dim3(row_tiles, dim_tiles), dim3(Traits::threads)},
        ek::grouped_swiglu_gemm<D, ek::Projection::down>,
        ek::GroupedGemmParams<D>{hidden.data(), nullptr, 1, weights.w2(), out.data(),
                                 plan.offsets(), plan.counts(), plan.row_block_starts(), experts, 0,
                                 inter, dim, dim, ek::vector_rows(hidden.data(), inter, 4),
                                 ek::vector_rows(weights.w2(), inter, 8)});
    cuda::launch(cuda, {dim3(unsigned(rows)), dim3(128)}, ek::zero_padding_rows<>,
                 ek::ZeroPaddingParams{plan.row_slot(), hidden.data(), out.data(), inter, dim});
  }

  /// The shared MLP over every token as the grouped GEMM's single segment (offsets null): one
  /// expert of width n_shared · inter over all rows. Chosen over cuBLAS because the kernel rounds
  /// the fp32 activations to T as it loads its tiles and forms silu(g) · u in registers, so no
  /// 16-bit copy of x or of the hidden activations (and no workspace for them) is needed, and
  /// the shared and routed experts round exactly alike.
  template <MoeConfig C, class T>
  static void shared(const CudaBackend& cuda, const DeviceSharedExpertWeights<C, T>& weights,
                     TensorView<const float, 2, DeviceMemory> x,
                     TensorView<float, 2, DeviceMemory> hidden,
                     TensorView<float, 2, DeviceMemory> out) {
    namespace ek = expert_kernels;
    using Traits = ek::GroupedGemmTraits;
    using D = typename DeviceSharedExpertWeights<C, T>::device_type;
    const index_t tokens = x.extent(0);
    const int dim = int(C::dim), width = int(DeviceSharedExpertWeights<C, T>::width);
    if (tokens == 0) return;
    daedalus::detail::require<InvalidArgument>(
        tokens <= std::numeric_limits<int>::max(), "daedalus::moe::shared_experts: 'x' has ",
        tokens, " rows; expected at most ", std::numeric_limits<int>::max());
    if (width == 0) {  // no shared experts: out = 0
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(
          out.data(), 0, std::size_t(tokens) * std::size_t(dim) * sizeof(float), cuda.stream()));
      return;
    }
    const auto row_tiles = unsigned((tokens + Traits::block_m - 1) / Traits::block_m);
    const auto unit_tiles = unsigned((width + Traits::block_n / 2 - 1) / (Traits::block_n / 2));
    const auto dim_tiles = unsigned((dim + Traits::block_n - 1) / Traits::block_n);
    cuda::launch(cuda, {dim3(row_tiles, unit_tiles), dim3(Traits::threads)},
                 ek::grouped_swiglu_gemm<D, ek::Projection::gate_up>,
                 ek::GroupedGemmParams<D>{x.data(), nullptr, 1, weights.w13(), hidden.data(),
                                          nullptr, nullptr, nullptr, 1, int(tokens), dim, width,
                                          2 * width, ek::vector_rows(x.data(), dim, 4),
                                          ek::vector_rows(weights.w13(), dim, 8)});
    cuda::launch(cuda, {dim3(row_tiles, dim_tiles), dim3(Traits::threads)},
                 ek::grouped_swiglu_gemm<D, ek::Projection::down>,
                 ek::GroupedGemmParams<D>{hidden.data(), nullptr, 1, weights.w2(), out.data(),
                                          nullptr, nullptr, nullptr, 1, int(tokens), width, dim,
                                          dim, ek::vector_rows(hidden.data(), width, 4),
                                          ek::vector_rows(weights.w2(), width, 8)});
  }
};

}  // namespace detail

/// routed_experts without the dispatched copy: the gate/up GEMM reads each kept row of the plan
/// straight from its token's row of x (through the plan's row_slot, as fused MoE kernels read
/// through their sorted token ids), so dispatch's [rows, dim] write and the GEMM's read of it are
/// saved. The same tiles, the same roundings and the same order of accumulation as dispatch
/// followed by routed_experts: the results are bitwise equal.
///
/// @param x          [plan.tokens(), dim] the tokens the plan was built for
/// @param hidden     [plan.rows(), moe_inter_dim] workspace (silu(w1 x) ⊙ w3 x on return)
/// @param expert_out [plan.rows(), dim] out, padding rows zero
/// @throws InvalidArgument when the plan is empty, was built for another number of experts, or
///         the extents disagree with it
template <MoeConfig C, class T>
void routed_experts_from_tokens(const CudaBackend& backend,
                                const DeviceExpertWeights<C, T>& weights,
                                const DeviceRoutingPlan& plan,
                                TensorView<const float, 2, DeviceMemory> x,
                                TensorView<float, 2, DeviceMemory> hidden,
                                TensorView<float, 2, DeviceMemory> expert_out) {
  constexpr std::string_view fn = "daedalus::moe::routed_experts_from_tokens";
  const index_t rows = detail::check_routed_plan<C>(fn, plan);
  daedalus::detail::check_extents(fn, "x", x, {plan.tokens(), index_t(C::dim)});
  daedalus::detail::check_extents(fn, "hidden", hidden, {rows, index_t(C::moe_inter_dim)});
  daedalus::detail::check_extents(fn, "expert_out", expert_out, {rows, index_t(C::dim)});
  detail::ExpertsImpl<CudaBackend>::routed_from_tokens(backend, weights, plan, x, hidden,
                                                       expert_out);
}

}  // namespace daedalus::moe
