// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/paged.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/mla/rope.hpp"
#include "daedalus/mla/weights.hpp"

/// Multi-head Latent Attention (DeepSeek-V2 paper, arXiv 2405.04434, section 2.1; DeepSeek-V3
/// reference inference/model.py `MLA.forward`). The front validates every argument, then hands
/// the work to `detail::MlaImpl<C, Backend>`, which each backend folder specialises.
///
/// The same functions serve every backend. Arguments live in the backend's memory space: host
/// views, `MlaWeights<C>` and host caches with CpuBackend; device views, `DeviceMlaWeights<C>`
/// (mla/cuda/weights.cuh) and device caches with CudaBackend. A `Weights` argument is any type
/// with `config` (its MlaConfig) and `memory_space`; the front checks both at compile time.
namespace daedalus::mla {

/// How attention over the latent cache is computed. Both give the same result up to rounding.
enum class AttentionMode {
  /// Up-project every cached latent through wkv_b into per-head keys and values, then ordinary
  /// attention with d_qk = nope + rope, d_v = v_head_dim. Cheaper for long query chunks
  /// (prefill), as vLLM and ik_llama.cpp do.
  naive,
  /// Absorb W_UK into the query and W_UV into the output, and attend directly over the
  /// kv_lora_rank + rope latent: multi-query attention with 576-wide keys whose first 512
  /// columns are the values (FlashMLA's form). What decode must use.
  absorbed,
};

namespace detail {

template <class...>
inline constexpr bool dependent_false = false;

/// The backend's implementation of MLA. Backends specialise it in their own folder
/// (`mla/cpu/attention.hpp`, `mla/cuda/attention.cuh`).
template <MlaConfig C, class Backend>
struct MlaImpl {
  static_assert(dependent_false<C, Backend>,
                "daedalus::mla: no MLA implementation for this backend is visible: include "
                "<daedalus/daedalus.hpp> for CpuBackend, or <daedalus/cuda.cuh> in a .cu file "
                "for CudaBackend");
};

/// Throws NumericError naming the first non-finite value of `count` host values, by row and
/// column of rows `row_width` wide (the CPU backend's finiteness check; MlaImpl::require_finite
/// is what the fronts call).
inline void require_finite(std::string_view function, std::string_view argument, const float* data,
                           index_t count, index_t row_width) {
  for (index_t i = 0; i < count; ++i) {
    if (!std::isfinite(data[i])) {
      throw NumericError(daedalus::detail::message(
          function, ": '", argument, "' holds a non-finite value (", data[i], ") at row ",
          i / row_width, ", column ", i % row_width));
    }
  }
}

/// Every entry of `seqs` names a sequence of the contiguous `cache` that already holds at least
/// q_len tokens (the query tokens are cached before they attend).
template <class Cache>
void require_cached_queries(std::string_view function, const Cache& cache,
                            std::span<const index_t> seqs, index_t q_len) {
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    daedalus::detail::require<OutOfRange>(
        seqs[b] >= 0 && seqs[b] < cache.num_sequences(), function, ": 'seqs[", b, "]' is ", seqs[b],
        "; expected a sequence id in [0, ", cache.num_sequences(), ")");
    daedalus::detail::require<OutOfRange>(cache.length(seqs[b]) >= q_len, function, ": sequence ",
                                          seqs[b], " holds ", cache.length(seqs[b]),
                                          " tokens; expected at least ", "q_len = ", q_len,
                                          " (the cache must already hold the query tokens)");
  }
}

/// A decode batch names each sequence once: two entries would write the same cache slots.
inline void require_distinct_sequences(std::string_view function, std::span<const index_t> seqs) {
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    for (std::size_t other = 0; other < b; ++other) {
      daedalus::detail::require<InvalidArgument>(
          seqs[other] != seqs[b], function, ": 'seqs' names sequence ", seqs[b], " twice (entries ",
          other, " and ", b, "); expected distinct ids");
    }
  }
}

