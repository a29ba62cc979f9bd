// SPDX-License-Identifier: Apache-2.0
// The tensor-core kernels that scripts/cuda-static-check.sh compiles on their own for sm_80 and
// sm_90a (to cubin, with -Xptxas -v) and inspects: no local-memory spills, HMMA in the SASS.
#include "cuda/kernels/mma_gemm.cuh"

namespace daedalus::testing::kernels {

template __global__ void mma_gemm<__nv_bfloat16, true>(MmaGemmParams<__nv_bfloat16>);
template __global__ void mma_gemm<__half, true>(MmaGemmParams<__half>);

}  // namespace daedalus::testing::kernels
