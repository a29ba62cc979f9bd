// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/cpu/linear.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/kv_cache/block_allocator.hpp"
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/paged.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/mla/attention.hpp"
#include "daedalus/mla/cpu/latent_block.hpp"
#include "daedalus/mla/cpu/latent_gemm.hpp"
#include "daedalus/mla/cpu/latent_gemm_bf16.hpp"
#include "daedalus/mla/cpu/latent_rows.hpp"
#include "daedalus/mla/rope.hpp"
#include "daedalus/mla/weights.hpp"

/// The CPU (Eigen + OpenMP) implementation of MLA.
namespace daedalus::mla {

/// Tiling of the CPU attention kernels. The defaults suit AVX-512 cores with 1 MiB of L2: a
/// key block of 128 latent rows (288 KiB fp32) stays in L2 while up to 128 query rows stream
/// over it twice (scores, then values).
struct CpuAttentionTraits {
  /// Cached tokens per block of the absorbed kernel (the N of Q·Kᵀ, the K of P·V).
  static constexpr index_t key_block = 128;
  /// Query rows (heads × query tokens, folded as FlashMLA folds them) per tile.
  static constexpr index_t row_tile = 128;
  /// Cached tokens per block of the naive kernel (each is up-projected to all heads at once).
  static constexpr index_t naive_key_block = 128;
  /// Split-KV (flash-decoding): a tile's key blocks are cut into pieces of at least
  /// split_min_blocks blocks, and into at most max_splits pieces. The cut depends on the tile's
  /// own key count only, never on the thread count or the rest of the batch, so a sequence's
  /// result is bitwise the same for any thread count and in any batch.
  static constexpr index_t split_min_blocks = 8;
  static constexpr index_t max_splits = 32;
  static_assert(key_block % cpu_kernels::kPanel == 0,
                "CpuAttentionTraits: key_block must be a multiple of the score kernel's panel");
};

namespace detail {

/// Running state of the online softmax (Milakov & Gimelshein 2018; FlashAttention's form) for
/// `rows` query rows: running max `m` of the scaled scores, running sum `l` of exp(s - m), and
/// the unnormalised output accumulator `acc`, rescaled whenever m grows.
struct OnlineSoftmax {
  std::vector<float> m, l;
  std::vector<float> block_max, shift, alpha, block_sum;  // scratch of update_block_t

  void reset(index_t rows) {
    m.assign(std::size_t(rows), -std::numeric_limits<float>::infinity());
    l.assign(std::size_t(rows), 0.0f);
  }

  /// Turns row r's first `visible` raw scores into probabilities relative to the new running
  /// max (the rest of the row, masked keys, becomes 0), and returns the factor the row's
  /// accumulator must be multiplied by before this block's P·V is added.
  float update_row(index_t r, float* scores, index_t visible, index_t width, float scale) {
    Eigen::Map<Eigen::ArrayXf> row(scores, width);
    if (visible <= 0) {
      row.setZero();
      return 1.0f;
    }
    auto live = row.head(visible);
    const float block_max = live.maxCoeff() * scale;
    const float m_new = std::max(m[std::size_t(r)], block_max);
    const float alpha = std::exp(m[std::size_t(r)] - m_new);  // 0 on the first visible block
    live = (live * scale - m_new).exp();
    if (visible < width) row.tail(width - visible).setZero();
    l[std::size_t(r)] = l[std::size_t(r)] * alpha + live.sum();
    m[std::size_t(r)] = m_new;
    return alpha;
  }