/// A layer's weights as the fronts take them: MlaWeights<C> (host) or DeviceMlaWeights<C, T>
/// (device), or any type that names its config and where it lives.
template <class W>
concept LayerWeights = requires {
  typename W::config;
  typename W::memory_space;
}
&&MlaConfig<typename W::config>;

/// The weights can be read by the backend and belong to the config of the cache (or views).
template <class Backend, class Weights, class C>
constexpr void require_weights() {
  static_assert(std::is_same_v<typename Weights::memory_space, typename Backend::memory_space>,
                "daedalus::mla: the weights live in a memory space this backend cannot read: pass "
                "mla::MlaWeights<C> with CpuBackend and mla::DeviceMlaWeights<C> (uploaded once "
                "from the MlaWeights) with CudaBackend");
  static_assert(std::is_same_v<typename Weights::config, C>,
                "daedalus::mla: the weights are of another MlaConfig than the cache");
}

}  // namespace detail

/// The query and latent projections of one chunk (MLA.forward steps 1-3):
/// q = wq_b(rmsnorm(wq_a x)) or wq x, its rotary part q_pe rotated; kv = wkv_a x, its latent
/// part RMS-normed with kv_norm and its shared k_pe rotated. Token i sits at start_pos + i.
///
/// @param x      [tokens, dim]
/// @param q      [tokens, n_heads, qk_head_dim] out: q_nope then rotated q_pe per head
/// @param latent [tokens, kv_lora_rank + rope] out: the rows the cache stores
/// @throws InvalidArgument for wrong extents, OutOfRange for start_pos < 0,
///         NumericError for non-finite x
template <class Backend, detail::LayerWeights Weights>
void project(const Backend& backend, const Weights& weights, index_t start_pos,
             TensorView<const float, 2, typename Backend::memory_space> x,
             TensorView<float, 3, typename Backend::memory_space> q,
             TensorView<float, 2, typename Backend::memory_space> latent) {
  using C = typename Weights::config;
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::project";
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, S::dim});
  daedalus::detail::check_extents(fn, "q", q, {tokens, S::n_heads, S::qk_head_dim});
  daedalus::detail::check_extents(fn, "latent", latent, {tokens, S::latent_dim});
  daedalus::detail::require<OutOfRange>(start_pos >= 0, fn, ": 'start_pos' is ", start_pos,
                                        "; expected at least 0");
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::MlaImpl<C, Backend>::project(backend, weights, start_pos, x, q, latent);
}

/// The absorbed attention core over a latent cache: FlashMLA's MQA form, with
/// n_heads × q_len query rows per sequence and one 576-wide key per cached token whose first
/// kv_lora_rank columns are also the value. The cache must already hold the query tokens: query
/// i of sequence b sits at position length(b) - q_len + i and sees keys t ≤ that position
/// (bottom-right causal). Sequences may have any lengths (varlen batch).
///
/// Precision: with an fp32 cache everything is fp32. With a bf16 cache on a CPU with
/// AVX512-BF16 the query rows and the softmax probabilities are rounded to bf16 before their
/// dot products (accumulation stays fp32), as FlashMLA's bf16 kernels do; each product term then
/// carries at most 2^-8 relative rounding on top of the cache's own. Without AVX512-BF16 the
/// bf16 rows are widened and the fp32 kernels run.
///
/// @param seqs       [batch] cache sequence ids
/// @param q          [batch, q_len, n_heads, kv_lora_rank + rope]: q_nope·W_UK then rotated q_pe
/// @param scale      the softmax scale (use softmax_scale<C>(): 192^-0.5 · mscale², not 576^-0.5)
/// @param out_latent [batch, q_len, n_heads, kv_lora_rank] out: Σ_t p_t c_t per head
/// @throws InvalidArgument, OutOfRange (unknown sequence, or fewer cached tokens than q_len)
template <class Backend, MlaConfig C, class Storage>
void absorbed_attention(const Backend& backend,
                        const ContiguousLatentCache<C, Backend, Storage>& cache,
                        std::span<const index_t> seqs,
                        TensorView<const float, 4, typename Backend::memory_space> q, double scale,
                        TensorView<float, 4, typename Backend::memory_space> out_latent) {
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::absorbed_attention";
  const index_t batch = index_t(seqs.size());
  const index_t q_len = q.extent(1);
  daedalus::detail::check_extents(fn, "q", q, {batch, q_len, S::n_heads, S::latent_dim});
  daedalus::detail::check_extents(fn, "out_latent", out_latent,
                                  {batch, q_len, S::n_heads, S::kv_lora_rank});
  detail::require_cached_queries(fn, cache, seqs, q_len);
  detail::MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  detail::MlaImpl<C, Backend>::absorbed_attention(backend, cache, seqs, q, scale, out_latent);
}

