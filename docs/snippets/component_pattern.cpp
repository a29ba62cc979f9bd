// SPDX-License-Identifier: Apache-2.0
// Snippet of docs/architecture.md: the shape of a component, a front that validates and a
// detail::Impl<Backend> that each backend folder specialises, shown on a toy component
// (`scale_rows`) so that the pattern compiles on its own.
#include <cstdio>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/daedalus.hpp"

// [snippet:front]
// include/daedalus/<component>/<name>.hpp: the front. It includes no backend.
namespace example {
namespace detail {

template <class...>
inline constexpr bool no_backend = false;

/// The primary template says which header to include; backends specialise it.
template <class Backend>
struct ScaleRowsImpl {
  static_assert(no_backend<Backend>,
                "example::scale_rows: no implementation for this backend is visible: include "
                "<daedalus/daedalus.hpp> for CpuBackend, or <daedalus/cuda.cuh> in a .cu file");
};

}  // namespace detail

/// rows[i, j] *= factor[i]. Views live in the backend's memory space, so a device view passed
/// with CpuBackend does not compile; everything is checked before anything is written.
template <class Backend>
void scale_rows(const Backend& backend,
                daedalus::TensorView<const float, 1, typename Backend::memory_space> factor,
                daedalus::TensorView<float, 2, typename Backend::memory_space> rows) {
  constexpr std::string_view fn = "example::scale_rows";
  daedalus::detail::check_extents(fn, "factor", factor, {rows.extent(0)});
  detail::ScaleRowsImpl<Backend>::run(backend, factor, rows);
}

}  // namespace example
// [/snippet:front]

// [snippet:cpu]
// include/daedalus/<component>/cpu/<name>.hpp: the CPU backend's specialisation.
template <>
struct example::detail::ScaleRowsImpl<daedalus::CpuBackend> {
  static void run(const daedalus::CpuBackend& cpu, daedalus::HostView<const float, 1> factor,
                  daedalus::HostView<float, 2> rows) {
    cpu.parallel_ranges(rows.extent(0), [&](std::int64_t r0, std::int64_t r1, int) {
      for (std::int64_t r = r0; r < r1; ++r)
        for (daedalus::index_t c = 0; c < rows.extent(1); ++c) rows(r, c) *= factor(r);
    });
  }
};
// [/snippet:cpu]

int main() {
  std::vector<float> factor{1.0f, 2.0f, 3.0f};
  std::vector<float> rows(3 * 4, 1.0f);
  example::scale_rows(daedalus::CpuBackend(2),
                      daedalus::HostView<const float, 1>(factor.data(), {3}),
                      daedalus::HostView<float, 2>(rows.data(), {3, 4}));
  std::printf("component_pattern: row 2 = %g\n", double(rows[8]));
  return rows[8] == 3.0f ? 0 : 1;
}