  /// The same update for a block of n keys held keys-major, scores_t[key][row] (row stride
  /// `stride`), where row r sees its first visible[r] keys: every step runs down the rows, so it
  /// vectorises across query rows. Returns the per-row rescale factors of the accumulators.
  const float* update_block_t(float* scores_t, index_t n, index_t rows, index_t stride,
                              const index_t* visible, float scale) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    block_max.assign(std::size_t(rows), neg_inf);
    shift.resize(std::size_t(rows));
    alpha.resize(std::size_t(rows));
    block_sum.assign(std::size_t(rows), 0.0f);
    const index_t min_visible = *std::min_element(visible, visible + rows);
    for (index_t t = std::max<index_t>(min_visible, 0); t < n; ++t) {
      float* row = scores_t + t * stride;
      for (index_t r = 0; r < rows; ++r)
        if (t >= visible[r]) row[r] = neg_inf;  // masked: exp gives exactly 0
    }
    for (index_t t = 0; t < n; ++t) {
      const float* row = scores_t + t * stride;
      for (index_t r = 0; r < rows; ++r)
        block_max[std::size_t(r)] = std::max(block_max[std::size_t(r)], row[r]);
    }
    for (std::size_t r = 0; r < std::size_t(rows); ++r) {
      const float m_new = std::max(m[r], block_max[r] * scale);
      // A row that has seen no key yet keeps m = -inf; shift by 0 so exp(-inf) stays 0.
      shift[r] = m_new == neg_inf ? 0.0f : m_new;
      alpha[r] = m_new == neg_inf ? 1.0f : std::exp(m[r] - m_new);
      m[r] = m_new;
    }
    Eigen::Map<const Eigen::ArrayXf> shift_v(shift.data(), rows);
    Eigen::Map<Eigen::ArrayXf> sum_v(block_sum.data(), rows);
    for (index_t t = 0; t < n; ++t) {
      Eigen::Map<Eigen::ArrayXf> row(scores_t + t * stride, rows);
      row = (row * scale - shift_v).exp();
      sum_v += row;
    }
    for (std::size_t r = 0; r < std::size_t(rows); ++r) l[r] = l[r] * alpha[r] + block_sum[r];
    return alpha.data();
  }

  /// log Σ exp(s): what split results are merged by. -inf for a row that saw no key.
  float lse(index_t r) const {
    const float lr = l[std::size_t(r)];
    return lr > 0.0f ? m[std::size_t(r)] + std::log(lr) : -std::numeric_limits<float>::infinity();
  }
};

/// Per-thread scratch, grown on demand and kept for the thread's life so that decode steps do
/// not allocate (OpenMP threads persist between parallel regions).
struct AttentionScratch {
  /// 64-byte aligned (a cache line, one zmm): Eigen's vectorised exp over a row of scores starts
  /// with scalar steps up to the first aligned element, and its scalar and packet exp round
  /// differently. With every thread's buffer aligned alike, a result does not depend on which
  /// thread computed it.
  using AlignedFloats = std::vector<float, Eigen::aligned_allocator<float>>;
  AlignedFloats scores, acc;
  std::vector<float> keys, packed, partial_out, partial_lse;
  std::vector<index_t> visible;
  std::vector<std::uint32_t> q_pairs, p_pairs, v_pairs;  // bf16 pairs (latent_gemm_bf16.hpp)
  std::vector<const void*> row_pointers;                 // key rows of a block across pages
  OnlineSoftmax softmax;

  static AttentionScratch& local() {
    static thread_local AttentionScratch scratch;
    return scratch;
  }
  template <class Vector>
  static float* sized(Vector& v, index_t n) {
    if (v.size() < std::size_t(n)) v.resize(std::size_t(n));
    return v.data();
  }
};

/// One unit of absorbed-attention work: a tile of query rows of one sequence against a range
/// of its cached tokens. Ranges of one tile that were split (flash-decoding) write partial
/// results that `merge_splits` combines by log-sum-exp.
struct AbsorbedWorkItem {
  index_t batch_index;
  index_t row_begin, row_end;  // folded rows (token · n_heads + head) of this sequence
  index_t key_begin, key_end;  // cached positions [key_begin, key_end)
  index_t partial_slot;        // -1: the only range of its tile, written to the output directly
};

}  // namespace detail

namespace detail {

template <MlaConfig C>
struct MlaImpl<C, CpuBackend> {
  using S = MlaShape<C>;
  using Traits = CpuAttentionTraits;

  /// The backend's own checks of a cache argument: none on the CPU (every cache is host memory
  /// and has no stream).
  template <class Cache>
  static void require_cache(const CpuBackend&, std::string_view, const Cache&) {}

  /// The fronts' finiteness check of an input (x): a scan on the host, NumericError naming the
  /// first non-finite value by row (over every leading extent) and column.
  template <int Rank>
  static void require_finite(const CpuBackend&, std::string_view function,
                             std::string_view argument, HostView<const float, Rank> values) {
    detail::require_finite(function, argument, values.data(), values.size(),
                           values.extent(Rank - 1));
  }

