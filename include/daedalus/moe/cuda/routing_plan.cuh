// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/moe/routing_plan.hpp"

/// The routing plan on the GPU: the same stable sort of (token, slot) pairs by expert as
/// RoutingPlan (moe/routing_plan.hpp), with the same capacity, drop policies and padding, built by
/// kernels from device topk_ids / topk_weights so that the gate's output never visits the host.
namespace daedalus::moe {

namespace detail::plan_kernels {

/// Slots per block of the chunked stable counting sort.
inline constexpr int kChunk = 256;
/// Threads per block of the element-wise kernels.
inline constexpr int kThreads = 256;

struct ValidateParams {
  const std::int32_t* ids;  // [slots]
  const float* weights;     // [slots]
  int slots;
  int num_experts;
  int* first_bad;  // [1] in/out: the lowest slot with a bad id or weight (INT_MAX: none)
};

/// The lowest slot whose expert id is out of range or whose weight is not finite: the slot at
/// which RoutingPlan::build's host loop would throw.
// Kernels are templates (`template <int = 0>` where nothing else varies), so that every
// translation unit that includes this header may define them without breaking the ODR.
template <int = 0>
__global__ void validate_slots(ValidateParams p) {
  const int s = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (s >= p.slots) return;
  const std::int32_t id = p.ids[s];
  const float w = p.weights[s];
  // w - w is 0 for a finite w and NaN otherwise; avoids depending on isfinite in device code.
  if (id < 0 || id >= p.num_experts || !((w - w) == 0.0f)) atomicMin(p.first_bad, s);
}

struct ChunkParams {
  const std::int32_t* ids;  // [slots]
  int slots;
  int num_experts;
  int* rank_in_chunk;  // [slots] out: earlier slots of the same chunk with the same expert
  int* chunk_counts;   // [chunks, num_experts] out (zeroed before): slots per expert per chunk
};

/// Stable ranks within one chunk of kChunk slots: slot s ranks after every earlier slot of its
/// chunk routed to the same expert. The last slot of each expert in the chunk records the count.
template <int = 0>
__global__ void __launch_bounds__(kChunk) rank_in_chunks(ChunkParams p) {
  __shared__ std::int32_t chunk_ids[kChunk];
  const int tid = static_cast<int>(threadIdx.x);
  const int chunk = static_cast<int>(blockIdx.x);
  const int s = chunk * kChunk + tid;
  const std::int32_t id = s < p.slots ? p.ids[s] : -1;
  chunk_ids[tid] = id;
  __syncthreads();
  if (s >= p.slots) return;
  int rank = 0;
  for (int j = 0; j < tid; ++j) rank += chunk_ids[j] == id ? 1 : 0;
  bool last = true;
  const int chunk_end = p.slots - chunk * kChunk < kChunk ? p.slots - chunk * kChunk : kChunk;
  for (int j = tid + 1; j < chunk_end && last; ++j) last = chunk_ids[j] != id;
  p.rank_in_chunk[s] = rank;
  if (last) p.chunk_counts[std::int64_t(chunk) * p.num_experts + id] = rank + 1;
}

struct ExpertScanParams {
  int* chunk_counts;  // [chunks, num_experts] in: counts; out: exclusive prefix over chunks
  int chunks;
  int num_experts;
  int* routed_counts;  // [num_experts] out
};

/// Per expert, the exclusive prefix sum of its per-chunk counts (in place) and its total.
template <int = 0>
__global__ void scan_chunks_per_expert(ExpertScanParams p) {
  const int e = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (e >= p.num_experts) return;
  int running = 0;
  for (int c = 0; c < p.chunks; ++c) {
    int* cell = p.chunk_counts + std::int64_t(c) * p.num_experts + e;
    const int count = *cell;
    *cell = running;
    running += count;
  }
  p.routed_counts[e] = running;
}

struct SegmentParams {
  const int* routed_counts;  // [num_experts]
  int num_experts;
  int capacity;
  int pad_block;
  int* starts;            // [num_experts + 1] out: where expert e's routed slots start, unpadded
  int* counts;            // [num_experts] out: kept slots
  int* offsets;           // [num_experts + 1] out: where expert e's rows start, padded
  int* dropped;           // [1] out
  int row_block;          // rows per block of the grouped expert GEMM
  int* row_block_starts;  // [num_experts + 1] out: first row block of each expert's kept rows
};

/// The segment layout: a sequential scan over the experts (a few hundred at most, one thread:
/// far below the cost of one launch).
template <int = 0>
__global__ void lay_out_segments(SegmentParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int start = 0, offset = 0, dropped = 0, blocks = 0;
  for (int e = 0; e < p.num_experts; ++e) {
    const int routed = p.routed_counts[e];
    const int kept = routed < p.capacity ? routed : p.capacity;
    p.starts[e] = start;
    p.offsets[e] = offset;
    p.counts[e] = kept;
    p.row_block_starts[e] = blocks;
    blocks += (kept + p.row_block - 1) / p.row_block;
    start += routed;
    offset += (kept + p.pad_block - 1) / p.pad_block * p.pad_block;
    dropped += routed - kept;
  }
  p.starts[p.num_experts] = start;
  p.offsets[p.num_experts] = offset;
  p.row_block_starts[p.num_experts] = blocks;
  *p.dropped = dropped;
}

struct SortParams {
  const std::int32_t* ids;   // [slots]
  const int* rank_in_chunk;  // [slots]
  const int* chunk_prefix;   // [chunks, num_experts]
  const int* starts;         // [num_experts + 1]
  int slots;
  int num_experts;
  int* position;         // [slots] out: the slot's index among its expert's slots
  std::int32_t* sorted;  // [slots] out: slots grouped by expert, in slot order
};

/// Scatters every slot to its stable place in the expert-ordered list.
template <int = 0>
__global__ void sort_by_expert(SortParams p) {
  const int s = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (s >= p.slots) return;
  const int e = p.ids[s];
  const int chunk = s / kChunk;
  const int pos = p.chunk_prefix[std::int64_t(chunk) * p.num_experts + e] + p.rank_in_chunk[s];
  p.position[s] = pos;
  p.sorted[p.starts[e] + pos] = s;
}

struct KeepParams {
  const std::int32_t* ids;     // [slots]
  const float* weights;        // [slots]
  const int* position;         // [slots]
  const std::int32_t* sorted;  // [slots]
  const int* starts;           // [num_experts + 1]
  const int* routed_counts;    // [num_experts]
  int slots;
  int capacity;
  int keep_by_weight;  // 1: DropPolicy::probs, 0: DropPolicy::position
  std::uint8_t* kept;  // [slots] out
};

/// Which slots their expert keeps. Within capacity every slot; over it, by position the first
/// `capacity` in slot order, by probs the `capacity` largest weights (equal weights: the lower
/// slot), as RoutingPlan::build. The probs rank is a count over the expert's slots: quadratic in
/// an overloaded expert's load, which only capacity-limited plans pay.
template <int = 0>
__global__ void mark_kept(KeepParams p) {
  const int s = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (s >= p.slots) return;
  const int e = p.ids[s];
  const int routed = p.routed_counts[e];
  bool keep = true;
  if (routed > p.capacity) {
    if (p.keep_by_weight == 0) {
      keep = p.position[s] < p.capacity;
    } else {
      const float w = p.weights[s];
      int ahead = 0;
      const std::int32_t* segment = p.sorted + p.starts[e];
      for (int i = 0; i < routed && ahead < p.capacity; ++i) {
        const std::int32_t other = segment[i];
        const float v = p.weights[other];
        ahead += (v > w || (v == w && other < s)) ? 1 : 0;
      }
      keep = ahead < p.capacity;
    }
  }
  p.kept[s] = keep ? 1 : 0;
}

struct PlaceParams {
  const std::int32_t* ids;     // [slots]
  const float* weights;        // [slots]
  const int* position;         // [slots]
  const std::int32_t* sorted;  // [slots]
  const int* starts;           // [num_experts + 1]
  const int* routed_counts;    // [num_experts]
  const int* offsets;          // [num_experts + 1]
  const std::uint8_t* kept;    // [slots]
  int slots;
  int capacity;
  std::int32_t* row_slot;  // [rows] out (pre-filled with -1)
  float* row_weight;       // [rows] out (pre-filled with 0)
  std::int32_t* slot_row;  // [slots] out
};

/// The final row of each kept slot: its expert's offset plus the kept slots before it in slot
/// order; dropped slots map to -1.
template <int = 0>
__global__ void place_rows(PlaceParams p) {
  const int s = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (s >= p.slots) return;
  if (p.kept[s] == 0) {
    p.slot_row[s] = -1;
    return;
  }
  const int e = p.ids[s];
  int index = p.position[s];
  if (p.routed_counts[e] > p.capacity) {
    // Kept slots before this one in slot order (its expert's list is in slot order).
    const std::int32_t* segment = p.sorted + p.starts[e];
    index = 0;
    for (int i = 0; i < p.position[s]; ++i) index += p.kept[segment[i]];
  }
  const int row = p.offsets[e] + index;
  p.row_slot[row] = s;
  p.row_weight[row] = p.weights[s];
  p.slot_row[s] = row;
}

}  // namespace detail::plan_kernels

/// The routing plan of one batch in device memory: what RoutingPlan holds, built on the GPU from
/// the gate's device outputs (a chunked stable counting sort: ranks within chunks of 256 slots,
/// a prefix over chunks per expert, a scatter), so expert ids and weights never visit the host.
///
/// Differences from RoutingPlan, both to avoid a device-to-host round trip per batch:
///   - `rows()` is the size of the expert-ordered buffer, known on the host: the most rows the
///     plan can need, tokens · k + num_experts · (pad_block − 1) (exact when dropless and
///     unpadded). The plan's own rows end at offsets[num_experts] (device); rows past it are
///     padding (row_slot −1, weight 0), which dispatch zeroes and combine never reads.
///   - per-expert counts, offsets and the dropped count live on the device; `download()` copies
///     everything to the host (tests, statistics).
/// Input validation (expert ids in range, finite weights) costs one 4-byte device-to-host copy
/// and a stream synchronisation, so that a bad batch throws before anything changes, naming the
/// token and slot as RoutingPlan::build does.
class DeviceRoutingPlan {
 public:
  using memory_space = DeviceMemory;
  /// Rows per block of the grouped expert GEMM (moe/cuda/experts.cuh), whose tile schedule the
  /// build computes.
  static constexpr int kRowBlock = 64;

