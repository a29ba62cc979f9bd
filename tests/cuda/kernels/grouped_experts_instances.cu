// SPDX-License-Identifier: Apache-2.0
// The grouped SwiGLU kernel of the routed and shared experts (moe/cuda/experts.cuh), both
// projections in bf16 and fp16, for scripts/cuda-static-check.sh: no local-memory spills for
// sm_80 and sm_90a, HMMA in the SASS.
#include <daedalus/moe/cuda/experts.cuh>

namespace daedalus::moe::detail::expert_kernels {

template __global__ void grouped_swiglu_gemm<__nv_bfloat16, Projection::gate_up>(
    GroupedGemmParams<__nv_bfloat16>);
template __global__ void grouped_swiglu_gemm<__nv_bfloat16, Projection::down>(
    GroupedGemmParams<__nv_bfloat16>);
template __global__ void grouped_swiglu_gemm<__half, Projection::gate_up>(
    GroupedGemmParams<__half>);
template __global__ void grouped_swiglu_gemm<__half, Projection::down>(GroupedGemmParams<__half>);

}  // namespace daedalus::moe::detail::expert_kernels