  /// RMSNorm of each row's first `width` values (DeepSeek `RMSNorm`: x / sqrt(mean(x²) + eps) · w),
  /// the sum of squares taken in double so wide rows lose nothing.
  static void rms_norm_rows(float* x, index_t rows, index_t width, index_t stride,
                            const float* weight) {
    for (index_t r = 0; r < rows; ++r) {
      float* row = x + r * stride;
      double sum_sq = 0.0;
      for (index_t j = 0; j < width; ++j) sum_sq += double(row[j]) * row[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / double(width) + C::norm_eps));
      for (index_t j = 0; j < width; ++j) row[j] = row[j] * inv * weight[j];
    }
  }

  /// Projections of `tokens` tokens whose positions are given one per token (MLA.forward steps
  /// 1-3). x [tokens, dim]; q [tokens, n_heads, qk_head_dim]; latent [tokens, latent_dim].
  static void project_tokens(const CpuBackend& cpu, const MlaWeights<C>& w,
                             const index_t* positions, index_t tokens, const float* x, float* q,
                             float* latent) {
    if (tokens == 0) return;
    constexpr index_t q_width = index_t(S::n_heads) * S::qk_head_dim;
    if constexpr (S::has_q_lora) {
      std::vector<float> q_a(std::size_t(tokens) * S::q_lora_rank);
      cpu::linear(cpu, x, tokens, S::dim, w.wq_a().data(), S::q_lora_rank, q_a.data());
      cpu.parallel_ranges(tokens, [&](index_t t0, index_t t1, int) {
        rms_norm_rows(q_a.data() + t0 * S::q_lora_rank, t1 - t0, S::q_lora_rank, S::q_lora_rank,
                      w.q_norm().data());
      });
      cpu::linear(cpu, q_a.data(), tokens, S::q_lora_rank, w.wq_b().data(), q_width, q);
    } else {
      cpu::linear(cpu, x, tokens, S::dim, w.wq().data(), q_width, q);
    }
    cpu::linear(cpu, x, tokens, S::dim, w.wkv_a().data(), S::latent_dim, latent);
    const RopeTable<C> rope;
    cpu.parallel_ranges(tokens, [&](index_t t0, index_t t1, int) {
      float cos_v[RopeTable<C>::pairs];
      float sin_v[RopeTable<C>::pairs];
      for (index_t t = t0; t < t1; ++t) {
        float* row = latent + t * S::latent_dim;
        // Only the latent is normed; k_pe is rotated and never normed (MLA.forward).
        rms_norm_rows(row, 1, S::kv_lora_rank, S::latent_dim, w.kv_norm().data());
        rope.angles(positions[t], cos_v, sin_v);
        RopeTable<C>::apply(row + S::kv_lora_rank, cos_v, sin_v);
        for (int h = 0; h < S::n_heads; ++h) {
          RopeTable<C>::apply(q + (t * S::n_heads + h) * S::qk_head_dim + S::nope, cos_v, sin_v);
        }
      }
    });
  }

  static void project(const CpuBackend& cpu, const MlaWeights<C>& w, index_t start_pos,
                      HostView<const float, 2> x, HostView<float, 3> q, HostView<float, 2> latent) {
    std::vector<index_t> positions(static_cast<std::size_t>(x.extent(0)));
    for (std::size_t i = 0; i < positions.size(); ++i) positions[i] = start_pos + index_t(i);
    project_tokens(cpu, w, positions.data(), x.extent(0), x.data(), q.data(), latent.data());
  }

  /// Cuts every tile's key range into pieces (CpuAttentionTraits::split_min_blocks,
  /// max_splits; FlashMLA's get_mla_metadata idea, on the host): a long sequence then uses every
  /// thread, and the cut, which fixes the rounding of the merge, depends on sizes only.
  template <class Rows>
  static std::vector<AbsorbedWorkItem> plan_absorbed(const Rows& src, index_t q_len,
                                                     index_t& partial_slots) {
    const index_t rows_per_seq = q_len * S::n_heads;
    const index_t tokens_per_tile = std::max<index_t>(1, Traits::row_tile / S::n_heads);
    std::vector<AbsorbedWorkItem> items;
    partial_slots = 0;
    for (index_t b = 0; b < src.batch(); ++b) {
      const index_t len = src.length(b);
      for (index_t t0 = 0; t0 < q_len; t0 += tokens_per_tile) {
        const index_t t1 = std::min(q_len, t0 + tokens_per_tile);
        const index_t row_begin = t0 * S::n_heads;
        const index_t row_end = std::min(rows_per_seq, t1 * S::n_heads);
        // The tile's last token sees keys [0, keys); none when the sequence holds fewer tokens
        // than its queries (a zero-length entry of a paged batch).
        const index_t keys = std::max<index_t>(0, len - q_len + t1);
        const index_t blocks = (keys + Traits::key_block - 1) / Traits::key_block;
        const index_t blocks_per_piece = std::max<index_t>(
            Traits::split_min_blocks, (blocks + Traits::max_splits - 1) / Traits::max_splits);
        const index_t pieces =
            std::max<index_t>(1, (blocks + blocks_per_piece - 1) / blocks_per_piece);
        for (index_t p = 0; p < pieces; ++p) {
          const index_t k0 = blocks * p / pieces * Traits::key_block;
          const index_t k1 = std::min(keys, blocks * (p + 1) / pieces * Traits::key_block);
          items.push_back({b, row_begin, row_end, k0, k1, pieces == 1 ? -1 : partial_slots++});
        }
      }
    }
    return items;
  }

