// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"

namespace daedalus::cuda {

/// The device type that stores a host storage type bit for bit: bfloat16 -> __nv_bfloat16,
/// half -> __half, anything else itself. (Under the emulation layer the two are the same type.)
template <class T>
struct DeviceStorage {
  using type = T;
};
/// The host type for a device storage type (the inverse of DeviceStorage).
template <class T>
struct HostStorage {
  using type = T;
};
#if !defined(DAEDALUS_CUDA_EMULATION)
template <>
struct DeviceStorage<bfloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceStorage<half> {
  using type = __half;
};
template <>
struct HostStorage<__nv_bfloat16> {
  using type = bfloat16;
};
template <>
struct HostStorage<__half> {
  using type = half;
};
#endif
template <class T>
using device_storage_t = typename DeviceStorage<std::remove_cv_t<T>>::type;
template <class T>
using host_storage_t = typename HostStorage<std::remove_cv_t<T>>::type;

/// True when a T may be copied byte for byte into a U: the same type, or a host storage type
/// and its device counterpart (Eigen's bfloat16/half and CUDA's are bit-identical).
template <class T, class U>
concept BitCompatible = std::is_trivially_copyable_v<std::remove_cv_t<T>> &&
                            sizeof(T) == sizeof(U) &&
                        (std::same_as<std::remove_cv_t<T>, std::remove_cv_t<U>> ||
                         std::same_as<device_storage_t<T>, std::remove_cv_t<U>> ||
                         std::same_as<device_storage_t<U>, std::remove_cv_t<T>>);

/// An owning, move-only array of `T` in device memory (RAII: cudaMalloc in the constructor,
/// cudaFree in the destructor). Its contents start uninitialised.
template <class T>
class DeviceBuffer {
  static_assert(
      std::is_trivially_copyable_v<T>,
      "daedalus::cuda::DeviceBuffer: T must be trivially copyable (it is copied by bytes)");

 public:
  using value_type = T;

  DeviceBuffer() = default;

  /// Allocates `size` elements (none for 0).
  /// @throws CudaError when the allocation fails.
  explicit DeviceBuffer(std::size_t size) : size_(size) {
    if (size_ > 0) DAEDALUS_CUDA_CHECK(cudaMalloc(&data_, size_ * sizeof(T)));
  }

  ~DeviceBuffer() { release(); }

  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] const T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return size_ * sizeof(T); }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }

  /// A device view of the buffer with the given extents, whose product must equal size().
  /// @throws InvalidArgument otherwise.
  template <std::size_t Rank>
  [[nodiscard]] TensorView<T, int(Rank), DeviceMemory> view(
      const std::array<index_t, Rank>& extents) {
    check_extents(extents);
    return TensorView<T, int(Rank), DeviceMemory>(data_, extents);
  }
  template <std::size_t Rank>
  [[nodiscard]] TensorView<const T, int(Rank), DeviceMemory> view(
      const std::array<index_t, Rank>& extents) const {
    check_extents(extents);
    return TensorView<const T, int(Rank), DeviceMemory>(data_, extents);
  }

 private:
  template <std::size_t Rank>
  void check_extents(const std::array<index_t, Rank>& extents) const {
    index_t count = 1;
    for (index_t e : extents) count *= e;
    ::daedalus::detail::require<InvalidArgument>(
        count == index_t(size_), "daedalus::cuda::DeviceBuffer::view: 'extents' ",
        ::daedalus::detail::format_extents(std::span<const index_t>(extents)), " hold ", count,
        " elements; expected ", size_, " (the buffer's size)");
  }

  void release() noexcept {
    // A destructor cannot throw. cudaFree fails only for a pointer it did not allocate or after
    // an earlier kernel fault, which the next checked call on the stream reports.
    if (data_ != nullptr) static_cast<void>(cudaFree(data_));
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

namespace detail {

template <class Space>
constexpr bool is_device = std::same_as<Space, DeviceMemory>;

template <class DstSpace, class SrcSpace>
constexpr cudaMemcpyKind copy_kind() {
  if constexpr (is_device<DstSpace> && is_device<SrcSpace>)
    return cudaMemcpyDeviceToDevice;
  else if constexpr (is_device<DstSpace>)
    return cudaMemcpyHostToDevice;
  else if constexpr (is_device<SrcSpace>)
    return cudaMemcpyDeviceToHost;
  else
    return cudaMemcpyHostToHost;
}

inline void require_same_size(const char* function, std::size_t dst, std::size_t src) {
  ::daedalus::detail::require<InvalidArgument>(dst == src, function, ": 'src' has ", src,
                                               " elements; expected ", dst, " (the size of 'dst')");
}

}  // namespace detail

/// Copies host memory into a device buffer on the backend's stream. Pageable host memory is
/// staged by CUDA before the call returns; pinned memory must stay untouched until the stream is
/// synchronised.
/// @throws InvalidArgument when the sizes differ (nothing is copied); CudaError on a CUDA error.
template <class T, class U>
requires BitCompatible<U, T>
void copy(const CudaBackend& backend, DeviceBuffer<T>& dst, std::span<const U> src) {
  detail::require_same_size("daedalus::cuda::copy", dst.size(), src.size());
  if (src.empty()) return;
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.size_bytes(),
                                      cudaMemcpyHostToDevice, backend.stream()));
}

