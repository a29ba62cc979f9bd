// SPDX-License-Identifier: Apache-2.0
#pragma once

namespace daedalus::detail {

/// False for every argument list, but only once instantiated: `static_assert(dependent_false<T>,
/// "...")` in a primary template (or a discarded `if constexpr` branch) fires only when that
/// template is used, where a plain `static_assert(false, ...)` would reject every program.
template <class...>
inline constexpr bool dependent_false = false;

}  // namespace daedalus::detail
