// SPDX-License-Identifier: Apache-2.0
#pragma once

// The kernels behind the device latent caches (kv_cache/cuda/paged.cuh, contiguous.cuh): the
// row encoder that rounds fp32 latent rows to the pool's storage type and scatters them to their
// pool rows, and the finiteness scan that `write` runs before it changes anything. The host
// helpers below choose the vector width, launch, and batch the encodes of one call, uploading the
// destination rows through a grow-only cuda::detail::StagedArray (cuda/device_buffer.cuh).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <unordered_set>
#include <utility>
#include <vector>

#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// What `encode_latent_rows` reads and writes. Row r of `rows` goes to pool row dst_rows[r]:
/// a paged pool's block·BlockSize + slot, or a contiguous pool's first_row + pos. The host
/// computes the destinations (it holds the block lists), so one kernel serves both layouts and
/// any interleaving of sequences in a batch.
struct EncodeRowsParams {
  const float* rows = nullptr;             // [num_rows, latent_dim] fp32, device
  const std::int64_t* dst_rows = nullptr;  // [num_rows] pool row of each source row, device
  std::byte* pool = nullptr;               // [pool rows, latent_dim] of the storage type, device
  int num_rows = 0;
};

/// Threads of one encode block, and the rows one block converts: a block covers several rows so
/// that DeepSeek's 576-wide rows (144 groups of 4) keep all 128 threads busy.
inline constexpr int kEncodeThreads = 128;
inline constexpr int kEncodeRowsPerBlock = 8;

/// Four fp32 values, 16-byte aligned: one 128-bit load.
struct alignas(16) Float4 {
  float v[4];
};
/// Four 16-bit stored values, 8-byte aligned: one 64-bit store.
template <class T>
struct alignas(8) Packed4 {
  T v[4];
};

/// Rounds rows to storage type T (round to nearest even, as the CPU caches' from_float) and
/// stores them at their pool rows. Each thread converts Width consecutive values: 4 when the
/// row width is a multiple of 4 and the source is 16-byte aligned (a 128-bit load and a 64-bit
/// store), else 1. LatentDim is a compile-time constant (the config's), so the index arithmetic
/// divides by constants. No finiteness check: the caller checked (or documents that it did not).
template <class T, int LatentDim, int Width>
__global__ void __launch_bounds__(kEncodeThreads) encode_latent_rows(EncodeRowsParams p) {
  static_assert(Width == 1 || (Width == 4 && LatentDim % 4 == 0),
                "encode_latent_rows: Width must be 1, or 4 for rows of a multiple of 4 values");
  const int first = static_cast<int>(blockIdx.x) * kEncodeRowsPerBlock;
  const int rows =
      p.num_rows - first < kEncodeRowsPerBlock ? p.num_rows - first : kEncodeRowsPerBlock;
  constexpr int groups = LatentDim / Width;
  T* const pool = reinterpret_cast<T*>(p.pool);
  for (int i = static_cast<int>(threadIdx.x); i < rows * groups;
       i += static_cast<int>(blockDim.x)) {
    const int r = first + i / groups;
    const int column = (i % groups) * Width;
    const float* src = p.rows + std::int64_t(r) * LatentDim + column;
    T* dst = pool + p.dst_rows[r] * LatentDim + column;
    if constexpr (Width == 4) {
      const Float4 in = *reinterpret_cast<const Float4*>(src);
      Packed4<T> out;
      for (int k = 0; k < 4; ++k) out.v[k] = ::daedalus::cuda::from_float<T>(in.v[k]);
      *reinterpret_cast<Packed4<T>*>(dst) = out;
    } else {
      *dst = ::daedalus::cuda::from_float<T>(*src);
    }
  }
}

/// What `find_non_finite` scans.
struct FindNonFiniteParams {
  const float* values = nullptr;            // [count], device
  std::int64_t count = 0;                   //
  unsigned long long* first_bad = nullptr;  // the smallest index of a NaN or infinity, device
};

inline constexpr int kScanThreads = 256;

/// True unless x is a NaN or an infinity (all exponent bits set), read from the bits so that no
/// compiler flag about floating-point semantics can change the answer.
__host__ __device__ __forceinline__ bool finite_bits(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x7f800000u) != 0x7f800000u;
}

