// SPDX-License-Identifier: Apache-2.0
#pragma once

// The device latent caches (kv_cache/cuda/{paged,contiguous}.cuh) against the host caches, run by
// daedalus_cuda_tests on a GPU and by daedalus_emulated_tests under the emulation layer (included
// by exactly one translation unit of each). The host caches are the reference: a device cache
// and a host cache driven by the same calls (each over its own BlockAllocator, which hands out
// the same block ids for the same calls) must hold the same bytes, since both round fp32 to
// bf16 / fp16 to nearest even; so every comparison here is exact (no tolerance), pool bytes
// included. The rounding itself is checked once against hand-computed bit patterns of ties.

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <daedalus/kv_cache/cuda/contiguous.cuh>
#include <daedalus/kv_cache/cuda/paged.cuh>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"

namespace daedalus::testing::kv_cache_checks {

/// A config whose cached row is 43 values (37 + 6): not a multiple of 4, so the encoder takes its
/// scalar path, and rows of 86 bytes are not 4-byte aligned in the pool.
struct OddLatent : Tiny {
  static constexpr const char* name = "OddLatent";
  static constexpr int kv_lora_rank = 37;
  static constexpr int qk_rope_head_dim = 6;
};

inline constexpr int kBlock = 16;

/// Everything observable about a BlockAllocator: free count, every reference count, and each live
/// sequence's length and block list (to check that a rejected call changed nothing, and that two
/// allocators given the same calls agree).
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

/// The bytes of a host cache's pool.
template <class Cache>
std::vector<std::byte> pool_bytes(const Cache& cache) {
  return {cache.pool_data(), cache.pool_data() + cache.bytes()};
}

template <class C, class S>
using DevicePaged = PagedLatentCache<C, CudaBackend, S, kBlock>;
template <class C, class S>
using HostPaged = PagedLatentCache<C, CpuBackend, S, kBlock>;
template <class C, class S>
using DeviceContiguous = ContiguousLatentCache<C, CudaBackend, S>;
template <class C, class S>
using HostContiguous = ContiguousLatentCache<C, CpuBackend, S>;

using DeviceRowsView = TensorView<const float, 2, DeviceMemory>;

/// Random rows [n, width]: uniform in [-2, 2], each row scaled by 2^k (k in [-6, 6]) so the
/// values span many binades, with a few values that sit exactly halfway between two bf16 or two
/// fp16 neighbours (ties, where the rounding mode decides) and fp16 subnormals spliced in.
inline std::vector<float> random_rows(Random& random, index_t n, int width) {
  std::vector<float> rows = random.uniform(std::size_t(n * width), 2.0);
  for (index_t r = 0; r < n; ++r) {
    const float scale = float(std::exp2(double(random.integer(-6, 6))));
    for (int i = 0; i < width; ++i) rows[std::size_t(r * width + i)] *= scale;
    static constexpr std::array<float, 6> kSpecial = {
        1.0f + 0x1p-8f,  1.0f + 3 * 0x1p-8f,    // bf16 ties
        1.0f + 0x1p-11f, -1.0f - 3 * 0x1p-11f,  // fp16 ties
        3.1e-6f,         -4.7e-7f};             // fp16 subnormals
    if (random.integer(0, 1) == 0)
      rows[std::size_t(r * width + random.integer(0, width - 1))] =
          kSpecial[std::size_t(random.integer(0, 5))];
  }
  return rows;
}

/// The bytes of a device pool (or any device range), copied to the host.
inline std::vector<std::byte> device_bytes(const CudaBackend& cuda, const std::byte* data,
                                           std::size_t bytes) {
  std::vector<std::byte> out(bytes);
  if (bytes > 0)
    DAEDALUS_CUDA_CHECK(
        cudaMemcpyAsync(out.data(), data, bytes, cudaMemcpyDeviceToHost, cuda.stream()));
  cuda.synchronize();
  return out;
}
template <class Cache>
std::vector<std::byte> device_pool_bytes(const Cache& cache) {
  return device_bytes(cache.backend(), cache.pool_data(), cache.bytes());
}

/// Writes the same fp32 rows at (seq, start) into a device cache (from device memory) and a
/// host cache (from host memory).
template <class Device, class Host>
void write_both(Device& device, Host& host, index_t seq, index_t start,
                const std::vector<float>& rows) {
  constexpr int D = Device::latent_dim;
  const index_t n = index_t(rows.size()) / D;
  const auto staged = cuda::to_device(device.backend(), rows);
  device.write(seq, start, DeviceRowsView(staged.data(), {n, D}));
  host.write(seq, start, HostView<const float, 2>(rows.data(), {n, D}));
}

/// Device and host paged caches (each over its own allocator) hold the same bytes, the
/// allocators the same state, and every live sequence reads back the same.
template <class Device, class Host>
void require_same_paged(const Device& device, const Host& host) {
  REQUIRE(AllocatorSnapshot(device.allocator()) == AllocatorSnapshot(host.allocator()));
  REQUIRE(device_pool_bytes(device) == pool_bytes(host));
}

// ---- bit patterns of the rounding --------------------------------------------------------------

/// Ties and subnormals stored by the device encoder, against bit patterns worked out by hand
/// (round to nearest, ties to even): the reference independent of any conversion code.
template <class S>
void check_rounding_bits(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr int D = MlaShape<C>::latent_dim;
  BlockAllocator allocator(2, kBlock);
  DevicePaged<C, S> cache(allocator, cuda);
  const index_t seq = allocator.add_sequence();
  std::vector<float> row(D, 1.0f);
  std::vector<std::uint16_t> expected(D, std::is_same_v<S, bfloat16> ? 0x3F80 : 0x3C00);
  if constexpr (std::is_same_v<S, bfloat16>) {
    // bf16 keeps 7 fraction bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (even: 1),
    // 1 + 3·2^-8 halfway between 1 + 2^-7 and 1 + 2^-6 (even: 1 + 2^-6), 1 + 2^-8 + 2^-20 above
    // the tie (up), and -(1 + 2^-8) the negative tie.
    row[0] = 1.0f + 0x1p-8f, expected[0] = 0x3F80;
    row[1] = 1.0f + 3 * 0x1p-8f, expected[1] = 0x3F82;
    row[2] = 1.0f + 0x1p-8f + 0x1p-20f, expected[2] = 0x3F81;
    row[3] = -1.0f - 0x1p-8f, expected[3] = 0xBF80;
    row[4] = 0x1p-130f, expected[4] = 0x0008;  // 2^-130 = 8 bf16 subnormal steps of 2^-133
  } else {
    // fp16 keeps 10 fraction bits; its subnormals are multiples of 2^-24.
    row[0] = 1.0f + 0x1p-11f, expected[0] = 0x3C00;
    row[1] = 1.0f + 3 * 0x1p-11f, expected[1] = 0x3C02;
    row[2] = 1.0f + 0x1p-11f + 0x1p-20f, expected[2] = 0x3C01;
    row[3] = -1.0f - 0x1p-11f, expected[3] = 0xBC00;
    row[4] = 3 * 0x1p-25f, expected[4] = 0x0002;  // 1.5 subnormal steps: tie to even, 2
    row[5] = 0x1p-25f, expected[5] = 0x0000;      // half a step: tie to even, +0
    row[6] = 70000.0f, expected[6] = 0x7C00;      // past fp16's range: +inf, as the host rounds
  }
  const auto staged = cuda::to_device(cuda, row);
  cache.write(seq, 0, DeviceRowsView(staged.data(), {1, D}));
  const std::vector<std::byte> bytes = device_pool_bytes(cache);
  std::vector<std::uint16_t> stored(D);
  std::memcpy(stored.data(), bytes.data(), D * sizeof(std::uint16_t));
  CHECK(stored == expected);
}

// ---- device cache == host cache ----------------------------------------------------------------

/// A scripted run over three sequences, forks and copy-on-write included: after every call the
/// device pool equals the host pool byte for byte.
template <class C, class S>
void check_paged_matches_host(const CudaBackend& cuda, std::uint64_t offset) {
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(offset);
  BlockAllocator device_allocator(12, kBlock), host_allocator(12, kBlock);
  DevicePaged<C, S> device(device_allocator, cuda);
  HostPaged<C, S> host(host_allocator);
  const auto both = [&](auto&& op) {
    const auto d = op(device_allocator);
    const auto h = op(host_allocator);
    REQUIRE(d == h);
    return d;
  };
  const auto rows = [&](index_t n) { return random_rows(random, n, D); };
  const index_t a = both([](BlockAllocator& x) { return x.add_sequence(); });
  write_both(device, host, a, 0, rows(21));  // two blocks, the second partly filled
  require_same_paged(device, host);
  write_both(device, host, a, 21, rows(1));  // a decode step
  write_both(device, host, a, 5, rows(30));  // a rewrite from an earlier position: 35 tokens
  require_same_paged(device, host);
  const index_t b = both([&](BlockAllocator& x) { return x.fork(a); });
  const index_t c = both([&](BlockAllocator& x) { return x.fork(a, 20); });
  write_both(device, host, b, 35, rows(3));  // copies the shared third block, rows 32..34
  write_both(device, host, c, 18, rows(4));  // copies the shared second block, rows 16..17
  write_both(device, host, a, 35, rows(1));  // a's third block is its own again: in place
  write_both(device, host, b, 0, rows(0));   // an empty write truncates to 0
  require_same_paged(device, host);
  const index_t d = both([](BlockAllocator& x) { return x.add_sequence(); });
  write_both(device, host, d, 0, rows(0));  // a zero-length sequence stays empty
  for (const index_t seq : {a, b, c, d}) {
    CAPTURE(seq);
    CHECK(device.length(seq) == host.length(seq));
    CHECK(device.rows(seq) == host.rows(seq));
  }
  // append is write at the end.
  const std::vector<float> more = rows(17);
  const auto staged = cuda::to_device(cuda, more);
  device.append(c, DeviceRowsView(staged.data(), {17, D}));
  host.append(c, HostView<const float, 2>(more.data(), {17, D}));
  require_same_paged(device, host);
  // read of an inner range, across a block boundary.
  std::vector<float> inner(std::size_t(7) * D), inner_host(std::size_t(7) * D);
  device.read(a, 12, HostView<float, 2>(inner.data(), {7, D}));
  host.read(a, 12, HostView<float, 2>(inner_host.data(), {7, D}));
  CHECK(inner == inner_host);
}

/// The contiguous caches: writes, appends, rewrites, truncation, the encode_rows batch (a
/// sequence listed twice included), against the host cache.
template <class C, class S>
void check_contiguous_matches_host(const CudaBackend& cuda, std::uint64_t offset) {
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(offset);
  const std::vector<index_t> capacities = {0, 5, 40, 17};
  DeviceContiguous<C, S> device(capacities, cuda);
  HostContiguous<C, S> host(capacities);
  CHECK(device.bytes() == std::size_t(62) * D * sizeof(S));
  const auto rows = [&](index_t n) { return random_rows(random, n, D); };
  const auto same = [&] {
    for (index_t s = 0; s < device.num_sequences(); ++s) {
      CAPTURE(s);
      REQUIRE(device.length(s) == host.length(s));
      REQUIRE(device.capacity(s) == host.capacity(s));
      // The stored values, bit for bit: the host rows are Storage, the device ones are read
      // back through the device cache's own pointer.
      const HostView<const S, 2> expected = host.rows(s);
      const std::vector<std::byte> stored =
          device_bytes(cuda, reinterpret_cast<const std::byte*>(device.row_pointer(s, 0)),
                       std::size_t(expected.size()) * sizeof(S));
      REQUIRE(std::memcmp(stored.data(), expected.data(), stored.size()) == 0);
      std::vector<float> widened(std::size_t(expected.size()));
      for (std::size_t i = 0; i < widened.size(); ++i) widened[i] = to_float(expected.data()[i]);
      REQUIRE(device.rows(s) == widened);
    }
  };
  write_both(device, host, 2, 0, rows(33));
  write_both(device, host, 1, 0, rows(5));  // full
  write_both(device, host, 3, 0, rows(3));
  same();
  write_both(device, host, 2, 10, rows(30));  // rewrite to the end of the capacity
  write_both(device, host, 0, 0, rows(0));    // capacity 0: an empty write
  const std::vector<float> one = rows(1);
  const auto staged = cuda::to_device(cuda, one);
  device.append(3, DeviceRowsView(staged.data(), {1, D}));
  host.append(3, HostView<const float, 2>(one.data(), {1, D}));
  same();
  device.truncate(2, 12);
  host.truncate(2, 12);
  device.clear(1);
  host.clear(1);
  same();
  // encode_rows: entries 3, 1, 2, 3 again, q_len 2; the second entry of 3 rewrites the last row
  // of the first (a sequence listed twice is written in list order, as by two writes).
  const std::vector<index_t> seqs = {3, 1, 2, 3};
  const std::vector<index_t> starts = {device.length(3), 0, 7, device.length(3) + 1};
  const std::vector<float> batch = rows(8);
  const auto staged_batch = cuda::to_device(cuda, batch);
  device.encode_rows(seqs, starts, 2, staged_batch.data());
  for (std::size_t i = 0; i < seqs.size(); ++i)
    host.write(seqs[i], starts[i],
               HostView<const float, 2>(batch.data() + i * 2 * D, {2, index_t(D)}));
  same();
  // read of an inner range
  std::vector<float> inner(std::size_t(4) * D);
  device.read(2, 3, HostView<float, 2>(inner.data(), {4, D}));
  const std::vector<float> all = device.rows(2);
  CHECK(std::equal(inner.begin(), inner.end(), all.begin() + 3 * D));
}

// ---- the random model --------------------------------------------------------------------------

/// A few hundred random operations on two device layers (bf16 and fp16) sharing one allocator,
/// and the same operations on two host layers sharing another: add, append (chunks and single
/// tokens), rewrite, fork, truncate, release, batched encode_rows (forks interleaved), and
/// rejected calls. After every operation both allocators are in the same state and each device
/// pool equals its host pool byte for byte (copy-on-write copies included).
template <class C>
class PagedModel {
 public:
  static constexpr int D = MlaShape<C>::latent_dim;
  static constexpr index_t kPoolBlocks = 20;