  /// Absorbed attention of one work item (DeepSeek-V2 section 2.1.2 with W_UK absorbed into q:
  /// score[r,t] = q[r]·[c_t ; k_pe_t] · scale, o_lat[r] = Σ_t p[r,t] c_t) over the cached rows
  /// of batch entry b of `src` (latent_rows.hpp). Each key block of up to key_block tokens is
  /// one online-softmax step; its rows are read run by run where they lie (fp32, and bf16 with
  /// AVX512-BF16) or widened to fp32 first (fp16, fp8, bf16 without AVX512-BF16). Only rows
  /// below the sequence's length are ever read. Writes the normalised [rows, kv_lora_rank]
  /// result to `out` (row stride out_stride) and, when `lse` is given, each row's log-sum-exp.
  template <class Rows>
  static void attend_tile(const Rows& src, index_t b, index_t q_len, const float* q_rows,
                          const AbsorbedWorkItem& item, float scale, float* out, index_t out_stride,
                          float* lse) {
    using Element = typename Rows::element_type;
    constexpr index_t D = S::latent_dim;
    constexpr index_t V = S::kv_lora_rank;
    constexpr index_t KB = Traits::key_block;
    constexpr index_t key_stride = Rows::row_stride;
    const index_t rows = item.row_end - item.row_begin;
    const index_t first_query_pos = src.length(b) - q_len;
    AttentionScratch& scratch = AttentionScratch::local();
    const index_t st_stride = cpu_kernels::padded_rows(rows);
    float* scores_t = AttentionScratch::sized(scratch.scores, KB * st_stride);  // [key][row]
    float* acc = AttentionScratch::sized(scratch.acc, rows * V);
    cpu::map(acc, rows, V, V).setZero();
    scratch.softmax.reset(rows);
    std::vector<index_t>& visible = scratch.visible;
    visible.resize(std::size_t(rows));
    const float* q_tile = q_rows + item.row_begin * D;
    // fp32 rows are read in place by the fp32 kernels.
    constexpr bool reads_fp32_in_place = std::is_same_v<Element, float>;
#if defined(__AVX512BF16__)
    // A bf16 cache is read as it lies by the AVX512-BF16 kernels (latent_gemm_bf16.hpp).
    constexpr bool use_bf16_kernels =
        std::is_same_v<Element, bfloat16> && cpu_kernels::bf16_kernels_fit(D, V);
    cpu_kernels::QueryTileBf16 tile_bf16{};
    if constexpr (use_bf16_kernels)
      tile_bf16 = cpu_kernels::prepare_query_tile_bf16(q_tile, rows, D, scratch.q_pairs);
#else
    constexpr bool use_bf16_kernels = false;
#endif
    cpu_kernels::QueryTile tile{};
    if constexpr (!use_bf16_kernels)
      tile = cpu_kernels::prepare_query_tile(q_tile, rows, D, scratch.packed);
    for (index_t k0 = item.key_begin; k0 < item.key_end; k0 += KB) {
      const index_t n = std::min(KB, item.key_end - k0);
      const float* keys = nullptr;  // [n, D] widened rows when not read in place
      if constexpr (use_bf16_kernels) {
#if defined(__AVX512BF16__)
        for_each_run(src, b, k0, n, [&](const LatentRun<Element>& run, index_t offset) {
          cpu_kernels::scores_bf16(tile_bf16, run.rows, run.count, key_stride,
                                   scores_t + offset * st_stride, st_stride);
        });
#endif
      } else if constexpr (reads_fp32_in_place) {
        for_each_run(src, b, k0, n, [&](const LatentRun<Element>& run, index_t offset) {
          cpu_kernels::latent_scores(tile, run.rows, run.count, key_stride,
                                     scores_t + offset * st_stride, st_stride);
        });
      } else {
        keys = latent_rows_fp32(src, b, k0, n, D, scratch.keys);
        cpu_kernels::latent_scores(tile, keys, n, D, scores_t, st_stride);
      }
      for (index_t r = 0; r < rows; ++r) {
        const index_t pos = first_query_pos + (item.row_begin + r) / S::n_heads;
        visible[std::size_t(r)] = std::clamp<index_t>(pos - k0 + 1, 0, n);
      }
      const float* alpha =
          scratch.softmax.update_block_t(scores_t, n, rows, st_stride, visible.data(), scale);
      for (index_t r = 0; r < rows; ++r) {
        if (alpha[r] != 1.0f) cpu::map(acc + r * V, 1, V, V) *= alpha[r];
      }
      // The first kv_lora_rank columns of each cached row are the value (MQA form).
      if constexpr (use_bf16_kernels) {
#if defined(__AVX512BF16__)
        cpu_kernels::pack_probabilities_bf16(scores_t, n, rows, st_stride, scratch.p_pairs);
        const auto first = src.run(b, k0, n);
        if (first.count == n) {
          cpu_kernels::pack_values_bf16(first.rows, n, key_stride, V, scratch.v_pairs);
        } else {
          std::vector<const void*>& row_at = scratch.row_pointers;
          row_at.resize(std::size_t(n));
          for_each_run(src, b, k0, n, [&](const LatentRun<Element>& run, index_t offset) {
            for (index_t t = 0; t < run.count; ++t)
              row_at[std::size_t(offset + t)] = run.rows + t * key_stride;
          });
          cpu_kernels::pack_values_bf16_at(
              [&](index_t t) { return static_cast<const Element*>(row_at[std::size_t(t)]); }, n, V,
              scratch.v_pairs);
        }
        cpu_kernels::accumulate_bf16(scratch.p_pairs.data(), rows, (n + 1) / 2,
                                     scratch.v_pairs.data(), V, acc);
#endif
      } else if constexpr (reads_fp32_in_place) {
        for_each_run(src, b, k0, n, [&](const LatentRun<Element>& run, index_t offset) {
          cpu_kernels::latent_accumulate(scores_t + offset * st_stride, rows, run.count, st_stride,
                                         run.rows, key_stride, V, acc);
        });
      } else {
        cpu_kernels::latent_accumulate(scores_t, rows, n, st_stride, keys, D, V, acc);
      }
    }
    for (index_t r = 0; r < rows; ++r) {
      const float l = scratch.softmax.l[std::size_t(r)];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      cpu::map(out + r * out_stride, 1, V, V) = cpu::map(acc + r * V, 1, V, V) * inv;
      if (lse) lse[r] = scratch.softmax.lse(r);
    }
  }

