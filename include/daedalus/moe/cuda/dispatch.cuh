// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>

#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/moe/cuda/routing_plan.cuh"
#include "daedalus/moe/dispatch.hpp"

namespace daedalus::moe::detail {

namespace dispatch_kernels {

/// Threads per block: each block moves one row (dispatch) or one token (combine), 4 floats per
/// thread per step when the width allows 16-byte accesses.
inline constexpr int kThreads = 256;

struct GatherParams {
  const float* x;                // [tokens, width]
  const std::int32_t* row_slot;  // [rows] slot of each row, -1 for padding
  float* expert_in;              // [rows, width]
  int k;
  int width;
  int vectorised;  // 1: width % 4 == 0 and both pointers 16-byte aligned
};

/// Row r of the expert-ordered buffer = the token row of its slot, or zeros for a padding row.
/// One block per row: a row is contiguous in both buffers, so the copy streams at full width.
// Kernels are templates (`template <int = 0>` where nothing else varies), so that every
// translation unit that includes this header may define them without breaking the ODR.
template <int = 0>
__global__ void __launch_bounds__(kThreads) gather_rows(GatherParams p) {
  const std::int64_t row = blockIdx.x;
  const std::int32_t slot = p.row_slot[row];
  float* dst = p.expert_in + row * p.width;
  const float* src = slot >= 0 ? p.x + std::int64_t(slot / p.k) * p.width : nullptr;
  const int tid = static_cast<int>(threadIdx.x);
  if (p.vectorised != 0) {
    const int quads = p.width / 4;
    auto* dst4 = reinterpret_cast<float4*>(dst);
    const auto* src4 = reinterpret_cast<const float4*>(src);
    for (int i = tid; i < quads; i += kThreads) {
      dst4[i] = src != nullptr ? src4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  } else {
    for (int i = tid; i < p.width; i += kThreads) dst[i] = src != nullptr ? src[i] : 0.0f;
  }
}

struct CombineParams {
  const float* expert_out;       // [rows, width]
  const std::int32_t* slot_row;  // [tokens * k] row of each slot, -1 if dropped
  const float* row_weight;       // [rows]
  float* out;                    // [tokens, width]
  int k;
  int width;
  int accumulate;  // 1: add to out's value, 0: overwrite
  int vectorised;
};

/// out[t] = Σ_j w · expert_out[row(t, j)], summed in slot order j = 0, 1, ... after out's own
/// value when accumulating: the same order as the CPU backend, and the same on every run (no
/// atomics; each element is summed by one thread).
template <int = 0>
__global__ void __launch_bounds__(kThreads) combine_rows(CombineParams p) {
  const std::int64_t token = blockIdx.x;
  float* o = p.out + token * p.width;
  const std::int32_t* rows = p.slot_row + token * p.k;
  const int tid = static_cast<int>(threadIdx.x);
  if (p.vectorised != 0) {
    const int quads = p.width / 4;
    auto* o4 = reinterpret_cast<float4*>(o);
    for (int i = tid; i < quads; i += kThreads) {
      float4 acc = p.accumulate != 0 ? o4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      bool written = p.accumulate != 0;
      for (int j = 0; j < p.k; ++j) {
        const std::int32_t row = rows[j];
        if (row < 0) continue;  // dropped for capacity: contributes nothing
        const float w = p.row_weight[row];
        const float4 y =
            reinterpret_cast<const float4*>(p.expert_out + std::int64_t(row) * p.width)[i];
        if (written) {
          acc.x += w * y.x;
          acc.y += w * y.y;
          acc.z += w * y.z;
          acc.w += w * y.w;
        } else {
          acc = make_float4(w * y.x, w * y.y, w * y.z, w * y.w);
          written = true;
        }
      }
      o4[i] = acc;
    }
  } else {
    for (int i = tid; i < p.width; i += kThreads) {
      float acc = p.accumulate != 0 ? o[i] : 0.0f;
      bool written = p.accumulate != 0;
      for (int j = 0; j < p.k; ++j) {
        const std::int32_t row = rows[j];
        if (row < 0) continue;
        const float w = p.row_weight[row];
        const float y = p.expert_out[std::int64_t(row) * p.width + i];
        acc = written ? acc + w * y : w * y;
        written = true;
      }
      o[i] = acc;
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace dispatch_kernels

/// Dispatch and combine on the GPU over a DeviceRoutingPlan: one block per row (dispatch) or per
/// token (combine), 16-byte accesses when the width is a multiple of 4 and the rows are aligned.
template <>
struct DispatchImpl<CudaBackend> {
  static void dispatch(const CudaBackend& cuda, const DeviceRoutingPlan& plan,
                       TensorView<const float, 2, DeviceMemory> x,
                       TensorView<float, 2, DeviceMemory> expert_in) {
    namespace dk = dispatch_kernels;
    const index_t width = x.extent(1);
    if (plan.rows() == 0 || width == 0) return;
    const bool vectorised =
        width % 4 == 0 && dk::aligned16(x.data()) && dk::aligned16(expert_in.data());
    cuda::launch(cuda, {dim3(unsigned(plan.rows())), dim3(dk::kThreads)}, dk::gather_rows<>,
                 dk::GatherParams{x.data(), plan.row_slot(), expert_in.data(), int(plan.k()),
                                  int(width), vectorised ? 1 : 0});
  }

  static void combine(const CudaBackend& cuda, const DeviceRoutingPlan& plan,
                      TensorView<const float, 2, DeviceMemory> expert_out,
                      TensorView<float, 2, DeviceMemory> out, CombineInto mode) {
    namespace dk = dispatch_kernels;
    const index_t width = expert_out.extent(1);
    if (plan.tokens() == 0 || width == 0) return;
    const bool vectorised =
        width % 4 == 0 && dk::aligned16(expert_out.data()) && dk::aligned16(out.data());
    cuda::launch(cuda, {dim3(unsigned(plan.tokens())), dim3(dk::kThreads)}, dk::combine_rows<>,
                 dk::CombineParams{expert_out.data(), plan.slot_row(), plan.row_weight(),
                                   out.data(), int(plan.k()), int(width),
                                   mode == CombineInto::accumulate ? 1 : 0, vectorised ? 1 : 0});
  }
};

}  // namespace daedalus::moe::detail
