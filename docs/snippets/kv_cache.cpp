// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/kv_cache.md: the paged latent cache containers used directly (one allocator,
// a pool per layer, fork, copy on write, truncate, release, the FlashMLA view), and the memory
// report and pool sizing. The containers are shown for any preset `Model`; this file runs them
// with daedalus::Tiny.
#include <cstdio>
#include <deque>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  using daedalus::HostView;
  using daedalus::index_t;
  constexpr index_t kLatent = daedalus::MlaShape<Model>::latent_dim;  // kv_lora_rank + rope
  const std::vector<float> prompt_rows(100 * kLatent, 0.5f);
  const std::vector<float> token_row(kLatent, 0.25f);

  // [snippet:containers]
  using Layer = daedalus::PagedLatentCache<Model, daedalus::CpuBackend, daedalus::bfloat16, 64>;
  daedalus::BlockAllocator allocator(/*num_blocks=*/1024, /*block_size=*/64);  // all layers
  std::deque<Layer> layers;  // one pool per layer, [1024, 64, row_bytes] bytes each
  for (int l = 0; l < 4; ++l) layers.emplace_back(allocator);

  // Rows are fp32 [n, kv_lora_rank + rope], rounded to the pool's storage type. Every layer
  // writes the same positions; the length lives in the allocator.
  const index_t prompt = allocator.add_sequence();
  for (Layer& layer : layers)
    layer.write(prompt, /*start_pos=*/0,
                HostView<const float, 2>(prompt_rows.data(), {100, kLatent}));

  const index_t request = allocator.fork(prompt);  // shares both blocks (a block table copy)
  // The fork's first write lands in the shared partial block (rows 64..99): the allocator copies
  // that block first, in every registered pool, then each layer writes its row.
  const index_t pos = allocator.length(request);
  for (Layer& layer : layers)
    layer.write(request, pos, HostView<const float, 2>(token_row.data(), {1, kLatent}));

  daedalus::BlockTable table;  // reused every step: FlashMLA's block_table and cache_seqlens
  const index_t batch[] = {prompt, request};
  const auto view = layers[0].view(batch, table);  // PagedLatentView: what the kernels read

  allocator.truncate(request, 64);  // drops rows 64.. and the request's own block
  allocator.release(request);       // blocks no other sequence holds go back to the free list
  // [/snippet:containers]

  // [snippet:memory]
  // Bytes per token per layer of every storage type, against MHA and GQA-8 of the same heads.
  std::printf("%s", daedalus::kv_memory_table<daedalus::DeepSeekV3>().c_str());
  // How many 64-token blocks fit 80 GiB when one block id costs all 61 layers' blocks.
  const auto sizing =
      daedalus::pool_sizing<daedalus::DeepSeekV3, daedalus::bfloat16, 64>(std::size_t(80) << 30);
  std::printf("%lld blocks, %lld tokens\n", static_cast<long long>(sizing.num_blocks),
              static_cast<long long>(sizing.tokens));
  // [/snippet:memory]

  std::printf("kv_cache: view of %lld sequences, %lld of %lld blocks free\n",
              static_cast<long long>(view.batch()),
              static_cast<long long>(allocator.num_free_blocks()),
              static_cast<long long>(allocator.num_blocks()));
  return sizing.num_blocks == 19099 && allocator.num_used_blocks() == 2 ? 0 : 1;
}
