// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/mla.md and docs/kv_cache.md: one MLA layer over a paged latent cache, and the
// absorbed core over a pool and block table an engine built itself (FlashMLA's arguments). The
// docs show the code for any preset `Model`; this file runs it with daedalus::Tiny.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  using S = daedalus::MlaShape<Model>;
  using daedalus::HostView;
  using daedalus::index_t;
  namespace mla = daedalus::mla;
  const daedalus::CpuBackend cpu;
  const auto weights = mla::MlaWeights<Model>::random(/*seed=*/1);
  const index_t tokens = 70;
  const std::vector<float> x(std::size_t(tokens * Model::dim), 0.5f);
  std::vector<float> y(x.size());
  const std::vector<float> x_step(std::size_t(2 * Model::dim), 0.25f);
  std::vector<float> y_step(x_step.size());

  // [snippet:single_layer]
  // One layer's pool of 256 blocks of 64 tokens in bf16, on an allocator of its own.
  daedalus::BlockAllocator allocator(/*num_blocks=*/256, /*block_size=*/64);
  daedalus::PagedLatentCache<Model, daedalus::CpuBackend, daedalus::bfloat16, 64> cache(allocator);

  const index_t prompt = allocator.add_sequence();
  mla::prefill(cpu, weights, cache, prompt, /*start_pos=*/0,
               HostView<const float, 2>(x.data(), {tokens, Model::dim}),
               HostView<float, 2>(y.data(), {tokens, Model::dim}));
  const index_t fork = allocator.fork(prompt);  // shares the prompt's blocks, copies nothing

  // A decode step over both: each new token goes at its sequence's length; the fork's first
  // write copies the shared partial block first (copy on write).
  const index_t seqs[] = {prompt, fork};
  mla::decode(cpu, weights, cache, seqs,
              HostView<const float, 3>(x_step.data(), {2, 1, Model::dim}),
              HostView<float, 3>(y_step.data(), {2, 1, Model::dim}));
  allocator.release(fork);  // blocks no other sequence holds return to the pool
  // [/snippet:single_layer]

  // An engine's own pool and tables, here built from the cache above (FlashMLA's k_cache,
  // block_table and cache_seqlens, copied to the host).
  daedalus::BlockTable table = allocator.block_table(std::span<const index_t>(&prompt, 1));
  const std::byte* pool_bytes = cache.pool_data();
  const index_t num_blocks = cache.num_blocks();
  const std::int32_t* block_table = table.table.data();
  const std::int32_t* cache_seqlens = table.seqlens.data();
  const index_t batch = table.batch();
  const index_t max_blocks = table.max_blocks;
  std::vector<float> q(std::size_t(batch * S::n_heads * S::latent_dim), 0.1f);
  std::vector<float> out_latent(std::size_t(batch * S::n_heads * S::kv_lora_rank));

  // [snippet:flashmla_view]
  // The absorbed core over any pool + block table + lengths; validate() checks every used table
  // entry against the pool before a kernel reads anything.
  const daedalus::PagedLatentView<Model, daedalus::bfloat16, 64> view{
      pool_bytes, num_blocks,
      HostView<const std::int32_t, 2>(block_table, {batch, max_blocks}),  // [batch, max_blocks]
      HostView<const std::int32_t, 1>(cache_seqlens, {batch})};           // [batch]
  mla::absorbed_attention(
      cpu, view, HostView<const float, 4>(q.data(), {batch, 1, S::n_heads, S::latent_dim}),
      mla::softmax_scale<Model>(),
      HostView<float, 4>(out_latent.data(), {batch, 1, S::n_heads, S::kv_lora_rank}));
  // [/snippet:flashmla_view]

  std::printf("mla_paged: prompt holds %lld tokens in %zu blocks; %lld of %lld blocks free\n",
              static_cast<long long>(allocator.length(prompt)), allocator.blocks(prompt).size(),
              static_cast<long long>(allocator.num_free_blocks()),
              static_cast<long long>(allocator.num_blocks()));
  return allocator.length(prompt) == tokens + 1 ? 0 : 1;
}
