// SPDX-License-Identifier: Apache-2.0
#pragma once

// The CUDA emulation layer (emulation/README.md; CMake target daedalus::cuda_emulation), used by
// daedalus's tests. Include it FIRST in a host (g++) translation unit, then the library's CUDA
// headers (<daedalus/cuda.cuh>) and kernel sources (.cuh): the same kernel source that nvcc
// compiles for sm_80/sm_90a then compiles with g++ and runs on CPU threads.
//
// What it provides (the vocabulary daedalus kernels may use, nothing more):
//   - the keywords __global__, __device__, __host__, __forceinline__, __shared__, __align__,
//     __launch_bounds__, __restrict__ (g++ has it);
//   - threadIdx, blockIdx, blockDim, gridDim, warpSize; dim3, uint3;
//   - __syncthreads, __syncwarp, __shfl_sync/_up/_down/_xor, __ballot_sync, __any_sync,
//     __all_sync, atomics (atomicAdd/Max/Min/CAS/Exch), __threadfence, __popc, __ffs, a few
//     math intrinsics; __nv_bfloat16 and __half (Eigen's bit-identical types) with conversions;
//   - dynamic shared memory, reached through daedalus::cuda::dynamic_shared_memory<T>();
//   - the warp-level m16n8k16 matrix product that daedalus::cuda::mma_m16n8k16 issues, computed
//     from the fragments exactly as the PTX ISA lays them out across the 32 lanes;
//   - a subset of the runtime API (cudaMalloc/Free/Memcpy/Memset (+Async), streams,
//     cudaGetLastError, ...) so that CudaBackend, DeviceBuffer and the launch helper run as is.
//
// How a launch runs. Each CUDA thread of a block is a fiber (its own stack and context), and the
// fibers of a block really interleave: a fiber runs until it reaches a synchronisation point
// (__syncthreads, a warp collective, the end of the kernel) and waits there until every thread
// the operation names has arrived. A thread therefore runs AHEAD of the others up to its next
// barrier: a kernel that reads shared memory another thread writes without a __syncthreads in
// between reads a value that has not been written yet and produces a wrong result, every time,
// instead of being right by luck as it often is on a GPU. The order in which runnable fibers are
// resumed is a choice (Schedule): thread order (the default), reversed, or a seeded shuffle.
// Shared memory starts as 0xFF bytes (NaN as float, bf16 and fp16) in every block, as does
// cudaMalloc'd memory, so a read of a never-written element shows up.
//
// What is diagnosed (the launch fails with a message naming the threads): a deadlock (threads
// waiting at different barriers, a __syncthreads some threads never reach), a warp collective
// whose mask names a lane that exited or does not exist, lanes of one mask waiting in different
// collectives, a mask that omits the calling lane, a launch shape CUDA would reject.
//
// Blocks of a grid run one after another on the calling thread, or on `host_threads` OS threads
// at once (atomics are real atomics, so concurrent blocks exercise them). Static __shared__
// variables are per OS thread, hence per running block. What is not emulated: inter-block
// spin-waiting (a block that waits for another block deadlocks), warp-group MMA (wgmma), the TMA,
// clusters, cooperative launches, memory-model subtleties beyond sequential consistency.
#if defined(__CUDACC__)
#error \
    "cuda_emulation.hpp is for host compilers: nvcc compiles the same kernels against CUDA itself"
#endif

#define DAEDALUS_CUDA_EMULATION 1

#include <ucontext.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------
// Keywords. A kernel is an ordinary function; __shared__ variables are static thread_local, so
// every OS thread (each runs one block at a time) has its own copy: shared by the block's fibers.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ------------------------------------------------------------------------------------------------
// Built-in types and variables.
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Per OS thread; the scheduler sets threadIdx before it resumes a fiber, the block runner sets
// the other three once per block.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

// 16-bit floating-point types: Eigen's are bit-identical to CUDA's and round to nearest even.
using __nv_bfloat16 = Eigen::bfloat16;
using __half = Eigen::half;

inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __half __float2half(float x) { return __half(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }

// ------------------------------------------------------------------------------------------------
// Runtime API subset. Error codes keep CUDA's numeric values.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorLaunchFailure = 719,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

inline constexpr unsigned cudaStreamDefault = 0;
inline constexpr unsigned cudaStreamNonBlocking = 1;

/// An emulated stream: work runs synchronously, so a stream only has an identity.
struct CUstream_st {
  unsigned flags;
};
using cudaStream_t = CUstream_st*;

namespace daedalus::cuda_emulation {

/// In which order the runnable threads of a block are resumed after each synchronisation point.
enum class Schedule {
  in_order,  ///< thread 0, 1, 2, ... (deterministic; the default)
  reversed,  ///< the last thread first (deterministic)
  shuffled,  ///< a fresh seeded permutation before every sweep (deterministic for a seed)
};

/// How launches run. `default_options()` applies to every launch that names none.
struct Options {
  Schedule schedule = Schedule::in_order;
  std::uint64_t seed = 1;               ///< seeds Schedule::shuffled
  int host_threads = 1;                 ///< OS threads that run blocks concurrently
  std::size_t stack_bytes = 256 << 10;  ///< per emulated CUDA thread
};

namespace detail {
/// Options from the environment, so a whole test binary can be rerun under another schedule:
/// DAEDALUS_EMULATION_SCHEDULE (in_order, reversed, shuffled), DAEDALUS_EMULATION_SEED,
/// DAEDALUS_EMULATION_HOST_THREADS. An unparsable value ends the run with a message.
inline Options options_from_environment() {
  Options options;
  auto fail = [](const char* name, const char* value, const char* expected) {
    std::fprintf(stderr, "cuda_emulation: %s is '%s'; expected %s\n", name, value, expected);
    std::exit(2);
  };
  if (const char* v = std::getenv("DAEDALUS_EMULATION_SCHEDULE"); v != nullptr && *v != '\0') {
    const std::string text = v;
    if (text == "in_order") {
      options.schedule = Schedule::in_order;
    } else if (text == "reversed") {
      options.schedule = Schedule::reversed;
    } else if (text == "shuffled") {
      options.schedule = Schedule::shuffled;
    } else {
      fail("DAEDALUS_EMULATION_SCHEDULE", v, "in_order, reversed or shuffled");
    }
  }
  if (const char* v = std::getenv("DAEDALUS_EMULATION_SEED"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    options.seed = std::strtoull(v, &end, 10);
    if (*end != '\0') fail("DAEDALUS_EMULATION_SEED", v, "a decimal integer");
  }
  if (const char* v = std::getenv("DAEDALUS_EMULATION_HOST_THREADS"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long threads = std::strtol(v, &end, 10);
    if (*end != '\0' || threads < 1 || threads > 256) {
      fail("DAEDALUS_EMULATION_HOST_THREADS", v, "an integer in [1, 256]");
    }
    options.host_threads = static_cast<int>(threads);
  }
  return options;
}
}  // namespace detail

/// The options of launches that name none: the defaults, or what the environment says.
inline Options& default_options() {
  static Options options = detail::options_from_environment();
  return options;
}

/// Sets default_options() for the lifetime of the object (tests use it to vary the schedule).
class ScopedOptions {
 public:
  explicit ScopedOptions(const Options& options) : saved_(default_options()) {
    default_options() = options;
  }
  ~ScopedOptions() { default_options() = saved_; }
  ScopedOptions(const ScopedOptions&) = delete;
  ScopedOptions& operator=(const ScopedOptions&) = delete;

 private:
  Options saved_;
};

/// A launch that CUDA would reject or that went wrong on the emulated device (deadlock,
/// divergent collective, bad mask). The message names the threads involved.
class LaunchError : public std::runtime_error {
 public:
  LaunchError(cudaError_t code, const std::string& what) : std::runtime_error(what), code_(code) {}
  [[nodiscard]] cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

namespace detail {

// ---- device memory bookkeeping: every cudaMalloc'd range, so copies can be checked ----------
struct Allocations {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> ranges;  // base -> bytes

  /// True when [p, p + bytes) lies inside one allocation.
  bool contains(const void* p, std::size_t bytes) {
    std::lock_guard lock(mutex);
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    auto it = ranges.upper_bound(address);
    if (it == ranges.begin()) return false;
    --it;
    return address >= it->first && address + bytes <= it->first + it->second &&
           (bytes > 0 || address < it->first + it->second);
  }
};

inline Allocations& allocations() {
  static Allocations instance;
  return instance;
}

/// Dynamic shared memory each kernel has opted into with cudaFuncSetAttribute (above 48 KiB).
struct SharedMemoryOptIns {
  std::mutex mutex;
  std::map<const void*, std::size_t> bytes;
};
inline SharedMemoryOptIns& shared_memory_opt_ins() {
  static SharedMemoryOptIns instance;
  return instance;
}
/// The dynamic shared memory a kernel may use without opting in (every architecture).
inline constexpr std::size_t default_dynamic_shared_bytes = 48u * 1024u;

inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local std::string last_error_detail;

inline cudaError_t record(cudaError_t code, std::string detail = {}) {
  if (code != cudaSuccess) {
    last_error = code;
    last_error_detail = std::move(detail);
  }
  return code;
}

// ---- fibers ------------------------------------------------------------------------------------
enum class State { runnable, at_block_barrier, in_warp_collective, exited };

enum class Collective {
  none,
  syncwarp,
  shfl_idx,
  shfl_up,
  shfl_down,
  shfl_xor,
  ballot,
  any,
  all,
  mma_bf16,
  mma_f16
};

inline const char* collective_name(Collective c) {
  switch (c) {
    case Collective::none:
      return "none";
    case Collective::syncwarp:
      return "__syncwarp";
    case Collective::shfl_idx:
      return "__shfl_sync";
    case Collective::shfl_up:
      return "__shfl_up_sync";
    case Collective::shfl_down:
      return "__shfl_down_sync";
    case Collective::shfl_xor:
      return "__shfl_xor_sync";
    case Collective::ballot:
      return "__ballot_sync";
    case Collective::any:
      return "__any_sync";
    case Collective::all:
      return "__all_sync";
    case Collective::mma_bf16:
      return "mma.sync.m16n8k16 (bf16)";
    case Collective::mma_f16:
      return "mma.sync.m16n8k16 (fp16)";
  }
  return "?";
}

/// One emulated CUDA thread.
struct Fiber {
  ucontext_t context{};
  std::unique_ptr<char[]> stack;
  uint3 thread_idx{0, 0, 0};
  unsigned linear = 0;  // x + y·Dx + z·Dx·Dy: what CUDA uses to form warps
  State state = State::runnable;
  // The collective this thread waits in, its operands and its result.
  Collective collective = Collective::none;
  unsigned mask = 0;
  int argument = 0;  // source lane, delta or lane mask
  int width = 32;
  std::uint64_t value = 0;
  std::uint64_t result = 0;
  const std::uint32_t* mma_a = nullptr;  // [4] packed pairs
  const std::uint32_t* mma_b = nullptr;  // [2] packed pairs
  float* mma_accumulator = nullptr;      // [4], read as C and written as D
};

class BlockRunner;
inline thread_local BlockRunner* current_runner = nullptr;
inline thread_local Fiber* current_fiber = nullptr;
inline thread_local std::byte* current_dynamic_shared = nullptr;

inline std::string format_thread(const uint3& t) {
  std::ostringstream out;
  out << "threadIdx (" << t.x << "," << t.y << "," << t.z << ")";
  return out.str();
}

/// Runs the blocks given to it, one at a time, each as a set of interleaving fibers.
class BlockRunner {
 public:
  BlockRunner(dim3 block, dim3 grid, std::size_t shared_bytes, const Options& options)
      : block_(block), grid_(grid), options_(options), rng_(options.seed) {
    const unsigned count = block.x * block.y * block.z;
    fibers_.resize(count);
    for (unsigned i = 0; i < count; ++i) {
      Fiber& f = fibers_[i];
      f.stack.reset(new char[options.stack_bytes]);
      f.linear = i;
      f.thread_idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    }
    // 128-byte alignment, as the base of dynamic shared memory on a GPU is at least 16.
    shared_.reset(new std::byte[shared_bytes + 128]);
    shared_bytes_ = shared_bytes;
    const auto base = reinterpret_cast<std::uintptr_t>(shared_.get());
    shared_base_ = shared_.get() + ((128 - base % 128) % 128);
    order_.resize(count);
  }

  /// Runs block `block_idx`: every fiber calls `body()`. Throws LaunchError on a diagnosed fault.
  void run(uint3 block_idx, const std::function<void()>& body) {
    body_ = &body;
    blockIdx = block_idx;
    blockDim = block_;
    gridDim = grid_;
    std::memset(shared_base_, 0xFF, shared_bytes_);
    current_dynamic_shared = shared_base_;
    current_runner = this;
    live_ = static_cast<unsigned>(fibers_.size());
    at_barrier_ = 0;
    failure_.clear();
    for (Fiber& f : fibers_) {
      f.state = State::runnable;
      f.collective = Collective::none;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = options_.stack_bytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &BlockRunner::entry, 0);
    }
    while (live_ > 0) {
      for (unsigned i = 0; i < order_.size(); ++i) order_[i] = i;
      if (options_.schedule == Schedule::reversed) std::reverse(order_.begin(), order_.end());
      if (options_.schedule == Schedule::shuffled) std::shuffle(order_.begin(), order_.end(), rng_);
      bool progressed = false;
      for (unsigned i : order_) {
        Fiber& f = fibers_[i];
        if (f.state != State::runnable) continue;
        progressed = true;
        current_fiber = &f;
        threadIdx = f.thread_idx;
        swapcontext(&scheduler_, &f.context);
        current_fiber = nullptr;
        if (!failure_.empty()) break;
      }
      if (!failure_.empty()) throw LaunchError(cudaErrorLaunchFailure, block_text() + failure_);
      if (!progressed) throw LaunchError(cudaErrorLaunchFailure, block_text() + deadlock_report());
    }
    current_runner = nullptr;
  }

  // ---- called from fibers ----

  void syncthreads() {
    Fiber& self = *current_fiber;
    self.state = State::at_block_barrier;
    ++at_barrier_;
    if (at_barrier_ == live_) {
      release_block_barrier();
    } else {
      yield();
    }
  }

  /// Enters a warp collective; returns once every lane of `mask` has entered the same one.
  void collective(Collective kind, unsigned mask) {
    Fiber& self = *current_fiber;
    const unsigned lane = self.linear % 32;
    const unsigned warp_base = self.linear - lane;
    if ((mask >> lane & 1u) == 0) {
      fail(format_thread(self.thread_idx) + " calls " + collective_name(kind) + " with mask " +
           hex(mask) + ", which does not name its own lane " + std::to_string(lane));
    }
    self.collective = kind;
    self.mask = mask;
    self.state = State::in_warp_collective;
    bool complete = true;
    for (unsigned l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) == 0) continue;
      if (warp_base + l >= fibers_.size()) {
        fail(format_thread(self.thread_idx) + " calls " + collective_name(kind) + " with mask " +
             hex(mask) + ", which names lane " + std::to_string(l) +
             " of a warp that has no such thread (block of " + std::to_string(fibers_.size()) +
             " threads)");
      }
      const Fiber& other = fibers_[warp_base + l];
      if (other.state == State::exited) {
        fail(format_thread(self.thread_idx) + " calls " + collective_name(kind) + " with mask " +
             hex(mask) + ", which names lane " + std::to_string(l) + " (" +
             format_thread(other.thread_idx) + "), which has exited");
      }
      if (other.state != State::in_warp_collective) {
        complete = false;
        continue;
      }
      if (other.collective != kind || other.mask != mask) {
        fail("divergent warp collectives: " + format_thread(self.thread_idx) + " is in " +
             collective_name(kind) + " with mask " + hex(mask) + " while " +
             format_thread(other.thread_idx) + " is in " + collective_name(other.collective) +
             " with mask " + hex(other.mask));
      }
    }
    if (complete) {
      complete_collective(kind, mask, warp_base);
    } else {
      yield();
    }
  }

  void thread_exited() {
    Fiber& self = *current_fiber;
    self.state = State::exited;
    --live_;
    // A lane that leaves while others of its warp wait for it in a collective: they would hang
    // (or read garbage) on a GPU.
    const unsigned lane = self.linear % 32;
    const unsigned warp_base = self.linear - lane;
    for (unsigned l = 0; l < 32 && warp_base + l < fibers_.size(); ++l) {
      const Fiber& other = fibers_[warp_base + l];
      if (other.state == State::in_warp_collective && (other.mask >> lane & 1u)) {
        fail(format_thread(other.thread_idx) + " waits in " + collective_name(other.collective) +
             " with mask " + hex(other.mask) + ", which names lane " + std::to_string(lane) + " (" +
             format_thread(self.thread_idx) + "), which has exited");
      }
    }
    // Threads that have exited no longer take part in __syncthreads (as on sm_70 and newer).
    if (live_ > 0 && at_barrier_ == live_) release_block_barrier();
  }

  [[noreturn]] void fail(const std::string& message) {
    if (failure_.empty()) failure_ = message;
    Fiber& self = *current_fiber;
    swapcontext(&self.context, &scheduler_);
    std::abort();  // never resumed
  }

 private:
  static void entry() {
    BlockRunner& runner = *current_runner;
    (*runner.body_)();
    runner.thread_exited();
    // Returning switches to uc_link, the scheduler.
  }

  void yield() {
    Fiber& self = *current_fiber;
    swapcontext(&self.context, &scheduler_);
    // Resumed by the scheduler, which has set current_fiber and threadIdx back.
  }

  void release_block_barrier() {
    for (Fiber& f : fibers_) {
      if (f.state == State::at_block_barrier) f.state = State::runnable;
    }
    at_barrier_ = 0;
  }

  void complete_collective(Collective kind, unsigned mask, unsigned warp_base) {
    auto lane_fiber = [&](unsigned l) -> Fiber& { return fibers_[warp_base + l]; };
    switch (kind) {
      case Collective::syncwarp:
        break;
      case Collective::shfl_idx:
      case Collective::shfl_up:
      case Collective::shfl_down:
      case Collective::shfl_xor:
        for (unsigned l = 0; l < 32; ++l) {
          if ((mask >> l & 1u) == 0) continue;
          Fiber& f = lane_fiber(l);
          const int width = f.width;
          const int segment = static_cast<int>(l) / width * width;
          int source = static_cast<int>(l);
          switch (kind) {
            case Collective::shfl_idx:
              source = segment + (f.argument % width + width) % width;
              break;
            case Collective::shfl_up:
              if (static_cast<int>(l) - segment >= f.argument)
                source = static_cast<int>(l) - f.argument;
              break;
            case Collective::shfl_down:
              if (static_cast<int>(l) - segment + f.argument < width)
                source = static_cast<int>(l) + f.argument;
              break;
            default: {  // xor: a lane may read from an earlier segment, never a later one
              const int partner = static_cast<int>(l) ^ f.argument;
              if (partner / width <= static_cast<int>(l) / width && partner < 32) source = partner;
              break;
            }
          }
          if ((mask >> source & 1u) == 0) {
            fail(format_thread(f.thread_idx) + " reads lane " + std::to_string(source) + " in " +
                 collective_name(kind) + ", but mask " + hex(mask) + " does not name that lane");
          }
          f.result = lane_fiber(static_cast<unsigned>(source)).value;
        }
        break;
      case Collective::ballot:
      case Collective::any:
      case Collective::all: {
        std::uint32_t ballot = 0;
        for (unsigned l = 0; l < 32; ++l) {
          if ((mask >> l & 1u) && lane_fiber(l).value != 0) ballot |= 1u << l;
        }
        std::uint64_t result = ballot;
        if (kind == Collective::any) result = ballot != 0;
        if (kind == Collective::all) result = ballot == mask;
        for (unsigned l = 0; l < 32; ++l) {
          if (mask >> l & 1u) lane_fiber(l).result = result;
        }
        break;
      }
      case Collective::mma_bf16:
      case Collective::mma_f16:
        complete_mma(kind == Collective::mma_bf16, warp_base);
        break;
      case Collective::none:
        break;
    }
    for (unsigned l = 0; l < 32; ++l) {
      if (mask >> l & 1u) {
        Fiber& f = lane_fiber(l);
        f.state = State::runnable;
        f.collective = Collective::none;
      }
    }
  }

  /// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A·B + C over the warp's fragments,
  /// laid out as the PTX ISA documents ("Matrix Fragments for mma.m16n8k16 with floating point
  /// type"): with g = laneid >> 2 and t = laneid % 4,
  ///   A (16×16), a0..a7 in four 32-bit registers, low half first:
  ///     row = g for a0,a1,a4,a5 and g + 8 for a2,a3,a6,a7;
  ///     col = 2t + (i & 1) for i < 4 and 2t + (i & 1) + 8 for i >= 4;
  ///   B (16×8), b0..b3 in two registers: row = 2t + (i & 1) (+ 8 for i >= 2), col = g;
  ///   C, D (16×8 fp32), c0..c3: row = g (+ 8 for i >= 2), col = 2t + (i & 1).
  /// Products of 16-bit inputs are exact in fp32; they are accumulated in fp32, in k order.
  void complete_mma(bool bf16, unsigned warp_base) {
    auto widen = [bf16](std::uint32_t bits) -> float {
      const auto raw = static_cast<std::uint16_t>(bits);
      if (bf16) return std::bit_cast<float>(static_cast<std::uint32_t>(raw) << 16);
      __half h;
      std::memcpy(static_cast<void*>(&h), &raw, sizeof(raw));
      return static_cast<float>(h);
    };
    float a[16][16], b[16][8], c[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
      const Fiber& f = fibers_[warp_base + lane];
      const unsigned g = lane >> 2, t = lane % 4;
      for (unsigned i = 0; i < 8; ++i) {
        const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        const unsigned col = t * 2 + (i & 1u) + (i >= 4 ? 8 : 0);
        a[row][col] = widen(f.mma_a[i / 2] >> (16 * (i & 1u)));
      }
      for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = t * 2 + (i & 1u) + (i >= 2 ? 8 : 0);
        b[row][g] = widen(f.mma_b[i / 2] >> (16 * (i & 1u)));
      }
      for (unsigned i = 0; i < 4; ++i) {
        c[g + (i >= 2 ? 8 : 0)][t * 2 + (i & 1u)] = f.mma_accumulator[i];
      }
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
      Fiber& f = fibers_[warp_base + lane];
      const unsigned g = lane >> 2, t = lane % 4;
      for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + (i >= 2 ? 8 : 0), col = t * 2 + (i & 1u);
        float sum = c[row][col];
        for (unsigned k = 0; k < 16; ++k) sum = std::fma(a[row][k], b[k][col], sum);
        f.mma_accumulator[i] = sum;
      }
    }
  }

  std::string deadlock_report() const {
    std::ostringstream out;
    out << "deadlock: no thread can proceed";
    if (at_barrier_ > 0) {
      out << "; " << at_barrier_ << " of " << live_ << " live threads wait at __syncthreads (e.g. "
          << format_thread(first_in(State::at_block_barrier)) << ")";
    }
    int listed = 0;
    for (const Fiber& f : fibers_) {
      if (f.state != State::in_warp_collective) continue;
      if (listed++ == 4) {
        out << "; ...";
        break;
      }
      out << "; " << format_thread(f.thread_idx) << " waits in " << collective_name(f.collective)
          << " with mask " << hex(f.mask);
    }
    return out.str();
  }

  uint3 first_in(State state) const {
    for (const Fiber& f : fibers_) {
      if (f.state == state) return f.thread_idx;
    }
    return uint3{0, 0, 0};
  }

  std::string block_text() const {
    std::ostringstream out;
    out << "emulated kernel, blockIdx (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z
        << "): ";
    return out.str();
  }

  static std::string hex(unsigned v) {
    std::ostringstream out;
    out << "0x" << std::hex << v;
    return out.str();
  }

  dim3 block_, grid_;
  Options options_;
  std::mt19937_64 rng_;
  std::vector<Fiber> fibers_;
  std::vector<unsigned> order_;
  std::unique_ptr<std::byte[]> shared_;
  std::byte* shared_base_ = nullptr;
  std::size_t shared_bytes_ = 0;
  ucontext_t scheduler_{};
  const std::function<void()>* body_ = nullptr;
  unsigned live_ = 0;
  unsigned at_barrier_ = 0;
  std::string failure_;
};

inline BlockRunner& runner_or_die(const char* what) {
  if (current_runner == nullptr || current_fiber == nullptr) {
    std::fprintf(stderr, "cuda_emulation: %s called outside an emulated kernel\n", what);
    std::abort();
  }
  return *current_runner;
}

template <class T>
std::uint64_t to_bits(const T& value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "cuda_emulation: warp shuffles move trivially copyable values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <class T>
T from_bits(std::uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <class T>
T shuffle(Collective kind, unsigned mask, T var, int argument, int width) {
  BlockRunner& runner = runner_or_die(collective_name(kind));
  Fiber& self = *current_fiber;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    runner.fail(format_thread(self.thread_idx) + " calls " + collective_name(kind) +
                " with width " + std::to_string(width) + "; expected a power of two in [1, 32]");
  }
  self.value = to_bits(var);
  self.argument = argument;
  self.width = width;
  runner.collective(kind, mask);
  return from_bits<T>(self.result);
}

inline std::uint64_t vote(Collective kind, unsigned mask, int predicate) {
  BlockRunner& runner = runner_or_die(collective_name(kind));
  Fiber& self = *current_fiber;
  self.value = predicate != 0;
  runner.collective(kind, mask);
  return self.result;
}

}  // namespace detail

/// The base of the running block's dynamic shared memory (the launch's `shared_bytes`).
inline void* dynamic_shared_memory() { return detail::current_dynamic_shared; }

/// The warp-wide m16n8k16 product behind daedalus::cuda::mma_m16n8k16: `accumulator` (this
/// lane's c0..c3) becomes D = A·B + C once all 32 lanes of the warp have called it.
inline void warp_mma_m16n8k16(bool bf16, const std::uint32_t (&a)[4], const std::uint32_t (&b)[2],
                              float (&accumulator)[4]) {
  detail::BlockRunner& runner = detail::runner_or_die("mma_m16n8k16");
  detail::Fiber& self = *detail::current_fiber;
  self.mma_a = a;
  self.mma_b = b;
  self.mma_accumulator = accumulator;
  runner.collective(bf16 ? detail::Collective::mma_bf16 : detail::Collective::mma_f16, 0xffffffffu);
}

/// Runs `kernel(args...)` over `grid` × `block` emulated threads with `shared_bytes` of dynamic
/// shared memory. Throws LaunchError for a launch CUDA would reject or a diagnosed fault.
template <class... Params, class... Args>
void launch(const Options& options, void (*kernel)(Params...), dim3 grid, dim3 block,
            std::size_t shared_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "cuda_emulation::launch: the kernel takes a different number of arguments");
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    std::ostringstream out;
    out << "invalid launch configuration: grid (" << grid.x << "," << grid.y << "," << grid.z
        << "), block (" << block.x << "," << block.y << "," << block.z
        << "); CUDA allows 1 to 1024 threads per block (z at most 64) and a non-empty grid";
    throw LaunchError(cudaErrorInvalidConfiguration, out.str());
  }
  // Above 48 KiB a kernel must opt in (cudaFuncSetAttribute), up to 227 KiB on sm_90.
  std::size_t allowed = detail::default_dynamic_shared_bytes;
  {
    detail::SharedMemoryOptIns& opt_ins = detail::shared_memory_opt_ins();
    std::lock_guard lock(opt_ins.mutex);
    const auto it = opt_ins.bytes.find(reinterpret_cast<const void*>(kernel));
    if (it != opt_ins.bytes.end()) allowed = std::max(allowed, it->second);
  }
  if (shared_bytes > allowed) {
    throw LaunchError(cudaErrorInvalidValue,
                      "invalid launch configuration: " + std::to_string(shared_bytes) +
                          " bytes of dynamic shared memory; the kernel may use " +
                          std::to_string(allowed) +
                          " (more than 49152 needs cudaFuncSetAttribute("
                          "cudaFuncAttributeMaxDynamicSharedMemorySize))");
  }
  // Kernel parameters are copied once, as the driver copies them into constant memory.
  const std::tuple<std::decay_t<Params>...> parameters(static_cast<Params>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, parameters); };
  const int workers = static_cast<int>(std::clamp<unsigned long long>(
      static_cast<unsigned long long>(std::max(1, options.host_threads)), 1ull, blocks));
  std::atomic<unsigned long long> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto work = [&](int worker) {
    Options worker_options = options;
    worker_options.seed = options.seed + 0x9E3779B97F4A7C15ull * static_cast<unsigned>(worker);
    detail::BlockRunner runner(block, grid, shared_bytes, worker_options);
    for (;;) {
      const unsigned long long b = next.fetch_add(1);
      if (b >= blocks) return;
      {
        std::lock_guard lock(failure_mutex);
        if (failure) return;
      }
      const uint3 index{static_cast<unsigned>(b % grid.x),
                        static_cast<unsigned>(b / grid.x % grid.y),
                        static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
      try {
        runner.run(index, body);
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        return;
      }
    }
  };
  if (workers == 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (int w = 0; w < workers; ++w) pool.emplace_back(work, w);
    for (std::thread& t : pool) t.join();
  }
  if (failure) std::rethrow_exception(failure);
}

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
            Args&&... args) {
  launch(default_options(), kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
}

/// What daedalus::cuda::launch calls under emulation: runs the kernel now (streams are
/// synchronous here) and records a failure as the runtime's last error, as a failed launch
/// does on a GPU, so that the caller's DAEDALUS_CUDA_CHECK reports it.
template <class... Params, class... Args>
void launch_on_stream(cudaStream_t, void (*kernel)(Params...), dim3 grid, dim3 block,
                      std::size_t shared_bytes, Args&&... args) {
  try {
    launch(default_options(), kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
  } catch (const LaunchError& e) {
    detail::record(e.code(), e.what());
  }
}

}  // namespace daedalus::cuda_emulation

// ------------------------------------------------------------------------------------------------
// Device functions.
inline void __syncthreads() {
  daedalus::cuda_emulation::detail::runner_or_die("__syncthreads").syncthreads();
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace daedalus::cuda_emulation::detail;
  runner_or_die("__syncwarp").collective(Collective::syncwarp, mask);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace daedalus::cuda_emulation::detail;
  return shuffle(Collective::shfl_idx, mask, var, src_lane, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace daedalus::cuda_emulation::detail;
  return shuffle(Collective::shfl_up, mask, var, static_cast<int>(delta), width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace daedalus::cuda_emulation::detail;
  return shuffle(Collective::shfl_down, mask, var, static_cast<int>(delta), width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace daedalus::cuda_emulation::detail;
  return shuffle(Collective::shfl_xor, mask, var, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace daedalus::cuda_emulation::detail;
  return static_cast<unsigned>(vote(Collective::ballot, mask, predicate));
}
inline int __any_sync(unsigned mask, int predicate) {
  using namespace daedalus::cuda_emulation::detail;
  return static_cast<int>(vote(Collective::any, mask, predicate));
}
inline int __all_sync(unsigned mask, int predicate) {
  using namespace daedalus::cuda_emulation::detail;
  return static_cast<int>(vote(Collective::all, mask, predicate));
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// Atomics: real atomics (std::atomic_ref), since blocks may run on several OS threads.
template <class T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <class T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <class T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  static_assert(std::is_integral_v<T>, "atomicCAS: CUDA provides it for integer words only");
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value either way
}
template <class T>
T atomicMax(T* address, T value) {
  static_assert(std::is_integral_v<T>, "atomicMax: CUDA provides it for integers only");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <class T>
T atomicMin(T* address, T value) {
  static_assert(std::is_integral_v<T>, "atomicMin: CUDA provides it for integers only");
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old > value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

// ------------------------------------------------------------------------------------------------
// Runtime API.
inline const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer:
      return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection:
      return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

/// CUDA's text for the code, followed for a failed emulated launch by what the emulation found
/// (the last such detail on this thread).
inline const char* cudaGetErrorString(cudaError_t error) {
  static thread_local std::string text;
  switch (error) {
    case cudaSuccess:
      text = "no error";
      break;
    case cudaErrorInvalidValue:
      text = "invalid argument";
      break;
    case cudaErrorMemoryAllocation:
      text = "out of memory";
      break;
    case cudaErrorInvalidConfiguration:
      text = "invalid configuration argument";
      break;
    case cudaErrorInvalidDevicePointer:
      text = "invalid device pointer";
      break;
    case cudaErrorInvalidMemcpyDirection:
      text = "invalid copy direction for memcpy";
      break;
    case cudaErrorInvalidResourceHandle:
      text = "invalid resource handle";
      break;
    case cudaErrorLaunchFailure:
      text = "unspecified launch failure";
      break;
    default:
      text = "unknown error";
      break;
  }
  using daedalus::cuda_emulation::detail::last_error_detail;
  if (error != cudaSuccess && !last_error_detail.empty()) text += " (" + last_error_detail + ")";
  return text.c_str();
}

inline cudaError_t cudaGetLastError() {
  using namespace daedalus::cuda_emulation::detail;
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}
inline cudaError_t cudaPeekAtLastError() { return daedalus::cuda_emulation::detail::last_error; }

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  using namespace daedalus::cuda_emulation::detail;
  return device == 0 ? cudaSuccess : record(cudaErrorInvalidValue, "one emulated device, 0");
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

/// Only cudaFuncAttributeMaxDynamicSharedMemorySize, up to sm_90's 227 KiB.
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  using namespace daedalus::cuda_emulation::detail;
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) {
    return record(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute or value not allowed");
  }
  SharedMemoryOptIns& opt_ins = shared_memory_opt_ins();
  std::lock_guard lock(opt_ins.mutex);
  opt_ins.bytes[reinterpret_cast<const void*>(kernel)] = static_cast<std::size_t>(value);
  return cudaSuccess;
}

/// Allocates 256-byte aligned memory filled with 0xFF bytes (NaN for floating-point types), so a
/// read of an element nobody wrote shows up. More than 1 TiB fails as the device would.
inline cudaError_t cudaMalloc(void** pointer, std::size_t bytes) {
  using namespace daedalus::cuda_emulation::detail;
  *pointer = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (bytes > (std::size_t{1} << 40)) return record(cudaErrorMemoryAllocation);
  const std::size_t rounded = (bytes + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, rounded);
  if (p == nullptr) return record(cudaErrorMemoryAllocation);
  std::memset(p, 0xFF, rounded);
  Allocations& a = allocations();
  std::lock_guard lock(a.mutex);
  a.ranges[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  *pointer = p;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** pointer, std::size_t bytes) {
  void* p = nullptr;
  const cudaError_t status = cudaMalloc(&p, bytes);
  *pointer = static_cast<T*>(p);
  return status;
}

inline cudaError_t cudaFree(void* pointer) {
  using namespace daedalus::cuda_emulation::detail;
  if (pointer == nullptr) return cudaSuccess;
  Allocations& a = allocations();
  {
    std::lock_guard lock(a.mutex);
    const auto it = a.ranges.find(reinterpret_cast<std::uintptr_t>(pointer));
    if (it == a.ranges.end()) {
      return record(cudaErrorInvalidValue, "cudaFree of a pointer cudaMalloc did not return");
    }
    a.ranges.erase(it);
  }
  std::free(pointer);
  return cudaSuccess;
}

namespace daedalus::cuda_emulation::detail {
/// Checks that the device side of a copy lies inside one allocation and the host side in none.
inline cudaError_t check_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  Allocations& a = allocations();
  const bool dst_device = a.contains(dst, bytes);
  const bool src_device = a.contains(src, bytes);
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToHost:
      ok = !dst_device && !src_device;
      break;
    case cudaMemcpyHostToDevice:
      ok = dst_device && !src_device;
      break;
    case cudaMemcpyDeviceToHost:
      ok = !dst_device && src_device;
      break;
    case cudaMemcpyDeviceToDevice:
      ok = dst_device && src_device;
      break;
    case cudaMemcpyDefault:
      ok = true;
      break;
    default:
      return record(cudaErrorInvalidMemcpyDirection);
  }
  if (!ok) {
    return record(cudaErrorInvalidValue,
                  "a copy of " + std::to_string(bytes) +
                      " bytes whose pointers do not match its direction or leave their allocation");
  }
  return cudaSuccess;
}
}  // namespace daedalus::cuda_emulation::detail

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  const cudaError_t status = daedalus::cuda_emulation::detail::check_copy(dst, src, bytes, kind);
  if (status == cudaSuccess) std::memmove(dst, src, bytes);
  return status;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* dst, int value, std::size_t bytes) {
  using namespace daedalus::cuda_emulation::detail;
  if (bytes == 0) return cudaSuccess;
  if (!allocations().contains(dst, bytes)) {
    return record(cudaErrorInvalidValue, "cudaMemset outside a device allocation");
  }
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes,
                                   cudaStream_t = nullptr) {
  return cudaMemset(dst, value, bytes);
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  *stream = new CUstream_st{flags};
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  using namespace daedalus::cuda_emulation::detail;
  if (stream == nullptr) return record(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ---- added for moe (vector types) ----
// CUDA's 16-byte vector type (vector_types.h): four floats, 16-byte aligned, so that one
// load or store moves a whole float4 (kernels use it only on 16-byte aligned addresses).
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
// ---- end of moe additions ----
// ---- added for the absorbed MLA decode ----
// Device attributes. The emulated device describes itself as a small sm_90-class part: 4
// multiprocessors (kernels that size their grids from the SM count stay cheap to emulate) with
// sm_90's 228 KiB of shared memory each. CUDA's enumerator values.
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  using namespace daedalus::cuda_emulation::detail;
  if (value == nullptr || device != 0) {
    return record(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null value or no such device");
  }
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = 4;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = 228 * 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
  }
  return record(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
}

namespace daedalus::cuda_emulation {

namespace detail {
/// The 16-byte asynchronous copies (cp.async) each emulated thread has issued and not yet waited
/// for, keyed by its fiber (the fibers of a block share one OS thread).
struct PendingCopy {
  void* shared_dst;
  const void* global_src;
};
inline thread_local std::map<const Fiber*, std::vector<PendingCopy>> pending_copies;
}  // namespace detail

/// cp.async.cg.shared.global of 16 bytes: CUDA guarantees the copy only once the issuing thread
/// has waited for it (cp.async.wait_group / wait_all), so the emulation performs it exactly then:
/// a kernel that reads the destination before waiting (or, from another thread, before the
/// barrier that follows the wait) reads the old contents.
inline void copy_async_16(void* shared_dst, const void* global_src) {
  detail::runner_or_die("cp.async");
  detail::pending_copies[detail::current_fiber].push_back({shared_dst, global_src});
}

/// cp.async.commit_group + cp.async.wait_group 0: every copy this thread issued completes.
inline void wait_async_copies() {
  detail::runner_or_die("cp.async.wait_group");
  const auto it = detail::pending_copies.find(detail::current_fiber);
  if (it == detail::pending_copies.end()) return;
  for (const detail::PendingCopy& copy : it->second)
    std::memcpy(copy.shared_dst, copy.global_src, 16);
  detail::pending_copies.erase(it);
}

}  // namespace daedalus::cuda_emulation
// ---- end of the block added for the absorbed MLA decode ----
// ---- added for MLA on the GPU ----
// The cuBLAS subset (GEMMs with fp32 accumulation) that daedalus/cuda/blas.cuh calls.
#include "cublas.hpp"
// ---- end of MLA on the GPU ----
