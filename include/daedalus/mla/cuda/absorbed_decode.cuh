// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"
#include "daedalus/mla/cuda/decode_kernels.cuh"

/// The absorbed MLA decode on the GPU: FlashMLA's computation (MQA over the cached latent rows,
/// heads and query tokens folded into the rows of one tile, split-KV merged by log-sum-exp, a
/// schedule computed on the device) on the tensor cores through mma.sync m16n8k16.
namespace daedalus::mla::cuda {

namespace detail {
struct DecodeLaunch;
}

/// Device scratch of absorbed_decode: the schedule and the partial results of split sequences.
/// Grows on demand (a cudaMalloc, which waits for the device, only when a call needs more than
/// any call before it); a steady decode loop allocates nothing. Use one per stream: a call on one
/// stream overwrites what a call on another may still be reading. Move-only.
class AbsorbedDecodeWorkspace {
 public:
  /// @param parts how many blocks of the attention grid share each tile of query rows, i.e. into
  ///              how many ranges the batch's key blocks are cut; 0 (the default) picks enough to
  ///              fill every SM of the current device. Tests pin it to force or forbid splits.
  /// @throws InvalidArgument for a negative `parts`.
  explicit AbsorbedDecodeWorkspace(int parts = 0) : parts_(parts) {
    daedalus::detail::require<InvalidArgument>(
        parts >= 0, "daedalus::mla::cuda::AbsorbedDecodeWorkspace: 'parts' is ", parts,
        "; expected 0 (fill the device) or a positive count");
  }

  [[nodiscard]] int parts() const noexcept { return parts_; }

  /// The number of pieces each batch entry was split into by the last call (0: no cached token,
  /// 1: not split). Copies from the device and waits for the backend's stream: for tests and
  /// diagnostics, not for a decode loop.
  [[nodiscard]] std::vector<std::int32_t> split_counts(const CudaBackend& backend) const {
    if (last_batch_ == 0) return {};
    std::vector<std::int32_t> schedule(detail::DecodeSchedule::ints(last_batch_));
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(schedule.data(), schedule_.data(),
                                        schedule.size() * sizeof(std::int32_t),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    backend.synchronize();
    const std::size_t first = 3 + 2 * std::size_t(last_batch_);
    return {schedule.begin() + std::ptrdiff_t(first), schedule.end()};
  }

 private:
  friend struct detail::DecodeLaunch;

  int parts_ = 0;
  int sm_count_ = 0;      // of the device current at the first call
  int shared_limit_ = 0;  // likewise: its opt-in shared memory per block
  int last_batch_ = 0;
  daedalus::cuda::DeviceBuffer<std::int32_t> schedule_;
  daedalus::cuda::DeviceBuffer<float> partial_out_;
  daedalus::cuda::DeviceBuffer<float> partial_lse_;
};

namespace detail {

/// The host side of one absorbed_decode call.
struct DecodeLaunch {
  /// Query rows per block: 64 when a sequence has that many (128 heads: 4 m-tiles share each key
  /// fragment in the value product), else the fewest 16-row tiles that hold them (16 heads and
  /// one token: 16 rows, the memory-bound case).
  static int row_tiles_for(int rows_per_seq) {
    if (rows_per_seq > 32) return 4;
    if (rows_per_seq > 16) return 2;
    return 1;
  }

  static int sm_count(AbsorbedDecodeWorkspace& workspace) {
    if (workspace.sm_count_ == 0) {
      int device = 0;
      DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
      int count = 0;
      DAEDALUS_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
      workspace.sm_count_ = std::max(1, count);
    }
    return workspace.sm_count_;
  }