  PagedModel(const CudaBackend& cuda, std::uint64_t offset)
      : random_(offset),
        device_bf16_(device_allocator_, cuda),
        device_fp16_(device_allocator_, cuda),
        host_bf16_(host_allocator_),
        host_fp16_(host_allocator_) {}

  void run(int operations) {
    for (int i = 0; i < operations; ++i) {
      CAPTURE(i);
      step();
      REQUIRE(AllocatorSnapshot(device_allocator_) == AllocatorSnapshot(host_allocator_));
      REQUIRE(device_pool_bytes(device_bf16_) == pool_bytes(host_bf16_));
      REQUIRE(device_pool_bytes(device_fp16_) == pool_bytes(host_fp16_));
    }
    for (const index_t seq : host_allocator_.sequences()) {
      CAPTURE(seq);
      REQUIRE(device_bf16_.rows(seq) == host_bf16_.rows(seq));
      REQUIRE(device_fp16_.rows(seq) == host_fp16_.rows(seq));
    }
    // The run did what it claims.
    CHECK(forks_ > 10);
    CHECK(writes_ > 50);
    CHECK(batches_ > 10);
    CHECK(copies_ > 5);
    CHECK(capacity_errors_ > 0);
    CHECK(rejected_ > 10);
  }

 private:
  index_t pick() {
    const std::vector<index_t> live = host_allocator_.sequences();
    return live[std::size_t(random_.integer(0, index_t(live.size()) - 1))];
  }

