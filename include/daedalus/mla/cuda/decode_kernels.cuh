// SPDX-License-Identifier: Apache-2.0
#pragma once

// The device kernels of the absorbed MLA decode (mla/cuda/absorbed_decode.cuh is the host side):
//
//   decode_schedule  one block: from the cached lengths, the split of the batch's key blocks over
//                    a fixed number of parts (FlashMLA's get_mla_metadata idea, on the device)
//   decode_attention grid (parts, row tiles): each block attends one tile of folded query rows
//                    (token · n_heads + head, FlashMLA folds them the same way) over its part's
//                    key blocks, which may span several batch entries, with an online softmax
//   decode_combine   grid (batch, row chunks): merges the split pieces of each row by their
//                    log-sum-exp, writes zeros for entries without cached tokens
//
// The products run on the tensor cores through daedalus::cuda::mma_m16n8k16 (the one wrapper),
// inputs in the storage type (bf16 or fp16), accumulation in fp32; fragments come from shared
// memory by ldmatrix.x4 (mma.cuh). An attention block has 8 warps and stages, per step of 64
// cached tokens, the key block with cp.async (double-buffered where shared memory allows:
// DecodeShape). Per step: scores (each warp 16 rows × 8·RowTiles keys over the whole 576-wide
// row), the block's row maxima exchanged through shared memory, probabilities rounded to the
// storage type into shared memory, then the value product (each warp all rows × an eighth of
// the V columns, accumulators in registers for the whole piece). Three barriers per step (four
// single-buffered).

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/mma.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/cuda/shared_memory.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"

namespace daedalus::mla::cuda::detail {

/// Fixed tiling of the decode kernels.
struct DecodeTiling {
  /// Cached tokens per step of the online softmax (FlashMLA's page and block size).
  static constexpr int key_block = 64;
  static constexpr int warps = 8;
  static constexpr int threads = warps * 32;
  /// Elements appended to every shared-memory row: rows of (a multiple of 16) + 8 16-bit elements
  /// start 16 bytes apart modulo 128, so the eight rows a fragment load touches fall on different
  /// banks.
  static constexpr int row_pad = 8;
  /// Threads of the schedule kernel (one block).
  static constexpr int schedule_threads = 256;
  /// Query rows per block of the combine kernel (one warp each).
  static constexpr int combine_rows = 8;
};

/// Whether the K block can be double-buffered for cached rows of D values whose first V are the
/// value: the value part must be whole 16-wide k-steps and rows whole 16-byte chunks.
template <int D, int V>
inline constexpr bool can_pipeline = V % 16 == 0 && D % 8 == 0;

/// Sizes of one attention block for a cached row of D values whose first V are the value, with
/// RowTiles tiles of 16 query rows (1, 2 or 4: 16, 32 or 64 folded rows per block).
///
/// Work split among the 8 warps:
///   scores  S[rows, 64] = Q · Kᵀ: warp w takes m-tile w % RowTiles and RowTiles n-tiles of 8
///           keys (key group w / RowTiles), accumulating over the padded D in k-steps of 16;
///   values  O[rows, V] += P · V: warp w takes every m-tile and the 8-column n-tiles
///           [w · v_tiles, (w + 1) · v_tiles), so a probability fragment feeds v_tiles products.
///
/// K in shared memory. Single-buffered (Pipelined = false): one [64, ld] block, loaded while the
/// block waits. Pipelined: two value buffers [64, V + 8] and one rope buffer [64, D - V + 8]: the
/// next block's value part is copied while this block computes its scores and values, and its
/// rope part (which only the scores read) while this block computes its values, so the copies
/// overlap all the arithmetic. 576-wide rows with 64 query rows then take 222 KiB (sm_90 has
/// 227); the launcher falls back to one buffer where it does not fit.
template <int D, int V, int RowTiles, bool Pipelined = false>
struct DecodeShape {
  static_assert(RowTiles == 1 || RowTiles == 2 || RowTiles == 4,
                "DecodeShape: 16, 32 or 64 query rows per block");
  static_assert(V >= 1 && V < D, "DecodeShape: the value is a proper prefix of the cached row");
  static_assert(!Pipelined || can_pipeline<D, V>,
                "DecodeShape: double buffering needs V % 16 == 0 and D % 8 == 0");
  static constexpr int rows = 16 * RowTiles;
  static constexpr int keys = DecodeTiling::key_block;
  static constexpr int d_pad = (D + 15) / 16 * 16;  // zero-padded in shared memory
  static constexpr int ld = d_pad + DecodeTiling::row_pad;
  static constexpr int k_steps = d_pad / 16;
  static constexpr int value_steps = V / 16;             // pipelined: k-steps in the value buffer
  static constexpr int ldv = V + DecodeTiling::row_pad;  // pipelined value buffer
  static constexpr int ldr = d_pad - V + DecodeTiling::row_pad;  // pipelined rope buffer
  static constexpr int key_groups = DecodeTiling::warps / RowTiles;
  static constexpr int score_tiles = (keys / 8) / key_groups;  // n-tiles of S per warp
  static constexpr int value_tiles_total = (V + 7) / 8;
  static constexpr int value_tiles =
      (value_tiles_total + DecodeTiling::warps - 1) / DecodeTiling::warps;  // n-tiles of O per warp
  static constexpr int ldp = keys + DecodeTiling::row_pad;
  /// Blocks per SM the register budget is set for. Single-buffered 16-row blocks: two (≤ 128
  /// registers and ~95 KiB of shared memory each), so one computes while the other waits for
  /// its keys. Otherwise one, which overlaps its own copies when pipelined.
  static constexpr int blocks_per_sm = (RowTiles == 1 && !Pipelined) ? 2 : 1;
  static_assert(score_tiles * key_groups * 8 == keys, "DecodeShape: key tiles split evenly");

