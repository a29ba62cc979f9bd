// SPDX-License-Identifier: Apache-2.0
// routed_experts_cublas as toolkits before cuBLAS 12.5 compile it (no cublasGemmGroupedBatchedEx:
// DAEDALUS_CUBLAS_GROUPED_GEMM 0, one cublasGemmEx per expert). The test
// cuda_experts_cublas_without_grouped_gemm compiles this file, warnings as errors, against the
// emulation layer; the per-expert loop itself runs in daedalus_emulated_tests and
// daedalus_cuda_tests through CublasExpertCalls::per_expert.
#define DAEDALUS_CUBLAS_GROUPED_GEMM 0
#include "cuda_emulation.hpp"
// The emulation layer first, then the library, as the emulated tests include them.
#include <daedalus/cuda.cuh>

static_assert(DAEDALUS_CUBLAS_GROUPED_GEMM == 0, "the fallback is what this file compiles");

void run_per_expert(const daedalus::CudaBackend& backend,
                    const daedalus::moe::DeviceExpertWeights<daedalus::Tiny>& weights,
                    const daedalus::moe::DeviceRoutingPlan& plan,
                    daedalus::TensorView<const float, 2, daedalus::DeviceMemory> expert_in,
                    daedalus::moe::CublasExpertWorkspace& workspace,
                    daedalus::TensorView<float, 2, daedalus::DeviceMemory> expert_out) {
  daedalus::moe::routed_experts_cublas(backend, weights, plan, expert_in, workspace, expert_out);
}