  /// Shared blocks among those a write of rows [start, start + n) of `seq` touches.
  index_t shared_written(index_t seq, index_t start, index_t n) const {
    const auto blocks = host_allocator_.blocks(seq);
    index_t shared = 0;
    for (index_t j = start / kBlock; j < index_t(blocks.size()) && j * kBlock < start + n; ++j)
      shared += host_allocator_.ref_count(blocks[std::size_t(j)]) > 1;
    return shared;
  }

  /// One write on both layers of both sides, or the same CapacityError on both with nothing
  /// changed.
  void write(index_t seq, index_t start, index_t n) {
    const std::vector<float> bf16_rows = random_rows(random_, n, D);
    const std::vector<float> fp16_rows = random_rows(random_, n, D);
    const std::string host_error = message_of<CapacityError>([&] {
      host_bf16_.write(seq, start, HostView<const float, 2>(bf16_rows.data(), {n, D}));
    });
    const auto staged = cuda::to_device(device_bf16_.backend(), bf16_rows);
    const index_t copies = shared_written(seq, start, n);
    const std::string device_error = message_of<CapacityError>([&] {
      device_bf16_.write(seq, start, DeviceRowsView(staged.data(), {n, D}));
    });
    if (host_error != "<nothing thrown>") {
      REQUIRE(device_error == host_error);
      ++capacity_errors_;
      return;
    }
    REQUIRE(device_error == "<nothing thrown>");
    copies_ += copies;
    const auto staged_fp16 = cuda::to_device(device_bf16_.backend(), fp16_rows);
    device_fp16_.write(seq, start, DeviceRowsView(staged_fp16.data(), {n, D}));
    host_fp16_.write(seq, start, HostView<const float, 2>(fp16_rows.data(), {n, D}));
    ++writes_;
  }

  /// A batched decode or prefill step through encode_rows: 1..4 entries (forks of one another
  /// when there are some, a sequence may repeat at its next position), validated first with
  /// check_writes as the MLA front does.
  void batch() {
    const index_t entries = random_.integer(1, 4);
    const index_t q_len = random_.integer(1, 2);
    std::vector<index_t> seqs, starts;
    std::map<index_t, index_t> next;  // the length each sequence has after the earlier entries
    for (index_t e = 0; e < entries; ++e) {
      const index_t seq = pick();
      const index_t length = next.count(seq) ? next[seq] : host_allocator_.length(seq);
      // Mostly appends; sometimes a rewrite of the last position (speculative decode rollback).
      const index_t start = length > 0 && random_.integer(0, 4) == 0 ? length - 1 : length;
      seqs.push_back(seq);
      starts.push_back(start);
      next[seq] = start + q_len;
    }
    const std::string host_check =
        message_of<Error>([&] { host_allocator_.check_writes("batch", seqs, starts, q_len); });
    const std::string device_check =
        message_of<Error>([&] { device_allocator_.check_writes("batch", seqs, starts, q_len); });
    REQUIRE(host_check == device_check);
    if (host_check != "<nothing thrown>") {
      ++capacity_errors_;
      return;
    }
    const index_t rows = entries * q_len;
    const std::vector<float> bf16_rows = random_rows(random_, rows, D);
    const std::vector<float> fp16_rows = random_rows(random_, rows, D);
    // Layer by layer, as a forward pass goes; each layer prepares the same writes.
    const auto staged_bf16 = cuda::to_device(device_bf16_.backend(), bf16_rows);
    device_bf16_.encode_rows(seqs, starts, q_len, staged_bf16.data());
    const auto staged_fp16 = cuda::to_device(device_fp16_.backend(), fp16_rows);
    device_fp16_.encode_rows(seqs, starts, q_len, staged_fp16.data());
    for (std::size_t e = 0; e < seqs.size(); ++e) {
      const std::size_t first = e * std::size_t(q_len) * D;
      if (shared_written(seqs[e], starts[e], q_len) > 0) ++copies_;
      host_bf16_.write(seqs[e], starts[e],
                       HostView<const float, 2>(bf16_rows.data() + first, {q_len, D}));
    }
    for (std::size_t e = 0; e < seqs.size(); ++e) {
      const std::size_t first = e * std::size_t(q_len) * D;
      host_fp16_.write(seqs[e], starts[e],
                       HostView<const float, 2>(fp16_rows.data() + first, {q_len, D}));
    }
    ++batches_;
  }