  // Dynamic shared memory: Q tile, K buffers, P tile (16-bit), then per-row maxima and sums of
  // each key group (fp32).
  static constexpr std::size_t q_elements = std::size_t(rows) * ld;
  static constexpr std::size_t value_elements = std::size_t(keys) * ldv;
  static constexpr std::size_t k_elements =
      Pipelined ? 2 * value_elements + std::size_t(keys) * ldr : std::size_t(keys) * ld;
  static constexpr std::size_t p_elements = std::size_t(rows) * ldp;
  static constexpr std::size_t stat_floats = std::size_t(key_groups) * rows;
  static constexpr std::size_t shared_bytes =
      2 * (q_elements + k_elements + p_elements) + 2 * stat_floats * sizeof(float);
};

/// The schedule the schedule kernel writes, as int32 in one device array:
///   [0] blocks_per_part, [1] total key blocks, then prefix [batch + 1] (first global key block of
///   each entry), split_base [batch] (first partial slot of a split entry), num_splits [batch]
///   (0: no cached token; 1: written directly; more: merged by decode_combine).
struct DecodeSchedule {
  const std::int32_t* data = nullptr;
  int batch = 0;

  static constexpr std::size_t ints(int batch) { return 3 + 3 * std::size_t(batch); }
  __host__ __device__ __forceinline__ int blocks_per_part() const { return data[0]; }
  __host__ __device__ __forceinline__ int total_blocks() const { return data[1]; }
  __host__ __device__ __forceinline__ int prefix(int b) const { return data[2 + b]; }
  __host__ __device__ __forceinline__ int split_base(int b) const { return data[3 + batch + b]; }
  __host__ __device__ __forceinline__ int num_splits(int b) const {
    return data[3 + 2 * batch + b];
  }
};

/// An inclusive prefix sum over the block (Hillis-Steele in shared memory); `scratch` holds
/// blockDim.x ints. Every thread of the block calls it.
__device__ __forceinline__ int block_inclusive_scan(int value, int* scratch) {
  const int tid = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(blockDim.x);
  scratch[tid] = value;
  __syncthreads();
  for (int offset = 1; offset < n; offset *= 2) {
    const int add = tid >= offset ? scratch[tid - offset] : 0;
    __syncthreads();
    scratch[tid] += add;
    __syncthreads();
  }
  return scratch[tid];
}

/// Computes the schedule of one call from the cached lengths: entry b has ceil(len_b / 64) key
/// blocks; the batch's blocks, laid end to end, are cut into `parts` ranges of equal size
/// (the last shorter), so that one long sequence spreads over many blocks of the attention grid
/// as much as a batch of short ones does. One block of DecodeTiling::schedule_threads threads.
template <int = 0>
__global__ void __launch_bounds__(DecodeTiling::schedule_threads)
    decode_schedule(const std::int32_t* seqlens, int batch, int parts, std::int32_t* schedule) {
  __shared__ int scratch[DecodeTiling::schedule_threads];
  constexpr int kb = DecodeTiling::key_block;
  const int tid = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(blockDim.x);
  std::int32_t* prefix = schedule + 2;
  std::int32_t* split_base = prefix + batch + 1;
  std::int32_t* num_splits = split_base + batch;
  int carry = 0;
  for (int first = 0; first < batch; first += n) {
    const int b = first + tid;
    const int len = b < batch ? seqlens[b] : 0;
    const int blocks = len > 0 ? (len + kb - 1) / kb : 0;
    const int inclusive = block_inclusive_scan(blocks, scratch);
    if (b < batch) prefix[b] = carry + inclusive - blocks;
    carry += scratch[n - 1];
    __syncthreads();  // scratch is rewritten by the next chunk
  }
  const int total = carry;
  const int per = total > 0 ? (total + parts - 1) / parts : 1;
  if (tid == 0) {
    prefix[batch] = total;
    schedule[0] = per;
    schedule[1] = total;
  }
  carry = 0;
  for (int first = 0; first < batch; first += n) {
    const int b = first + tid;
    int splits = 0;
    if (b < batch) {
      const int len = seqlens[b];
      const int blocks = len > 0 ? (len + kb - 1) / kb : 0;
      // prefix[b] was written by this same thread in the first pass (same b, same thread).
      const int begin = prefix[b];
      splits = blocks > 0 ? (begin + blocks - 1) / per - begin / per + 1 : 0;
    }
    const int slots = splits > 1 ? splits : 0;
    const int inclusive = block_inclusive_scan(slots, scratch);
    if (b < batch) {
      split_base[b] = carry + inclusive - slots;
      num_splits[b] = splits;
    }
    carry += scratch[n - 1];
    __syncthreads();
  }
}

/// Arguments of decode_attention.
template <class Address>
struct DecodeAttentionParams {
  daedalus::cuda::DeviceLatentBatch<Address> cache;
  const float* q;      // [batch, rows_per_seq, D]
  float* out;          // [batch, rows_per_seq, V]
  float* partial_out;  // [slots, rows_per_seq, V]
  float* partial_lse;  // [slots, rows_per_seq], base-2 log-sum-exp
  const std::int32_t* schedule;
  int q_len;
  int n_heads;
  int rows_per_seq;  // q_len · n_heads
  float scale_log2;  // softmax scale · log2(e): scores in base-2 units, softmax with exp2
};

using ::daedalus::cuda::Bytes16;

using ::daedalus::cuda::detail::store_pair;

using ::daedalus::cuda::copy_async_16;
using ::daedalus::cuda::wait_async_copies;

/// Copies cached rows [key0, key0 + valid) of entry b into the K block in shared memory (row j at
/// k_shared + j · Shape::ld), zero-filling rows past `valid` and columns past D, so that rows no
/// query may see (past the sequence's end: poisoned or another sequence's data) contribute exact
/// zeros to both products.
template <class Element, int D, class Shape, class Address>
__device__ __forceinline__ void load_key_block(const daedalus::cuda::DeviceLatentBatch<Address>& c,
                                               int b, int key0, int valid, Element* k_shared) {
  constexpr int threads = DecodeTiling::threads;
  constexpr int keys = Shape::keys;
  if constexpr (D % 8 == 0) {
    // Rows of D 16-bit values are a whole number of 16-byte chunks (the pool is 256-byte
    // aligned, rows are D · 2 bytes), as for DeepSeek's 576: asynchronous copies, all in flight
    // together; zeros are stored directly.
    constexpr int chunks = Shape::d_pad / 8;
    for (int e = static_cast<int>(threadIdx.x); e < keys * chunks; e += threads) {
      const int j = e / chunks, chunk = e % chunks;
      Element* dst = k_shared + j * Shape::ld + chunk * 8;
      if (j < valid && chunk < D / 8) {
        copy_async_16(dst, reinterpret_cast<const Bytes16*>(c.row(b, key0 + j)) + chunk);
      } else {
        *reinterpret_cast<Bytes16*>(dst) = Bytes16{{0u, 0u, 0u, 0u}};
      }
    }
    wait_async_copies();
  } else {
    const Element zero = daedalus::cuda::from_float<Element>(0.0f);
    for (int e = static_cast<int>(threadIdx.x); e < keys * Shape::d_pad; e += threads) {
      const int j = e / Shape::d_pad, col = e % Shape::d_pad;
      Element value = zero;
      if (j < valid && col < D) value = reinterpret_cast<const Element*>(c.row(b, key0 + j))[col];
      k_shared[j * Shape::ld + col] = value;
    }
  }
}

/// Starts the copies of columns [col0, col1) (multiples of 8) of cached rows [key0, key0 + valid)
/// of entry b into `dst` (row j at dst + j · dst_ld, column col0 first), zero-filling rows past
/// `valid` and columns at or past D. Complete after wait_async_copies() and a barrier.
template <class Element, int D, class Address>
__device__ __forceinline__ void copy_key_columns(
    const daedalus::cuda::DeviceLatentBatch<Address>& c, int b, int key0, int valid, int col0,
    int col1, Element* dst, int dst_ld) {
  constexpr int keys = DecodeTiling::key_block;
  const int chunks = (col1 - col0) / 8;
  for (int e = static_cast<int>(threadIdx.x); e < keys * chunks; e += DecodeTiling::threads) {
    const int j = e / chunks, chunk = col0 / 8 + e % chunks;
    Element* to = dst + j * dst_ld + (chunk * 8 - col0);
    if (j < valid && chunk < D / 8) {
      copy_async_16(to, reinterpret_cast<const Bytes16*>(c.row(b, key0 + j)) + chunk);
    } else {
      *reinterpret_cast<Bytes16*>(to) = Bytes16{{0u, 0u, 0u, 0u}};
    }
  }
}

/// s[j] += Q[16 rows] · K[key tile j]ᵀ over `Steps` k-steps: the query tile at `q_tile`, this
/// warp's keys at `k_tile` (row-major, leading dimension `k_ld`), both from their first column.
template <class Shape, int Steps, class Element>
__device__ __forceinline__ void score_steps(daedalus::cuda::MmaAccumulator (&s)[Shape::score_tiles],
                                            const Element* q_tile, const Element* k_tile, int k_ld,
                                            int lane) {
  for (int k = 0; k < Steps; ++k) {
    const auto a = daedalus::cuda::load_fragment_a_x4(q_tile + k * 16, Shape::ld, lane);
    if constexpr (Shape::score_tiles % 2 == 0) {
      DAEDALUS_UNROLL
      for (int j = 0; j < Shape::score_tiles; j += 2) {
        const auto bf = daedalus::cuda::load_fragments_b_transposed_x4(
            k_tile + j * 8 * k_ld + k * 16, k_ld, lane);
        daedalus::cuda::mma_m16n8k16(s[j], a, bf.tile[0]);
        daedalus::cuda::mma_m16n8k16(s[j + 1], a, bf.tile[1]);
      }
    } else {
      DAEDALUS_UNROLL
      for (int j = 0; j < Shape::score_tiles; ++j) {
        const auto bf =
            daedalus::cuda::load_fragment_b_transposed(k_tile + j * 8 * k_ld + k * 16, k_ld, lane);
        daedalus::cuda::mma_m16n8k16(s[j], a, bf);
      }
    }
  }
}

/// score_steps for one key tile per warp (16-row blocks): the even and odd k-steps go to two
/// accumulators, added at the end, so that two independent products are in flight instead of
/// one chain of dependent ones.
template <class Shape, int Steps, class Element>
__device__ __forceinline__ void score_steps_single(daedalus::cuda::MmaAccumulator& s,
                                                   const Element* q_tile, const Element* k_tile,
                                                   int k_ld, int lane) {
  daedalus::cuda::MmaAccumulator odd{{0.0f, 0.0f, 0.0f, 0.0f}};
  for (int k = 0; k < Steps; ++k) {
    const auto a = daedalus::cuda::load_fragment_a_x4(q_tile + k * 16, Shape::ld, lane);
    const auto bf = daedalus::cuda::load_fragment_b_transposed(k_tile + k * 16, k_ld, lane);
    daedalus::cuda::mma_m16n8k16(k % 2 == 0 ? s : odd, a, bf);
  }
  DAEDALUS_UNROLL
  for (int i = 0; i < 4; ++i) s.reg[i] += odd.reg[i];
}

/// Absorbed attention of one tile of folded query rows over key blocks [block0, block1) of entry
/// b (DeepSeek-V2 section 2.1.2 with W_UK absorbed: score[r, t] = q[r] · [c_t ; k_pe_t] · scale,
/// o[r] = Σ_t softmax(score)[r, t] · c_t). Online softmax (Milakov & Gimelshein 2018) in base 2;
/// query row r of token i = r / n_heads sees keys t ≤ len - q_len + i (bottom-right causal).
/// Writes the normalised rows to `out` when the entry is not split, else to its partial slot
/// with the rows' log-sum-exp.
template <class Element, int D, int V, int RowTiles, bool Pipelined, class Address>
__device__ __forceinline__ void attend_piece(const DecodeAttentionParams<Address>& p,
                                             const DecodeSchedule& schedule, int b, int block0,
                                             int block1, int split, unsigned char* shared) {
  using Shape = DecodeShape<D, V, RowTiles, Pipelined>;
  using daedalus::cuda::MmaAccumulator;
  constexpr int rows = Shape::rows, ld = Shape::ld, ldp = Shape::ldp;
  constexpr float neg_inf = -__builtin_huge_valf();
  Element* q_shared = reinterpret_cast<Element*>(shared);
  Element* k_shared = q_shared + Shape::q_elements;
  Element* p_shared = k_shared + Shape::k_elements;
  float* max_shared = reinterpret_cast<float*>(p_shared + Shape::p_elements);  // [groups][rows]
  float* sum_shared = max_shared + Shape::stat_floats;                         // [groups][rows]
  // Pipelined: value buffers k_shared and k_shared + value_elements, rope buffer after both.
  Element* rope_shared = k_shared + 2 * Shape::value_elements;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = static_cast<int>(blockIdx.y) * rows;  // first folded row of the tile
  const int len = p.cache.seqlens[b];
  const Element zero = daedalus::cuda::from_float<Element>(0.0f);

  __syncthreads();  // the previous piece is done with every shared array
  // The query tile, rounded to the storage type for the tensor cores (attention.hpp, precision).
  const float* q_rows = p.q + (std::size_t(b) * p.rows_per_seq + row0) * D;
  for (int e = tid; e < rows * Shape::d_pad; e += DecodeTiling::threads) {
    const int r = e / Shape::d_pad, col = e % Shape::d_pad;
    q_shared[r * ld + col] = (row0 + r < p.rows_per_seq && col < D)
                                 ? daedalus::cuda::from_float<Element>(q_rows[r * D + col])
                                 : zero;
  }

  // Scores: this warp's m-tile and key group.
  const int score_tile = warp % RowTiles;
  const int key_group = warp / RowTiles;
  // The last key each of this lane's two score rows (g and g + 8 of its m-tile) may see, + 1.
  int score_limit[2];
  DAEDALUS_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int token = (row0 + score_tile * 16 + g + 8 * h) / p.n_heads;
    const int limit = len - p.q_len + token + 1;
    score_limit[h] = limit < len ? limit : len;
  }
  float score_max[2] = {neg_inf, neg_inf};

