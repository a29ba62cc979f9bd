// SPDX-License-Identifier: Apache-2.0
//
// GPU benchmarks of daedalus's absorbed MLA decode kernel (Google Benchmark, CUDA events).
//
// - BM_copy_bandwidth, BM_cublas_bf16_gemm: the memory and matrix roofs (bench_support.cuh) that
//   copy_bw_fraction and gemm_fraction divide by.
// - BM_mla_decode<Config>/batch:B/ctx:T/q_len:Q[/varlen]: mla::cuda::absorbed_decode over a bf16
//   paged pool ([blocks, 64, 576], FlashMLA's layout) of random rows, each batch entry's blocks
//   drawn from a shuffled permutation of the pool. FlashMLA's grid: batch 1/16/64/128, context
//   4K/16K, DeepSeek-V3 (128 heads) and DeepSeek-V2-Lite (16 heads), 1 and 2 query tokens, and
//   varlen batches whose lengths are drawn uniformly in [T/2, 3T/2] (sequence_lengths below; the
//   PyTorch baseline bench/gpu/torch_mla_decode.py draws the same lengths).
//
// Counters of the decode rows:
//   bytes          bytes one call must move: every cached latent row read once (576 bf16 values)
//                  plus the fp32 queries read and the fp32 latent outputs written
//   bytes/s        bytes over the measured time of one call
//   FLOP/s         Σ_b 2 · q_len · heads · seqlen_b · (576 + 512) per call (q·Kᵀ over the 576-wide
//                  latent, P·V over its first 512 columns; FlashMLA's count) over the time
//   copy_bw_fraction  bytes/s over the copy bandwidth measured at start in this process
//   gemm_fraction     FLOP/s over the bf16 GEMM rate measured at start in this process
//   heads, batch, ctx, q_len, varlen: the shape, for bench/gpu/table.py
// The two roofs (BM_copy_bandwidth, BM_cublas_bf16_gemm; bench_support.cuh) are measured once when
// the binary starts (before any benchmark, whatever the filter) and written into the JSON context
// as copy_bytes_per_second and gemm_flops_per_second.
//
// Timing: each iteration flushes the L2 cache (a memset of max(256 MiB, 2 · L2) outside the
// timed region: the pools of the small shapes would otherwise be read from L2, as Triton's
// do_bench does), then times one call between two CUDA events (UseManualTime). Two untimed calls
// warm up first; the first one also checks that every output value was written and is finite
// (the output is poisoned with NaN before it). Each run is DAEDALUS_BENCH_ITERATIONS calls
// (default 10); pass --benchmark_repetitions=N and read the median aggregate.
//
// Names containing "Tiny" run tiny shapes (CI's smoke convention). Without a CUDA device the
// binary says so and exits 0, so a smoke call on a machine without a GPU is harmless; listing
// (--benchmark_list_tests) works without one.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <daedalus/cuda.cuh>
#include <exception>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "bench_support.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/mla/cuda/absorbed_decode.cuh"

namespace {

using namespace daedalus;  // so template arguments print as "DeepSeekV3"
using daedalus::bench::Bf16;
namespace dcuda = daedalus::cuda;

constexpr int kBlockSize = 64;  // FlashMLA's page size
constexpr int kLatentDim = MlaShape<DeepSeekV3>::latent_dim;
constexpr int kRank = MlaShape<DeepSeekV3>::kv_lora_rank;
static_assert(MlaShape<DeepSeekV2Lite>::latent_dim == kLatentDim &&
                  MlaShape<DeepSeekV2Lite>::kv_lora_rank == kRank,
              "the benchmarks share one pool of latent rows between DeepSeek-V3 and V2-Lite");
constexpr std::size_t kRowBytes = std::size_t(kLatentDim) * sizeof(Bf16);

// --------------------------------------------------------------------------------------------
// Process-wide device state, created on first use (never without a device).

/// The pool of random bf16 latent rows that every decode row reads, grown (and redrawn) to at
/// least `blocks` blocks; [pool_blocks, kBlockSize, kLatentDim].
struct LatentPool {
  dcuda::DeviceBuffer<Bf16> rows;
  std::int64_t blocks = 0;

