// SPDX-License-Identifier: Apache-2.0
// TensorView: extents, packed and explicit strides, indexing, sub-views, const conversion, and
// the extents check every entry point uses (its message names function, argument, got, expected).
#include <doctest/doctest.h>

#include <array>
#include <daedalus/core/tensor_view.hpp>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "support/errors.hpp"

namespace {

using daedalus::HostView;
using daedalus::index_t;
using daedalus::TensorView;

/// The what() of the exception `call` throws, or "" when it throws nothing.
using daedalus::testing::message_of;

}  // namespace

TEST_CASE("TensorView: packed row-major extents, strides and size") {
  std::vector<float> data(2 * 3 * 5);
  const HostView<float, 3> v(data.data(), {2, 3, 5});
  CHECK(v.extents() == std::array<index_t, 3>{2, 3, 5});
  CHECK(v.strides() == std::array<index_t, 3>{15, 5, 1});
  CHECK(v.extent(1) == 3);
  CHECK(v.stride(0) == 15);
  CHECK(v.size() == 30);
  CHECK(v.is_contiguous());
  CHECK(v.data() == data.data());
  CHECK(decltype(v)::rank == 3);
  static_assert(std::is_same_v<decltype(v)::memory_space, daedalus::HostMemory>);
}

TEST_CASE("TensorView: operator() addresses row-major elements") {
  std::vector<int> data(4 * 6);
  std::iota(data.begin(), data.end(), 0);
  const HostView<int, 2> v(data.data(), {4, 6});
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < 6; ++j) CHECK(v(i, j) == i * 6 + j);
  v(2, 3) = -7;  // writes through
  CHECK(data[2 * 6 + 3] == -7);
}

TEST_CASE("TensorView: operator[] gives the sub-view of one leading index") {
  std::vector<int> data(2 * 3 * 4);
  std::iota(data.begin(), data.end(), 0);
  const HostView<int, 3> v(data.data(), {2, 3, 4});
  const auto sub = v[1];
  static_assert(decltype(sub)::rank == 2);
  CHECK(sub.extents() == std::array<index_t, 2>{3, 4});
  CHECK(sub.strides() == std::array<index_t, 2>{4, 1});
  CHECK(sub.data() == data.data() + 12);
  CHECK(sub(2, 1) == 12 + 2 * 4 + 1);
  const auto row = v[1][2];
  CHECK(row.extent(0) == 4);
  CHECK(row(3) == 12 + 8 + 3);
}

TEST_CASE(
    "TensorView: explicit strides (a transposed view) index correctly and are not contiguous") {
  std::vector<int> data(3 * 5);
  std::iota(data.begin(), data.end(), 0);
  // The transpose of a packed [3, 5] array: [5, 3] with strides {1, 5}.
  const HostView<int, 2> t(data.data(), {5, 3}, {1, 5});
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < 3; ++j) CHECK(t(i, j) == j * 5 + i);
  CHECK_FALSE(t.is_contiguous());
  CHECK(t.size() == 15);
  // A column of a packed array, taken through a strided view, then its sub-views.
  const HostView<int, 2> every_other_row(data.data(), {2, 5}, {10, 1});
  CHECK(every_other_row[1](4) == 14);
  CHECK_FALSE(every_other_row.is_contiguous());
}

TEST_CASE("TensorView: a view of T converts to a view of const T, not back") {
  std::vector<float> data(6, 1.5f);
  const HostView<float, 2> v(data.data(), {2, 3});
  const HostView<const float, 2> c = v;
  CHECK(c.data() == v.data());
  CHECK(c.extents() == v.extents());
  CHECK(c.strides() == v.strides());
  CHECK(c(1, 2) == 1.5f);
  static_assert(std::is_convertible_v<HostView<float, 2>, HostView<const float, 2>>);
  static_assert(!std::is_convertible_v<HostView<const float, 2>, HostView<float, 2>>);
  // A device view given where a host view is expected resolves to a constructor that fails with
  // a sentence; tests/compile_fail/device_view_to_cpu_backend.cpp checks that it does not compile.
}

TEST_CASE("TensorView: a default view is empty; extents of 1 do not break contiguity") {
  const HostView<float, 2> empty;
  CHECK(empty.data() == nullptr);
  std::vector<float> data(4);
  // [4, 1] with an arbitrary stride on the size-1 dimension is still packed.
  const HostView<float, 2> column(data.data(), {4, 1}, {1, 99});
  CHECK(column.is_contiguous());
}

TEST_CASE("check_extents: accepts a packed view of the expected extents") {
  std::vector<float> data(12);
  const HostView<const float, 2> v(data.data(), {3, 4});
  CHECK_NOTHROW(daedalus::detail::check_extents("daedalus::f", "x", v, {3, 4}));
}

TEST_CASE("check_extents: the message names function, argument, received and expected extents") {
  std::vector<float> data(4 * 1 * 96);
  const HostView<const float, 3> x(data.data(), {4, 1, 96});
  const std::string what = message_of<daedalus::InvalidArgument>([&] {
    daedalus::detail::check_extents("daedalus::mla::decode", "x", x, {4, 1, 2048});
  });
  CHECK(what == "daedalus::mla::decode: 'x' has extents [4,1,96]; expected [4,1,2048]");
}

TEST_CASE("check_extents: rejects a null pointer and non-packed strides, naming the argument") {
  const HostView<const float, 2> null_view(nullptr, {2, 2});
  std::string what = message_of<daedalus::InvalidArgument>([&] {
    daedalus::detail::check_extents("daedalus::f", "q", null_view, {2, 2});
  });
  CHECK(what.find("daedalus::f") != std::string::npos);
  CHECK(what.find("'q'") != std::string::npos);
  CHECK(what.find("null") != std::string::npos);

  std::vector<float> data(4);
  const HostView<const float, 2> transposed(data.data(), {2, 2}, {1, 2});
  what = message_of<daedalus::InvalidArgument>([&] {
    daedalus::detail::check_extents("daedalus::f", "out", transposed, {2, 2});
  });
  CHECK(what.find("'out'") != std::string::npos);
  CHECK(what.find("[1,2]") != std::string::npos);  // the strides it got
}

TEST_CASE(
    "InvalidArgument and the other errors derive from daedalus::Error and std::runtime_error") {
  static_assert(std::is_base_of_v<std::runtime_error, daedalus::Error>);
  static_assert(std::is_base_of_v<daedalus::Error, daedalus::InvalidArgument>);
  static_assert(std::is_base_of_v<daedalus::Error, daedalus::OutOfRange>);
  static_assert(std::is_base_of_v<daedalus::Error, daedalus::CapacityError>);
  static_assert(std::is_base_of_v<daedalus::Error, daedalus::NumericError>);
  static_assert(std::is_base_of_v<daedalus::Error, daedalus::CudaError>);
  CHECK(std::string(daedalus::OutOfRange("daedalus::f: 'seq' is 3; expected [0, 2)").what()) ==
        "daedalus::f: 'seq' is 3; expected [0, 2)");
}