  // Values: every m-tile, this warp's columns. Per row: running max (base 2) and sum.
  MmaAccumulator acc[RowTiles][Shape::value_tiles];
  float row_max[RowTiles][2], row_sum[RowTiles][2];
  DAEDALUS_UNROLL
  for (int m = 0; m < RowTiles; ++m) {
    DAEDALUS_UNROLL
    for (int v = 0; v < Shape::value_tiles; ++v) {
      DAEDALUS_UNROLL
      for (int i = 0; i < 4; ++i) acc[m][v].reg[i] = 0.0f;
    }
    DAEDALUS_UNROLL
    for (int h = 0; h < 2; ++h) {
      row_max[m][h] = neg_inf;
      row_sum[m][h] = 0.0f;
    }
  }

  if constexpr (Pipelined) {
    // The first block's copies; later blocks are copied while their predecessor computes.
    const int valid = len - block0 * Shape::keys;
    copy_key_columns<Element, D>(p.cache, b, block0 * Shape::keys, valid, 0, V, k_shared,
                                 Shape::ldv);
    copy_key_columns<Element, D>(p.cache, b, block0 * Shape::keys, valid, V, Shape::d_pad,
                                 rope_shared, Shape::ldr);
  }
  for (int block = block0; block < block1; ++block) {
    const int key0 = block * Shape::keys;
    // This block's value buffer (pipelined: alternating) and its leading dimension.
    Element* value_shared =
        Pipelined ? k_shared + ((block - block0) % 2) * Shape::value_elements : k_shared;
    constexpr int value_ld = Pipelined ? Shape::ldv : ld;
    const bool has_next = block + 1 < block1;
    if constexpr (Pipelined) {
      wait_async_copies();
      __syncthreads();  // this block's keys have landed; the previous step is done with the
                        // other value buffer, P and the row statistics
      if (has_next) {
        Element* next = k_shared + ((block + 1 - block0) % 2) * Shape::value_elements;
        copy_key_columns<Element, D>(p.cache, b, key0 + Shape::keys, len - key0 - Shape::keys, 0, V,
                                     next, Shape::ldv);
      }
    } else {
      const int valid = len - key0 < Shape::keys ? len - key0 : Shape::keys;
      __syncthreads();  // the previous step is done with the K block, P and the row statistics
      load_key_block<Element, D, Shape>(p.cache, b, key0, valid, k_shared);
      __syncthreads();
    }

    // S = Q · Kᵀ for this warp's 16 rows × score_tiles · 8 keys.
    MmaAccumulator s[Shape::score_tiles];
    DAEDALUS_UNROLL
    for (int j = 0; j < Shape::score_tiles; ++j) {
      DAEDALUS_UNROLL
      for (int i = 0; i < 4; ++i) s[j].reg[i] = 0.0f;
    }
    const Element* q_tile = q_shared + score_tile * 16 * ld;
    const int key_row = key_group * Shape::score_tiles * 8;
    if constexpr (Pipelined) {
      if constexpr (Shape::score_tiles == 1) {
        score_steps_single<Shape, Shape::value_steps>(
            s[0], q_tile, value_shared + key_row * Shape::ldv, Shape::ldv, lane);
        score_steps_single<Shape, Shape::k_steps - Shape::value_steps>(
            s[0], q_tile + V, rope_shared + key_row * Shape::ldr, Shape::ldr, lane);
      } else {
        score_steps<Shape, Shape::value_steps>(s, q_tile, value_shared + key_row * Shape::ldv,
                                               Shape::ldv, lane);
        score_steps<Shape, Shape::k_steps - Shape::value_steps>(
            s, q_tile + V, rope_shared + key_row * Shape::ldr, Shape::ldr, lane);
      }
    } else if constexpr (Shape::score_tiles == 1) {
      score_steps_single<Shape, Shape::k_steps>(s[0], q_tile, k_shared + key_row * ld, ld, lane);
    } else {
      score_steps<Shape, Shape::k_steps>(s, q_tile, k_shared + key_row * ld, ld, lane);
    }
    // Scale to base-2 units, mask, and this warp's maximum of each row.
    float block_max[2] = {neg_inf, neg_inf};
    DAEDALUS_UNROLL
    for (int j = 0; j < Shape::score_tiles; ++j) {
      DAEDALUS_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2;
        const int key = key0 + (key_group * Shape::score_tiles + j) * 8 + 2 * t + (i & 1);
        const float value = key < score_limit[h] ? s[j].reg[i] * p.scale_log2 : neg_inf;
        s[j].reg[i] = value;
        block_max[h] = fmaxf(block_max[h], value);
      }
    }
    DAEDALUS_UNROLL
    for (int h = 0; h < 2; ++h) {
      block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffffu, block_max[h], 1));
      block_max[h] = fmaxf(block_max[h], __shfl_xor_sync(0xffffffffu, block_max[h], 2));
      if (t == 0) max_shared[key_group * rows + score_tile * 16 + g + 8 * h] = block_max[h];
    }
    __syncthreads();
    if constexpr (Pipelined) {
      // Every warp is done with the rope buffer: the next block's rope part goes there now.
      if (has_next) {
        copy_key_columns<Element, D>(p.cache, b, key0 + Shape::keys, len - key0 - Shape::keys, V,
                                     Shape::d_pad, rope_shared, Shape::ldr);
      }
    }

    // P = exp2(S - new running max), rounded to the storage type; its row sums (of the rounded
    // values, so that the normalisation matches the weights the value product uses).
    float block_sum[2] = {0.0f, 0.0f};
    float shift[2];
    DAEDALUS_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = score_tile * 16 + g + 8 * h;
      float m = score_max[h];
      DAEDALUS_UNROLL
      for (int q = 0; q < Shape::key_groups; ++q) m = fmaxf(m, max_shared[q * rows + r]);
      score_max[h] = m;
      // A row that has seen no key yet keeps max -inf; shifting by 0 keeps exp2(-inf) = 0.
      shift[h] = m == neg_inf ? 0.0f : m;
    }
    DAEDALUS_UNROLL
    for (int j = 0; j < Shape::score_tiles; ++j) {
      const int col = (key_group * Shape::score_tiles + j) * 8 + 2 * t;
      DAEDALUS_UNROLL
      for (int h = 0; h < 2; ++h) {
        const Element p0 = daedalus::cuda::from_float<Element>(exp2f(s[j].reg[2 * h] - shift[h]));
        const Element p1 =
            daedalus::cuda::from_float<Element>(exp2f(s[j].reg[2 * h + 1] - shift[h]));
        block_sum[h] += daedalus::cuda::to_float(p0) + daedalus::cuda::to_float(p1);
        const int r = score_tile * 16 + g + 8 * h;
        store_pair(p_shared + r * ldp + col, daedalus::cuda::detail::pack_pair(p0, p1));
      }
    }
    DAEDALUS_UNROLL
    for (int h = 0; h < 2; ++h) {
      block_sum[h] += __shfl_xor_sync(0xffffffffu, block_sum[h], 1);
      block_sum[h] += __shfl_xor_sync(0xffffffffu, block_sum[h], 2);
      if (t == 0) sum_shared[key_group * rows + score_tile * 16 + g + 8 * h] = block_sum[h];
    }
    __syncthreads();

    // Rescale the accumulators to the new maxima, then O += P · V over this warp's columns.
    DAEDALUS_UNROLL
    for (int m = 0; m < RowTiles; ++m) {
      DAEDALUS_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int r = m * 16 + g + 8 * h;
        float new_max = row_max[m][h];
        float added = 0.0f;
        DAEDALUS_UNROLL
        for (int q = 0; q < Shape::key_groups; ++q) {
          new_max = fmaxf(new_max, max_shared[q * rows + r]);
          added += sum_shared[q * rows + r];
        }
        const float alpha = new_max == neg_inf ? 1.0f : exp2f(row_max[m][h] - new_max);
        row_max[m][h] = new_max;
        row_sum[m][h] = row_sum[m][h] * alpha + added;
        DAEDALUS_UNROLL
        for (int v = 0; v < Shape::value_tiles; ++v) {
          acc[m][v].reg[2 * h] *= alpha;
          acc[m][v].reg[2 * h + 1] *= alpha;
        }
      }
    }
    DAEDALUS_UNROLL
    for (int k = 0; k < Shape::keys / 16; ++k) {
      daedalus::cuda::MmaFragmentA<Element> a[RowTiles];
      DAEDALUS_UNROLL
      for (int m = 0; m < RowTiles; ++m)
        a[m] = daedalus::cuda::load_fragment_a_x4(p_shared + m * 16 * ldp + k * 16, ldp, lane);
      // Pairs of 8-column tiles with one ldmatrix.x4.trans; columns at or past V (a pair's
      // second tile at the value's edge) are computed but never stored. Warps whose columns
      // start past V have nothing to do (warp-uniform branches).
      DAEDALUS_UNROLL
      for (int v = 0; v + 1 < Shape::value_tiles; v += 2) {
        const int col0 = (warp * Shape::value_tiles + v) * 8;
        if (col0 < V) {
          const auto bf = daedalus::cuda::load_fragments_b_x4(
              value_shared + k * 16 * value_ld + col0, value_ld, lane);
          DAEDALUS_UNROLL
          for (int m = 0; m < RowTiles; ++m) {
            daedalus::cuda::mma_m16n8k16(acc[m][v], a[m], bf.tile[0]);
            daedalus::cuda::mma_m16n8k16(acc[m][v + 1], a[m], bf.tile[1]);
          }
        }
      }
      if constexpr (Shape::value_tiles % 2 == 1) {
        constexpr int v = Shape::value_tiles - 1;
        const int col0 = (warp * Shape::value_tiles + v) * 8;
        if (col0 < V) {
          const auto bf = daedalus::cuda::load_fragment_b(value_shared + k * 16 * value_ld + col0,
                                                          value_ld, lane);
          DAEDALUS_UNROLL
          for (int m = 0; m < RowTiles; ++m) daedalus::cuda::mma_m16n8k16(acc[m][v], a[m], bf);
        }
      }
    }
  }

  // Normalise and store. Rows that saw no key have sum 0 and get zeros (lse -inf).
  const int splits = schedule.num_splits(b);
  const bool direct = splits == 1;
  const std::size_t slot = direct ? 0 : std::size_t(schedule.split_base(b) + split);
  float* dst = direct ? p.out + std::size_t(b) * p.rows_per_seq * V
                      : p.partial_out + slot * p.rows_per_seq * V;
  DAEDALUS_UNROLL
  for (int m = 0; m < RowTiles; ++m) {
    DAEDALUS_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + m * 16 + g + 8 * h;
      if (r >= p.rows_per_seq) continue;
      const float sum = row_sum[m][h];
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      DAEDALUS_UNROLL
      for (int v = 0; v < Shape::value_tiles; ++v) {
        const int col = (warp * Shape::value_tiles + v) * 8 + 2 * t;
        if (col < V) dst[std::size_t(r) * V + col] = acc[m][v].reg[2 * h] * inv;
        if (col + 1 < V) dst[std::size_t(r) * V + col + 1] = acc[m][v].reg[2 * h + 1] * inv;
      }
      if (!direct && warp == 0 && t == 0) {
        p.partial_lse[slot * p.rows_per_seq + r] =
            sum > 0.0f ? row_max[m][h] + log2f(sum) : neg_inf;
      }
    }
  }
}