  /// Dynamic shared memory one block may opt into on the current device.
  static int shared_limit(AbsorbedDecodeWorkspace& workspace) {
    if (workspace.shared_limit_ == 0) {
      int device = 0;
      DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
      int bytes = 0;
      DAEDALUS_CUDA_CHECK(
          cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      workspace.shared_limit_ = std::max(1, bytes);
    }
    return workspace.shared_limit_;
  }

  /// The double-buffered kernel where the shapes allow it and its shared memory fits the device
  /// (sm_90, and sm_80 up to 32 rows, for DeepSeek's 576), else the single-buffered one.
  template <class Element, int D, int V, int RowTiles, class Address>
  static void run(const CudaBackend& backend,
                  const daedalus::cuda::DeviceLatentBatch<Address>& cache, int q_len, int n_heads,
                  const float* q, float scale, float* out, AbsorbedDecodeWorkspace& workspace) {
    if constexpr (can_pipeline<D, V>) {
      if (DecodeShape<D, V, RowTiles, true>::shared_bytes <=
          static_cast<std::size_t>(shared_limit(workspace))) {
        run_shape<Element, D, V, RowTiles, true>(backend, cache, q_len, n_heads, q, scale, out,
                                                 workspace);
        return;
      }
    }
    run_shape<Element, D, V, RowTiles, false>(backend, cache, q_len, n_heads, q, scale, out,
                                              workspace);
  }

  template <class Element, int D, int V, int RowTiles, bool Pipelined, class Address>
  static void run_shape(const CudaBackend& backend,
                        const daedalus::cuda::DeviceLatentBatch<Address>& cache, int q_len,
                        int n_heads, const float* q, float scale, float* out,
                        AbsorbedDecodeWorkspace& workspace) {
    using Shape = DecodeShape<D, V, RowTiles, Pipelined>;
    const int batch = cache.batch;
    const int rows_per_seq = q_len * n_heads;
    const int row_tiles = (rows_per_seq + Shape::rows - 1) / Shape::rows;
    int parts = workspace.parts_;
    if (parts == 0) {
      // As many attention blocks as the SMs hold at once (the 16-row tile twice per SM, the
      // others once), shared among the row tiles.
      parts = std::max(1, sm_count(workspace) * Shape::blocks_per_sm / row_tiles);
    }
    // Each part touches at most two split entries (its first and its last), so the split pieces
    // number at most 2 · parts, whatever the batch.
    const std::size_t slots = 2 * std::size_t(parts);
    daedalus::cuda::grow(workspace.schedule_, DecodeSchedule::ints(batch));
    daedalus::cuda::grow(workspace.partial_out_, slots * std::size_t(rows_per_seq) * V);
    daedalus::cuda::grow(workspace.partial_lse_, slots * std::size_t(rows_per_seq));
    workspace.last_batch_ = batch;

    daedalus::cuda::launch(backend, {dim3(1), dim3(DecodeTiling::schedule_threads)},
                           &decode_schedule<>, cache.seqlens, batch, parts,
                           workspace.schedule_.data());
    DecodeAttentionParams<Address> params{cache,
                                          q,
                                          out,
                                          workspace.partial_out_.data(),
                                          workspace.partial_lse_.data(),
                                          workspace.schedule_.data(),
                                          q_len,
                                          n_heads,
                                          rows_per_seq,
                                          static_cast<float>(double(scale) * 1.4426950408889634)};
    daedalus::cuda::launch(backend,
                           {dim3(unsigned(parts), unsigned(row_tiles)), dim3(DecodeTiling::threads),
                            Shape::shared_bytes},
                           &decode_attention<Element, D, V, RowTiles, Pipelined, Address>, params);
    const DecodeCombineParams combine{out,
                                      workspace.partial_out_.data(),
                                      workspace.partial_lse_.data(),
                                      workspace.schedule_.data(),
                                      batch,
                                      rows_per_seq,
                                      V};
    const int chunks = (rows_per_seq + DecodeTiling::combine_rows - 1) / DecodeTiling::combine_rows;
    daedalus::cuda::launch(
        backend, {dim3(unsigned(batch), unsigned(chunks)), dim3(DecodeTiling::combine_rows * 32)},
        &decode_combine<>, combine);
  }
};

}  // namespace detail

/// The absorbed attention core of one decode step on the GPU (mla::absorbed_attention's
/// computation): for every batch entry b, n_heads × q_len query rows against the entry's cached
/// latent rows [c ; k_pe] (576 values for DeepSeek), the first kv_lora_rank of which are also the
/// value. Query i of entry b sits at position seqlens[b] - q_len + i and sees keys t ≤ that
/// position (bottom-right causal); a row that sees no key (an entry holding fewer tokens than
/// q_len, e.g. a zero-length padding entry) gets zeros. Varlen batches, any q_len ≥ 1.
///
/// How: a schedule kernel cuts the batch's 64-token key blocks into equal ranges, one per block of
/// the attention grid (FlashMLA's get_mla_metadata, here on the device: no host sync), so a
/// long single sequence spreads over every SM; the attention kernel runs an online softmax over
/// 64-key blocks staged in shared memory; a combine kernel merges the pieces of split entries by
/// log-sum-exp. Nothing is read outside rows [0, seqlens[b]) of each entry, and nothing is
/// written outside `out_latent` and the workspace.
///
/// Precision: the fp32 query rows are rounded to the storage type (bf16 or fp16) before the
/// tensor-core products, and so are the softmax probabilities before the value product;
/// accumulation and the softmax are fp32 (FlashMLA's bf16 kernels round the same way; each
/// product term carries at most one extra unit roundoff, 2^-8 for bf16, 2^-11 for fp16, on top
/// of the cache's own rounding). The softmax normalisation sums the rounded probabilities. An
/// fp16 query must stay below 65504 in magnitude.
///
/// No checks of the device data: lengths and block ids must be valid (validate_on_device, or a
/// cache that built them). The host-side checks below cost nothing on the device.
///
/// @tparam C       the MLA config (latent_dim = kv_lora_rank + qk_rope_head_dim, n_heads)
/// @tparam Storage bfloat16 or half: the pool's row format, LatentRowFormat<C, Storage>
/// @param cache      the device pool, row addressing (paged or contiguous) and lengths
/// @param q_len      query tokens per entry (1-2 in decode; more are masked causally)
/// @param q          device [batch, q_len, n_heads, latent_dim]: q_nope · W_UK then rotated q_pe
/// @param scale      the softmax scale (mla::softmax_scale<C>())
/// @param out_latent device [batch, q_len, n_heads, kv_lora_rank] out
/// @throws InvalidArgument (q_len < 1 or past 524280 / n_heads, a row size other than the
///         format's, a null pointer with a non-empty batch, a pool not on a 16-byte boundary),
///         CudaError
template <MlaConfig C, class Storage, class Address>
void absorbed_decode(const CudaBackend& backend,
                     const daedalus::cuda::DeviceLatentBatch<Address>& cache, int q_len,
                     const float* q, float scale, float* out_latent,
                     AbsorbedDecodeWorkspace& workspace) {
  static_assert(std::is_same_v<Storage, bfloat16> || std::is_same_v<Storage, half>,
                "daedalus::mla::cuda::absorbed_decode: device pools store bfloat16 or half rows "
                "(the tensor cores' 16-bit inputs); fp32 and fp8 pools are read by the CPU "
                "backend only");
  using S = MlaShape<C>;
  using Element = daedalus::cuda::device_storage_t<Storage>;
  using Format = LatentRowFormat<C, Storage>;
  constexpr std::string_view fn = "daedalus::mla::cuda::absorbed_decode";
  daedalus::detail::require<InvalidArgument>(q_len >= 1, fn, ": 'q_len' is ", q_len,
                                             "; expected at least 1");
  daedalus::detail::require<InvalidArgument>(cache.batch >= 0, fn, ": 'cache.batch' is ",
                                             cache.batch, "; expected at least 0");
  daedalus::detail::require<InvalidArgument>(
      cache.row_bytes == Format::row_bytes, fn, ": 'cache.row_bytes' is ", cache.row_bytes,
      "; expected ", Format::row_bytes, " (", S::latent_dim, " values of ", Format::name, ")");
  // The combine grid has one block per 8 folded rows in its y dimension (at most 65535).
  constexpr int max_rows = 65535 * detail::DecodeTiling::combine_rows;
  daedalus::detail::require<InvalidArgument>(
      q_len <= max_rows / S::n_heads, fn, ": 'q_len' is ", q_len, "; expected at most ",
      max_rows / S::n_heads, " (", max_rows, " query rows of ", S::n_heads, " heads per entry)");
  if (cache.batch == 0) return;
  daedalus::detail::require<InvalidArgument>(
      cache.seqlens != nullptr && q != nullptr && out_latent != nullptr, fn,
      ": 'cache.seqlens', 'q' and 'out_latent' must be device pointers; expected none null for a "
      "batch of ",
      cache.batch);
  // Key rows are copied 16 bytes at a time (cp.async): the pool must start on a 16-byte
  // boundary (cudaMalloc gives 256) when its rows are whole 16-byte chunks.
  daedalus::detail::require<InvalidArgument>(
      Format::row_bytes % 16 != 0 || reinterpret_cast<std::uintptr_t>(cache.pool) % 16 == 0, fn,
      ": 'cache.pool' is not 16-byte aligned; expected the start of a device allocation or a "
      "16-byte boundary in one");
  constexpr int D = S::latent_dim;
  constexpr int V = S::kv_lora_rank;
  const int rows_per_seq = q_len * S::n_heads;
  switch (detail::DecodeLaunch::row_tiles_for(rows_per_seq)) {
    case 1:
      detail::DecodeLaunch::run<Element, D, V, 1>(backend, cache, q_len, S::n_heads, q, scale,
                                                  out_latent, workspace);
      break;
    case 2:
      detail::DecodeLaunch::run<Element, D, V, 2>(backend, cache, q_len, S::n_heads, q, scale,
                                                  out_latent, workspace);
      break;
    default:
      detail::DecodeLaunch::run<Element, D, V, 4>(backend, cache, q_len, S::n_heads, q, scale,
                                                  out_latent, workspace);
      break;
  }
}

/// The device-side checks that PagedLatentView::validate makes on the host, for a view whose
/// tables live on the device: every length in [0, max_blocks · BlockSize], every block-table
/// entry a sequence uses (the first ceil(len / BlockSize) of its row) in [0, num_blocks). One
/// small kernel and one copy back (a host sync: the price of checking user input before any
/// kernel reads it; a cache that built its own tables needs none).
/// @throws InvalidArgument (extents, negative num_blocks, a null pool with used blocks) and
///         OutOfRange (the first bad entry, named exactly as the host check names it).
template <MlaConfig C, class Storage, int BS>
void validate_on_device(const CudaBackend& backend,
                        const PagedLatentView<C, Storage, BS, DeviceMemory>& view,
                        std::string_view caller) {
  using daedalus::detail::require;
  view.validate(caller);  // the checks that need no device data (extents, num_blocks)
  const index_t batch = view.batch();
  const index_t max_blocks = view.max_blocks();
  if (batch == 0) return;
  // The calling thread's scratch word, not a buffer per call: cudaFree would wait for the whole
  // device. It is free again once this function has synchronised the stream below.
  auto* result = daedalus::cuda::thread_scratch<detail::PagedCheckResult>(1);
  DAEDALUS_CUDA_CHECK(cudaMemsetAsync(result, 0xFF, sizeof(unsigned long long), backend.stream()));
  DAEDALUS_CUDA_CHECK(
      cudaMemsetAsync(reinterpret_cast<unsigned char*>(result) + sizeof(unsigned long long), 0,
                      sizeof(unsigned long long), backend.stream()));
  constexpr int threads = 128;
  daedalus::cuda::launch(backend, {dim3(unsigned((batch + threads - 1) / threads)), dim3(threads)},
                         &detail::paged_view_check<>, view.cache_seqlens.data(),
                         view.block_table.data(), int(batch), int(max_blocks), BS,
                         static_cast<long long>(view.num_blocks), result);
  detail::PagedCheckResult host{};
  DAEDALUS_CUDA_CHECK(
      cudaMemcpyAsync(&host, result, sizeof(host), cudaMemcpyDeviceToHost, backend.stream()));
  backend.synchronize();
  if (host.first_bad != ~0ull) {
    const index_t b = index_t(host.first_bad / (unsigned long long)(max_blocks + 1));
    const index_t which = index_t(host.first_bad % (unsigned long long)(max_blocks + 1));
    std::int32_t len = 0;
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&len, view.cache_seqlens.data() + b, sizeof(len),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    std::int32_t block = 0;
    if (which > 0) {
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&block,
                                          view.block_table.data() + b * max_blocks + (which - 1),
                                          sizeof(block), cudaMemcpyDeviceToHost, backend.stream()));
    }
    backend.synchronize();
    // The host check's messages, word for word (PagedLatentView::validate).
    if (which == 0) {
      require<OutOfRange>(false, caller, ": 'cache_seqlens[", b, "]' is ", len,
                          "; expected a length in [0, ", max_blocks * BS, "] (max_blocks ",
                          max_blocks, " x block size ", BS, ")");
    }
    const index_t used = (index_t(len) + BS - 1) / BS;
    require<OutOfRange>(false, caller, ": 'block_table[", b, ",", which - 1, "]' is ", block,
                        "; expected a block id in [0, ", view.num_blocks, ") (sequence ", b,
                        " holds ", len, " tokens, so its first ", used, " entries are used)");
  }
  require<InvalidArgument>(host.any_used == 0 || view.pool != nullptr, caller,
                           ": 'pool' is null; expected ", view.num_blocks, " blocks of ", BS,
                           " rows of ", view.row_bytes, " bytes");
}

}  // namespace daedalus::mla::cuda
