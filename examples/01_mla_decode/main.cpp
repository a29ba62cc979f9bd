// SPDX-License-Identifier: Apache-2.0
//
// Example 01: one DeepSeek-V2-Lite Multi-head Latent Attention layer on the CPU.
//
// It builds the layer with random weights, prefills a 512-token prompt, then generates 64 tokens
// one at a time, the way an inference engine drives an attention layer. Along the way it prints
// how fast each phase runs and how little KV cache MLA keeps per token compared with standard
// multi-head attention (MHA) and grouped-query attention (GQA) of the same head sizes.
//
//   cmake --workflow --preset example && ./build/release/example_mla_decode

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::DeepSeekV2Lite;  // dim 2048, 16 heads, kv_lora_rank 512, rope 64
using Storage = daedalus::bfloat16;      // what the cache stores; `float` works too
constexpr daedalus::index_t kPrompt = 512;
constexpr daedalus::index_t kGenerate = 64;
constexpr int kDim = Model::dim;

/// Stand-in activations: `n` values uniform in [-1, 1]. In a real model these would be the
/// hidden states coming out of the previous layer's RMSNorm.
std::vector<float> random_activations(std::size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main() {
  namespace mla = daedalus::mla;
  using daedalus::HostView;
  using daedalus::index_t;

  // The backend: Eigen kernels on all the hardware threads OpenMP reports.
  const daedalus::CpuBackend cpu;

  // The layer's weights in DeepSeek's [out, in] layout. A real program would load a checkpoint
  // with MlaWeights<Model>::from_arrays(...); random ones suffice to time the layer.
  const auto weights = mla::MlaWeights<Model>::random(/*seed=*/42);

  // The KV cache: one sequence with room for the prompt and every generated token. Each token
  // takes one row of 576 values: the compressed latent (512) and the shared rotary key (64).
  daedalus::ContiguousLatentCache<Model, daedalus::CpuBackend, Storage> cache(
      /*num_sequences=*/1, /*capacity=*/kPrompt + kGenerate);
  const index_t seq = 0;

  std::printf("daedalus %d.%d.%d: one %s MLA layer, %d threads, %s KV cache\n",
              DAEDALUS_VERSION_MAJOR, DAEDALUS_VERSION_MINOR, DAEDALUS_VERSION_PATCH, Model::name,
              cpu.num_threads(), daedalus::StorageTraits<Storage>::name);

  std::mt19937 rng(7);

  // 1. Prefill: the whole prompt in one call. The naive mode (up-project the latents into
  //    per-head keys and values) is the cheaper one for long chunks.
  const std::vector<float> prompt = random_activations(std::size_t(kPrompt) * kDim, rng);
  std::vector<float> prompt_out(prompt.size());
  auto start = std::chrono::steady_clock::now();
  mla::prefill(cpu, weights, cache, seq, /*start_pos=*/0,
               HostView<const float, 2>(prompt.data(), {kPrompt, kDim}),
               HostView<float, 2>(prompt_out.data(), {kPrompt, kDim}), mla::AttentionMode::naive);
  const double prefill_s = seconds_since(start);

  // 2. Decode: one token per step. Each step appends the token's latent to the cache and attends
  //    over everything cached, in the absorbed form (W_UK folded into the query, W_UV into the
  //    output), which reads only the 576-wide latent rows.
  const index_t seqs[] = {seq};
  std::vector<float> out(kDim);
  start = std::chrono::steady_clock::now();
  for (index_t step = 0; step < kGenerate; ++step) {
    const std::vector<float> x = random_activations(kDim, rng);  // [batch 1, q_len 1, dim]
    mla::decode(cpu, weights, cache, seqs, HostView<const float, 3>(x.data(), {1, 1, kDim}),
                HostView<float, 3>(out.data(), {1, 1, kDim}));
  }
  const double decode_s = seconds_since(start);

  std::printf("prefill: %lld tokens in %.1f ms, %.0f tokens/s\n", static_cast<long long>(kPrompt),
              prefill_s * 1e3, double(kPrompt) / prefill_s);
  std::printf("decode:  %lld tokens in %.1f ms, %.0f tokens/s (context %lld to %lld)\n",
              static_cast<long long>(kGenerate), decode_s * 1e3, double(kGenerate) / decode_s,
              static_cast<long long>(kPrompt), static_cast<long long>(cache.length(seq)));

  // 3. Why MLA: KV cache bytes per token per layer for this model's head sizes
  //    (DeepSeek-V2 paper, section 2.1.4).
  using Fp32 = daedalus::KvBytesPerToken<Model, float>;
  using Bf16 = daedalus::KvBytesPerToken<Model, daedalus::bfloat16>;
  std::printf("KV cache per token per layer (%d heads of %d + %d):\n", Model::n_heads,
              daedalus::MlaShape<Model>::qk_head_dim, Model::v_head_dim);
  std::printf("  %-6s %8s %8s\n", "", "fp32", "bf16");
  std::printf("  %-6s %8zu %8zu bytes\n", "MLA", Fp32::mla, Bf16::mla);
  std::printf("  %-6s %8zu %8zu bytes (%.1fx MLA)\n", "GQA-8", Fp32::gqa(8), Bf16::gqa(8),
              double(Bf16::gqa(8)) / double(Bf16::mla));
  std::printf("  %-6s %8zu %8zu bytes (%.1fx MLA)\n", "MHA", Fp32::mha, Bf16::mha,
              double(Bf16::mha) / double(Bf16::mla));

  // 4. A checksum of the last token's output, to compare runs and builds (it moves in the last
  //    digits between machines: the kernels' summation order depends on the SIMD width).
  double sum = 0.0;
  double abs_sum = 0.0;
  for (float v : out) {
    sum += v;
    abs_sum += v < 0 ? -v : v;
  }
  std::printf("checksum of the last output: sum %.6f, sum |x| %.6f\n", sum, abs_sum);
  return 0;
}