/// The attention grid: blockIdx.x is the part (a range of the batch's key blocks laid end to end,
/// from the schedule), blockIdx.y the tile of folded query rows. A part walks the entries its
/// range touches; each intersection is one piece (a split of that entry when other parts share
/// it). DecodeTiling::threads threads, DecodeShape::shared_bytes of dynamic shared memory.
template <class Element, int D, int V, int RowTiles, bool Pipelined, class Address>
__global__ void __launch_bounds__(DecodeTiling::threads,
                                  (DecodeShape<D, V, RowTiles, Pipelined>::blocks_per_sm))
    decode_attention(DecodeAttentionParams<Address> p) {
  const DecodeSchedule schedule{p.schedule, p.cache.batch};
  const int per = schedule.blocks_per_part();
  const int total = schedule.total_blocks();
  const int part = static_cast<int>(blockIdx.x);
  const long long first = static_cast<long long>(part) * per;
  if (first >= total) return;
  const int begin = static_cast<int>(first);
  const int end = total - begin < per ? total : begin + per;
  // The first entry whose blocks reach past `begin` (entries without blocks have empty ranges).
  int lo = 0, hi = p.cache.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (schedule.prefix(mid + 1) > begin)
      hi = mid;
    else
      lo = mid + 1;
  }
  unsigned char* shared = daedalus::cuda::dynamic_shared_memory<unsigned char>();
  for (int b = lo; b < p.cache.batch && schedule.prefix(b) < end; ++b) {
    const int entry_begin = schedule.prefix(b), entry_end = schedule.prefix(b + 1);
    if (entry_end <= entry_begin) continue;
    const int block0 = (begin > entry_begin ? begin : entry_begin) - entry_begin;
    const int block1 = (end < entry_end ? end : entry_end) - entry_begin;
    const int split = part - entry_begin / per;
    attend_piece<Element, D, V, RowTiles, Pipelined>(p, schedule, b, block0, block1, split, shared);
  }
}

