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

/// Starts an asynchronous 16-byte copy from global to shared memory (cp.async.cg, sm_80+: the
/// data does not pass through registers, so a thread keeps all its copies (a whole tile) in
/// flight at once). Complete only after wait_async_copies() in the issuing thread, and visible to
/// the block after the barrier that follows it.
__device__ __forceinline__ void copy_async_16(void* shared_dst, const void* global_src) {
#if defined(DAEDALUS_CUDA_EMULATION)
  ::daedalus::cuda_emulation::copy_async_16(shared_dst, global_src);
#elif defined(__CUDA_ARCH__)
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global_src)
               : "memory");
#else
  (void)shared_dst;
  (void)global_src;
#endif
}

/// Waits until every copy_async_16 this thread issued has landed.
__device__ __forceinline__ void wait_async_copies() {
#if defined(DAEDALUS_CUDA_EMULATION)
  ::daedalus::cuda_emulation::wait_async_copies();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

}  // namespace daedalus::cuda
