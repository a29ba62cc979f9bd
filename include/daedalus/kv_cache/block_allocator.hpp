// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"

namespace daedalus {

/// The batch description FlashMLA-style kernels take, owning its storage: `table` is row-major
/// [batch, max_blocks] of block ids (entry [b, j] holds tokens [j·block_size, (j+1)·block_size)
/// of the b-th sequence; unused entries are -1) and `seqlens` [batch] the tokens of each sequence.
struct BlockTable {
  std::vector<std::int32_t> table;    // [batch, max_blocks]
  index_t max_blocks = 0;             // columns of `table`
  std::vector<std::int32_t> seqlens;  // [batch]

  [[nodiscard]] index_t batch() const { return index_t(seqlens.size()); }
};

/// The positions one step of a model writes, reserved once for all of its layers by
/// BlockAllocator::reserve: entry b covers positions [start_positions()[b],
/// start_positions()[b] + tokens()) of sequence sequences()[b], whose length the reservation set
/// to the end of that range. Layers given the reservation (mla::decode, mla::prefill) write
/// exactly these rows into their own pools and never move a length, so every layer sees the same
/// sequences. A reservation is stale once one of its sequences changes again (another
/// reservation or write of it, a fork of it, a truncation, its release): the layers then refuse it
/// with a typed error instead of writing rows the allocator no longer holds for them.
class SlotReservation {
 public:
  /// Sequences in the reservation, each named once.
  [[nodiscard]] index_t batch() const { return index_t(seqs_.size()); }
  /// New positions per sequence (1 for a decode step; q_len for speculative decoding; a chunk's
  /// length for prefill).
  [[nodiscard]] index_t tokens() const { return tokens_; }
  /// [batch] the sequence ids, in the order the step's activations are laid out.
  [[nodiscard]] std::span<const index_t> sequences() const { return seqs_; }
  /// [batch] the first reserved position of each sequence.
  [[nodiscard]] std::span<const index_t> start_positions() const { return starts_; }

 private:
  friend class BlockAllocator;
  const void* owner_ = nullptr;  // the allocator's shared state
  index_t tokens_ = 0;
  std::vector<index_t> seqs_;
  std::vector<index_t> starts_;
  std::vector<std::uint64_t> versions_;  // each sequence's version right after the reservation
};

namespace detail {

/// What the allocator asks of every layer pool registered with it: copy the first `rows` rows of
/// block `src` into block `dst` (copy-on-write of a shared block).
class BlockPoolHook {
 public:
  virtual void copy_block_rows(std::int32_t dst, std::int32_t src, index_t rows) = 0;

 protected:
  BlockPoolHook() = default;
  BlockPoolHook(const BlockPoolHook&) = default;
  BlockPoolHook& operator=(const BlockPoolHook&) = default;
  ~BlockPoolHook() = default;
};

}  // namespace detail

/// Hands out fixed-size blocks of cache rows to sequences, for every layer of a model at once: a
/// block id addresses the same slot in each layer's pool (PagedLatentCache), so a sequence has one
/// block list however many layers there are (vLLM's PagedAttention design; FlashMLA's
/// `block_table`). Blocks carry reference counts: `fork` shares a sequence's blocks with a new
/// sequence (prefix sharing) and the first write into a shared block copies it, in every
/// registered pool, before anything is written (copy on write).
///
/// Every operation checks all of its arguments, and that the pool holds enough free blocks for
/// it, before it changes anything: a call that throws leaves the allocator and every pool as they
/// were. Sequence ids are never reused, so a released id stays invalid. Not thread-safe: one
/// thread schedules, as in a serving engine.
///
/// A BlockAllocator is a handle: copies refer to the same allocator, and every pool registered
/// with it keeps one, so the allocator lives as long as its last handle. Pools and the
/// allocator object a user made may be destroyed in any order.
///
/// One step of a multi-layer model reserves its positions once, with `reserve`: the sequences'
/// lengths advance once, new blocks are taken and shared blocks copied (in every layer's pool)
/// once, and each layer then writes exactly the reserved rows (vLLM computes one slot mapping per
/// step for all layers the same way).
class BlockAllocator {
 public:
  /// A pool of `num_blocks` blocks of `block_size` tokens each.
  /// @throws InvalidArgument when num_blocks is not in [0, 2^31) (block ids are int32, as in
  ///         FlashMLA's block_table) or block_size < 1.
  BlockAllocator(index_t num_blocks, index_t block_size)
      : s_(std::make_shared<State>(check_num_blocks(num_blocks), check_block_size(block_size))) {
    s_->ref_counts.assign(std::size_t(s_->num_blocks), 0);
    s_->free.reserve(std::size_t(s_->num_blocks));
    // Handed out from the back: block 0 first, so a fresh pool fills from its start.
    for (index_t b = s_->num_blocks - 1; b >= 0; --b) s_->free.push_back(std::int32_t(b));
  }