  const Bf16* at_least(const CudaBackend& backend, std::int64_t wanted) {
    if (wanted > blocks) {
      rows = dcuda::DeviceBuffer<Bf16>();  // free first: the pool is gigabytes
      const std::size_t count = std::size_t(wanted) * kBlockSize * kLatentDim;
      rows = dcuda::DeviceBuffer<Bf16>(count);
      daedalus::bench::fill_random(backend, rows.data(), count, 0x5eed0001);
      blocks = wanted;
    }
    return rows.data();
  }
};

LatentPool& latent_pool() {
  static LatentPool pool;
  return pool;
}

// --------------------------------------------------------------------------------------------
// The decode benchmarks

struct DecodeShape {
  int batch;
  int ctx;  // every entry's length, or the mean length when varlen
  int q_len;
  bool varlen;
};

/// Cached tokens of each batch entry: `ctx`, or for varlen ctx/2 + (splitmix64(b) mod (ctx+1)),
/// uniform in [ctx/2, 3·ctx/2] around the mean (bench/gpu/torch_mla_decode.py: the same lengths).
std::vector<std::int32_t> sequence_lengths(const DecodeShape& shape) {
  std::vector<std::int32_t> lengths(std::size_t(shape.batch), shape.ctx);
  if (shape.varlen) {
    for (int b = 0; b < shape.batch; ++b) {
      const std::uint64_t draw =
          daedalus::bench::splitmix64(std::uint64_t(b)) % std::uint64_t(shape.ctx + 1);
      lengths[std::size_t(b)] = std::max(shape.ctx / 2 + std::int32_t(draw), shape.q_len);
    }
  }
  return lengths;
}

/// A block table [batch, max_blocks] giving each entry its blocks from a shuffled permutation of
/// all `pool_blocks` blocks of the pool (entries past an entry's length hold block 0, never read).
std::vector<std::int32_t> shuffled_block_table(const std::vector<std::int32_t>& lengths,
                                               std::int64_t pool_blocks, int max_blocks,
                                               std::uint64_t seed) {
  std::vector<std::int32_t> permutation(std::size_t(pool_blocks), 0);
  std::iota(permutation.begin(), permutation.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(permutation.begin(), permutation.end(), rng);
  std::vector<std::int32_t> table(lengths.size() * std::size_t(max_blocks), 0);
  std::size_t next = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    const int used = (lengths[b] + kBlockSize - 1) / kBlockSize;
    for (int j = 0; j < used; ++j)
      table[b * std::size_t(max_blocks) + std::size_t(j)] = permutation[next++];
  }
  return table;
}

template <class C>
void BM_mla_decode(benchmark::State& state, DecodeShape shape) {
  using S = MlaShape<C>;
  try {
    daedalus::bench::BenchDevice& dev = daedalus::bench::bench_device();
    const std::vector<std::int32_t> lengths = sequence_lengths(shape);
    int max_blocks = 0;
    std::int64_t needed_blocks = 0;
    double rows_read = 0.0;
    for (const std::int32_t length : lengths) {
      const int blocks = (length + kBlockSize - 1) / kBlockSize;
      max_blocks = std::max(max_blocks, blocks);
      needed_blocks += blocks;
      rows_read += double(length);
    }
    LatentPool& pool_state = latent_pool();
    const Bf16* pool = pool_state.at_least(dev.backend, needed_blocks);
    const std::vector<std::int32_t> table = shuffled_block_table(
        lengths, pool_state.blocks, max_blocks, 0x5eed0100 + std::uint64_t(shape.batch));

    const std::size_t q_count =
        std::size_t(shape.batch) * std::size_t(shape.q_len) * S::n_heads * S::latent_dim;
    const std::size_t out_count =
        std::size_t(shape.batch) * std::size_t(shape.q_len) * S::n_heads * S::kv_lora_rank;
    dcuda::DeviceBuffer<std::int32_t> device_table =
        dcuda::to_device(dev.backend, std::span<const std::int32_t>(table));
    dcuda::DeviceBuffer<std::int32_t> device_lengths =
        dcuda::to_device(dev.backend, std::span<const std::int32_t>(lengths));
    dcuda::DeviceBuffer<float> q(q_count), out(out_count);
    daedalus::bench::fill_random(dev.backend, q.data(), q_count, 0x5eed0200);

    const dcuda::DeviceLatentBatch<dcuda::PagedRowAddress> cache{
        reinterpret_cast<const std::byte*>(pool), kRowBytes,
        dcuda::PagedRowAddress{device_table.data(), max_blocks, kBlockSize}, device_lengths.data(),
        shape.batch};
    mla::cuda::AbsorbedDecodeWorkspace workspace;
    const float scale = float(mla::softmax_scale<C>());
    const auto call = [&] {
      mla::cuda::absorbed_decode<C, bfloat16>(dev.backend, cache, shape.q_len, q.data(), scale,
                                              out.data(), workspace);
    };

    // Warm-up; the first call's output must be complete and finite.
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xff, out.bytes(), dev.stream.get()));
    call();
    const std::int64_t bad = daedalus::bench::first_non_finite(dcuda::to_host(dev.backend, out));
    if (bad >= 0) {
      state.SkipWithError(
          ("absorbed_decode left output value " + std::to_string(bad) + " unwritten or non-finite")
              .c_str());
      return;
    }
    const double seconds = daedalus::bench::time_flushed_calls(state, dev, call);

