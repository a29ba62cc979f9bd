// SPDX-License-Identifier: Apache-2.0
// Snippets of README.md and docs/kv_cache.md: a model of several MLA layers over one paged latent
// cache (one BlockAllocator, one pool per layer), prefilled and decoded with one slot reservation
// per step that every layer writes. The docs show the code for any preset `Model`; this file runs
// it with daedalus::Tiny.
#include <cstdio>
#include <deque>
#include <utility>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  const int n_layers = 4;
  const int batch = 3;
  const daedalus::index_t prompt_tokens = 100;
  const int steps = 8;
  constexpr daedalus::index_t dim = Model::dim;

  // [snippet:tour]
  namespace mla = daedalus::mla;
  using daedalus::HostView;
  using daedalus::index_t;
  // bf16 rows: a -march=native build on a CPU with AVX512-BF16 reads them in place.
  using Cache = daedalus::PagedLatentCache<Model, daedalus::CpuBackend, daedalus::bfloat16, 64>;

  const daedalus::CpuBackend cpu;               // every hardware thread
  std::vector<mla::MlaWeights<Model>> weights;  // one per layer
  for (int l = 0; l < n_layers; ++l) weights.push_back(mla::MlaWeights<Model>::random(l));
  // One allocator for all layers, of the cache type's block size (stated once, above).
  daedalus::BlockAllocator allocator = Cache::make_allocator(/*num_blocks=*/1024);
  std::deque<Cache> caches;  // one pool per layer: block b is the same slot in each
  for (int l = 0; l < n_layers; ++l) caches.emplace_back(allocator);

  // Prefill: a prompt reserves its positions once; every layer writes exactly those.
  std::vector<index_t> seqs;
  std::vector<float> x(std::size_t(prompt_tokens * dim), 0.5f), y(x.size());  // [tokens, dim]
  for (int b = 0; b < batch; ++b) {
    const index_t seq[] = {allocator.add_sequence()};
    const daedalus::SlotReservation prompt = allocator.reserve(seq, prompt_tokens);
    for (int l = 0; l < n_layers; ++l) {
      mla::prefill(cpu, weights[l], caches[l], prompt,
                   HostView<const float, 2>(x.data(), {prompt_tokens, dim}),
                   HostView<float, 2>(y.data(), {prompt_tokens, dim}));
      std::swap(x, y);  // the rest of the decoder layer (norms, MLP or MoE) would go here
    }
    seqs.push_back(seq[0]);
  }

  // Decode: one reservation per step for the whole batch (each sequence's length advances once,
  // for all layers), then one batched absorbed-attention call per layer. Buffers are allocated
  // once, outside the loop.
  std::vector<float> h(std::size_t(batch) * dim, 0.25f), h_out(h.size());  // [batch, 1, dim]
  for (int step = 0; step < steps; ++step) {
    const daedalus::SlotReservation slots = allocator.reserve(seqs, /*tokens_per_sequence=*/1);
    for (int l = 0; l < n_layers; ++l) {
      mla::decode(cpu, weights[l], caches[l], slots,
                  HostView<const float, 3>(h.data(), {batch, 1, dim}),
                  HostView<float, 3>(h_out.data(), {batch, 1, dim}));
      std::swap(h, h_out);
    }
  }
  // [/snippet:tour]

  // [snippet:rewrite]
  // Rewrite the last two positions of every sequence (e.g. after speculative decoding rejected
  // drafted tokens): a reservation at explicit start positions, written by every layer.
  std::vector<index_t> starts;
  for (const index_t seq : seqs) starts.push_back(allocator.length(seq) - 2);
  const daedalus::SlotReservation redo = allocator.reserve(seqs, starts, /*tokens=*/2);
  std::vector<float> chunk(std::size_t(batch) * 2 * dim, 0.125f), chunk_out(chunk.size());
  for (int l = 0; l < n_layers; ++l) {
    mla::decode(cpu, weights[l], caches[l], redo,
                HostView<const float, 3>(chunk.data(), {batch, 2, dim}),  // [batch, 2, dim]
                HostView<float, 3>(chunk_out.data(), {batch, 2, dim}));
  }
  // [/snippet:rewrite]

  std::printf("paged_multilayer_decode: %d sequences of %lld tokens, %lld blocks used\n", batch,
              static_cast<long long>(allocator.length(seqs[0])),
              static_cast<long long>(allocator.num_used_blocks()));
  return allocator.length(seqs[0]) == prompt_tokens + steps ? 0 : 1;
}