/// The absorbed attention core over a paged pool, with FlashMLA's arguments (PagedLatentView:
/// pool, block_table [batch, max_blocks], cache_seqlens [batch]): the same computation, masking
/// and precision as the contiguous overload, for a varlen batch whose blocks may lie anywhere in
/// the pool, in any order, shared or not. Query i of entry b sits at position
/// cache_seqlens[b] - q_len + i; a query row that sees no cached token (an entry with fewer
/// tokens than q_len, e.g. a zero-length padding entry) gets zeros. Long sequences are split
/// across threads and merged by log-sum-exp (flash-decoding), as in the contiguous case. fp16
/// and fp8 pools are widened to fp32 per key block (fp8: e4m3 code times its tile's scale, k_pe
/// from bf16; LatentRowFormat) and the fp32 kernels run; the result then carries the storage's
/// rounding of every cached value (the tests bound it from the format's documented error).
///
/// @param cache      the pool and batch; only rows below each sequence's length are read
/// @param q          [batch, q_len, n_heads, kv_lora_rank + rope]
/// @param scale      the softmax scale (softmax_scale<C>())
/// @param out_latent [batch, q_len, n_heads, kv_lora_rank] out
/// @throws InvalidArgument (extents), OutOfRange (a negative length, a length past
///         max_blocks · BlockSize, a used block-table entry outside [0, num_blocks)); nothing is
///         written when it throws.
template <class Backend, MlaConfig C, class Storage, int BlockSize, class Space>
void absorbed_attention(const Backend& backend,
                        const PagedLatentView<C, Storage, BlockSize, Space>& cache,
                        TensorView<const float, 4, typename Backend::memory_space> q, double scale,
                        TensorView<float, 4, typename Backend::memory_space> out_latent) {
  static_assert(std::is_same_v<Space, typename Backend::memory_space>,
                "daedalus::mla::absorbed_attention: 'cache' (a PagedLatentView) lives in a memory "
                "space this backend cannot read");
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::absorbed_attention";
  cache.validate(fn);
  const index_t batch = cache.batch();
  const index_t q_len = q.extent(1);
  daedalus::detail::check_extents(fn, "q", q, {batch, q_len, S::n_heads, S::latent_dim});
  daedalus::detail::check_extents(fn, "out_latent", out_latent,
                                  {batch, q_len, S::n_heads, S::kv_lora_rank});
  detail::MlaImpl<C, Backend>::absorbed_attention(backend, cache, q, scale, out_latent);
}

/// The naive attention core: up-projects the cached latents through wkv_b into per-head keys
/// [k_nope ; k_pe] and values, blockwise, and runs causal multi-head attention (same masking and
/// cache contract as `absorbed_attention`).
///
/// @param q   [batch, q_len, n_heads, qk_head_dim]: q_nope then rotated q_pe
/// @param out [batch, q_len, n_heads, v_head_dim] out
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage>
void naive_attention(const Backend& backend, const Weights& weights,
                     const ContiguousLatentCache<C, Backend, Storage>& cache,
                     std::span<const index_t> seqs,
                     TensorView<const float, 4, typename Backend::memory_space> q, double scale,
                     TensorView<float, 4, typename Backend::memory_space> out) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::naive_attention";
  const index_t batch = index_t(seqs.size());
  const index_t q_len = q.extent(1);
  daedalus::detail::check_extents(fn, "q", q, {batch, q_len, S::n_heads, S::qk_head_dim});
  daedalus::detail::check_extents(fn, "out", out, {batch, q_len, S::n_heads, S::v_head_dim});
  detail::require_cached_queries(fn, cache, seqs, q_len);
  detail::MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  detail::MlaImpl<C, Backend>::naive_attention(backend, weights, cache, seqs, q, scale, out);
}

