// SPDX-License-Identifier: Apache-2.0
//
// Example 03: a paged latent KV cache shared by 16 concurrent requests.
//
// Sixteen requests start with the same 1,000-token system prompt. The prompt is prefilled once
// into one sequence; each request forks it (prefix sharing: the forks list the prompt's blocks
// instead of copying them) and then the requests decode in turn, one token each per round,
// through one DeepSeek-V2-Lite MLA layer with random weights. At the end the example prints how
// many blocks the pool used, against what the same requests take without prefix sharing
// (measured: a second pool where every request holds its own copy of the prompt), and the
// memory against MHA and GQA-8 caches of the same heads.
//
//   cmake --workflow --preset example && ./build/release/example_paged_cache

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::DeepSeekV2Lite;  // dim 2048, 16 heads, kv_lora_rank 512, rope 64
using Storage = daedalus::bfloat16;      // float, half or daedalus::Fp8E4m3Latent work too
constexpr int kBlockSize = 64;           // tokens per block, as FlashMLA
constexpr daedalus::index_t kPrompt = 1000;
constexpr daedalus::index_t kRequests = 16;
constexpr daedalus::index_t kGenerate = 32;  // tokens each request decodes
constexpr int kDim = Model::dim;
using Cache = daedalus::PagedLatentCache<Model, daedalus::CpuBackend, Storage, kBlockSize>;

std::vector<float> random_activations(std::size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

}  // namespace