  /// A call that must be rejected with the host cache's error, changing nothing.
  void rejected() {
    const index_t seq = pick();
    const index_t length = host_allocator_.length(seq);
    std::vector<float> row = random_rows(random_, 2, D);
    const auto device_bytes_before = device_pool_bytes(device_bf16_);
    const AllocatorSnapshot before(device_allocator_);
    std::string device_error, host_error;
    const auto call = [&](auto&& device_call, auto&& host_call) {
      device_error = message_of<Error>(device_call);
      host_error = message_of<Error>(host_call);
    };
    const auto staged_row = [&] { return cuda::to_device(device_bf16_.backend(), row); };
    switch (random_.integer(0, 3)) {
      case 0: {  // a released or never-added sequence
        const index_t bad =
            released_.empty() || random_.integer(0, 1) == 0
                ? seq + 1000
                : released_[std::size_t(random_.integer(0, index_t(released_.size()) - 1))];
        const auto staged = staged_row();
        call(
            [&] {
              device_bf16_.append(bad, DeviceRowsView(staged.data(), {2, D}));
            },
            [&] {
              host_bf16_.append(bad, HostView<const float, 2>(row.data(), {2, D}));
            });
        break;
      }
      case 1: {  // start past the end
        const auto staged = staged_row();
        call(
            [&] {
              device_bf16_.write(seq, length + 1, DeviceRowsView(staged.data(), {2, D}));
            },
            [&] {
              host_bf16_.write(seq, length + 1, HostView<const float, 2>(row.data(), {2, D}));
            });
        break;
      }
      case 2: {  // a NaN or an infinity (CapacityError first when the pool is full)
        row[std::size_t(random_.integer(0, 2 * D - 1))] =
            random_.integer(0, 1) ? std::nanf("") : -std::numeric_limits<float>::infinity();
        const auto staged = staged_row();
        call(
            [&] {
              device_bf16_.write(seq, length, DeviceRowsView(staged.data(), {2, D}));
            },
            [&] {
              host_bf16_.write(seq, length, HostView<const float, 2>(row.data(), {2, D}));
            });
        break;
      }
      default: {  // rows one column short
        const auto staged = staged_row();
        call(
            [&] {
              device_bf16_.write(seq, length, DeviceRowsView(staged.data(), {2, D - 1}));
            },
            [&] {
              host_bf16_.write(seq, length, HostView<const float, 2>(row.data(), {2, D - 1}));
            });
        break;
      }
    }
    REQUIRE(device_error == host_error);
    REQUIRE(device_error.rfind("<", 0) != 0);  // a daedalus::Error was thrown
    REQUIRE(AllocatorSnapshot(device_allocator_) == before);
    REQUIRE(device_pool_bytes(device_bf16_) == device_bytes_before);
    ++rejected_;
  }

  void step() {
    const index_t op = host_allocator_.num_sequences() == 0 ? 0 : random_.integer(0, 99);
    if (op < 8) {
      if (host_allocator_.num_sequences() < 8)
        REQUIRE(device_allocator_.add_sequence() == host_allocator_.add_sequence());
    } else if (op < 35) {
      const index_t seq = pick();
      const index_t n = random_.integer(0, 3) == 0 ? random_.integer(0, 40) : 1;
      write(seq, host_allocator_.length(seq), n);
    } else if (op < 45) {
      const index_t seq = pick();
      write(seq, random_.integer(0, host_allocator_.length(seq)), random_.integer(0, 20));
    } else if (op < 60) {
      if (host_allocator_.num_sequences() >= 10) return;
      const index_t seq = pick();
      const index_t length = host_allocator_.length(seq);
      const index_t prefix = random_.integer(0, 1) ? length : random_.integer(0, length);
      REQUIRE(device_allocator_.fork(seq, prefix) == host_allocator_.fork(seq, prefix));
      ++forks_;
    } else if (op < 75) {
      batch();
    } else if (op < 82) {
      const index_t seq = pick();
      const index_t length = random_.integer(0, host_allocator_.length(seq));
      device_allocator_.truncate(seq, length);
      host_allocator_.truncate(seq, length);
    } else if (op < 90) {
      const index_t seq = pick();
      device_allocator_.release(seq);
      host_allocator_.release(seq);
      released_.push_back(seq);
    } else {
      rejected();
    }
  }