  /// Another handle of the same allocator (it shares the blocks, sequences and pools; nothing is
  /// copied). There is no move: a moved-from handle would be one that cannot be used.
  BlockAllocator(const BlockAllocator&) = default;
  BlockAllocator& operator=(const BlockAllocator&) = default;
  ~BlockAllocator() = default;

  /// True when both handles refer to the same allocator.
  friend bool operator==(const BlockAllocator& a, const BlockAllocator& b) { return a.s_ == b.s_; }

  [[nodiscard]] index_t num_blocks() const { return s_->num_blocks; }
  [[nodiscard]] index_t block_size() const { return s_->block_size; }
  [[nodiscard]] index_t num_free_blocks() const { return index_t(s_->free.size()); }
  [[nodiscard]] index_t num_used_blocks() const { return s_->num_blocks - num_free_blocks(); }
  /// Blocks a sequence of `tokens` tokens occupies: ceil(tokens / block_size).
  [[nodiscard]] index_t blocks_for(index_t tokens) const {
    return (tokens + s_->block_size - 1) / s_->block_size;
  }

  /// How many sequences hold block `block` (0 when it is free).
  /// @throws OutOfRange when block is not in [0, num_blocks).
  [[nodiscard]] std::int32_t ref_count(index_t block) const {
    detail::require<OutOfRange>(block >= 0 && block < s_->num_blocks, kName,
                                "::ref_count: 'block' is ", block, "; expected a block id in [0, ",
                                s_->num_blocks, ")");
    return s_->ref_counts[std::size_t(block)];
  }

  /// Starts an empty sequence and returns its id (ids count up from 0 and are never reused).
  index_t add_sequence() {
    const index_t id = s_->next_id;
    s_->sequences.try_emplace(id);
    ++s_->next_id;
    return id;
  }

  /// True when `seq` was added and not released.
  [[nodiscard]] bool contains(index_t seq) const { return s_->sequences.count(seq) != 0; }
  /// Live sequences.
  [[nodiscard]] index_t num_sequences() const { return index_t(s_->sequences.size()); }
  /// The ids of the live sequences, ascending.
  [[nodiscard]] std::vector<index_t> sequences() const {
    std::vector<index_t> ids;
    ids.reserve(s_->sequences.size());
    for (const auto& [id, sequence] : s_->sequences) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  /// Throws OutOfRange, with a message starting with `caller`, unless `seq` is live.
  void check_live(std::string_view caller, index_t seq) const { live_for(caller, seq); }

  /// Tokens sequence `seq` holds. @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] index_t length(index_t seq) const { return live(seq, "length").length; }

  /// The blocks of sequence `seq` in token order: blocks_for(length(seq)) ids.
  /// @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] std::span<const std::int32_t> blocks(index_t seq) const {
    return live(seq, "blocks").blocks;
  }

