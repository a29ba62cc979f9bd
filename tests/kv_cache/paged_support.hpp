// SPDX-License-Identifier: Apache-2.0
#pragma once

// What the paged-cache tests share: snapshots of an allocator and of pools (to check that a
// rejected call changed nothing), and a catcher for error messages.

#include <cstddef>
#include <cstdint>
#include <daedalus/daedalus.hpp>
#include <string>
#include <utility>
#include <vector>

#include "support/errors.hpp"

namespace daedalus::testing {

/// Everything observable about a BlockAllocator: free count, every reference count, and each live
/// sequence's length and block list.
struct AllocatorSnapshot {
  index_t free_blocks = 0;
  std::vector<std::int32_t> ref_counts;
  std::vector<std::pair<index_t, std::pair<index_t, std::vector<std::int32_t>>>> sequences;

  explicit AllocatorSnapshot(const BlockAllocator& allocator)
      : free_blocks(allocator.num_free_blocks()) {
    for (index_t b = 0; b < allocator.num_blocks(); ++b)
      ref_counts.push_back(allocator.ref_count(b));
    for (const index_t seq : allocator.sequences()) {
      const auto blocks = allocator.blocks(seq);
      sequences.push_back({seq, {allocator.length(seq), {blocks.begin(), blocks.end()}}});
    }
  }
  bool operator==(const AllocatorSnapshot&) const = default;
};

/// The bytes of a pool.
template <class Cache>
std::vector<std::byte> pool_bytes(const Cache& cache) {
  return {cache.pool_data(), cache.pool_data() + cache.bytes()};
}

/// The message of the exception of type E that `call` throws, or "<nothing thrown>".
using daedalus::testing::contains;
using daedalus::testing::message_of;

}  // namespace daedalus::testing