  Random random_;
  BlockAllocator device_allocator_{kPoolBlocks, kBlock};
  BlockAllocator host_allocator_{kPoolBlocks, kBlock};
  DevicePaged<C, bfloat16> device_bf16_;
  DevicePaged<C, half> device_fp16_;
  HostPaged<C, bfloat16> host_bf16_;
  HostPaged<C, half> host_fp16_;
  std::vector<index_t> released_;
  int forks_ = 0, writes_ = 0, batches_ = 0, capacity_errors_ = 0, rejected_ = 0;
  index_t copies_ = 0;
};

// ---- views, batches and the addressing the kernels use -----------------------------------------

/// Copies every cached row of every entry of `batch` into `out`, entry b's rows starting at row
/// out_first[b]: the row addressing of device_rows.cuh exercised by a kernel, one block per
/// entry.
template <class Address>
__global__ void gather_latent_rows(cuda::DeviceLatentBatch<Address> batch,
                                   const std::int64_t* out_first,  // [batch]
                                   std::byte* out) {               // [total rows, row_bytes]
  const int b = static_cast<int>(blockIdx.x);
  const std::int64_t row_bytes = std::int64_t(batch.row_bytes);
  const std::int64_t bytes = std::int64_t(batch.seqlens[b]) * row_bytes;
  for (std::int64_t i = threadIdx.x; i < bytes; i += blockDim.x) {
    const int pos = static_cast<int>(i / row_bytes);
    out[(out_first[b] + pos) * row_bytes + i % row_bytes] = batch.row(b, pos)[i % row_bytes];
  }
}

/// The rows of each entry of a device batch, gathered by the kernel and copied to the host.
template <class Address>
std::vector<std::byte> gather(const CudaBackend& cuda,
                              const cuda::DeviceLatentBatch<Address>& batch,
                              const std::vector<index_t>& lengths) {
  std::vector<std::int64_t> first(lengths.size() + 1, 0);
  for (std::size_t b = 0; b < lengths.size(); ++b) first[b + 1] = first[b] + lengths[b];
  const auto d_first = cuda::to_device(cuda, first);
  cuda::DeviceBuffer<std::byte> out(std::size_t(first.back()) * batch.row_bytes);
  if (batch.batch > 0 && first.back() > 0)
    cuda::launch(cuda, {dim3(unsigned(batch.batch)), dim3(64)}, &gather_latent_rows<Address>, batch,
                 static_cast<const std::int64_t*>(d_first.data()), out.data());
  return device_bytes(cuda, out.data(), out.bytes());
}

/// view(): its table and lengths equal the host allocator's BlockTable (shuffled order, repeats,
/// empty sequences), and a kernel reading through cuda::latent_batch(view) finds each sequence's
/// rows where the host cache has them. The same for the contiguous cache's batch().
template <class S>
void check_view_and_batch(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(5101);
  BlockAllocator device_allocator(16, kBlock), host_allocator(16, kBlock);
  DevicePaged<C, S> device(device_allocator, cuda);
  HostPaged<C, S> host(host_allocator);
  std::vector<index_t> ids;
  for (const index_t n : {37, 0, 16, 5}) {
    const index_t seq = device_allocator.add_sequence();
    REQUIRE(host_allocator.add_sequence() == seq);
    write_both(device, host, seq, 0, random_rows(random, n, D));
    ids.push_back(seq);
  }
  // Forks share blocks; a later write into the parent gives it a copy, so the table mixes both.
  const index_t fork = device_allocator.fork(ids[0], 33);
  REQUIRE(host_allocator.fork(ids[0], 33) == fork);
  write_both(device, host, ids[0], 33, random_rows(random, 2, D));
  ids.push_back(fork);
  DeviceBlockTable storage;
  for (const std::vector<index_t>& seqs :
       {std::vector<index_t>{ids[4], ids[1], ids[0], ids[3], ids[0], ids[2]},
        std::vector<index_t>{ids[1]}, std::vector<index_t>{}, ids}) {
    CAPTURE(seqs.size());
    const PagedLatentView<C, S, kBlock, DeviceMemory> view = device.view(seqs, storage);
    const BlockTable expected = host_allocator.block_table(seqs);
    CHECK(view.pool == device.pool_data());
    CHECK(view.num_blocks == 16);
    REQUIRE(view.batch() == expected.batch());
    REQUIRE(view.max_blocks() == expected.max_blocks);
    std::vector<std::int32_t> table(expected.table.size()), seqlens(expected.seqlens.size());
    if (!table.empty())
      DAEDALUS_CUDA_CHECK(cudaMemcpy(table.data(), view.block_table.data(),
                                     table.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost));
    if (!seqlens.empty())
      DAEDALUS_CUDA_CHECK(cudaMemcpy(seqlens.data(), view.cache_seqlens.data(),
                                     seqlens.size() * sizeof(std::int32_t),
                                     cudaMemcpyDeviceToHost));
    CHECK(table == expected.table);
    CHECK(seqlens == expected.seqlens);
    const cuda::DeviceLatentBatch<cuda::PagedRowAddress> batch = cuda::latent_batch(view);
    CHECK(batch.pool == device.pool_data());
    CHECK(batch.row_bytes == DevicePaged<C, S>::row_bytes);
    CHECK(batch.batch == int(seqs.size()));
    CHECK(batch.address.block_size == kBlock);
    std::vector<index_t> lengths;
    std::vector<std::byte> rows;
    for (const index_t seq : seqs) {
      lengths.push_back(host_allocator.length(seq));
      for (index_t pos = 0; pos < lengths.back(); ++pos) {
        const std::byte* row =
            host.row_pointer(host_allocator.blocks(seq)[std::size_t(pos / kBlock)], pos % kBlock);
        rows.insert(rows.end(), row, row + DevicePaged<C, S>::row_bytes);
      }
    }
    CHECK(gather(cuda, batch, lengths) == rows);
  }

  // The contiguous cache's batch(): first rows and lengths, and the same gather.
  DeviceContiguous<C, S> contiguous(std::vector<index_t>{20, 0, 9}, cuda);
  HostContiguous<C, S> contiguous_host(std::vector<index_t>{20, 0, 9});
  write_both(contiguous, contiguous_host, 0, 0, random_rows(random, 13, D));
  write_both(contiguous, contiguous_host, 2, 0, random_rows(random, 9, D));
  DeviceBatchRows batch_storage;
  for (const std::vector<index_t>& seqs :
       {std::vector<index_t>{2, 1, 0, 2}, std::vector<index_t>{1}, std::vector<index_t>{}}) {
    CAPTURE(seqs.size());
    const auto batch = contiguous.batch(seqs, batch_storage);
    CHECK(batch.batch == int(seqs.size()));
    CHECK(batch.pool == contiguous.pool_data());
    CHECK(batch.row_bytes == std::size_t(D) * sizeof(S));
    std::vector<index_t> lengths;
    std::vector<std::byte> rows;
    for (const index_t seq : seqs) {
      lengths.push_back(contiguous_host.length(seq));
      const HostView<const S, 2> stored = contiguous_host.rows(seq);
      const auto* begin = reinterpret_cast<const std::byte*>(stored.data());
      rows.insert(rows.end(), begin, begin + stored.size() * index_t(sizeof(S)));
      CHECK(batch_storage.host_first_row[lengths.size() - 1] == contiguous.first_row(seq));
    }
    CHECK(gather(cuda, batch, lengths) == rows);
  }
  CHECK_THROWS_AS(static_cast<void>(contiguous.batch(std::vector<index_t>{3}, batch_storage)),
                  OutOfRange);
}

/// encode_rows over a batch whose entries share blocks: forks of one sequence appending into
/// their shared last block (each but the last to be prepared gets a copy), a prefix fork
/// rewriting inside a shared block, a sequence listed twice, and an empty q_len; the device pool
/// equals the host pool after the same writes one by one.
template <class S>
void check_encode_rows_shared_blocks(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(5201);
  BlockAllocator device_allocator(24, kBlock), host_allocator(24, kBlock);
  DevicePaged<C, S> device(device_allocator, cuda);
  HostPaged<C, S> host(host_allocator);
  const index_t root = device_allocator.add_sequence();
  REQUIRE(host_allocator.add_sequence() == root);
  write_both(device, host, root, 0, random_rows(random, 40, D));
  std::vector<index_t> forks;
  for (const index_t prefix : {40, 40, 23, 40}) {
    forks.push_back(device_allocator.fork(root, prefix));
    REQUIRE(host_allocator.fork(root, prefix) == forks.back());
  }
  const index_t other = device_allocator.add_sequence();
  REQUIRE(host_allocator.add_sequence() == other);
  // forks[0], root and forks[1] append into block 2, which all of them share; forks[2] appends
  // inside block 1 (shared); `other` starts empty and is listed twice, its second entry
  // rewriting the second row of the first; forks[3] rewrites its last
  // row (a shared block again).
  const std::vector<index_t> seqs = {forks[0], other, root, forks[2], other, forks[1], forks[3]};
  const std::vector<index_t> starts = {40, 0, 40, 23, 1, 40, 39};
  constexpr index_t q_len = 2;
  const std::vector<float> rows = random_rows(random, index_t(seqs.size()) * q_len, D);
  const auto staged = cuda::to_device(cuda, rows);
  device.encode_rows(seqs, starts, q_len, staged.data());
  for (std::size_t i = 0; i < seqs.size(); ++i)
    host.write(seqs[i], starts[i],
               HostView<const float, 2>(rows.data() + i * q_len * D, {q_len, index_t(D)}));
  require_same_paged(device, host);
  for (const index_t seq : host_allocator.sequences()) CHECK(device.rows(seq) == host.rows(seq));
  // q_len 0 truncates each entry to its start, as a write of no rows does.
  const std::vector<index_t> empty_seqs = {forks[0], root};
  const std::vector<index_t> empty_starts = {41, 3};
  device.encode_rows(empty_seqs, empty_starts, 0, nullptr);
  host.write(forks[0], 41, HostView<const float, 2>(nullptr, {0, index_t(D)}));
  host.write(root, 3, HostView<const float, 2>(nullptr, {0, index_t(D)}));
  require_same_paged(device, host);
  // Mismatched spans and a negative q_len are rejected before anything changes.
  const AllocatorSnapshot before(device_allocator);
  CHECK_THROWS_AS(
      device.encode_rows(empty_seqs, std::span<const index_t>(starts.data(), 1), 1, staged.data()),
      InvalidArgument);
  CHECK_THROWS_AS(device.encode_rows(empty_seqs, empty_starts, -1, staged.data()), InvalidArgument);
  CHECK(AllocatorSnapshot(device_allocator) == before);
}

// ---- bad input -------------------------------------------------------------------------------

/// Every bad call on the device caches throws the host cache's error type with the host cache's
/// message (the same checks, in the same order), and changes nothing: allocator, lengths and
/// device pool bytes.
template <class S>
void check_bad_input(const CudaBackend& cuda) {
  using C = Tiny;
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(5301);
  BlockAllocator device_allocator(4, kBlock), host_allocator(4, kBlock);
  DevicePaged<C, S> device(device_allocator, cuda);
  HostPaged<C, S> host(host_allocator);
  const index_t seq = device_allocator.add_sequence();
  REQUIRE(host_allocator.add_sequence() == seq);
  write_both(device, host, seq, 0, random_rows(random, 20, D));
  const index_t released = device_allocator.add_sequence();
  REQUIRE(host_allocator.add_sequence() == released);
  device_allocator.release(released);
  host_allocator.release(released);

  // 64 rows: the finiteness scan spans several thread blocks; the first bad value is reported.
  constexpr index_t n = 64;
  std::vector<float> rows = random_rows(random, n, D);
  const auto paged_case = [&](const char* what, auto expected_type, index_t target, index_t start,
                              index_t count, index_t width, const std::vector<float>& values) {
    using E = decltype(expected_type);
    CAPTURE(what);
    const AllocatorSnapshot before(device_allocator);
    const std::vector<std::byte> bytes = device_pool_bytes(device);
    const auto staged = cuda::to_device(cuda, values);
    const std::string device_message = message_of<E>([&] {
      device.write(target, start, DeviceRowsView(staged.data(), {count, width}));
    });
    const std::string host_message = message_of<E>([&] {
      host.write(target, start, HostView<const float, 2>(values.data(), {count, width}));
    });
    CHECK(device_message == host_message);
    CHECK(device_message.rfind("daedalus::PagedLatentCache::write", 0) == 0);
    CHECK(AllocatorSnapshot(device_allocator) == before);
    CHECK(device_pool_bytes(device) == bytes);
  };
  paged_case("never added", OutOfRange{""}, 99, 0, n, D, rows);
  paged_case("released", OutOfRange{""}, released, 0, n, D, rows);
  paged_case("start past the end", OutOfRange{""}, seq, 21, n, D, rows);
  paged_case("negative start", OutOfRange{""}, seq, -1, n, D, rows);
  paged_case("pool exhausted", CapacityError{""}, seq, 20, n, D, rows);
  paged_case("too wide", InvalidArgument{""}, seq, 20, 2, D + 1, rows);
  std::vector<float> bad = rows;
  bad[std::size_t(2 * D + 5)] = std::nanf("");
  bad[std::size_t(30 * D + 1)] = std::numeric_limits<float>::infinity();
  paged_case("NaN", NumericError{""}, seq, 20, 40, D, bad);
  bad[std::size_t(D + 7)] = -std::numeric_limits<float>::infinity();
  paged_case("-inf first", NumericError{""}, seq, 3, 40, D, bad);
  {
    const auto staged = cuda::to_device(cuda, bad);
    const std::string message = message_of<NumericError>([&] {
      device.write(seq, 3, DeviceRowsView(staged.data(), {40, D}));
    });
    CHECK(contains(message, "non-finite value (-inf) at row 1, column 7"));
  }
  // The first and the last value of the rows.
  std::vector<float> edge = rows;
  edge.back() = std::numeric_limits<float>::infinity();
  paged_case("last value", NumericError{""}, seq, 20, n / 2, D,
             std::vector<float>(edge.begin() + n / 2 * D, edge.end()));
  edge.front() = std::nanf("");
  paged_case("first value", NumericError{""}, seq, 20, n / 2, D,
             std::vector<float>(edge.begin(), edge.begin() + n / 2 * D));
  // append checks the sequence before anything else.
  {
    const auto staged = cuda::to_device(cuda, rows);
    CHECK(message_of<OutOfRange>([&] {
            device.append(released, DeviceRowsView(staged.data(), {2, D}));
          }) == message_of<OutOfRange>([&] {
            host.append(released, HostView<const float, 2>(rows.data(), {2, D}));
          }));
  }
  // read: out-of-range tokens and a wrong shape.
  std::vector<float> out(std::size_t(4) * D);
  CHECK(message_of<OutOfRange>([&] {
          device.read(seq, 18, HostView<float, 2>(out.data(), {4, D}));
        }) == message_of<OutOfRange>([&] {
          host.read(seq, 18, HostView<float, 2>(out.data(), {4, D}));
        }));
  CHECK(message_of<InvalidArgument>([&] {
          device.read(seq, 0, HostView<float, 2>(out.data(), {2, 2 * D}));
        }) == message_of<InvalidArgument>([&] {
          host.read(seq, 0, HostView<float, 2>(out.data(), {2, 2 * D}));
        }));
  CHECK_THROWS_AS(static_cast<void>(device.rows(released)), OutOfRange);
  // view of a released sequence; upload/download over another allocator; a block-size mismatch.
  DeviceBlockTable table;
  CHECK_THROWS_AS(static_cast<void>(device.view(std::vector<index_t>{seq, released}, table)),
                  OutOfRange);
  {
    const AllocatorSnapshot before(device_allocator);
    const std::vector<std::byte> bytes = device_pool_bytes(device);
    CHECK(contains(message_of<InvalidArgument>([&] { device.upload(host); }),
                   "another BlockAllocator"));
    CHECK(contains(message_of<InvalidArgument>([&] { device.download(host); }),
                   "another BlockAllocator"));
    CHECK(AllocatorSnapshot(device_allocator) == before);
    CHECK(device_pool_bytes(device) == bytes);
  }
  BlockAllocator wrong_size(4, kBlock + 1);
  CHECK(message_of<InvalidArgument>([&] { DevicePaged<C, S> cache(wrong_size, cuda); }) ==
        message_of<InvalidArgument>([&] { HostPaged<C, S> cache(wrong_size); }));
  CHECK(wrong_size.num_pools() == 0);

  // The contiguous cache.
  DeviceContiguous<C, S> contiguous(std::vector<index_t>{8, 30}, cuda);
  HostContiguous<C, S> contiguous_host(std::vector<index_t>{8, 30});
  write_both(contiguous, contiguous_host, 1, 0, random_rows(random, 10, D));
  const auto contiguous_case = [&](const char* what, auto expected_type, index_t target,
                                   index_t start, index_t count, index_t width,
                                   const std::vector<float>& values) {
    using E = decltype(expected_type);
    CAPTURE(what);
    const std::vector<std::byte> bytes = device_pool_bytes(contiguous);
    const std::array<index_t, 2> lengths = {contiguous.length(0), contiguous.length(1)};
    const auto staged = cuda::to_device(cuda, values);
    const std::string device_message = message_of<E>([&] {
      contiguous.write(target, start, DeviceRowsView(staged.data(), {count, width}));
    });
    const std::string host_message = message_of<E>([&] {
      contiguous_host.write(target, start, HostView<const float, 2>(values.data(), {count, width}));
    });
    CHECK(device_message == host_message);
    CHECK(device_message.rfind("daedalus::ContiguousLatentCache::write", 0) == 0);
    CHECK(device_pool_bytes(contiguous) == bytes);
    CHECK(std::array<index_t, 2>{contiguous.length(0), contiguous.length(1)} == lengths);
  };
  contiguous_case("no such sequence", OutOfRange{""}, 2, 0, 2, D, rows);
  contiguous_case("negative sequence", OutOfRange{""}, -1, 0, 2, D, rows);
  contiguous_case("start past the end", OutOfRange{""}, 1, 11, 2, D, rows);
  contiguous_case("over capacity", CapacityError{""}, 1, 10, 21, D, rows);
  contiguous_case("too narrow", InvalidArgument{""}, 1, 10, 2, D - 3, rows);
  contiguous_case("NaN", NumericError{""}, 1, 5, 25, D, bad);
  CHECK(message_of<OutOfRange>([&] { contiguous.truncate(1, 11); }) ==
        message_of<OutOfRange>([&] { contiguous_host.truncate(1, 11); }));
  CHECK(message_of<OutOfRange>([&] { static_cast<void>(contiguous.length(2)); }) ==
        message_of<OutOfRange>([&] { static_cast<void>(contiguous_host.length(2)); }));
  CHECK_THROWS_AS(contiguous.read(1, 9, HostView<float, 2>(out.data(), {2, D})), OutOfRange);
  using Contiguous = DeviceContiguous<C, S>;
  CHECK_THROWS_AS(Contiguous(-1, 4, cuda), InvalidArgument);
  CHECK_THROWS_AS(Contiguous(std::vector<index_t>{3, -2}, cuda), InvalidArgument);
  CHECK_THROWS_AS(Contiguous(std::vector<index_t>{index_t(1) << 31}, cuda), InvalidArgument);
  HostContiguous<C, S> other_shape(std::vector<index_t>{8, 31});
  CHECK(contains(message_of<InvalidArgument>([&] { contiguous.upload(other_shape); }),
                 "has capacity 31; expected 30"));
  CHECK(contains(message_of<InvalidArgument>([&] { contiguous.download(other_shape); }),
                 "has capacity 31; expected 30"));
  CHECK(other_shape.length(1) == 0);
  CHECK(contiguous.length(1) == 10);
}

// ---- host <-> device ---------------------------------------------------------------------------

/// upload then download returns the host pool bit for bit; rows written on the device after an
/// upload arrive in the host cache with download; a contiguous cache likewise.
template <class S>
void check_upload_download(const CudaBackend& cuda) {
  using C = OddLatent;
  constexpr int D = MlaShape<C>::latent_dim;
  Random random(5401);
  BlockAllocator allocator(10, kBlock);
  HostPaged<C, S> host(allocator);
  DevicePaged<C, S> device(allocator, cuda);
  const index_t a = allocator.add_sequence(), b = allocator.add_sequence();
  const std::vector<float> a_rows = random_rows(random, 30, D), b_rows = random_rows(random, 7, D);
  host.write(a, 0, HostView<const float, 2>(a_rows.data(), {30, D}));
  host.write(b, 0, HostView<const float, 2>(b_rows.data(), {7, D}));
  device.upload(host);
  CHECK(device_pool_bytes(device) == pool_bytes(host));
  CHECK(device.rows(a) == host.rows(a));
  // New rows on the device (the host pool does not see them, though the allocator moved on).
  const std::vector<float> more = random_rows(random, 20, D);
  const auto staged = cuda::to_device(cuda, more);
  // (At explicit positions: with several pools on one allocator, append is refused.)
  device.write(b, allocator.length(b), DeviceRowsView(staged.data(), {20, D}));
  const std::vector<std::byte> before_download = device_pool_bytes(device);
  HostPaged<C, S> copy(allocator);
  device.download(copy);
  CHECK(pool_bytes(copy) == before_download);
  std::vector<float> expected = b_rows;
  expected.insert(expected.end(), more.begin(), more.end());
  HostPaged<C, S> reference_rows(allocator);  // a host layer given the same writes, for rows()
  reference_rows.write(b, 0, HostView<const float, 2>(expected.data(), {27, D}));
  CHECK(copy.rows(b) == reference_rows.rows(b));
  CHECK(copy.rows(b) == device.rows(b));
  // Host and device layers on one allocator: a write into a fork's shared block copies the
  // block in both pools (memcpy on the host, a device copy on the device).
  const index_t fork = allocator.fork(a, 20);
  const std::vector<float> tail = random_rows(random, 3, D);
  const auto staged_tail = cuda::to_device(cuda, tail);
  device.write(fork, 20, DeviceRowsView(staged_tail.data(), {3, D}));
  host.write(fork, 20, HostView<const float, 2>(tail.data(), {3, D}));  // the same positions
  const std::vector<float> parent = device.rows(a);
  std::vector<float> forked(parent.begin(), parent.begin() + 20 * D);
  const std::vector<float> tail_rows = host.rows(fork);
  forked.insert(forked.end(), tail_rows.end() - 3 * D, tail_rows.end());
  CHECK(device.rows(fork) == forked);
  CHECK(host.rows(fork) == forked);
  CHECK(device.rows(a) == host.rows(a));  // the parent's block was not written

  // Contiguous: upload carries rows and lengths, download brings them back.
  HostContiguous<C, S> contiguous_host(std::vector<index_t>{12, 0, 25});
  const std::vector<float> c_rows = random_rows(random, 11, D);
  contiguous_host.write(2, 0, HostView<const float, 2>(c_rows.data(), {11, D}));
  DeviceContiguous<C, S> contiguous(std::vector<index_t>{12, 0, 25}, cuda);
  contiguous.upload(contiguous_host);
  CHECK(contiguous.length(2) == 11);
  CHECK(contiguous.length(0) == 0);
  const auto staged_c = cuda::to_device(cuda, c_rows);
  contiguous.write(0, 0, DeviceRowsView(staged_c.data(), {5, D}));
  HostContiguous<C, S> back(std::vector<index_t>{12, 0, 25});
  contiguous.download(back);
  for (index_t s = 0; s < 3; ++s) {
    CAPTURE(s);
    CHECK(back.length(s) == contiguous.length(s));
    CHECK(contiguous.rows(s) == std::vector<float>(contiguous.rows(s)));
    const HostView<const S, 2> stored = back.rows(s);
    std::vector<float> widened(std::size_t(stored.size()));
    for (std::size_t i = 0; i < widened.size(); ++i) widened[i] = to_float(stored.data()[i]);
    CHECK(widened == contiguous.rows(s));
  }
  CHECK(back.rows(2).size() == contiguous_host.rows(2).size());
  CHECK(std::memcmp(back.rows(2).data(), contiguous_host.rows(2).data(),
                    std::size_t(11) * D * sizeof(S)) == 0);
}

}  // namespace daedalus::testing::kv_cache_checks

