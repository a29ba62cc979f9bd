// SPDX-License-Identifier: Apache-2.0
// Misuse: a latent cache for a backend whose memory is on the device, named in a translation unit
// that did not include <daedalus/cuda.cuh>. The host headers hold no device storage, and the error
// must point the user to the header that does. `DeviceBackend` stands for CudaBackend, which is
// declared only under daedalus/cuda/: any backend with DeviceMemory takes this path.
// expected-error: daedalus::ContiguousLatentCache: no implementation for this backend is visible
// expected-error: include <daedalus/cuda\.cuh> in a \.cu file for CudaBackend
#include <daedalus/daedalus.hpp>

struct DeviceBackend {
  using memory_space = daedalus::DeviceMemory;
  static constexpr const char* name = "device";
};
static_assert(daedalus::Backend<DeviceBackend>);

int main() {
  daedalus::ContiguousLatentCache<daedalus::Tiny, DeviceBackend> cache(1, 4);
  return static_cast<int>(cache.num_sequences());
}