/// first_bad = min(first_bad, i) over every i with a non-finite values[i] (grid-stride loop;
/// the caller sets first_bad to ~0 first).
template <int = 0>
__global__ void __launch_bounds__(kScanThreads) find_non_finite(FindNonFiniteParams p) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.count;
       i += stride) {
    if (!finite_bits(p.values[i])) atomicMin(p.first_bad, static_cast<unsigned long long>(i));
  }
}

/// Launches encode_latent_rows for `num_rows` rows of LatentDim fp32 values at `rows` (device)
/// into `pool` rows of storage type T at `dst_rows` (device). Nothing for 0 rows.
template <class T, int LatentDim>
void launch_encode_rows(const CudaBackend& backend, const float* rows, const std::int64_t* dst_rows,
                        std::byte* pool, index_t num_rows) {
  if (num_rows == 0) return;
  const EncodeRowsParams params{rows, dst_rows, pool, static_cast<int>(num_rows)};
  const dim3 grid(
      static_cast<unsigned>((num_rows + kEncodeRowsPerBlock - 1) / kEncodeRowsPerBlock));
  if constexpr (LatentDim % 4 == 0) {
    if (reinterpret_cast<std::uintptr_t>(rows) % 16 == 0) {
      launch(backend, {grid, dim3(kEncodeThreads)}, &encode_latent_rows<T, LatentDim, 4>, params);
      return;
    }
  }
  launch(backend, {grid, dim3(kEncodeThreads)}, &encode_latent_rows<T, LatentDim, 1>, params);
}

/// The batched encode both device caches run (their `encode_rows`): for each entry i in order,
/// `prepare(i)` updates the cache's bookkeeping and appends the pool rows of entry i's q_len
/// rows to `dst.host`; the rows of all entries go out in one kernel, except that a sequence
/// listed again starts a new launch, so that its rows land in list order, as sequential writes
/// would leave them (a later entry may rewrite or drop rows of an earlier one).
template <class T, int LatentDim, class Prepare>
void encode_batch(const CudaBackend& backend, std::span<const index_t> seqs, index_t q_len,
                  const float* rows, std::byte* pool, detail::StagedArray<std::int64_t>& dst,
                  Prepare&& prepare) {
  dst.reserve(seqs.size() * std::size_t(q_len));
  dst.host.clear();
  std::unordered_set<index_t> group;  // the sequences of the pending launch
  std::size_t group_begin = 0;        // its first entry
  const auto flush = [&](std::size_t end) {
    if (!dst.host.empty()) {
      const std::int64_t* destinations = dst.upload(backend);
      launch_encode_rows<T, LatentDim>(backend,
                                       rows + std::int64_t(group_begin) * q_len * LatentDim,
                                       destinations, pool, index_t(dst.host.size()));
    }
    dst.host.clear();
    group.clear();
    group_begin = end;
  };
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    if (group.count(seqs[i]) != 0) flush(i);
    group.insert(seqs[i]);
    prepare(i);
  }
  flush(seqs.size());
}

/// The first non-finite value of `count` fp32 values at `values` (device), with its index, or
/// nothing. Costs a kernel and a device-to-host copy of the flag (a stream synchronisation):
/// the price of checking user rows on the device before anything changes. `flag` is one
/// element of device scratch.
inline std::optional<std::pair<index_t, float>> first_non_finite(
    const CudaBackend& backend, const float* values, index_t count,
    DeviceBuffer<unsigned long long>& flag) {
  if (count == 0) return std::nullopt;
  DAEDALUS_CUDA_CHECK(
      cudaMemsetAsync(flag.data(), 0xFF, sizeof(unsigned long long), backend.stream()));
  // Enough blocks to fill a device; the grid-stride loop covers the rest.
  const index_t blocks = std::min<index_t>((count + kScanThreads - 1) / kScanThreads, 1024);
  launch(backend, {dim3(static_cast<unsigned>(blocks)), dim3(kScanThreads)}, &find_non_finite<>,
         FindNonFiniteParams{values, count, flag.data()});
  unsigned long long first = 0;
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&first, flag.data(), sizeof(first), cudaMemcpyDeviceToHost,
                                      backend.stream()));
  backend.synchronize();
  if (first == std::numeric_limits<unsigned long long>::max()) return std::nullopt;
  float value = 0.0f;
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&value, values + first, sizeof(value), cudaMemcpyDeviceToHost,
                                      backend.stream()));
  backend.synchronize();
  return std::pair<index_t, float>{index_t(first), value};
}

}  // namespace daedalus::cuda