  /// A new sequence holding the first `prefix_length` tokens of `seq` by sharing its blocks
  /// (nothing is copied now; a later write into a shared block copies that block first).
  /// @throws OutOfRange for a released or unknown `seq` or prefix_length not in [0, length(seq)].
  index_t fork(index_t seq, index_t prefix_length) {
    const Sequence& parent = live(seq, "fork");
    detail::require<OutOfRange>(prefix_length >= 0 && prefix_length <= parent.length, kName,
                                "::fork: 'prefix_length' is ", prefix_length,
                                "; expected a length in [0, ", parent.length, "] (sequence ", seq,
                                " holds ", parent.length, " tokens)");
    Sequence child;
    child.length = prefix_length;
    child.blocks.assign(parent.blocks.begin(),
                        parent.blocks.begin() + std::ptrdiff_t(blocks_for(prefix_length)));
    const index_t id = s_->next_id;
    s_->sequences.emplace(id, std::move(child));  // may throw bad_alloc: nothing changed yet
    ++s_->next_id;
    for (const std::int32_t b : s_->sequences.at(id).blocks) ++s_->ref_counts[std::size_t(b)];
    // The parent's blocks are shared now: a reservation of it no longer holds them alone.
    ++s_->sequences.find(seq)->second.version;
    return id;
  }
  /// A new sequence sharing all of `seq`'s tokens: fork(seq, length(seq)).
  index_t fork(index_t seq) { return fork(seq, live(seq, "fork").length); }

  /// Sets the length of `seq` to `new_length`. Growing claims the new rows for writing: shared
  /// blocks among them are copied first and new blocks taken from the free list; shrinking
  /// returns blocks no longer needed.
  /// @throws OutOfRange for a released or unknown sequence or new_length < 0; CapacityError when
  ///         the pool lacks the free blocks.
  void resize(index_t seq, index_t new_length) {
    detail::require<OutOfRange>(new_length >= 0, kName, "::resize: 'new_length' is ", new_length,
                                "; expected at least 0");
    const index_t old_length = live(seq, "resize").length;
    set_length("daedalus::BlockAllocator::resize", seq, std::min(old_length, new_length),
               new_length);
  }

  /// Grows `seq` by `n` tokens: resize(seq, length(seq) + n).
  /// @throws as resize, and InvalidArgument when n < 0.
  void append(index_t seq, index_t n) {
    detail::require<InvalidArgument>(n >= 0, kName, "::append: 'n' is ", n,
                                     "; expected at least 0");
    const index_t old_length = live(seq, "append").length;
    set_length("daedalus::BlockAllocator::append", seq, old_length, old_length + n);
  }

  /// Keeps the first `new_length` tokens of `seq`, returning blocks no longer needed.
  /// @throws OutOfRange for a released or unknown sequence or new_length not in [0, length(seq)].
  void truncate(index_t seq, index_t new_length) {
    const index_t old_length = live(seq, "truncate").length;
    detail::require<OutOfRange>(new_length >= 0 && new_length <= old_length, kName,
                                "::truncate: 'new_length' is ", new_length,
                                "; expected a length in [0, ", old_length, "] (sequence ", seq,
                                " holds ", old_length, " tokens)");
    set_length("daedalus::BlockAllocator::truncate", seq, new_length, new_length);
  }

  /// Ends sequence `seq`: its blocks' reference counts drop and unshared blocks return to the
  /// free list. The id stays invalid.
  /// @throws OutOfRange for a released or unknown sequence.
  void release(index_t seq) {
    live(seq, "release");
    auto node = s_->sequences.extract(seq);
    for (const std::int32_t b : node.mapped().blocks) drop(b);
  }

  /// Reserves `tokens` new positions after the current length of each sequence of `seqs` for
  /// one step of every layer: reserve(seqs, lengths, tokens).
  SlotReservation reserve(std::span<const index_t> seqs, index_t tokens) {
    std::vector<index_t> starts(seqs.size());
    for (std::size_t b = 0; b < seqs.size(); ++b)
      starts[b] = live_for(kReserve, seqs[b]).length;  // an unknown id is reported here
    return reserve(seqs, starts, tokens);
  }