    const double calls = double(state.iterations());
    const double bytes =
        rows_read * double(kRowBytes) + double(q_count + out_count) * double(sizeof(float));
    const double flops =
        2.0 * shape.q_len * S::n_heads * rows_read * (S::latent_dim + S::kv_lora_rank);
    const double bytes_per_second = seconds > 0 ? bytes * calls / seconds : 0.0;
    const double flops_per_second = seconds > 0 ? flops * calls / seconds : 0.0;
    state.counters["bytes"] = bytes;
    state.counters["bytes/s"] = bytes_per_second;
    state.counters["FLOP/s"] = flops_per_second;
    state.counters["copy_bw_fraction"] =
        dev.copy_bytes_per_second > 0 ? bytes_per_second / dev.copy_bytes_per_second : 0.0;
    state.counters["gemm_fraction"] =
        dev.gemm_flops_per_second > 0 ? flops_per_second / dev.gemm_flops_per_second : 0.0;
    state.counters["heads"] = S::n_heads;
    state.counters["batch"] = shape.batch;
    state.counters["ctx"] = shape.ctx;
    state.counters["q_len"] = shape.q_len;
    state.counters["varlen"] = shape.varlen ? 1 : 0;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

template <class C>
void register_decode(const char* config, const DecodeShape& shape, bool tiny) {
  std::string name = std::string(tiny ? "BM_mla_decode_Tiny<" : "BM_mla_decode<") + config +
                     ">/batch:" + std::to_string(shape.batch) +
                     "/ctx:" + std::to_string(shape.ctx) + "/q_len:" + std::to_string(shape.q_len) +
                     (shape.varlen ? "/varlen" : "");
  daedalus::bench::register_timed(name, &BM_mla_decode<C>, shape);
}

void register_benchmarks() {
  daedalus::bench::register_roof_benchmarks();

  // Tiny: a few hundred tokens, lengths off the 64-token block size.
  register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {3, 300, 1, false}, true);
  register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {3, 300, 2, true}, true);
  register_decode<DeepSeekV3>("DeepSeekV3", {2, 130, 2, false}, true);

  // FlashMLA's grid.
  for (const int ctx : {4096, 16384}) {
    for (const int batch : {1, 16, 64, 128}) {
      for (const int q_len : {1, 2}) {
        register_decode<DeepSeekV3>("DeepSeekV3", {batch, ctx, q_len, false}, false);
        register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {batch, ctx, q_len, false}, false);
      }
    }
    for (const int batch : {64, 128}) {
      register_decode<DeepSeekV3>("DeepSeekV3", {batch, ctx, 1, true}, false);
      register_decode<DeepSeekV2Lite>("DeepSeekV2Lite", {batch, ctx, 1, true}, false);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return daedalus::bench::run_benchmarks("bench_cuda_mla_decode", argc, argv, register_benchmarks);
}
