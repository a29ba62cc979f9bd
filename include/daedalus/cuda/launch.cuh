// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <source_location>
#include <string>
#include <utility>

#include "daedalus/core/error.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"

namespace daedalus::cuda {

/// The shape of a kernel launch. `where` records the line that wrote the braces (the caller),
/// which is what a failed launch reports.
struct LaunchShape {
  dim3 grid;
  dim3 block;
  std::size_t shared_bytes = 0;  ///< dynamic shared memory per block
  std::source_location where = std::source_location::current();
};

/// Dynamic shared memory a kernel may use without opting in, on every architecture.
inline constexpr std::size_t kDefaultDynamicSharedBytes = 48u * 1024u;

/// Launches `kernel(args...)` with `shape` on the backend's stream and checks the launch: a
/// rejected configuration or an earlier asynchronous fault throws CudaError naming the caller's
/// file:line, the launch shape and CUDA's error. More than 48 KiB of dynamic shared memory is
/// opted into first (cudaFuncSetAttribute; at most 163 KiB on sm_80, 227 KiB on sm_90). Kernels are
/// launched only through this function, so that the same host code runs under nvcc and under the
/// CUDA emulation layer.
/// @throws CudaError when the launch fails.
template <class... Params, class... Args>
void launch(const CudaBackend& backend, const LaunchShape& shape, void (*kernel)(Params...),
            Args&&... args) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in, once per size it needs.
  if (shape.shared_bytes > kDefaultDynamicSharedBytes) {
    // Checked as DAEDALUS_CUDA_CHECK does, but reported at the caller's line.
    detail::check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shape.shared_bytes)),
                       "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
                       "shape.shared_bytes)",
                       shape.where.file_name(), shape.where.line());
  }
#if defined(DAEDALUS_CUDA_EMULATION)
  ::daedalus::cuda_emulation::launch_on_stream(backend.stream(), kernel, shape.grid, shape.block,
                                               shape.shared_bytes, std::forward<Args>(args)...);
#else
  // clang-format off
  kernel<<<shape.grid, shape.block, shape.shared_bytes, backend.stream()>>>(
      std::forward<Args>(args)...);
  // clang-format on
#endif
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    const std::string call = ::daedalus::detail::message(
        "kernel launch <<<grid (", shape.grid.x, ",", shape.grid.y, ",", shape.grid.z, "), block (",
        shape.block.x, ",", shape.block.y, ",", shape.block.z, "), ", shape.shared_bytes,
        " bytes of shared memory>>>");
    detail::check_cuda(status, call.c_str(), shape.where.file_name(), shape.where.line());
  }
}

}  // namespace daedalus::cuda