/// The naive attention core over a paged pool (PagedLatentView), with the masking of the
/// paged `absorbed_attention`.
///
/// @param q   [batch, q_len, n_heads, qk_head_dim]: q_nope then rotated q_pe
/// @param out [batch, q_len, n_heads, v_head_dim] out
/// @throws as the paged absorbed_attention; nothing is written when it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize,
          class Space>
void naive_attention(const Backend& backend, const Weights& weights,
                     const PagedLatentView<C, Storage, BlockSize, Space>& cache,
                     TensorView<const float, 4, typename Backend::memory_space> q, double scale,
                     TensorView<float, 4, typename Backend::memory_space> out) {
  static_assert(std::is_same_v<Space, typename Backend::memory_space>,
                "daedalus::mla::naive_attention: 'cache' (a PagedLatentView) lives in a memory "
                "space this backend cannot read");
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::naive_attention";
  cache.validate(fn);
  const index_t batch = cache.batch();
  const index_t q_len = q.extent(1);
  daedalus::detail::check_extents(fn, "q", q, {batch, q_len, S::n_heads, S::qk_head_dim});
  daedalus::detail::check_extents(fn, "out", out, {batch, q_len, S::n_heads, S::v_head_dim});
  detail::MlaImpl<C, Backend>::naive_attention(backend, weights, cache, q, scale, out);
}

/// One MLA layer over a chunk of `tokens` tokens of sequence `seq` at positions
/// start_pos .. start_pos + tokens - 1 (MLA.forward): projects, writes the chunk's normed latent
/// and rotated k_pe into the cache at start_pos (overwriting anything cached there and setting
/// the length to start_pos + tokens), attends causally over everything cached up to each token,
/// and applies the output projection. Any chunk at any start_pos ≤ length(seq): a prompt in one
/// call or in several chunks gives the same result.
///
/// @param x    [tokens, dim]
/// @param out  [tokens, dim] out (may not alias x)
/// @param mode naive (the default: cheaper for long chunks) or absorbed
/// @throws InvalidArgument (extents), OutOfRange (seq, start_pos > length(seq)),
///         CapacityError (start_pos + tokens > capacity(seq)), NumericError (non-finite x).
///         The cache is unchanged when it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage>
void prefill(const Backend& backend, const Weights& weights,
             ContiguousLatentCache<C, Backend, Storage>& cache, index_t seq, index_t start_pos,
             TensorView<const float, 2, typename Backend::memory_space> x,
             TensorView<float, 2, typename Backend::memory_space> out,
             AttentionMode mode = AttentionMode::naive) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::prefill";
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, S::dim});
  daedalus::detail::check_extents(fn, "out", out, {tokens, S::dim});
  cache.check_write(fn, seq, start_pos, tokens);
  detail::MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::MlaImpl<C, Backend>::forward(backend, weights, cache, std::span<const index_t>(&seq, 1),
                                       std::span<const index_t>(&start_pos, 1), tokens, x.data(),
                                       out.data(), mode);
}

