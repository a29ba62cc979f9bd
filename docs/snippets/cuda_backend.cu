// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/cuda.md (the CUDA backend's stream, buffers, copies and launch function) and
// docs/kv_cache.md (a paged latent cache in device memory). Built with nvcc only (a .cu file
// linking daedalus::cuda); not run by CTest, and without a device main() only says so.
#include <cstdio>
#include <vector>

#include "daedalus/cuda.cuh"

namespace {

using Model = daedalus::Tiny;

// [snippet:kernel]
// A kernel takes device views by value; it is launched through cuda::launch, never <<<>>>, so
// that the same source also runs under the CUDA emulation layer.
__global__ void scale(daedalus::TensorView<float, 1, daedalus::DeviceMemory> values, float factor) {
  const auto i = static_cast<daedalus::index_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < values.extent(0)) values(i) *= factor;
}
// [/snippet:kernel]

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_backend: no CUDA device answered\n");
    return 0;
  }
  const std::vector<float> host_values(1000, 1.0f);
  const auto n = static_cast<daedalus::index_t>(host_values.size());

  // [snippet:backend]
  daedalus::cuda::Stream stream;                          // owned, non-blocking
  const auto cuda = daedalus::CudaBackend{}.on(stream);   // every call of `cuda` goes to `stream`
  auto x = daedalus::cuda::to_device(cuda, host_values);  // DeviceBuffer<float>, extents checked
  daedalus::cuda::launch(cuda, {dim3(unsigned((n + 255) / 256)), dim3(256)}, &scale, x.view<1>({n}),
                         2.0f);  // a failed launch throws CudaError (file:line)
  const std::vector<float> back = daedalus::cuda::to_host(cuda, x);  // synchronises the stream
  // [/snippet:backend]

  const std::vector<float> rows_host(std::size_t(70) * daedalus::MlaShape<Model>::latent_dim, 0.5f);
  auto rows_buffer = daedalus::cuda::to_device(cuda, rows_host);
  const daedalus::TensorView<const float, 2, daedalus::DeviceMemory> rows(
      rows_buffer.data(), {70, daedalus::MlaShape<Model>::latent_dim});

  // [snippet:device_cache]
  // One allocator serves host and device layers alike; the device pool holds bf16 (or half)
  // rows, zero-filled: [num_blocks, 64, row_bytes] bytes.
  daedalus::BlockAllocator allocator(/*num_blocks=*/256, /*block_size=*/64);
  daedalus::PagedLatentCache<Model, daedalus::CudaBackend, daedalus::bfloat16> layer(allocator,
                                                                                     cuda);
  const daedalus::index_t seq = allocator.add_sequence();
  layer.append(seq, rows);  // device fp32 [n, latent_dim]: checked finite, then rounded on the GPU
  daedalus::DeviceBlockTable table;  // device block table and lengths, reused every step
  const daedalus::index_t seqs[] = {seq};
  const auto view = layer.view(seqs, table);              // PagedLatentView in device memory
  const auto batch = daedalus::cuda::latent_batch(view);  // what the device kernels read
  daedalus::PagedLatentCache<Model, daedalus::CpuBackend, daedalus::bfloat16> host_layer(allocator);
  layer.download(host_layer);  // the whole pool, byte for byte, into a host layer
  // [/snippet:device_cache]

  std::printf("cuda_backend: back[0] = %g, %d entries, host row 0 starts with %g\n",
              double(back[0]), batch.batch, double(host_layer.rows(seq)[0]));
  return back[0] == 2.0f ? 0 : 1;
}
