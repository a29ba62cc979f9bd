// SPDX-License-Identifier: Apache-2.0
// Misuse: a config whose kv_lora_rank is 0. MLA caches a latent of that width, so a config
// without one is rejected when anything derives its shape (config/concepts.hpp, MlaShape).
// expected-error: MlaConfig: 'kv_lora_rank' must be positive
#include <daedalus/daedalus.hpp>

struct NoLatent : daedalus::Tiny {
  static constexpr int kv_lora_rank = 0;
};

int main() {
  daedalus::ContiguousLatentCache<NoLatent> cache(1, 4);
  return static_cast<int>(cache.num_sequences());
}
