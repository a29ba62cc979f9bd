// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// The block's dynamic shared memory (the launch's `shared_bytes`), as an array of T. Kernels
/// reach dynamic shared memory only through this function: `extern __shared__` has no meaning
/// to a host compiler, and one declaration of one type avoids nvcc's "incompatible redeclaration"
/// when several kernel templates use different element types. 16-byte aligned.
template <class T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#if defined(DAEDALUS_CUDA_EMULATION)
  return static_cast<T*>(::daedalus::cuda_emulation::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char daedalus_dynamic_shared_memory[];
  return reinterpret_cast<T*>(daedalus_dynamic_shared_memory);
#endif
}

}  // namespace daedalus::cuda
