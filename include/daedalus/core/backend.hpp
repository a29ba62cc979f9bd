// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "daedalus/core/error.hpp"

namespace daedalus {

/// Memory that host code may dereference (pageable or pinned system memory).
struct HostMemory {
  static constexpr const char* name = "host";
};

/// Memory that only device code may dereference (a CUDA allocation).
struct DeviceMemory {
  static constexpr const char* name = "device";
};

/// True for the memory-space tags the library knows.
template <class Space>
concept MemorySpace = std::same_as<Space, HostMemory> || std::same_as<Space, DeviceMemory>;

/// What a backend policy type must provide: a memory space its kernels read and a name for
/// messages. Backends are chosen at compile time by passing such an object first to every
/// free function (`mla::decode(cpu, ...)`), or naming its type in an owning container.
template <class B>
concept Backend = requires(const B& backend) {
  typename B::memory_space;
  requires MemorySpace<typename B::memory_space>;
  { B::name } -> std::convertible_to<const char*>;
};

/// The Eigen/OpenMP backend: kernels run on the calling host thread plus a team of
/// `num_threads()` OpenMP threads. Cheap to copy; holds no resources.
class CpuBackend {
 public:
  using memory_space = HostMemory;
  static constexpr const char* name = "cpu";

  /// Uses every hardware thread the OpenMP runtime reports (or std::thread's count).
  CpuBackend() : num_threads_(default_threads()) {}

  /// @param num_threads threads to spread work over; must be at least 1.
  /// @throws InvalidArgument when `num_threads` < 1.
  explicit CpuBackend(int num_threads) : num_threads_(num_threads) {
    detail::require<InvalidArgument>(num_threads >= 1, "daedalus::CpuBackend: 'num_threads' is ",
                                     num_threads, "; expected at least 1");
  }

  [[nodiscard]] int num_threads() const noexcept { return num_threads_; }

  /// Runs `body(begin, end, thread)` over a static partition of [0, count) into at most
  /// `num_threads()` contiguous ranges. The partition depends only on `count` and the thread
  /// count, so results that are reduced per range in order are reproducible run to run.
  template <class Body>
  void parallel_ranges(std::int64_t count, Body&& body) const {
    if (count <= 0) return;
    const int teams = static_cast<int>(std::min<std::int64_t>(num_threads_, count));
    if (teams == 1) {
      body(std::int64_t{0}, count, 0);
      return;
    }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(teams) schedule(static, 1)
    for (int team = 0; team < teams; ++team) {
      body(count * team / teams, count * (team + 1) / teams, team);
    }
#else
    for (int team = 0; team < teams; ++team)
      body(count * team / teams, count * (team + 1) / teams, team);
#endif
  }

  /// Runs `body(i, thread)` for every i in [0, count), `count` items dynamically shared by the
  /// threads: for work items of uneven cost (sequences of different lengths).
  template <class Body>
  void parallel_for(std::int64_t count, Body&& body) const {
    if (count <= 0) return;
    const int teams = static_cast<int>(std::min<std::int64_t>(num_threads_, count));
    if (teams == 1) {
      for (std::int64_t i = 0; i < count; ++i) body(i, 0);
      return;
    }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(teams) schedule(dynamic, 1)
    for (std::int64_t i = 0; i < count; ++i) body(i, omp_get_thread_num());
#else
    for (std::int64_t i = 0; i < count; ++i) body(i, 0);
#endif
  }

 private:
  static int default_threads() {
#if defined(_OPENMP)
    return std::max(1, omp_get_max_threads());
#else
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
  }

  int num_threads_;
};

static_assert(Backend<CpuBackend>);

}  // namespace daedalus
