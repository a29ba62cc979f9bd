// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/cuda.md: an MLA layer on the GPU (device weights, a device paged cache,
// prefill and decode with CudaBackend), and the absorbed decode kernel called directly. Built
// with nvcc only; not run by CTest, and without a device main() only says so.
#include <cstdio>
#include <vector>

#include "daedalus/cuda.cuh"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_mla: no CUDA device answered\n");
    return 0;
  }
  using S = daedalus::MlaShape<Model>;
  using daedalus::DeviceMemory;
  using daedalus::index_t;
  using daedalus::TensorView;
  const index_t tokens = 70;
  const auto host_weights = daedalus::mla::MlaWeights<Model>::random(/*seed=*/1);
  const daedalus::CudaBackend setup;
  auto x_buffer =
      daedalus::cuda::to_device(setup, std::vector<float>(std::size_t(tokens * Model::dim), 0.5f));
  daedalus::cuda::DeviceBuffer<float> out_buffer(std::size_t(tokens * Model::dim));
  auto step_buffer =
      daedalus::cuda::to_device(setup, std::vector<float>(std::size_t(Model::dim), 0.25f));
  daedalus::cuda::DeviceBuffer<float> step_out_buffer(std::size_t(Model::dim));
  const auto x_prompt = x_buffer.view<2>({tokens, Model::dim});
  const auto out_prompt = out_buffer.view<2>({tokens, Model::dim});
  const auto x_step = step_buffer.view<3>({1, 1, Model::dim});
  const auto out_step = step_out_buffer.view<3>({1, 1, Model::dim});

  // [snippet:layer]
  namespace mla = daedalus::mla;
  const daedalus::CudaBackend cuda;  // the default stream; cuda.on(stream) for another
  // Uploaded once: projections in bf16 (half as a second template argument), norms in fp32.
  const mla::DeviceMlaWeights<Model> weights(cuda, host_weights);  // from MlaWeights<Model>
  daedalus::BlockAllocator allocator(/*num_blocks=*/256, /*block_size=*/64);
  daedalus::PagedLatentCache<Model, daedalus::CudaBackend, daedalus::bfloat16, 64> cache(allocator,
                                                                                         cuda);
  const index_t seq = allocator.add_sequence();
  // The fronts of the CPU backend, with device views ([tokens, dim] and [batch, q_len, dim]).
  mla::prefill(cuda, weights, cache, seq, /*start_pos=*/0, x_prompt, out_prompt);
  const index_t seqs[] = {seq};
  mla::decode(cuda, weights, cache, seqs, x_step, out_step);  // absorbed, tensor-core kernel
  // [/snippet:layer]

  const index_t batch_size = 1;
  daedalus::cuda::DeviceBuffer<float> q_buffer(
      std::size_t(batch_size * S::n_heads * S::latent_dim));
  daedalus::cuda::DeviceBuffer<float> latent_buffer(
      std::size_t(batch_size * S::n_heads * S::kv_lora_rank));
  DAEDALUS_CUDA_CHECK(cudaMemset(q_buffer.data(), 0, q_buffer.bytes()));
  float* d_q = q_buffer.data();
  float* d_out = latent_buffer.data();
  daedalus::DeviceBlockTable table;
  const auto batch = daedalus::cuda::latent_batch(cache.view(seqs, table));
  const int q_len = 1;

  // [snippet:absorbed_decode]
  // FlashMLA's computation on a device batch (paged or contiguous, bf16 or fp16 pool):
  // q [batch, q_len, n_heads, 576] already multiplied by W_UK, out [batch, q_len, n_heads, 512].
  mla::cuda::AbsorbedDecodeWorkspace workspace;  // one per stream; grows on demand
  mla::cuda::absorbed_decode<Model, daedalus::bfloat16>(
      cuda, batch, q_len, d_q, float(mla::softmax_scale<Model>()), d_out, workspace);
  // [/snippet:absorbed_decode]

  cuda.synchronize();
  std::printf("cuda_mla: sequence holds %lld tokens\n",
              static_cast<long long>(allocator.length(seq)));
  return allocator.length(seq) == tokens + 1 ? 0 : 1;
}