/// One decode step for a batch of sequences of different lengths, each with the same number
/// q_len of new tokens (1, or a few for speculative decoding; FlashMLA's s_q). The new tokens of
/// sequence b sit at positions length(b) .. length(b) + q_len - 1; their latents are appended to
/// the cache and each attends causally over its sequence.
///
/// @param seqs [batch] distinct cache sequence ids
/// @param x    [batch, q_len, dim]
/// @param out  [batch, q_len, dim] out
/// @param mode absorbed (the default) or naive; absorbed attention's precision with a bf16
///             cache is described at `absorbed_attention`
/// @throws InvalidArgument (extents, repeated sequence id), OutOfRange (unknown sequence),
///         CapacityError (a sequence would pass its capacity), NumericError (non-finite x).
///         The cache is unchanged when it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage>
void decode(const Backend& backend, const Weights& weights,
            ContiguousLatentCache<C, Backend, Storage>& cache, std::span<const index_t> seqs,
            TensorView<const float, 3, typename Backend::memory_space> x,
            TensorView<float, 3, typename Backend::memory_space> out,
            AttentionMode mode = AttentionMode::absorbed) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::decode";
  const index_t batch = index_t(seqs.size());
  const index_t q_len = x.extent(1);
  daedalus::detail::check_extents(fn, "x", x, {batch, q_len, S::dim});
  daedalus::detail::check_extents(fn, "out", out, {batch, q_len, S::dim});
  detail::require_distinct_sequences(fn, seqs);
  std::vector<index_t> starts(seqs.size());
  for (index_t b = 0; b < batch; ++b) {
    daedalus::detail::require<OutOfRange>(
        seqs[b] >= 0 && seqs[b] < cache.num_sequences(), fn, ": 'seqs[", b, "]' is ", seqs[b],
        "; expected a sequence id in [0, ", cache.num_sequences(), ")");
    starts[b] = cache.length(seqs[b]);
    cache.check_write(fn, seqs[b], starts[b], q_len);
  }
  detail::MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::MlaImpl<C, Backend>::forward(backend, weights, cache, seqs, starts, q_len, x.data(),
                                       out.data(), mode);
}

namespace detail {
/// The paged `decode` overloads: validates everything (extents, ids, positions, pool capacity for
/// the whole batch, finiteness) before the forward pass writes anything.
template <class Backend, class Weights, MlaConfig C, class Storage, int BlockSize>
void paged_decode(const Backend& backend, const Weights& weights,
                  PagedLatentCache<C, Backend, Storage, BlockSize>& cache,
                  std::span<const index_t> seqs,
                  std::optional<std::span<const index_t>> start_positions,
                  TensorView<const float, 3, typename Backend::memory_space> x,
                  TensorView<float, 3, typename Backend::memory_space> out, AttentionMode mode) {
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::decode";
  const index_t batch = index_t(seqs.size());
  const index_t q_len = x.extent(1);
  daedalus::detail::check_extents(fn, "x", x, {batch, q_len, S::dim});
  daedalus::detail::check_extents(fn, "out", out, {batch, q_len, S::dim});
  if (start_positions) {
    daedalus::detail::require<InvalidArgument>(
        index_t(start_positions->size()) == batch, fn, ": 'start_positions' has ",
        start_positions->size(), " entries; expected ", batch, " (one per entry of 'seqs')");
  }
  const BlockAllocator allocator = cache.allocator();
  // Appending at each length is one layer's step; every further layer would append again.
  if (!start_positions) allocator.require_single_pool(fn);
  detail::require_distinct_sequences(fn, seqs);
  std::vector<index_t> starts(seqs.size());
  for (index_t b = 0; b < batch; ++b) {
    daedalus::detail::require<OutOfRange>(allocator.contains(seqs[b]), fn, ": 'seqs[", b, "]' is ",
                                          seqs[b],
                                          "; expected a live sequence of the cache's allocator");
    const index_t length = cache.length(seqs[b]);
    starts[b] = start_positions ? (*start_positions)[std::size_t(b)] : length;
    daedalus::detail::require<OutOfRange>(starts[b] >= 0 && starts[b] <= length, fn,
                                          ": 'start_positions[", b, "]' is ", starts[b],
                                          "; expected a position in [0, ", length, "] (sequence ",
                                          seqs[b], " holds ", length, " tokens)");
  }
  allocator.check_writes(fn, seqs, starts, q_len);
  MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  MlaImpl<C, Backend>::forward(backend, weights, cache, seqs, starts, q_len, x.data(), out.data(),
                               mode);
}

/// One layer's forward pass over slots reserved for the step (BlockAllocator::reserve): the
/// reservation is checked to be this cache's allocator's and current, then the layer writes its
/// rows at the reserved positions (the allocator has nothing left to do for them: the blocks
/// are taken and the lengths set) and attends.
template <class Backend, class Weights, MlaConfig C, class Storage, int BlockSize>
void reserved_forward(std::string_view fn, const Backend& backend, const Weights& weights,
                      PagedLatentCache<C, Backend, Storage, BlockSize>& cache,
                      const SlotReservation& slots, index_t q_len, const float* x, float* out,
                      AttentionMode mode) {
  cache.allocator().check_reservation(fn, slots);
  MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  MlaImpl<C, Backend>::forward(backend, weights, cache, slots.sequences(), slots.start_positions(),
                               q_len, x, out, mode);
}
}  // namespace detail