  /// Absorbed attention over any row source (latent_rows.hpp): q [batch, q_len, n_heads,
  /// latent_dim], out_latent [batch, q_len, n_heads, kv_lora_rank]. Rows that see no cached
  /// token (a zero-length sequence) get zeros.
  template <class Rows>
  static void absorbed_rows(const CpuBackend& cpu, const Rows& src, HostView<const float, 4> q,
                            double scale, HostView<float, 4> out_latent) {
    constexpr index_t D = S::latent_dim;
    constexpr index_t V = S::kv_lora_rank;
    const index_t q_len = q.extent(1);
    const index_t rows_per_seq = q_len * S::n_heads;
    index_t partial_slots = 0;
    const std::vector<AbsorbedWorkItem> items = plan_absorbed(src, q_len, partial_slots);
    // Split partials live in the calling thread's scratch; the workers get plain pointers
    // (naming a thread_local inside the parallel region would give each worker its own).
    AttentionScratch& caller = AttentionScratch::local();
    float* partial_out =
        AttentionScratch::sized(caller.partial_out, partial_slots * Traits::row_tile * V);
    float* partial_lse =
        AttentionScratch::sized(caller.partial_lse, partial_slots * Traits::row_tile);
    cpu.parallel_for(index_t(items.size()), [&](index_t i, int) {
      const AbsorbedWorkItem& item = items[std::size_t(i)];
      const float* q_seq = q.data() + item.batch_index * rows_per_seq * D;
      float* out_seq = out_latent.data() + item.batch_index * rows_per_seq * V;
      if (item.partial_slot < 0) {
        attend_tile(src, item.batch_index, q_len, q_seq, item, float(scale),
                    out_seq + item.row_begin * V, V, nullptr);
      } else {
        attend_tile(src, item.batch_index, q_len, q_seq, item, float(scale),
                    partial_out + item.partial_slot * Traits::row_tile * V, V,
                    partial_lse + item.partial_slot * Traits::row_tile);
      }
    });
    merge_splits(cpu, items, rows_per_seq, partial_out, partial_lse, out_latent.data());
  }

