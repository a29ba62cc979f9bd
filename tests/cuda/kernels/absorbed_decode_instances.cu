// SPDX-License-Identifier: Apache-2.0
// The absorbed-decode kernels that scripts/cuda-static-check.sh compiles on their own for sm_80
// and sm_90a (to cubin, with -Xptxas -v) and inspects: no local-memory spills, HMMA in the SASS
// of decode_attention. DeepSeek-V3's shapes over a paged bf16 pool: 512 + 64 latent, 64-row
// tiles (128 heads) and 16-row tiles (16 heads, one query token), and 32-row tiles (16 heads,
// two query tokens).
#include <daedalus/mla/cuda/decode_kernels.cuh>

namespace daedalus::mla::cuda::detail {

using PagedBatch = daedalus::cuda::PagedRowAddress;

template __global__ void decode_attention<__nv_bfloat16, 576, 512, 4, PagedBatch>(
    DecodeAttentionParams<PagedBatch>);
template __global__ void decode_attention<__nv_bfloat16, 576, 512, 2, PagedBatch>(
    DecodeAttentionParams<PagedBatch>);
template __global__ void decode_attention<__nv_bfloat16, 576, 512, 1, PagedBatch>(
    DecodeAttentionParams<PagedBatch>);

}  // namespace daedalus::mla::cuda::detail