/// `prefill` over a paged cache (PagedLatentCache): the same semantics as the contiguous
/// overload. The chunk's rows go to the sequence's blocks (blocks shared with a fork are copied
/// first, in every layer's pool, by the allocator), then the chunk attends over the sequence
/// read through its block table.
///
/// @throws InvalidArgument (extents), OutOfRange (released or unknown seq, start_pos >
///         length(seq)), CapacityError (the pool lacks the free blocks the chunk needs, copies
///         included), NumericError (non-finite x). The cache and allocator are unchanged when
///         it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize>
void prefill(const Backend& backend, const Weights& weights,
             PagedLatentCache<C, Backend, Storage, BlockSize>& cache, index_t seq,
             index_t start_pos, TensorView<const float, 2, typename Backend::memory_space> x,
             TensorView<float, 2, typename Backend::memory_space> out,
             AttentionMode mode = AttentionMode::naive) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::prefill";
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, S::dim});
  daedalus::detail::check_extents(fn, "out", out, {tokens, S::dim});
  cache.check_write(fn, seq, start_pos, tokens);
  detail::MlaImpl<C, Backend>::require_cache(backend, fn, cache);
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::MlaImpl<C, Backend>::forward(backend, weights, cache, std::span<const index_t>(&seq, 1),
                                       std::span<const index_t>(&start_pos, 1), tokens, x.data(),
                                       out.data(), mode);
}

/// `decode` over a paged cache (PagedLatentCache): the same semantics as the contiguous
/// overload; the batch is read through the sequences' block tables. Pool capacity is checked for
/// the whole batch before anything is written (BlockAllocator::check_writes: new blocks and
/// copy-on-write copies, counted exactly). The new tokens go at length(seq) of each sequence.
/// That is right for a model of one layer; layers that share an allocator share lengths, so
/// while the allocator serves more than one pool this overload refuses to run (it would advance
/// each sequence once per layer): a model of several layers reserves the step once
/// (`BlockAllocator::reserve`) and passes the SlotReservation to every layer.
///
/// @throws InvalidArgument (extents, repeated sequence id, an allocator serving several pools),
///         OutOfRange (released or unknown sequence), CapacityError (the pool lacks free
///         blocks), NumericError (non-finite x). The cache and allocator are unchanged when it
///         throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize>
void decode(const Backend& backend, const Weights& weights,
            PagedLatentCache<C, Backend, Storage, BlockSize>& cache, std::span<const index_t> seqs,
            TensorView<const float, 3, typename Backend::memory_space> x,
            TensorView<float, 3, typename Backend::memory_space> out,
            AttentionMode mode = AttentionMode::absorbed) {
  detail::require_weights<Backend, Weights, C>();
  detail::paged_decode(backend, weights, cache, seqs, std::nullopt, x, out, mode);
}

/// `decode` at explicit positions, for a model whose layers share one BlockAllocator: the new
/// tokens of sequence b go at start_positions[b] .. start_positions[b] + q_len - 1, and its length
/// becomes start_positions[b] + q_len (rows at and past the start are overwritten, as in
/// `prefill`). Every layer given the same positions writes the same slots: the first allocates
/// them (and copies shared blocks, in every layer's pool), the later ones find them allocated.
/// The SlotReservation overload below does the same with the positions reserved once per step
/// and checked to still be current at every layer; it is the form a model's step loop uses.
///
/// @param start_positions [batch] each in [0, length(seqs[b])]
/// @throws as the overload above, and OutOfRange for a start position outside [0, length] or
///         InvalidArgument when start_positions and seqs differ in size. Nothing changes when it
///         throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize>
void decode(const Backend& backend, const Weights& weights,
            PagedLatentCache<C, Backend, Storage, BlockSize>& cache, std::span<const index_t> seqs,
            std::span<const index_t> start_positions,
            TensorView<const float, 3, typename Backend::memory_space> x,
            TensorView<float, 3, typename Backend::memory_space> out,
            AttentionMode mode = AttentionMode::absorbed) {
  detail::require_weights<Backend, Weights, C>();
  detail::paged_decode(backend, weights, cache, seqs, start_positions, x, out, mode);
}