/// Arguments of decode_combine.
struct DecodeCombineParams {
  float* out;                // [batch, rows_per_seq, V]
  const float* partial_out;  // [slots, rows_per_seq, V]
  const float* partial_lse;  // [slots, rows_per_seq]
  const std::int32_t* schedule;
  int batch;
  int rows_per_seq;
  int v;
};

/// Merges the pieces of every split row: out = Σ_s 2^(lse_s - M) o_s / Σ_s 2^(lse_s - M) with
/// M = max_s lse_s (the log-sum-exp merge of flash-decoding); entries without cached tokens get
/// zeros, unsplit entries were written by decode_attention. One warp per row, grid (batch,
/// row chunks of DecodeTiling::combine_rows).
template <int = 0>
__global__ void __launch_bounds__(DecodeTiling::combine_rows * 32)
    decode_combine(DecodeCombineParams p) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int b = static_cast<int>(blockIdx.x);
  const int r = static_cast<int>(blockIdx.y) * DecodeTiling::combine_rows +
                static_cast<int>(threadIdx.x) / 32;
  if (r >= p.rows_per_seq) return;
  const DecodeSchedule schedule{p.schedule, p.batch};
  const int splits = schedule.num_splits(b);
  if (splits == 1) return;
  float* dst = p.out + (std::size_t(b) * p.rows_per_seq + r) * p.v;
  constexpr float neg_inf = -__builtin_huge_valf();
  const std::size_t base = splits > 1 ? std::size_t(schedule.split_base(b)) : 0;
  float top = neg_inf;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, p.partial_lse[(base + s) * p.rows_per_seq + r]);
  if (top == neg_inf) {  // no cached token, or no visible key in any piece
    for (int c = lane; c < p.v; c += 32) dst[c] = 0.0f;
    return;
  }
  float denominator = 0.0f;
  for (int s = 0; s < splits; ++s)
    denominator += exp2f(p.partial_lse[(base + s) * p.rows_per_seq + r] - top);
  const float inv = 1.0f / denominator;
  for (int c = lane; c < p.v; c += 32) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const std::size_t slot = base + s;
      const float weight = exp2f(p.partial_lse[slot * p.rows_per_seq + r] - top);
      sum += weight * p.partial_out[(slot * p.rows_per_seq + r) * p.v + c];
    }
    dst[c] = sum * inv;
  }
}