int main() {
  namespace mla = daedalus::mla;
  using daedalus::HostView;
  using daedalus::index_t;

  const daedalus::CpuBackend cpu;
  const auto weights = mla::MlaWeights<Model>::random(/*seed=*/42);
  std::mt19937 rng(7);

  // The pool, sized from a memory budget: 16 MiB for this one layer (a model would pass its
  // n_layers; one block id then costs that many layers' blocks).
  const auto sizing = daedalus::pool_sizing<Model, Storage, kBlockSize>(16u << 20, /*n_layers=*/1);
  daedalus::BlockAllocator allocator(sizing.num_blocks, kBlockSize);
  Cache cache(allocator);
  std::printf(
      "%s MLA layer, %s cache, %d threads: pool of %lld blocks of %d tokens (%.1f MiB "
      "of a 16 MiB budget)\n",
      Model::name, Cache::format::name, cpu.num_threads(),
      static_cast<long long>(sizing.num_blocks), kBlockSize, mib(double(sizing.bytes)));

  // 1. The system prompt, prefilled once.
  const index_t prompt_seq = allocator.add_sequence();
  const std::vector<float> prompt = random_activations(std::size_t(kPrompt) * kDim, rng);
  std::vector<float> prompt_out(prompt.size());
  auto start = std::chrono::steady_clock::now();
  mla::prefill(cpu, weights, cache, prompt_seq, /*start_pos=*/0,
               HostView<const float, 2>(prompt.data(), {kPrompt, kDim}),
               HostView<float, 2>(prompt_out.data(), {kPrompt, kDim}));
  const double prefill_s = seconds_since(start);
  std::printf("prefill of the %lld-token system prompt: %.0f ms, %lld blocks\n",
              static_cast<long long>(kPrompt), prefill_s * 1e3,
              static_cast<long long>(allocator.num_used_blocks()));

  // 2. Sixteen requests fork the prompt: no block is copied yet.
  std::vector<index_t> requests;
  for (index_t r = 0; r < kRequests; ++r) requests.push_back(allocator.fork(prompt_seq));
  std::printf("after %lld forks: %lld blocks used (the prompt's blocks are shared %lld ways)\n",
              static_cast<long long>(kRequests),
              static_cast<long long>(allocator.num_used_blocks()),
              static_cast<long long>(allocator.ref_count(allocator.blocks(prompt_seq)[0])));

  // 3. The requests decode in turn, one token each per round. The first token of each request
  //    lands in the prompt's partial last block (1,000 = 15·64 + 40): that block is copied for
  //    the request first (copy on write); later tokens fill it and then fresh blocks.
  std::vector<float> out(kDim);
  start = std::chrono::steady_clock::now();
  for (index_t step = 0; step < kGenerate; ++step) {
    for (const index_t request : requests) {
      const std::vector<float> x = random_activations(kDim, rng);
      mla::decode(cpu, weights, cache, std::span<const index_t>(&request, 1),
                  HostView<const float, 3>(x.data(), {1, 1, kDim}),
                  HostView<float, 3>(out.data(), {1, 1, kDim}));
    }
  }
  const double decode_s = seconds_since(start);
  std::printf("decode: %lld rounds x %lld requests in %.0f ms, %.0f tokens/s\n",
              static_cast<long long>(kGenerate), static_cast<long long>(kRequests), decode_s * 1e3,
              double(kGenerate * kRequests) / decode_s);

  // 4. The same requests without prefix sharing: each holds its own copy of its rows (copied
  //    from the shared pool; re-encoding a stored value is exact, so the rows are identical).
  daedalus::BlockAllocator unshared_allocator(
      kRequests * allocator.blocks_for(kPrompt + kGenerate) + allocator.blocks_for(kPrompt),
      kBlockSize);
  Cache unshared(unshared_allocator);
  index_t tokens_held = 0;
  for (const index_t seq : allocator.sequences()) {
    const std::vector<float> rows = cache.rows(seq);
    const index_t copy = unshared_allocator.add_sequence();
    unshared.append(copy,
                    HostView<const float, 2>(rows.data(), {cache.length(seq), Cache::latent_dim}));
    if (unshared.rows(copy) != rows) {
      std::printf("error: a copied sequence does not read back identically\n");
      return 1;
    }
    tokens_held += cache.length(seq);
  }

  const index_t shared_blocks = allocator.num_used_blocks();
  const index_t unshared_blocks = unshared_allocator.num_used_blocks();
  std::printf("\nblocks used for %lld requests of %lld + %lld tokens (and the prompt itself):\n",
              static_cast<long long>(kRequests), static_cast<long long>(kPrompt),
              static_cast<long long>(kGenerate));
  std::printf("  with prefix sharing    %5lld blocks, %7.2f MiB per layer\n",
              static_cast<long long>(shared_blocks),
              mib(double(shared_blocks) * Cache::block_bytes));
  std::printf("  without prefix sharing %5lld blocks, %7.2f MiB per layer (%.1fx)\n",
              static_cast<long long>(unshared_blocks),
              mib(double(unshared_blocks) * Cache::block_bytes),
              double(unshared_blocks) / double(shared_blocks));

  // 5. Against MHA and GQA-8 caches of the same heads and storage, holding the same tokens
  //    (without sharing, as those caches are usually run; DeepSeek-V2 paper, section 2.1.4).
  const daedalus::KvMemoryRow row = daedalus::kv_memory_row<Model, Storage>();
  std::printf("\n%lld tokens held per layer:\n", static_cast<long long>(tokens_held));
  std::printf("  MHA   %8.2f MiB (%zu B/token)\n", mib(double(tokens_held) * double(row.mha)),
              row.mha);
  std::printf("  GQA-8 %8.2f MiB (%zu B/token)\n", mib(double(tokens_held) * double(row.gqa8)),
              row.gqa8);
  std::printf("  MLA   %8.2f MiB (%zu B/token, unshared blocks)\n",
              mib(double(unshared_blocks) * Cache::block_bytes), row.mla);
  std::printf("  MLA   %8.2f MiB (shared blocks): %.0fx less than MHA\n",
              mib(double(shared_blocks) * Cache::block_bytes),
              double(tokens_held) * double(row.mha) / (double(shared_blocks) * Cache::block_bytes));
  std::printf("\nbytes per token per layer, every storage type:\n%s",
              daedalus::kv_memory_table<Model>().c_str());

  // 6. Every block goes back to the pool when the requests end.
  for (const index_t seq : allocator.sequences()) allocator.release(seq);
  std::printf("\nafter releasing every sequence: %lld of %lld blocks free\n",
              static_cast<long long>(allocator.num_free_blocks()),
              static_cast<long long>(allocator.num_blocks()));
  double sum = 0.0;
  for (const float v : out) sum += v;
  std::printf("checksum of the last output: %.6f\n", sum);
  return 0;
}
