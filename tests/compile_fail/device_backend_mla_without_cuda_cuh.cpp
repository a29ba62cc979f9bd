// SPDX-License-Identifier: Apache-2.0
// Misuse: MLA called with a device backend in a translation unit that did not include
// <daedalus/cuda.cuh>. The front (mla/attention.hpp) finds no specialisation of
// detail::MlaImpl for the backend, and its primary template must say which header provides one.
// `DeviceBackend` stands for CudaBackend, which is declared only under daedalus/cuda/.
// expected-error: daedalus::mla: no MLA implementation for this backend is visible
// expected-error: or <daedalus/cuda\.cuh> in a \.cu file for CudaBackend
#include <daedalus/daedalus.hpp>
#include <vector>

struct DeviceBackend {
  using memory_space = daedalus::DeviceMemory;
  static constexpr const char* name = "device";
};

int main() {
  using namespace daedalus;
  using C = Tiny;
  using S = MlaShape<C>;
  const DeviceBackend device;
  const auto weights = mla::MlaWeights<C>::from_arrays({});
  const TensorView<const float, 2, DeviceMemory> x(nullptr, {1, S::dim});
  const TensorView<float, 3, DeviceMemory> q(nullptr, {1, S::n_heads, S::qk_head_dim});
  const TensorView<float, 2, DeviceMemory> latent(nullptr, {1, S::latent_dim});
  mla::project(device, weights, 0, x, q, latent);
}