  template <class Storage>
  static void absorbed_attention(const CpuBackend& cpu,
                                 const ContiguousLatentCache<C, CpuBackend, Storage>& cache,
                                 std::span<const index_t> seqs, HostView<const float, 4> q,
                                 double scale, HostView<float, 4> out_latent) {
    absorbed_rows(cpu, ContiguousLatentRows<C, Storage>(cache, seqs), q, scale, out_latent);
  }

  template <class Storage, int BlockSize>
  static void absorbed_attention(const CpuBackend& cpu,
                                 const PagedLatentView<C, Storage, BlockSize, HostMemory>& cache,
                                 HostView<const float, 4> q, double scale,
                                 HostView<float, 4> out_latent) {
    absorbed_rows(cpu, PagedLatentRows<C, Storage, BlockSize>(cache), q, scale, out_latent);
  }

  /// Combines the split ranges of each tile: o = Σ_s exp(lse_s - lse) o_s with
  /// lse = log Σ_s exp(lse_s) (flash-decoding's reduction, FlashMLA's combine kernel). Rows are
  /// independent and each is summed in piece order, so the threads change nothing but speed.
  static void merge_splits(const CpuBackend& cpu, const std::vector<AbsorbedWorkItem>& items,
                           index_t rows_per_seq, const float* partial_out, const float* partial_lse,
                           float* out) {
    constexpr index_t V = S::kv_lora_rank;
    constexpr float kNoKeys = -std::numeric_limits<float>::infinity();
    struct Group {
      std::size_t first, end;  // the split pieces [first, end) of one tile
      index_t rows_before;     // rows of the groups before this one
    };
    std::vector<Group> groups;
    index_t total_rows = 0;
    for (std::size_t i = 0; i < items.size();) {
      if (items[i].partial_slot < 0) {
        ++i;
        continue;
      }
      std::size_t end = i;
      while (end < items.size() && items[end].partial_slot >= 0 &&
             items[end].batch_index == items[i].batch_index &&
             items[end].row_begin == items[i].row_begin) {
        ++end;
      }
      groups.push_back({i, end, total_rows});
      total_rows += items[i].row_end - items[i].row_begin;
      i = end;
    }
    // One parallel region over every merged row of every tile.
    cpu.parallel_ranges(total_rows, [&](index_t g0, index_t g1, int) {
      std::size_t g = std::size_t(std::upper_bound(groups.begin(), groups.end(), g0,
                                                   [](index_t row, const Group& group) {
                                                     return row < group.rows_before;
                                                   }) -
                                  groups.begin() - 1);
      for (index_t flat = g0; flat < g1; ++flat) {
        while (g + 1 < groups.size() && flat >= groups[g + 1].rows_before) ++g;
        const Group& group = groups[g];
        const AbsorbedWorkItem& tile = items[group.first];
        const index_t r = flat - group.rows_before;
        float max_lse = kNoKeys;
        for (std::size_t s = group.first; s < group.end; ++s)
          max_lse = std::max(max_lse, partial_lse[items[s].partial_slot * Traits::row_tile + r]);
        auto row =
            cpu::map(out + (tile.batch_index * rows_per_seq + tile.row_begin + r) * V, 1, V, V);
        row.setZero();
        float total = 0.0f;
        for (std::size_t s = group.first; s < group.end; ++s) {
          const float lse = partial_lse[items[s].partial_slot * Traits::row_tile + r];
          if (lse == kNoKeys) continue;
          const float weight = std::exp(lse - max_lse);
          total += weight;
          row += weight * cpu::map(partial_out + (items[s].partial_slot * Traits::row_tile + r) * V,
                                   1, V, V);
        }
        if (total > 0.0f) row *= 1.0f / total;
      }
    });
  }

