// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <Eigen/Core>
#include <concepts>
#include <cstddef>
#include <type_traits>

namespace daedalus {

/// The 16-bit storage types of the host backend. Eigen's types are bit-compatible with
/// `__nv_bfloat16` and `__half`, so a host buffer of either can be copied to a device as is.
using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

/// Properties of a storage type: its name in messages and reports, its size, and its unit
/// roundoff u (half the distance from 1 to the next representable number), which is what the
/// tests' tolerances are derived from: rounding a value x to the type changes it by at most u·|x|.
template <class T>
struct StorageTraits;

template <>
struct StorageTraits<float> {
  static constexpr const char* name = "fp32";
  static constexpr std::size_t bytes = 4;
  static constexpr double unit_roundoff = 0x1p-24;
};

template <>
struct StorageTraits<double> {
  static constexpr const char* name = "fp64";
  static constexpr std::size_t bytes = 8;
  static constexpr double unit_roundoff = 0x1p-53;
};

template <>
struct StorageTraits<bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr std::size_t bytes = 2;
  static constexpr double unit_roundoff = 0x1p-8;  // 8 significant bits
};

template <>
struct StorageTraits<half> {
  static constexpr const char* name = "fp16";
  static constexpr std::size_t bytes = 2;
  static constexpr double unit_roundoff = 0x1p-11;  // 11 significant bits
};

/// A type the caches and weights may store: one with StorageTraits.
template <class T>
concept StorageType = requires {
  { StorageTraits<T>::name } -> std::convertible_to<const char*>;
  { StorageTraits<T>::bytes } -> std::convertible_to<std::size_t>;
};

/// Widens a stored value to fp32, the type every kernel accumulates in.
template <StorageType T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

/// Rounds an fp32 value to storage type T (round to nearest even).
template <StorageType T>
inline T from_float(float value) {
  return static_cast<T>(value);
}

}  // namespace daedalus