  /// Reserves positions [starts[b], starts[b] + tokens) of each sequence seqs[b] for one step of
  /// every layer (a start below the length rewrites from there, as a recomputed chunk does):
  /// each length becomes starts[b] + tokens, new blocks are taken, and shared blocks holding
  /// reserved rows are copied in every registered pool, once, before any layer writes.
  /// @throws InvalidArgument when the spans differ in size, a sequence is named twice or
  ///         tokens < 0; OutOfRange for a released or unknown sequence or a start outside
  ///         [0, length]; CapacityError when the pool lacks the blocks for the whole batch.
  ///         Nothing changes when it throws.
  SlotReservation reserve(std::span<const index_t> seqs, std::span<const index_t> starts,
                          index_t tokens) {
    for (std::size_t b = 0; b < seqs.size(); ++b)
      for (std::size_t other = 0; other < b; ++other)
        detail::require<InvalidArgument>(seqs[other] != seqs[b], kReserve,
                                         ": 'seqs' names sequence ", seqs[b], " twice (entries ",
                                         other, " and ", b, "); expected distinct ids");
    check_writes(kReserve, seqs, starts, tokens);
    SlotReservation slots;
    slots.owner_ = s_.get();
    slots.tokens_ = tokens;
    slots.seqs_.assign(seqs.begin(), seqs.end());
    slots.starts_.assign(starts.begin(), starts.end());
    slots.versions_.resize(seqs.size());
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      set_length(kReserve, seqs[b], starts[b], starts[b] + tokens);
      slots.versions_[b] = s_->sequences.find(seqs[b])->second.version;
    }
    return slots;
  }

  /// Throws unless `slots` was reserved on this allocator and none of its sequences changed
  /// since. Messages start with `caller`.
  /// @throws InvalidArgument for a reservation of another allocator or a stale one; OutOfRange
  ///         when one of its sequences was released.
  void check_reservation(std::string_view caller, const SlotReservation& slots) const {
    detail::require<InvalidArgument>(slots.owner_ == s_.get(), caller,
                                     ": 'slots' was reserved on another BlockAllocator; expected "
                                     "a reservation of the cache's allocator");
    for (std::size_t b = 0; b < slots.seqs_.size(); ++b) {
      const Sequence& sequence = live_for(caller, slots.seqs_[b]);
      detail::require<InvalidArgument>(
          sequence.version == slots.versions_[b], caller, ": 'slots' is stale: sequence ",
          slots.seqs_[b], " changed after the reservation (it holds ", sequence.length,
          " tokens); reserve the step again (BlockAllocator::reserve)");
    }
  }

