// SPDX-License-Identifier: Apache-2.0
//
// Example 04: the MLA layers of a model decoding over paged caches, one reservation per step.
//
// A model's layers share one BlockAllocator: a block id is the same slot in every layer's pool,
// and the sequence lengths live in the allocator. Each step reserves its positions once
// (BlockAllocator::reserve: lengths advance once, blocks are taken once) and every layer writes
// exactly those positions with the absorbed decode. Four requests of different lengths are
// prefilled chunk by chunk, then decode together; the example checks that every length advanced
// by one per step (not once per layer) and times a step against one layer's decode on its own.
//
//   cmake --build --preset release --target example_multilayer_decode
//   ./build/release/example_multilayer_decode [layers]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#include "daedalus/daedalus.hpp"

namespace {

using Model = daedalus::DeepSeekV2Lite;  // dim 2048, 16 heads, kv_lora_rank 512, rope 64
using Storage = daedalus::bfloat16;
constexpr int kBlockSize = 64;
constexpr int kDim = Model::dim;
constexpr daedalus::index_t kSteps = 16;
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

}  // namespace

int main(int argc, char** argv) {
  namespace mla = daedalus::mla;
  using daedalus::HostView;
  using daedalus::index_t;

  const int layers = argc > 1 ? std::atoi(argv[1]) : 2;
  if (layers < 1) {
    std::fprintf(stderr, "usage: %s [layers >= 1]\n", argv[0]);
    return 2;
  }
  const daedalus::CpuBackend cpu;
  std::mt19937 rng(11);
  std::vector<mla::MlaWeights<Model>> weights;
  for (int l = 0; l < layers; ++l) weights.push_back(mla::MlaWeights<Model>::random(100 + l));

  // [doc:model-step]
  daedalus::BlockAllocator allocator = Cache::make_allocator(/*num_blocks=*/256);
  std::vector<Cache> caches;  // one pool per layer, all on the one allocator
  for (int l = 0; l < layers; ++l) caches.emplace_back(allocator);

  // Prefill: each prompt chunk is reserved once, then every layer runs over it.
  const std::vector<index_t> prompt_lengths = {700, 1500, 90, 1023};
  std::vector<index_t> seqs;
  for (const index_t length : prompt_lengths) {
    const index_t seq = allocator.add_sequence();
    seqs.push_back(seq);
    for (index_t done = 0; done < length; done += 512) {
      const index_t chunk = std::min<index_t>(512, length - done);
      const daedalus::SlotReservation slots = allocator.reserve(std::span(&seq, 1), chunk);
      std::vector<float> h = random_activations(std::size_t(chunk) * kDim, rng);
      std::vector<float> next(h.size());
      for (int l = 0; l < layers; ++l) {
        mla::prefill(cpu, weights[std::size_t(l)], caches[std::size_t(l)], slots,
                     HostView<const float, 2>(h.data(), {chunk, kDim}),
                     HostView<float, 2>(next.data(), {chunk, kDim}));
        std::swap(h, next);
      }
    }
  }

  // Decode: one reservation per step for the whole batch; every layer writes those positions.
  const index_t batch = index_t(seqs.size());
  std::vector<float> h(std::size_t(batch) * kDim), next(h.size());
  const auto decode_start = std::chrono::steady_clock::now();
  for (index_t step = 0; step < kSteps; ++step) {
    h = random_activations(h.size(), rng);
    const daedalus::SlotReservation slots = allocator.reserve(seqs, /*tokens=*/1);
    for (int l = 0; l < layers; ++l) {
      mla::decode(cpu, weights[std::size_t(l)], caches[std::size_t(l)], slots,
                  HostView<const float, 3>(h.data(), {batch, 1, kDim}),
                  HostView<float, 3>(next.data(), {batch, 1, kDim}));
      std::swap(h, next);
    }
  }
  // [/doc:model-step]
  const double step_s = seconds_since(decode_start) / double(kSteps);

  bool lengths_ok = true;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    const index_t length = allocator.length(seqs[b]);
    std::printf("sequence %lld: %lld tokens (prompt %lld + %lld decoded)\n",
                static_cast<long long>(seqs[b]), static_cast<long long>(length),
                static_cast<long long>(prompt_lengths[b]), static_cast<long long>(kSteps));
    lengths_ok = lengths_ok && length == prompt_lengths[b] + kSteps;
  }

  // One layer's decode on its own, over the same lengths (a one-pool allocator appends at the
  // length): a step of the model should cost `layers` times this.
  daedalus::BlockAllocator single_allocator = Cache::make_allocator(256);
  Cache single(single_allocator);
  std::vector<index_t> single_seqs;
  for (const index_t seq : seqs) {
    const index_t copy = single_allocator.add_sequence();
    const std::vector<float> rows = caches[0].rows(seq);
    single.write(copy, 0,
                 HostView<const float, 2>(rows.data(), {allocator.length(seq), Cache::latent_dim}));
    single_seqs.push_back(copy);
  }
  const auto layer_start = std::chrono::steady_clock::now();
  for (index_t step = 0; step < kSteps; ++step) {
    mla::decode(cpu, weights[0], single, std::span<const index_t>(single_seqs),
                HostView<const float, 3>(h.data(), {batch, 1, kDim}),
                HostView<float, 3>(next.data(), {batch, 1, kDim}));
  }
  const double layer_s = seconds_since(layer_start) / double(kSteps);

  std::printf(
      "%d layers, batch %lld, %d threads: %.2f ms per step, %.2f ms per layer "
      "(one layer's decode alone: %.2f ms)\n",
      layers, static_cast<long long>(batch), cpu.num_threads(), step_s * 1e3, step_s * 1e3 / layers,
      layer_s * 1e3);
  if (!lengths_ok) {
    std::printf("error: a sequence did not advance by exactly one token per step\n");
    return 1;
  }
  return 0;
}
