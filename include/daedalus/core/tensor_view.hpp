// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>

#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/macros.hpp"

namespace daedalus {

/// Signed index type of every extent and stride (as Eigen's Index).
using index_t = std::int64_t;

/// A non-owning view of a row-major `Rank`-dimensional array of `T` living in memory space
/// `Space`. Strides are in elements and default to the packed row-major ones; a view never
/// allocates. `TensorView<const float, 2>` is the read-only form.
template <class T, int Rank, class Space = HostMemory>
class TensorView {
  static_assert(Rank >= 1, "daedalus::TensorView: Rank must be at least 1");
  static_assert(MemorySpace<Space>,
                "daedalus::TensorView: Space must be HostMemory or DeviceMemory");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using memory_space = Space;
  static constexpr int rank = Rank;

  DAEDALUS_HOST_DEVICE TensorView() : data_(nullptr), extents_{}, strides_{} {}

  /// A packed row-major view of `data` with the given extents.
  DAEDALUS_HOST_DEVICE TensorView(T* data, const std::array<index_t, Rank>& extents)
      : data_(data), extents_(extents) {
    index_t stride = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      strides_[d] = stride;
      stride *= extents_[d];
    }
  }

  /// A strided view: element (i0, i1, ...) lives at data[i0 * strides[0] + i1 * strides[1] ...].
  DAEDALUS_HOST_DEVICE TensorView(T* data, const std::array<index_t, Rank>& extents,
                                  const std::array<index_t, Rank>& strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A view of `const T` from a view of `T`.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) DAEDALUS_HOST_DEVICE
      TensorView(const TensorView<U, Rank, Space>& other)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  /// Never usable: a view of one memory space passed where a view of another is expected (a
  /// device view given to CpuBackend). Declared, rather than left out, so that such a call
  /// resolves to this constructor and fails with a sentence instead of "no matching function".
  /// std::is_convertible therefore reports true across spaces; any use is ill-formed.
  template <class U, class OtherSpace>
  requires(std::is_same_v<std::remove_const_t<U>, std::remove_const_t<T>> &&
           !std::is_same_v<OtherSpace, Space>) DAEDALUS_HOST_DEVICE
      TensorView(const TensorView<U, Rank, OtherSpace>&)
      : data_(nullptr), extents_{}, strides_{} {
    static_assert(!(std::is_same_v<OtherSpace, DeviceMemory> && std::is_same_v<Space, HostMemory>),
                  "daedalus::TensorView: a DeviceMemory view cannot become a HostMemory view: a "
                  "device view was passed where host memory is read (e.g. to CpuBackend); copy "
                  "it to the host first");
    static_assert(!(std::is_same_v<OtherSpace, HostMemory> && std::is_same_v<Space, DeviceMemory>),
                  "daedalus::TensorView: a HostMemory view cannot become a DeviceMemory view: a "
                  "host view was passed where device memory is read (e.g. to CudaBackend); copy "
                  "it to the device first");
  }

  [[nodiscard]] DAEDALUS_HOST_DEVICE T* data() const { return data_; }
  [[nodiscard]] DAEDALUS_HOST_DEVICE const std::array<index_t, Rank>& extents() const {
    return extents_;
  }
  [[nodiscard]] DAEDALUS_HOST_DEVICE const std::array<index_t, Rank>& strides() const {
    return strides_;
  }
  [[nodiscard]] DAEDALUS_HOST_DEVICE index_t extent(int d) const { return extents_[d]; }
  [[nodiscard]] DAEDALUS_HOST_DEVICE index_t stride(int d) const { return strides_[d]; }

  /// Number of elements the view spans.
  [[nodiscard]] DAEDALUS_HOST_DEVICE index_t size() const {
    index_t n = 1;
    for (int d = 0; d < Rank; ++d) n *= extents_[d];
    return n;
  }

  /// True when the strides are the packed row-major ones (rows can be read as one span).
  [[nodiscard]] DAEDALUS_HOST_DEVICE bool is_contiguous() const {
    index_t stride = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      if (extents_[d] != 1 && strides_[d] != stride) return false;
      stride *= extents_[d];
    }
    return true;
  }

  template <class... Indices>
  requires(sizeof...(Indices) == Rank && (std::integral<Indices> && ...)) DAEDALUS_HOST_DEVICE T&
  operator()(Indices... indices) const {
    const index_t idx[] = {static_cast<index_t>(indices)...};
    index_t offset = 0;
    for (int d = 0; d < Rank; ++d) offset += idx[d] * strides_[d];
    return data_[offset];
  }

  /// The sub-view at index `i` of the first dimension (rank drops by one).
  DAEDALUS_HOST_DEVICE auto operator[](index_t i) const requires(Rank > 1) {
    std::array<index_t, Rank - 1> extents{};
    std::array<index_t, Rank - 1> strides{};
    for (int d = 1; d < Rank; ++d) {
      extents[d - 1] = extents_[d];
      strides[d - 1] = strides_[d];
    }
    return TensorView<T, Rank - 1, Space>(data_ + i * strides_[0], extents, strides);
  }

 private:
  T* data_;
  std::array<index_t, Rank> extents_;
  std::array<index_t, Rank> strides_;
};

/// Convenience aliases for host views.
template <class T, int Rank>
using HostView = TensorView<T, Rank, HostMemory>;

namespace detail {

/// Checks that `view` has exactly `expected` extents and is packed row-major; the message names
/// the function, the argument and both shapes, e.g.
/// `daedalus::mla::decode: 'x' has extents [4,1,96]; expected [4,1,2048]`.
template <class T, int Rank, class Space>
void check_extents(std::string_view function, std::string_view argument,
                   const TensorView<T, Rank, Space>& view,
                   const std::array<index_t, Rank>& expected) {
  if (view.extents() != expected) {
    throw InvalidArgument(message(function, ": '", argument, "' has extents ",
                                  format_extents<index_t>(view.extents()), "; expected ",
                                  format_extents<index_t>(expected)));
  }
  if (view.size() > 0 && view.data() == nullptr) {
    throw InvalidArgument(message(function, ": '", argument, "' has a null data pointer"));
  }
  if (!view.is_contiguous()) {
    throw InvalidArgument(message(function, ": '", argument,
                                  "' must be packed row-major; its strides are ",
                                  format_extents<index_t>(view.strides())));
  }
}

}  // namespace detail
}  // namespace daedalus