/// Copies a device buffer into host memory on the backend's stream; the host data is complete
/// once the stream is synchronised (backend.synchronize()).
/// @throws InvalidArgument when the sizes differ (nothing is copied); CudaError on a CUDA error.
template <class T, class U>
requires BitCompatible<U, T>
void copy(const CudaBackend& backend, std::span<T> dst, const DeviceBuffer<U>& src) {
  detail::require_same_size("daedalus::cuda::copy", dst.size(), src.size());
  if (src.empty()) return;
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), dst.size_bytes(),
                                      cudaMemcpyDeviceToHost, backend.stream()));
}

/// Copies between two packed views with equal extents, in any memory spaces, on the backend's
/// stream.
/// @throws InvalidArgument when the extents differ or a view is not packed (nothing is copied);
///         CudaError on a CUDA error.
template <class T, class U, int Rank, class DstSpace, class SrcSpace>
requires BitCompatible<U, T> &&
    (!std::is_const_v<T>)void copy(const CudaBackend& backend, TensorView<T, Rank, DstSpace> dst,
                                   TensorView<U, Rank, SrcSpace> src) {
  using ::daedalus::detail::format_extents;
  using ::daedalus::detail::require;
  require<InvalidArgument>(
      dst.extents() == src.extents(), "daedalus::cuda::copy: 'src' has extents ",
      format_extents(std::span<const index_t>(src.extents())), "; expected ",
      format_extents(std::span<const index_t>(dst.extents())), " (the extents of 'dst')");
  require<InvalidArgument>(dst.is_contiguous(), "daedalus::cuda::copy: 'dst' is strided; expected ",
                           "a packed row-major view");
  require<InvalidArgument>(src.is_contiguous(), "daedalus::cuda::copy: 'src' is strided; expected ",
                           "a packed row-major view");
  if (src.size() == 0) return;
  DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), std::size_t(src.size()) * sizeof(U),
                                      (detail::copy_kind<DstSpace, SrcSpace>()), backend.stream()));
}

/// A new device buffer holding `src` (as its device storage type), copied on the backend's stream.
template <class T>
[[nodiscard]] DeviceBuffer<device_storage_t<T>> to_device(const CudaBackend& backend,
                                                          std::span<const T> src) {
  DeviceBuffer<device_storage_t<T>> dst(src.size());
  copy(backend, dst, src);
  return dst;
}
template <class T>
[[nodiscard]] DeviceBuffer<device_storage_t<T>> to_device(const CudaBackend& backend,
                                                          const std::vector<T>& src) {
  return to_device(backend, std::span<const T>(src));
}

