// SPDX-License-Identifier: Apache-2.0
#pragma once

// Rounding fp32 rows to a 16-bit GEMM input type on the GPU: what the MLA projections and the
// cuBLAS MoE experts feed their tensor-core GEMMs.

#include <algorithm>
#include <cstdint>

#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// What `convert_rows` reads and writes: rows × cols values, source rows `src_ld` apart,
/// destination rows `dst_ld` apart.
template <class Out>
struct ConvertRowsParams {
  const float* src = nullptr;
  Out* dst = nullptr;
  std::int64_t rows = 0;
  int cols = 0;
  std::int64_t src_ld = 0;
  std::int64_t dst_ld = 0;
};

inline constexpr int kConvertThreads = 256;

/// dst[r, c] = round-to-nearest-even(src[r, c]) (grid-stride over every element).
template <DeviceElement Out>
__global__ void __launch_bounds__(kConvertThreads) convert_rows(ConvertRowsParams<Out> p) {
  const std::int64_t total = p.rows * p.cols;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const std::int64_t r = i / p.cols;
    const std::int64_t c = i % p.cols;
    p.dst[r * p.dst_ld + c] = ::daedalus::cuda::from_float<Out>(p.src[r * p.src_ld + c]);
  }
}

/// Rounds rows × cols fp32 values (device) to Out on the backend's stream.
template <DeviceElement Out>
void launch_convert_rows(const CudaBackend& backend, const float* src, index_t rows, index_t cols,
                         index_t src_ld, Out* dst, index_t dst_ld) {
  if (rows == 0 || cols == 0) return;
  const index_t blocks =
      std::min<index_t>((rows * cols + kConvertThreads - 1) / kConvertThreads, 4096);
  launch(backend, {dim3(unsigned(blocks)), dim3(kConvertThreads)}, &convert_rows<Out>,
         ConvertRowsParams<Out>{src, dst, rows, int(cols), src_ld, dst_ld});
}

}  // namespace daedalus::cuda
