// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>

#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// Where token `pos` of batch entry `b` lies in a paged pool: row
/// block_table[b, pos / block_size] · block_size + pos % block_size (FlashMLA's block table).
/// Device pointers; built by PagedLatentCache<..., CudaBackend, ...>::view or from a user's
/// PagedLatentView in device memory.
struct PagedRowAddress {
  const std::int32_t* block_table = nullptr;  // [batch, max_blocks], device
  int max_blocks = 0;
  int block_size = 1;

  __host__ __device__ __forceinline__ std::int64_t row(int b, int pos) const {
    return std::int64_t(block_table[std::int64_t(b) * max_blocks + pos / block_size]) * block_size +
           pos % block_size;
  }
};

/// Where token `pos` of batch entry `b` lies in a contiguous pool: row first_row[b] + pos (each
/// sequence owns a contiguous range of rows, ContiguousLatentCache's layout).
struct ContiguousRowAddress {
  const std::int64_t* first_row = nullptr;  // [batch], device

  __host__ __device__ __forceinline__ std::int64_t row(int b, int pos) const {
    return first_row[b] + pos;
  }
};

/// A batch of sequences in a device pool of latent rows, as the device kernels read it: the pool
/// (each row `row_bytes` bytes in LatentRowFormat<C, Storage>), how rows are found, and the
/// number of cached tokens of each entry. Every pointer is device memory.
template <class Address>
struct DeviceLatentBatch {
  const std::byte* pool = nullptr;        // [rows, row_bytes]
  std::size_t row_bytes = 0;              // bytes of one cached token
  Address address;                        // token (b, pos) -> pool row
  const std::int32_t* seqlens = nullptr;  // [batch] cached tokens of each entry, device
  int batch = 0;

  __host__ __device__ __forceinline__ const std::byte* row(int b, int pos) const {
    return pool + std::size_t(address.row(b, pos)) * row_bytes;
  }
};

}  // namespace daedalus::cuda
