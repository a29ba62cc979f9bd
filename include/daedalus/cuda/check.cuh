// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <source_location>

#include "daedalus/core/error.hpp"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda::detail {

/// Throws CudaError for a failed CUDA runtime call: `file:line: call failed: cudaErrorName:
/// description`. Host code only; device code never throws.
inline void check_cuda(cudaError_t status, const char* call, const char* file, unsigned line) {
  if (status == cudaSuccess) return;
  // A failed call also becomes the runtime's "last error"; it is reported here, so consume it,
  // or the next launch check would report it a second time. (Sticky errors from a faulted
  // context persist regardless.)
  static_cast<void>(cudaGetLastError());
  throw CudaError(::daedalus::detail::message(file, ":", line, ": ", call,
                                              " failed: ", cudaGetErrorName(status), ": ",
                                              cudaGetErrorString(status)));
}

}  // namespace daedalus::cuda::detail

/// Checks the cudaError_t that `call` returns and throws daedalus::CudaError naming the file,
/// the line, the call as written and CUDA's error name and string when it is not cudaSuccess.
/// Every runtime call in daedalus goes through it; kernel launches go through
/// daedalus::cuda::launch, which checks the launch the same way.
#define DAEDALUS_CUDA_CHECK(call) \
  ::daedalus::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)
