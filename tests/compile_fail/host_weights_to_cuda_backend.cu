// SPDX-License-Identifier: Apache-2.0
// Misuse: MlaWeights (host arrays) passed to an MLA front with CudaBackend. The device kernels
// cannot read host memory; the front must say so, and name what to pass instead.
// expected-error: daedalus::mla: the weights live in a memory space this backend cannot read
// expected-error: mla::DeviceMlaWeights<C> \(uploaded once from the MlaWeights\) with CudaBackend
#include <daedalus/cuda.cuh>

int main() {
  using namespace daedalus;
  using C = Tiny;
  using S = MlaShape<C>;
  const CudaBackend cuda;
  const auto weights = mla::MlaWeights<C>::random(1);
  ContiguousLatentCache<C, CudaBackend, bfloat16> cache(1, 4, cuda);
  cuda::DeviceBuffer<float> x(S::dim), out(S::dim);
  mla::prefill(cuda, weights, cache, 0, 0,
               TensorView<const float, 2, DeviceMemory>(x.data(), {1, S::dim}),
               out.view<2>({1, S::dim}));
}