/// What validate_on_device learns: the first bad entry in the host check's order (key
/// b · (max_blocks + 1) for a bad length of entry b, b · (max_blocks + 1) + 1 + j for a bad
/// block-table entry j; all ones when none) and whether any entry uses a block.
struct PagedCheckResult {
  unsigned long long first_bad;
  unsigned long long any_used;
};

/// One thread per batch entry: checks its length against [0, max_blocks · block_size] and the
/// block ids it uses against [0, num_blocks), and records the smallest bad key.
template <int = 0>
__global__ void paged_view_check(const std::int32_t* seqlens, const std::int32_t* block_table,
                                 int batch, int max_blocks, int block_size, long long num_blocks,
                                 PagedCheckResult* result) {
  const int b = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (b >= batch) return;
  const unsigned long long key0 = static_cast<unsigned long long>(b) * (max_blocks + 1ull);
  const int len = seqlens[b];
  if (len < 0 || static_cast<long long>(len) > static_cast<long long>(max_blocks) * block_size) {
    atomicMin(&result->first_bad, key0);
    return;
  }
  const int used = (len + block_size - 1) / block_size;
  if (used > 0) atomicMax(&result->any_used, 1ull);
  for (int j = 0; j < used; ++j) {
    const int id = block_table[static_cast<long long>(b) * max_blocks + j];
    if (id < 0 || id >= num_blocks) {
      atomicMin(&result->first_bad, key0 + 1 + j);
      return;
    }
  }
}

}  // namespace daedalus::mla::cuda::detail