// The test cases both binaries run.
TEST_SUITE("cuda kv cache") {
  using namespace daedalus::testing::kv_cache_checks;
  using daedalus::bfloat16;
  using daedalus::CudaBackend;
  using daedalus::half;
  using daedalus::Tiny;

  TEST_CASE("device encoder rounds ties to even and keeps subnormals, bf16 and fp16") {
    check_rounding_bits<bfloat16>(CudaBackend{});
    check_rounding_bits<half>(CudaBackend{});
  }
  TEST_CASE("device PagedLatentCache == host cache byte for byte (writes, forks, copy-on-write)") {
    check_paged_matches_host<Tiny, bfloat16>(CudaBackend{}, 5001);
    check_paged_matches_host<Tiny, half>(CudaBackend{}, 5002);
    check_paged_matches_host<OddLatent, bfloat16>(CudaBackend{}, 5003);
  }
  TEST_CASE("device ContiguousLatentCache == host cache (writes, truncate, encode_rows)") {
    check_contiguous_matches_host<Tiny, bfloat16>(CudaBackend{}, 5011);
    check_contiguous_matches_host<OddLatent, half>(CudaBackend{}, 5012);
  }
  TEST_CASE("device paged caches, 2 layers on one allocator: random operations vs host caches") {
    PagedModel<Tiny>(CudaBackend{}, 5021).run(300);
  }
  TEST_CASE("view(): block table and lengths as the allocator's; kernels find the rows") {
    check_view_and_batch<bfloat16>(CudaBackend{});
    check_view_and_batch<half>(CudaBackend{});
  }
  TEST_CASE("encode_rows over a batch with interleaved shared blocks and repeated sequences") {
    check_encode_rows_shared_blocks<bfloat16>(CudaBackend{});
    check_encode_rows_shared_blocks<half>(CudaBackend{});
  }
  TEST_CASE("device caches reject bad input with the host cache's errors and change nothing") {
    check_bad_input<bfloat16>(CudaBackend{});
    check_bad_input<half>(CudaBackend{});
  }
  TEST_CASE("upload / download between host and device caches") {
    check_upload_download<bfloat16>(CudaBackend{});
    check_upload_download<half>(CudaBackend{});
  }
}
