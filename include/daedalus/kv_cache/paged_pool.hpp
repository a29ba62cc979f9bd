// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/traits.hpp"
#include "daedalus/kv_cache/block_allocator.hpp"

namespace daedalus::detail {

/// What every backend's pool of a PagedLatentCache shares: the handle of the allocator it is
/// registered with (so the allocator lives as long as the pool) and the hook through which the
/// allocator's copy-on-write reaches it.
class PagedPoolBase : public BlockPoolHook {
 public:
  PagedPoolBase& operator=(const PagedPoolBase&) = delete;

 protected:
  explicit PagedPoolBase(const BlockAllocator& allocator) : allocator_(allocator) {}
  PagedPoolBase(const PagedPoolBase&) = default;
  ~PagedPoolBase() = default;

  BlockAllocator allocator_;  // a handle: the allocator lives at least as long as this pool
  bool registered_ = true;    // false once moved from
};

/// Where a PagedLatentCache keeps its [num_blocks, BlockSize, row_bytes] pool and how it moves
/// rows, per backend: the CPU's in kv_cache/cpu/paged_pool.hpp, CUDA's in kv_cache/cuda/paged.cuh.
/// Each derives from PagedPoolBase and provides the constructor (allocator, backend), a move
/// constructor, copy_block_rows, `check_usable`, `require_finite_rows`, `reserve_rows`, `encode`
/// and `decode` (what the front's write and read need), `view`, and the backend's own accessors.
template <MlaConfig C, class Backend, class Storage, int BlockSize>
class PagedPool {
  static_assert(dependent_false<Backend>,
                "daedalus::PagedLatentCache: no implementation for this backend is visible: "
                "include <daedalus/cuda.cuh> in a .cu file for CudaBackend");
};

}  // namespace daedalus::detail
