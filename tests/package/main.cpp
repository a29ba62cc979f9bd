// SPDX-License-Identifier: Apache-2.0
// A user's program: includes the umbrella header, runs a small MLA decode step on the CPU, and
// checks that the output is finite. Exit code 0 means the package works.
#include <cmath>
#include <cstdio>
#include <daedalus/daedalus.hpp>
#include <vector>

int main() {
  using namespace daedalus;
  using C = Tiny;
  using S = MlaShape<C>;

  // Deterministic, non-zero values: the point is that everything links and runs.
  auto filled = [](std::size_t n, float step) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = 0.01f * static_cast<float>((i * 37) % 23) - step;
    return v;
  };
  const auto wq_a = filled(std::size_t(S::q_lora_rank) * S::dim, 0.1f);
  const auto q_norm = std::vector<float>(S::q_lora_rank, 1.0f);
  const auto wq_b = filled(std::size_t(S::n_heads) * S::qk_head_dim * S::q_lora_rank, 0.1f);
  const auto wkv_a = filled(std::size_t(S::latent_dim) * S::dim, 0.1f);
  const auto kv_norm = std::vector<float>(S::kv_lora_rank, 1.0f);
  const auto wkv_b =
      filled(std::size_t(S::n_heads) * S::kv_b_rows_per_head * S::kv_lora_rank, 0.1f);
  const auto wo = filled(std::size_t(S::dim) * S::n_heads * S::v_head_dim, 0.1f);
  const auto weights =
      mla::MlaWeights<C>::from_arrays({wq_a, q_norm, wq_b, {}, wkv_a, kv_norm, wkv_b, wo});

  const CpuBackend cpu(2);
  ContiguousLatentCache<C> cache(1, 8);
  const auto x = filled(std::size_t(3) * S::dim, 0.05f);
  std::vector<float> y(x.size());
  mla::prefill(cpu, weights, cache, 0, 0, HostView<const float, 2>(x.data(), {3, S::dim}),
               HostView<float, 2>(y.data(), {3, S::dim}));
  for (const float v : y) {
    if (!std::isfinite(v)) {
      std::fprintf(stderr, "consumer: prefill produced a non-finite value\n");
      return 1;
    }
  }
  std::printf("consumer: daedalus %d.%d.%d, cache holds %lld tokens\n", DAEDALUS_VERSION_MAJOR,
              DAEDALUS_VERSION_MINOR, DAEDALUS_VERSION_PATCH,
              static_cast<long long>(cache.length(0)));
  return cache.length(0) == 3 ? 0 : 1;
}