  /// Naive attention (MLA.forward with attn_impl = "naive"): per key block, up-project the
  /// latents through wkv_b into every head's [k_nope ; v] at once (one GEMM), append the shared
  /// k_pe, and run causal multi-head attention with an online softmax per head. Any row source.
  template <class Rows>
  static void naive_rows(const CpuBackend& cpu, const MlaWeights<C>& w, const Rows& src,
                         HostView<const float, 4> q, double scale, HostView<float, 4> out) {
    constexpr index_t H = S::n_heads;
    constexpr index_t D = S::latent_dim;
    constexpr index_t QK = S::qk_head_dim;
    constexpr index_t KVB = S::kv_b_rows_per_head;
    constexpr index_t VD = S::v_head_dim;
    constexpr index_t KB = Traits::naive_key_block;
    const index_t q_len = q.extent(1);
    std::vector<float> keys;
    std::vector<float> decompressed(std::size_t(KB) * H * KVB);
    std::vector<float> acc(std::size_t(q_len) * H * VD);
    std::vector<OnlineSoftmax> softmax(static_cast<std::size_t>(H));
    for (index_t b = 0; b < src.batch(); ++b) {
      const index_t len = src.length(b);
      const index_t first_query_pos = len - q_len;
      const float* q_seq = q.data() + b * q_len * H * QK;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (auto& state : softmax) state.reset(q_len);
      for (index_t k0 = 0; k0 < len; k0 += KB) {
        const index_t n = std::min(KB, len - k0);
        const float* block = latent_rows_fp32(src, b, k0, n, D, keys);
        // [n, H·(nope + v)] = c [n, kv_lora_rank] · wkv_bᵀ: every head's k_nope and v at once.
        cpu::linear(cpu, block, n, S::kv_lora_rank, D, w.wkv_b().data(), H * KVB,
                    decompressed.data());
        cpu.parallel_for(H, [&](index_t h, int) {
          AttentionScratch& scratch = AttentionScratch::local();
          float* scores = AttentionScratch::sized(scratch.scores, q_len * KB);
          auto s = cpu::map(scores, q_len, n, KB);
          s.noalias() = cpu::map(q_seq + h * QK, q_len, S::nope, H * QK) *
                        cpu::map(decompressed.data() + h * KVB, n, S::nope, H * KVB).transpose();
          s.noalias() += cpu::map(q_seq + h * QK + S::nope, q_len, S::rope, H * QK) *
                         cpu::map(block + S::kv_lora_rank, n, S::rope, D).transpose();
          auto o = cpu::map(acc.data() + h * VD, q_len, VD, H * VD);
          for (index_t r = 0; r < q_len; ++r) {
            const index_t visible = std::clamp<index_t>(first_query_pos + r - k0 + 1, 0, n);
            const float alpha =
                softmax[std::size_t(h)].update_row(r, scores + r * KB, visible, n, float(scale));
            if (alpha != 1.0f) o.row(r) *= alpha;
          }
          o.noalias() += s * cpu::map(decompressed.data() + h * KVB + S::nope, n, VD, H * KVB);
        });
      }
      float* out_seq = out.data() + b * q_len * H * VD;
      for (index_t r = 0; r < q_len; ++r) {
        for (index_t h = 0; h < H; ++h) {
          const float l = softmax[std::size_t(h)].l[std::size_t(r)];
          const float inv = l > 0.0f ? 1.0f / l : 0.0f;
          for (index_t j = 0; j < VD; ++j)
            out_seq[(r * H + h) * VD + j] = acc[std::size_t((r * H + h) * VD + j)] * inv;
        }
      }
    }
  }

  template <class Storage>
  static void naive_attention(const CpuBackend& cpu, const MlaWeights<C>& w,
                              const ContiguousLatentCache<C, CpuBackend, Storage>& cache,
                              std::span<const index_t> seqs, HostView<const float, 4> q,
                              double scale, HostView<float, 4> out) {
    naive_rows(cpu, w, ContiguousLatentRows<C, Storage>(cache, seqs), q, scale, out);
  }

  template <class Storage, int BlockSize>
  static void naive_attention(const CpuBackend& cpu, const MlaWeights<C>& w,
                              const PagedLatentView<C, Storage, BlockSize, HostMemory>& cache,
                              HostView<const float, 4> q, double scale, HostView<float, 4> out) {
    naive_rows(cpu, w, PagedLatentRows<C, Storage, BlockSize>(cache), q, scale, out);
  }

  /// Calls `body(rows)` with the row source of `seqs` in a contiguous cache.
  template <class Storage, class Body>
  static void with_rows(const ContiguousLatentCache<C, CpuBackend, Storage>& cache,
                        std::span<const index_t> seqs, Body&& body) {
    body(ContiguousLatentRows<C, Storage>(cache, seqs));
  }