/// The contents of a device buffer as a host vector (of its host storage type). Synchronises the
/// backend's stream, so the vector is complete on return.
template <class T>
[[nodiscard]] std::vector<host_storage_t<T>> to_host(const CudaBackend& backend,
                                                     const DeviceBuffer<T>& src) {
  std::vector<host_storage_t<T>> dst(src.size());
  copy(backend, std::span<host_storage_t<T>>(dst), src);
  backend.synchronize();
  return dst;
}

/// How cuda::grow sizes the buffer it must replace.
enum class Growth {
  /// The count asked for: buffers sized by a model's widths and a batch's tokens (activations,
  /// routing plans), which a steady loop asks for at one size and where a doubled allocation
  /// would be large.
  exact,
  /// max(count, 2 · size()): small index arrays that a serving loop may grow an entry at a time
  /// (a batch's sequences, a cache's destination rows), so that n calls reallocate O(log n)
  /// times.
  doubling,
};

/// Makes `buffer` hold at least max(count, 1) elements and returns buffer.data(). A buffer that
/// holds enough is left as it is (it never shrinks); otherwise it is replaced by a new
/// allocation, sized by `growth`, and its contents are lost, not copied. Never empty afterwards,
/// so its data() is a valid pointer to hand a kernel even for an empty batch. The one grow-only
/// rule of the library's device workspaces: a steady loop allocates nothing after its first
/// call, and growth, which costs a cudaMalloc and a cudaFree that waits for the device, is rare.
/// @throws CudaError when the allocation fails (`buffer` is then unchanged).
template <class T>
T* grow(DeviceBuffer<T>& buffer, std::size_t count, Growth growth = Growth::exact) {
  count = std::max<std::size_t>(count, 1);
  if (buffer.size() < count) {
    buffer =
        DeviceBuffer<T>(growth == Growth::doubling ? std::max(count, 2 * buffer.size()) : count);
  }
  return buffer.data();
}

namespace detail {

/// A host array and a device copy of it that only grows (Growth::doubling), so that a decode loop
/// reuses one device allocation: the destination rows the device caches' encoders upload.
template <class T>
class StagedArray {
 public:
  /// Makes room for `n` elements on both sides. Done before a caller changes any state, so that
  /// what may fail (allocation) fails first.
  void reserve(std::size_t n) {
    host.reserve(n);
    grow(device_, n, Growth::doubling);
  }
  /// Copies `host` to the device on the backend's stream (pageable memory: CUDA stages it
  /// before the call returns, so `host` may change afterwards).
  const T* upload(const CudaBackend& backend) {
    reserve(host.size());
    if (!host.empty())
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(device_.data(), host.data(), host.size() * sizeof(T),
                                          cudaMemcpyHostToDevice, backend.stream()));
    return device_.data();
  }

  std::vector<T> host;

 private:
  DeviceBuffer<T> device_;
};

}  // namespace detail

/// `count` elements of device memory owned by the calling thread on its current device, kept for
/// the thread's life and grown on demand: the few words of error flags that a stateless entry
/// point (moe::route_logits) writes, copies back and waits for before it returns. A cudaMalloc and
/// a cudaFree per call would cost more than the check, and cudaFree waits for the whole device.
/// The memory may be reused by the thread's next call, so a caller must be done with it (its
/// stream synchronised) before it returns.
/// @throws CudaError when the device cannot be queried or the allocation fails.
template <class T>
[[nodiscard]] T* thread_scratch(std::size_t count) {
  int device = 0;
  DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
  thread_local std::vector<std::pair<int, DeviceBuffer<T>>> per_device;
  auto it = std::find_if(per_device.begin(), per_device.end(),
                         [&](const auto& entry) { return entry.first == device; });
  if (it == per_device.end()) {
    per_device.emplace_back(device, DeviceBuffer<T>());
    it = per_device.end() - 1;
  }
  return grow(it->second, count);
}

}  // namespace daedalus::cuda
