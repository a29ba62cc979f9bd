// SPDX-License-Identifier: Apache-2.0
// Misuse: a view of device memory given to a CPU entry point. The CPU backend cannot read device
// memory, so this must not compile, and the error must say why (docs/architecture.md, "Views").
// expected-error: daedalus::TensorView: a DeviceMemory view cannot become a HostMemory view
#include <daedalus/daedalus.hpp>
#include <vector>

int main() {
  using namespace daedalus;
  using C = Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(1);
  const auto weights = mla::MlaWeights<C>::from_arrays({});
  std::vector<float> q(S::n_heads * S::qk_head_dim), latent(S::latent_dim);
  const TensorView<const float, 2, DeviceMemory> x_on_device(nullptr, {1, S::dim});
  mla::project(cpu, weights, 0, x_on_device,
               HostView<float, 3>(q.data(), {1, S::n_heads, S::qk_head_dim}),
               HostView<float, 2>(latent.data(), {1, S::latent_dim}));
}