  /// Calls `body(rows)` with the row source of `seqs` in a paged cache: their block table, read
  /// from the allocator after the writes that precede the attention.
  template <class Storage, int BlockSize, class Body>
  static void with_rows(const PagedLatentCache<C, CpuBackend, Storage, BlockSize>& cache,
                        std::span<const index_t> seqs, Body&& body) {
    static thread_local BlockTable table;  // reused: a decode loop rebuilds it every step
    const PagedLatentView<C, Storage, BlockSize> view = cache.view(seqs, table);
    body(PagedLatentRows<C, Storage, BlockSize>(view));
  }

  /// MLA.forward for `q_len` tokens of each sequence in `seqs`, token i of sequence b at
  /// position starts[b] + i, over a contiguous or a paged cache. The front has validated every
  /// argument.
  template <class Cache>
  static void forward(const CpuBackend& cpu, const MlaWeights<C>& w, Cache& cache,
                      std::span<const index_t> seqs, std::span<const index_t> starts, index_t q_len,
                      const float* x, float* out, AttentionMode mode) {
    constexpr index_t H = S::n_heads;
    constexpr index_t D = S::latent_dim;
    constexpr index_t QK = S::qk_head_dim;
    constexpr index_t V = S::kv_lora_rank;
    constexpr index_t VD = S::v_head_dim;
    const index_t batch = index_t(seqs.size());
    const index_t tokens = batch * q_len;
    std::vector<index_t> positions(static_cast<std::size_t>(tokens));
    for (index_t b = 0; b < batch; ++b)
      for (index_t i = 0; i < q_len; ++i) positions[std::size_t(b * q_len + i)] = starts[b] + i;
    std::vector<float> q(std::size_t(tokens) * H * QK);
    std::vector<float> latent(std::size_t(tokens) * D);
    project_tokens(cpu, w, positions.data(), tokens, x, q.data(), latent.data());
    for (index_t b = 0; b < batch; ++b) {
      cache.write(seqs[b], starts[b],
                  HostView<const float, 2>(latent.data() + b * q_len * D, {q_len, D}));
    }
    // An empty chunk still sets each length to its start (a recompute from start_pos truncates).
    if (tokens == 0) return;
    std::vector<float> o(std::size_t(tokens) * H * VD);  // [tokens, n_heads, v_head_dim]
    const double scale = softmax_scale<C>();
    if (mode == AttentionMode::absorbed) {
      std::vector<float> q_abs(std::size_t(tokens) * H * D);
      std::vector<float> o_lat(std::size_t(tokens) * H * V);
      // q_lat[h] = q_nope[h] · W_UK[h] (absorbing W_UK into the query); q_pe passes through.
      cpu.parallel_for(H, [&](index_t h, int) {
        cpu::map(q_abs.data() + h * D, tokens, V, H * D).noalias() =
            cpu::map(q.data() + h * QK, tokens, S::nope, H * QK) *
            cpu::map(w.w_uk(int(h)).data(), S::nope, V, V);
        cpu::map(q_abs.data() + h * D + V, tokens, S::rope, H * D) =
            cpu::map(q.data() + h * QK + S::nope, tokens, S::rope, H * QK);
      });
      with_rows(cache, seqs, [&](const auto& src) {
        absorbed_rows(cpu, src, HostView<const float, 4>(q_abs.data(), {batch, q_len, H, D}), scale,
                      HostView<float, 4>(o_lat.data(), {batch, q_len, H, V}));
      });
      // o[h] = W_UV[h] · o_lat[h] (absorbing W_UV into the output side).
      cpu.parallel_for(H, [&](index_t h, int) {
        cpu::map(o.data() + h * VD, tokens, VD, H * VD).noalias() =
            cpu::map(o_lat.data() + h * V, tokens, V, H * V) *
            cpu::map(w.w_uv(int(h)).data(), VD, V, V).transpose();
      });
    } else {
      with_rows(cache, seqs, [&](const auto& src) {
        naive_rows(cpu, w, src, HostView<const float, 4>(q.data(), {batch, q_len, H, QK}), scale,
                   HostView<float, 4>(o.data(), {batch, q_len, H, VD}));
      });
    }
    cpu::linear(cpu, o.data(), tokens, H * VD, w.wo().data(), S::dim, out);
  }
};

}  // namespace detail
}  // namespace daedalus::mla