/// One layer's share of a decode step whose positions were reserved once for every layer
/// (`BlockAllocator::reserve(seqs, q_len)`): the new tokens of entry b go at
/// slots.start_positions()[b] .. + q_len - 1 of slots.sequences()[b], and each attends causally
/// over its sequence. The lengths were set by the reservation; no layer moves them, so an
/// L-layer step is one reserve and L calls of this overload, every layer writing the same
/// positions into its own pool.
///
/// @param slots [batch] entries of slots.tokens() = q_len new positions each
/// @param x     [batch, q_len, dim], in the order of slots.sequences()
/// @param out   [batch, q_len, dim] out
/// @throws InvalidArgument (extents; a reservation of another allocator, or a stale one: one of
///         its sequences changed after it), OutOfRange (a sequence released since),
///         NumericError (non-finite x). The cache is unchanged when it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize>
void decode(const Backend& backend, const Weights& weights,
            PagedLatentCache<C, Backend, Storage, BlockSize>& cache, const SlotReservation& slots,
            TensorView<const float, 3, typename Backend::memory_space> x,
            TensorView<float, 3, typename Backend::memory_space> out,
            AttentionMode mode = AttentionMode::absorbed) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::decode";
  daedalus::detail::check_extents(fn, "x", x, {slots.batch(), slots.tokens(), S::dim});
  daedalus::detail::check_extents(fn, "out", out, {slots.batch(), slots.tokens(), S::dim});
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::reserved_forward(fn, backend, weights, cache, slots, slots.tokens(), x.data(), out.data(),
                           mode);
}

/// One layer's share of a prefill chunk whose positions were reserved once for every layer
/// (`BlockAllocator::reserve` of one sequence: the chunk's tokens() positions from its start):
/// the semantics of `prefill` at start_pos = slots.start_positions()[0].
///
/// @param slots a reservation of one sequence
/// @param x     [slots.tokens(), dim]
/// @param out   [slots.tokens(), dim] out (may not alias x)
/// @throws InvalidArgument (extents; a reservation of more than one sequence, of another
///         allocator, or a stale one), OutOfRange (its sequence released since), NumericError
///         (non-finite x). The cache is unchanged when it throws.
template <class Backend, detail::LayerWeights Weights, MlaConfig C, class Storage, int BlockSize>
void prefill(const Backend& backend, const Weights& weights,
             PagedLatentCache<C, Backend, Storage, BlockSize>& cache, const SlotReservation& slots,
             TensorView<const float, 2, typename Backend::memory_space> x,
             TensorView<float, 2, typename Backend::memory_space> out,
             AttentionMode mode = AttentionMode::naive) {
  detail::require_weights<Backend, Weights, C>();
  using S = MlaShape<C>;
  constexpr std::string_view fn = "daedalus::mla::prefill";
  daedalus::detail::require<InvalidArgument>(
      slots.batch() == 1, fn, ": 'slots' reserves ", slots.batch(),
      " sequences; expected 1 (a prefill chunk is one sequence's; decode takes a batch)");
  daedalus::detail::check_extents(fn, "x", x, {slots.tokens(), S::dim});
  daedalus::detail::check_extents(fn, "out", out, {slots.tokens(), S::dim});
  detail::MlaImpl<C, Backend>::require_finite(backend, fn, "x", x);
  detail::reserved_forward(fn, backend, weights, cache, slots, slots.tokens(), x.data(), out.data(),
                           mode);
}

}  // namespace daedalus::mla
