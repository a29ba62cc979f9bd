// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace daedalus {

/// Base of every exception the library throws. Messages name the function, the argument, what was
/// received and what was expected, e.g.
/// `daedalus::mla::decode: 'x' has extents [4,1,96]; expected [4,1,2048]`.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A shape, size or configuration argument does not match what the function expects.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// An index (sequence id, position, expert id) lies outside its valid range.
class OutOfRange : public Error {
 public:
  using Error::Error;
};

/// A container would grow past its capacity (sequence past capacity, pool exhausted).
class CapacityError : public Error {
 public:
  using Error::Error;
};

/// Input values are not finite (NaN or infinity) where finite values are required.
class NumericError : public Error {
 public:
  using Error::Error;
};

/// A CUDA runtime or library call failed.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {

/// Formats extents as `[a,b,c]`, the notation every shape message uses.
template <class Int>
std::string format_extents(std::span<const Int> extents) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < extents.size(); ++i) out << (i ? "," : "") << extents[i];
  out << ']';
  return out.str();
}

/// Builds a message from any streamable pieces.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws `E` with the concatenation of `parts` unless `condition` holds.
template <class E, class... Parts>
void require(bool condition, const Parts&... parts) {
  if (!condition) throw E(message(parts...));
}

}  // namespace detail
}  // namespace daedalus