  /// Checks what prepare_write(seq, start_pos, n) would check, without changing anything.
  /// Messages start with `caller`.
  /// @throws OutOfRange for a released or unknown sequence or start_pos not in [0, length(seq)];
  ///         InvalidArgument when n < 0; CapacityError when the free blocks do not cover the new
  ///         blocks and the copy-on-write copies the write needs.
  void check_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) const {
    const Sequence& sequence = live_for(caller, seq);
    detail::require<OutOfRange>(start_pos >= 0 && start_pos <= sequence.length, caller,
                                ": 'start_pos' is ", start_pos, "; expected a position in [0, ",
                                sequence.length, "] (sequence ", seq, " holds ", sequence.length,
                                " tokens)");
    detail::require<InvalidArgument>(n >= 0, caller, ": the write has ", n,
                                     " rows; expected at least 0");
    check_capacity(caller, seq, sequence, start_pos, start_pos + n);
  }

  /// Checks that the writes of `n` rows at starts[i] of seqs[i], for every i in order, are each
  /// valid and fit in the pool together (what a batched decode or prefill needs before its first
  /// write): the free blocks must cover every new block and copy-on-write copy of the batch,
  /// counted exactly (two forks appending into their shared last block need one copy, not two:
  /// after the first copies, the second holds the block alone). Changes nothing.
  /// @throws InvalidArgument when the spans differ in size or n < 0; OutOfRange for a released
  ///         or unknown sequence or a start outside [0, length] (the length after the batch's
  ///         earlier writes to that sequence); CapacityError when the pool cannot hold the batch.
  void check_writes(std::string_view caller, std::span<const index_t> seqs,
                    std::span<const index_t> starts, index_t n) const {
    detail::require<InvalidArgument>(seqs.size() == starts.size(), caller, ": 'starts' has ",
                                     starts.size(), " entries; expected ", seqs.size(),
                                     " (one per sequence)");
    detail::require<InvalidArgument>(n >= 0, caller, ": the write has ", n,
                                     " rows; expected at least 0");
    std::unordered_map<index_t, Sequence> simulated;      // sequences the batch wrote so far
    std::unordered_map<std::int32_t, std::int32_t> refs;  // reference counts the batch changed
    const auto ref = [&](std::int32_t block) {
      const auto it = refs.find(block);
      return it != refs.end() ? it->second : s_->ref_counts[std::size_t(block)];
    };
    index_t free = num_free_blocks();
    index_t needed = 0;
    std::int32_t next_block = -1;  // stand-ins for blocks the batch takes: -1, -2, ...
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const index_t seq = seqs[i];
      const auto found = simulated.find(seq);
      Sequence next = found != simulated.end() ? found->second : live_for(caller, seq);
      detail::require<OutOfRange>(starts[i] >= 0 && starts[i] <= next.length, caller, ": 'starts[",
                                  i, "]' is ", starts[i], "; expected a position in [0, ",
                                  next.length, "] (sequence ", seq, " holds ", next.length,
                                  " tokens)");
      const index_t new_length = starts[i] + n;
      const index_t keep = blocks_for(new_length);
      const auto take_simulated = [&] {
        ++needed;
        detail::require<CapacityError>(
            free > 0, caller, ": the block pool is exhausted: the batch's writes need at least ",
            needed, " free blocks (new blocks and copy-on-write copies) by entry ", i,
            " (sequence ", seq, "); ", num_free_blocks(), " of the pool's ", s_->num_blocks,
            " blocks of ", s_->block_size, " tokens are free");
        --free;
        const std::int32_t block = next_block--;  // negative: never a real block id
        refs[block] = 1;
        return block;
      };
      while (index_t(next.blocks.size()) > keep) {
        const std::int32_t block = next.blocks.back();
        const std::int32_t remaining = ref(block) - 1;
        refs[block] = remaining;
        if (remaining == 0) ++free;
        next.blocks.pop_back();
      }
      for (index_t j = first_written_block(starts[i], new_length); j < index_t(next.blocks.size());
           ++j) {
        std::int32_t& block = next.blocks[std::size_t(j)];
        if (ref(block) == 1) continue;
        const std::int32_t copy = take_simulated();
        const std::int32_t remaining = ref(block) - 1;
        refs[block] = remaining;
        block = copy;
      }
      while (index_t(next.blocks.size()) < keep) next.blocks.push_back(take_simulated());
      next.length = new_length;
      simulated[seq] = std::move(next);
    }
  }

  /// Makes rows [start_pos, start_pos + n) of `seq` writable and sets its length to
  /// start_pos + n (rows from there on are dropped, as a chunked-prefill rewrite expects): blocks
  /// past the new end are returned, shared blocks holding any of the rows are copied (rows before
  /// start_pos, in every registered pool), and new blocks are taken for the rest. The caller then
  /// writes the rows into each pool. @throws as check_write; nothing changes when it throws.
  void prepare_write(std::string_view caller, index_t seq, index_t start_pos, index_t n) {
    check_write(caller, seq, start_pos, n);
    set_length(caller, seq, start_pos, start_pos + n);
  }

  /// New blocks plus copy-on-write copies that writing rows [start_pos, start_pos + n) of `seq`
  /// needs, less the blocks the write frees by dropping rows past start_pos + n.
  [[nodiscard]] index_t blocks_needed(index_t seq, index_t start_pos, index_t n) const {
    const Sequence& sequence = live(seq, "blocks_needed");
    const Need need = need_for(sequence, start_pos, start_pos + n);
    return need.new_blocks + need.copies - need.freed;
  }

  /// The block table and lengths of `seqs`, in that order (a sequence may appear more than once).
  /// @throws OutOfRange for a released or unknown sequence.
  [[nodiscard]] BlockTable block_table(std::span<const index_t> seqs) const {
    BlockTable out;
    block_table(seqs, out);
    return out;
  }
  /// As above, into `out`, reusing its storage (a decode loop rebuilds the table every step).
  void block_table(std::span<const index_t> seqs, BlockTable& out) const {
    index_t max_blocks = 0;
    for (const index_t seq : seqs)
      max_blocks = std::max(max_blocks, index_t(live(seq, "block_table").blocks.size()));
    out.max_blocks = max_blocks;
    out.table.assign(seqs.size() * std::size_t(max_blocks), -1);
    out.seqlens.resize(seqs.size());
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      const Sequence& sequence = s_->sequences.at(seqs[b]);
      std::copy(sequence.blocks.begin(), sequence.blocks.end(),
                out.table.begin() + std::ptrdiff_t(b * std::size_t(max_blocks)));
      out.seqlens[b] = std::int32_t(sequence.length);
    }
  }

  /// Pools call these from their constructors and destructors so that copy-on-write reaches
  /// every layer. Not for other callers.
  void register_pool(detail::BlockPoolHook* pool) { s_->pools.push_back(pool); }
  void unregister_pool(detail::BlockPoolHook* pool) {
    s_->pools.erase(std::remove(s_->pools.begin(), s_->pools.end(), pool), s_->pools.end());
  }
  void replace_pool(detail::BlockPoolHook* from, detail::BlockPoolHook* to) {
    std::replace(s_->pools.begin(), s_->pools.end(), from, to);
  }
  [[nodiscard]] index_t num_pools() const { return index_t(s_->pools.size()); }

  /// Throws InvalidArgument, with a message starting with `caller`, when more than one pool is
  /// registered: an operation that appends at a sequence's length would then run once per layer
  /// and advance the sequence once per layer.
  void require_single_pool(std::string_view caller) const {
    detail::require<InvalidArgument>(
        s_->pools.size() <= 1, caller, ": the cache's BlockAllocator serves ", s_->pools.size(),
        " layer pools, which share sequence lengths, so appending at a sequence's length would "
        "advance it once per layer; expected one pool. Reserve the step once for every layer "
        "(BlockAllocator::reserve) and pass the SlotReservation to each layer, or write at "
        "explicit positions");
  }

 private:
  static constexpr std::string_view kName = "daedalus::BlockAllocator";
  static constexpr std::string_view kReserve = "daedalus::BlockAllocator::reserve";

  struct Sequence {
    index_t length = 0;
    std::vector<std::int32_t> blocks;  // blocks_for(length) ids in token order
    std::uint64_t version = 0;         // counts the changes of length, blocks or their sharing
  };

  /// What moving a sequence to `new_length`, writing rows [write_start, new_length), takes.
  struct Need {
    index_t new_blocks = 0;  // taken from the free list to extend the block list
    index_t copies = 0;      // shared blocks holding rows to write, copied first
    index_t freed = 0;       // blocks past the new end whose last reference this drops
  };

  static index_t check_num_blocks(index_t n) {
    detail::require<InvalidArgument>(n >= 0 && n <= std::numeric_limits<std::int32_t>::max(), kName,
                                     ": 'num_blocks' is ", n, "; expected a count in [0, ",
                                     std::numeric_limits<std::int32_t>::max(),
                                     "] (block ids are int32)");
    return n;
  }
  static index_t check_block_size(index_t n) {
    detail::require<InvalidArgument>(n >= 1, kName, ": 'block_size' is ", n,
                                     "; expected at least 1");
    return n;
  }

  const Sequence& live_for(std::string_view caller, index_t seq) const {
    const auto it = s_->sequences.find(seq);
    if (it == s_->sequences.end()) {
      const bool released = seq >= 0 && seq < s_->next_id;
      throw OutOfRange(detail::message(caller, ": sequence ", seq,
                                       released ? " was released" : " was never added",
                                       "; expected a live sequence id"));
    }
    return it->second;
  }
  const Sequence& live(index_t seq, std::string_view function) const {
    const auto it = s_->sequences.find(seq);
    if (it != s_->sequences.end()) return it->second;
    return live_for(detail::message(kName, "::", function), seq);
  }

  /// The first block holding a row of [write_start, new_length); past the kept blocks when the
  /// range is empty (a truncation writes nothing and copies nothing).
  index_t first_written_block(index_t write_start, index_t new_length) const {
    return write_start < new_length ? write_start / s_->block_size : blocks_for(new_length);
  }

  Need need_for(const Sequence& sequence, index_t write_start, index_t new_length) const {
    Need need;
    const index_t have = index_t(sequence.blocks.size());
    const index_t keep = blocks_for(new_length);
    for (index_t j = keep; j < have; ++j)
      if (s_->ref_counts[std::size_t(sequence.blocks[std::size_t(j)])] == 1) ++need.freed;
    for (index_t j = first_written_block(write_start, new_length); j < std::min(keep, have); ++j)
      if (s_->ref_counts[std::size_t(sequence.blocks[std::size_t(j)])] > 1) ++need.copies;
    need.new_blocks = std::max<index_t>(0, keep - have);
    return need;
  }

  void check_capacity(std::string_view caller, index_t seq, const Sequence& sequence,
                      index_t write_start, index_t new_length) const {
    const Need need = need_for(sequence, write_start, new_length);
    const index_t available = num_free_blocks() + need.freed;
    detail::require<CapacityError>(need.new_blocks + need.copies <= available, caller,
                                   ": the block pool is exhausted: "
                                   "sequence ",
                                   seq, " needs ", need.new_blocks + need.copies, " free blocks (",
                                   need.new_blocks, " new, ", need.copies,
                                   " copy-on-write copies of shared blocks) to hold ", new_length,
                                   " tokens; ", available, " of the pool's ", s_->num_blocks,
                                   " blocks of ", s_->block_size, " tokens are free");
  }

  /// Moves `seq` to `new_length` with rows [write_start, new_length) about to be written; checks
  /// capacity first, then cannot fail.
  void set_length(std::string_view caller, index_t seq, index_t write_start, index_t new_length) {
    Sequence& sequence = s_->sequences.find(seq)->second;
    check_capacity(caller, seq, sequence, write_start, new_length);
    const index_t keep = blocks_for(new_length);
    sequence.blocks.reserve(std::size_t(keep));  // the only allocation; before any change
    bool changed = sequence.length != new_length || index_t(sequence.blocks.size()) != keep;
    while (index_t(sequence.blocks.size()) > keep) {
      drop(sequence.blocks.back());
      sequence.blocks.pop_back();
    }
    for (index_t j = first_written_block(write_start, new_length);
         j < index_t(sequence.blocks.size()); ++j) {
      std::int32_t& block = sequence.blocks[std::size_t(j)];
      if (s_->ref_counts[std::size_t(block)] == 1) continue;
      const std::int32_t copy = take();
      // Only the rows before the write survive it; rows from write_start on are rewritten.
      const index_t rows = std::clamp<index_t>(write_start - j * s_->block_size, 0, s_->block_size);
      if (rows > 0)
        for (detail::BlockPoolHook* pool : s_->pools) pool->copy_block_rows(copy, block, rows);
      drop(block);
      block = copy;
      changed = true;
    }
    while (index_t(sequence.blocks.size()) < keep) sequence.blocks.push_back(take());
    sequence.length = new_length;
    // A write that finds its rows already reserved (every layer after the first, in a step)
    // changes nothing and leaves the version, so the step's reservation stays current.
    if (changed) ++sequence.version;
  }

  std::int32_t take() {
    const std::int32_t block = s_->free.back();
    s_->free.pop_back();
    s_->ref_counts[std::size_t(block)] = 1;
    return block;
  }
  void drop(std::int32_t block) {
    if (--s_->ref_counts[std::size_t(block)] == 0) s_->free.push_back(block);
  }

  /// Everything the allocator knows, shared by every handle: the user's BlockAllocator and the
  /// copy each registered pool keeps, so pools and allocator may be destroyed in any order.
  struct State {
    State(index_t blocks, index_t size) : num_blocks(blocks), block_size(size) {}
    index_t num_blocks;
    index_t block_size;
    std::vector<std::int32_t> ref_counts;  // [num_blocks]
    std::vector<std::int32_t> free;        // stack of free block ids
    std::unordered_map<index_t, Sequence> sequences;
    index_t next_id = 0;
    std::vector<detail::BlockPoolHook*> pools;
  };
  std::shared_ptr<State> s_;
};

}  // namespace daedalus
