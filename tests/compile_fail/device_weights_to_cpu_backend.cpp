// SPDX-License-Identifier: Apache-2.0
// Misuse: weights in device memory passed to an MLA front with CpuBackend. `DeviceWeights`
// stands for mla::DeviceMlaWeights, which is declared only under daedalus/mla/cuda/: any weights
// type whose memory_space is DeviceMemory takes this path.
// expected-error: daedalus::mla: the weights live in a memory space this backend cannot read
#include <daedalus/daedalus.hpp>
#include <vector>

struct DeviceWeights {
  using config = daedalus::Tiny;
  using memory_space = daedalus::DeviceMemory;
};

int main() {
  using namespace daedalus;
  using C = Tiny;
  using S = MlaShape<C>;
  const CpuBackend cpu(1);
  ContiguousLatentCache<C> cache(1, 4);
  std::vector<float> x(S::dim), out(S::dim);
  mla::prefill(cpu, DeviceWeights{}, cache, 0, 0, HostView<const float, 2>(x.data(), {1, S::dim}),
               HostView<float, 2>(out.data(), {1, S::dim}));
}