  /// The plan's arrays copied to the host, in RoutingPlan's meaning (offsets, counts and
  /// routed_counts per expert; row_slot / row_weight over rows(); slot_row over tokens · k).
  struct HostCopy {
    std::vector<std::int32_t> offsets, counts, routed_counts, row_slot, slot_row;
    std::vector<float> row_weight;
    std::int32_t dropped = 0;
  };

  DeviceRoutingPlan() = default;

  /// Builds the plan of one batch on the backend's stream.
  /// @param topk_ids     [tokens, k] device expert ids, each in [0, num_experts)
  /// @param topk_weights [tokens, k] device routing weights; finite
  /// @param num_experts  routed experts, at least 1
  /// @param settings     capacity, drop policy and padding, as for RoutingPlan
  /// @throws InvalidArgument, OutOfRange (naming token and slot) or NumericError (naming token
  ///         and slot) exactly as RoutingPlan::build; CudaError on a CUDA error. A failed build
  ///         leaves the plan as it was.
  void build(const CudaBackend& backend, TensorView<const std::int32_t, 2, DeviceMemory> topk_ids,
             TensorView<const float, 2, DeviceMemory> topk_weights, int num_experts,
             const PlanSettings& settings = {}) {
    namespace k = detail::plan_kernels;
    constexpr std::string_view fn = "daedalus::moe::DeviceRoutingPlan::build";
    const index_t tokens = topk_ids.extent(0);
    const index_t width = topk_ids.extent(1);
    const index_t slots =
        detail::check_plan_arguments(fn, topk_ids, topk_weights, num_experts, settings);
    const index_t max_rows = slots + index_t(num_experts) * (settings.pad_block - 1);
    const int n = static_cast<int>(slots);
    const std::int32_t* ids = topk_ids.data();
    const float* weights = topk_weights.data();

    // Validation first: nothing of the plan changes before it passes.
    // The flag lives in the plan (a cudaMalloc and cudaFree per build would make every build
    // wait for the whole device); the build synchronises before it reads it back.
    if (first_bad_.size() == 0) first_bad_ = cuda::DeviceBuffer<int>(1);
    const int none = INT_MAX;
    cuda::copy(backend, first_bad_, std::span<const int>(&none, 1));
    if (n > 0) {
      cuda::launch(backend, {dim3(blocks_for(n)), dim3(k::kThreads)}, k::validate_slots<>,
                   k::ValidateParams{ids, weights, n, num_experts, first_bad_.data()});
    }
    int bad = none;
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad_.data(), sizeof(int),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    backend.synchronize();
    if (bad != none) throw_bad_slot(backend, fn, ids, weights, bad, width, num_experts);

    // At most slots (< 2^31, checked above), so the kernels' int holds it.
    const index_t capacity = detail::expert_capacity(slots, num_experts, settings.capacity_factor);
    const int chunks = (n + k::kChunk - 1) / k::kChunk;
    const auto experts = std::size_t(num_experts);
    // The build writes into the spare arrays (double buffering): the current plan stays intact
    // until everything is issued, so a failed build leaves it as it was. A grown buffer is never
    // empty, so every pointer handed to a kernel is valid, even for an empty batch.
    ScratchArrays& scratch = scratch_;
    cuda::grow(scratch.chunk_counts, std::size_t(chunks) * experts);
    cuda::grow(scratch.rank, std::size_t(n));
    cuda::grow(scratch.position, std::size_t(n));
    cuda::grow(scratch.sorted, std::size_t(n));
    cuda::grow(scratch.kept, std::size_t(n));
    cuda::grow(scratch.starts, experts + 1);
    PlanArrays& next = spare_;
    cuda::grow(next.routed_counts, experts);
    cuda::grow(next.counts, experts);
    cuda::grow(next.offsets, experts + 1);
    cuda::grow(next.dropped, 1);
    cuda::grow(next.row_block_starts, experts + 1);
    cuda::grow(next.row_slot, std::size_t(max_rows));
    cuda::grow(next.row_weight, std::size_t(max_rows));
    cuda::grow(next.slot_row, std::size_t(n));

    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(scratch.chunk_counts.data(), 0,
                                        std::size_t(chunks) * experts * sizeof(int),
                                        backend.stream()));
    // Padding rows: slot -1 (all bits set) and weight 0.
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(next.row_slot.data(), 0xFF,
                                        std::size_t(max_rows) * sizeof(std::int32_t),
                                        backend.stream()));
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(next.row_weight.data(), 0,
                                        std::size_t(max_rows) * sizeof(float), backend.stream()));
    if (n > 0) {
      cuda::launch(
          backend, {dim3(unsigned(chunks)), dim3(k::kChunk)}, k::rank_in_chunks<>,
          k::ChunkParams{ids, n, num_experts, scratch.rank.data(), scratch.chunk_counts.data()});
    }
    cuda::launch(backend, {dim3(blocks_for(num_experts)), dim3(k::kThreads)},
                 k::scan_chunks_per_expert<>,
                 k::ExpertScanParams{scratch.chunk_counts.data(), chunks, num_experts,
                                     next.routed_counts.data()});
    cuda::launch(backend, {dim3(1), dim3(32)}, k::lay_out_segments<>,
                 k::SegmentParams{next.routed_counts.data(), num_experts, int(capacity),
                                  int(settings.pad_block), scratch.starts.data(),
                                  next.counts.data(), next.offsets.data(), next.dropped.data(),
                                  kRowBlock, next.row_block_starts.data()});
    if (n > 0) {
      const dim3 grid(blocks_for(n)), block(k::kThreads);
      cuda::launch(backend, {grid, block}, k::sort_by_expert<>,
                   k::SortParams{ids, scratch.rank.data(), scratch.chunk_counts.data(),
                                 scratch.starts.data(), n, num_experts, scratch.position.data(),
                                 scratch.sorted.data()});
      cuda::launch(
          backend, {grid, block}, k::mark_kept<>,
          k::KeepParams{ids, weights, scratch.position.data(), scratch.sorted.data(),
                        scratch.starts.data(), next.routed_counts.data(), n, int(capacity),
                        settings.drop_policy == DropPolicy::probs ? 1 : 0, scratch.kept.data()});
      cuda::launch(
          backend, {grid, block}, k::place_rows<>,
          k::PlaceParams{ids, weights, scratch.position.data(), scratch.sorted.data(),
                         scratch.starts.data(), next.routed_counts.data(), next.offsets.data(),
                         scratch.kept.data(), n, int(capacity), next.row_slot.data(),
                         next.row_weight.data(), next.slot_row.data()});
    }
    // Everything is issued: the plan takes the new arrays.
    std::swap(storage_, spare_);
    tokens_ = tokens;
    k_ = width;
    num_experts_ = num_experts;
    capacity_ = capacity;
    rows_ = max_rows;
    settings_ = settings;
  }

  /// Tokens of the batch the plan was built for.
  [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
  /// Experts per token.
  [[nodiscard]] index_t k() const noexcept { return k_; }
  /// Routed experts.
  [[nodiscard]] int num_experts() const noexcept { return num_experts_; }
  /// Rows of the expert-ordered buffer (see the class comment: a bound known on the host).
  [[nodiscard]] index_t rows() const noexcept { return rows_; }
  /// Slots each expert may keep: tokens · k when dropless, and at most that.
  [[nodiscard]] index_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] const PlanSettings& settings() const noexcept { return settings_; }

  /// Device arrays, RoutingPlan's meaning. [num_experts + 1]
  [[nodiscard]] const std::int32_t* offsets() const noexcept { return storage_.offsets.data(); }
  /// [num_experts] kept slots per expert.
  [[nodiscard]] const std::int32_t* counts() const noexcept { return storage_.counts.data(); }
  /// [num_experts] slots routed to each expert before capacity (the load).
  [[nodiscard]] const std::int32_t* routed_counts() const noexcept {
    return storage_.routed_counts.data();
  }
  /// [rows()] the slot each row holds, or −1 for padding.
  [[nodiscard]] const std::int32_t* row_slot() const noexcept { return storage_.row_slot.data(); }
  /// [rows()] each row's routing weight; 0 for padding.
  [[nodiscard]] const float* row_weight() const noexcept { return storage_.row_weight.data(); }
  /// [tokens · k] the row of each slot, or −1 if it was dropped.
  [[nodiscard]] const std::int32_t* slot_row() const noexcept { return storage_.slot_row.data(); }
  /// [num_experts + 1] the grouped expert GEMM's schedule: expert e's kept rows are row blocks
  /// [row_block_starts[e], row_block_starts[e + 1]) of kRowBlock rows (the last one partial).
  [[nodiscard]] const std::int32_t* row_block_starts() const noexcept {
    return storage_.row_block_starts.data();
  }
  /// [1] slots dropped for capacity.
  [[nodiscard]] const std::int32_t* dropped() const noexcept { return storage_.dropped.data(); }

  /// Copies the plan to the host (synchronises the backend's stream).
  [[nodiscard]] HostCopy download(const CudaBackend& backend) const {
    HostCopy h;
    if (k_ == 0) return h;
    h.offsets = cuda::to_host(backend, storage_.offsets);
    h.counts = cuda::to_host(backend, storage_.counts);
    h.routed_counts = cuda::to_host(backend, storage_.routed_counts);
    h.row_slot = cuda::to_host(backend, storage_.row_slot);
    h.row_weight = cuda::to_host(backend, storage_.row_weight);
    h.slot_row = cuda::to_host(backend, storage_.slot_row);
    h.dropped = cuda::to_host(backend, storage_.dropped).front();
    return h;
  }

 private:
  /// The plan's arrays.
  struct PlanArrays {
    cuda::DeviceBuffer<std::int32_t> routed_counts, counts, offsets, dropped, row_slot, slot_row,
        row_block_starts;
    cuda::DeviceBuffer<float> row_weight;
  };
  /// Working arrays of a build, kept so that a plan reused across batches does not allocate.
  struct ScratchArrays {
    cuda::DeviceBuffer<int> chunk_counts, rank, position, starts;
    cuda::DeviceBuffer<std::int32_t> sorted;
    cuda::DeviceBuffer<std::uint8_t> kept;
  };

  static unsigned blocks_for(index_t n) {
    return unsigned((n + detail::plan_kernels::kThreads - 1) / detail::plan_kernels::kThreads);
  }

  /// Throws RoutingPlan::build's error for slot `slot`, reading its id and weight back.
  [[noreturn]] static void throw_bad_slot(const CudaBackend& backend, std::string_view fn,
                                          const std::int32_t* ids, const float* weights, int slot,
                                          index_t k, int num_experts) {
    std::int32_t id = 0;
    float weight = 0.0f;
    DAEDALUS_CUDA_CHECK(
        cudaMemcpyAsync(&id, ids + slot, sizeof(id), cudaMemcpyDeviceToHost, backend.stream()));
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&weight, weights + slot, sizeof(weight),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    backend.synchronize();
    if (id < 0 || id >= num_experts) {
      throw OutOfRange(daedalus::detail::message(fn, ": 'topk_ids' holds expert id ", id,
                                                 " at token ", slot / k, ", slot ", slot % k,
                                                 "; expected an id in [0, ", num_experts, ")"));
    }
    throw NumericError(daedalus::detail::message(fn, ": 'topk_weights' holds a non-finite value (",
                                                 weight, ") at token ", slot / k, ", slot ",
                                                 slot % k));
  }

  index_t tokens_ = 0;
  index_t k_ = 0;
  int num_experts_ = 0;
  index_t capacity_ = 0;
  index_t rows_ = 0;
  PlanSettings settings_{};
  PlanArrays storage_;  // the plan
  PlanArrays spare_;    // the previous plan's arrays: the next build writes into them
  ScratchArrays scratch_;
  cuda::DeviceBuffer<int> first_bad_;  // [1] the validation's result (build's first step)
};

}  // namespace daedalus::moe
