// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/mla.md: an MLA layer's weights from checkpoint arrays, a contiguous latent
// cache, chunked prefill and a batched decode step, and the absorbed attention core called
// directly. The docs show the code for any preset `Model`; this file runs it with daedalus::Tiny
// so that the CTest run takes milliseconds.
#include <cstdio>
#include <span>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::Tiny;

std::vector<float> filled(std::size_t n, float value) { return std::vector<float>(n, value); }

}  // namespace

int main() {
  using S = daedalus::MlaShape<Model>;
  const auto u = [](auto n) { return static_cast<std::size_t>(n); };
  // Checkpoint-layout arrays of the right sizes (a real program reads them from a checkpoint).
  const auto wq_a = filled(u(S::q_lora_rank) * u(S::dim), 0.01f);
  const auto q_norm = filled(u(S::q_lora_rank), 1.0f);
  const auto wq_b = filled(u(S::n_heads * S::qk_head_dim) * u(S::q_lora_rank), 0.01f);
  const auto wkv_a = filled(u(S::latent_dim) * u(S::dim), 0.01f);
  const auto kv_norm = filled(u(S::kv_lora_rank), 1.0f);
  const auto wkv_b = filled(u(S::n_heads * (S::nope + S::v_head_dim)) * u(S::kv_lora_rank), 0.01f);
  const auto wo = filled(u(S::dim) * u(S::n_heads * S::v_head_dim), 0.01f);
  const daedalus::index_t tokens = 5;
  const auto x = filled(u(tokens * Model::dim), 0.5f);
  auto y = filled(u(tokens * Model::dim), 0.0f);
  const auto x1 = filled(u(3 * Model::dim), 0.25f);
  auto y1 = filled(u(3 * Model::dim), 0.0f);

  // [snippet:from_arrays]
  namespace mla = daedalus::mla;
  // [out, in] row-major, as nn.Linear stores them (HF: q_a_proj, q_a_layernorm, q_b_proj,
  // q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj). A config without query
  // LoRA (V2-Lite) passes wq and leaves wq_a, q_norm and wq_b empty.
  const auto weights = mla::MlaWeights<Model>::from_arrays({.wq_a = wq_a,
                                                            .q_norm = q_norm,
                                                            .wq_b = wq_b,
                                                            .wq = {},
                                                            .wkv_a = wkv_a,
                                                            .kv_norm = kv_norm,
                                                            .wkv_b = wkv_b,
                                                            .wo = wo});
  // [/snippet:from_arrays]

  // [snippet:prefill_decode]
  using daedalus::HostView;
  using daedalus::index_t;
  const daedalus::CpuBackend cpu;  // every hardware thread; CpuBackend(n) for n
  // 8 sequences of at most 4096 tokens each, stored in bf16 (float and half work too).
  daedalus::ContiguousLatentCache<Model, daedalus::CpuBackend, daedalus::bfloat16> cache(
      /*num_sequences=*/8, /*capacity=*/4096);

  // Prefill a prompt of `tokens` tokens into sequence 0 (any chunking gives the same result:
  // a later chunk passes start_pos = the tokens already cached).
  mla::prefill(cpu, weights, cache, /*seq=*/0, /*start_pos=*/0,
               HostView<const float, 2>(x.data(), {tokens, Model::dim}),  // [tokens, dim]
               HostView<float, 2>(y.data(), {tokens, Model::dim}));       // [tokens, dim]

  // One decode step of a varlen batch: one new token for each of sequences 0, 3 and 5, appended
  // at each sequence's length.
  const std::vector<index_t> seqs{0, 3, 5};
  mla::decode(cpu, weights, cache, seqs,
              HostView<const float, 3>(x1.data(), {3, 1, Model::dim}),  // [batch, q_len, dim]
              HostView<float, 3>(y1.data(), {3, 1, Model::dim}));
  // [/snippet:prefill_decode]

  // [snippet:core]
  // An engine with its own projections calls the absorbed core: q = [q_nope·W_UK ; q_pe] per
  // head, [batch, q_len, n_heads, kv_lora_rank + rope]; out_latent [batch, q_len, n_heads,
  // kv_lora_rank] (apply W_UV and wo afterwards). The cache must already hold the query tokens.
  std::vector<float> q(seqs.size() * S::n_heads * S::latent_dim, 0.1f);
  std::vector<float> out_latent(seqs.size() * S::n_heads * S::kv_lora_rank);
  const index_t batch = index_t(seqs.size());
  mla::absorbed_attention(
      cpu, cache, seqs, HostView<const float, 4>(q.data(), {batch, 1, S::n_heads, S::latent_dim}),
      mla::softmax_scale<Model>(),  // 192^-0.5 · mscale² (0.135234 for V3), not 576^-0.5
      HostView<float, 4>(out_latent.data(), {batch, 1, S::n_heads, S::kv_lora_rank}));
  // [/snippet:core]

  std::printf("mla_contiguous: sequence 0 holds %lld tokens, y1[0] = %g, out_latent[0] = %g\n",
              static_cast<long long>(cache.length(0)), double(y1[0]), double(out_latent[0]));
  return cache.length(0) == tokens + 1 ? 0 : 1;
}
