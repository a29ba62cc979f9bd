// SPDX-License-Identifier: Apache-2.0
// cpu::linear, the nn.Linear product every CPU projection uses: equal to an fp64 reference within
// fp32's accumulation bound, and the same bits for any thread count, on shapes that are
// multiples of no tile (every thread's range starts at a multiple of kLinearFeatureAlign).
#include <doctest/doctest.h>

#include <cstring>
#include <daedalus/daedalus.hpp>
#include <vector>

#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::CpuBackend;
using daedalus::index_t;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;

struct Shape {
  index_t tokens, in, out, x_stride;
};

std::vector<float> run_linear(int threads, const Shape& s, const std::vector<float>& x,
                              const std::vector<float>& w) {
  std::vector<float> y(std::size_t(s.tokens * s.out));
  daedalus::cpu::linear(CpuBackend(threads), x.data(), s.tokens, s.in, s.x_stride, w.data(), s.out,
                        y.data());
  return y;
}

}  // namespace

TEST_CASE("cpu::linear equals the fp64 product and gives the same bits for 1, 2, 3, 5, 7 threads") {
  // Decode-sized (GEMV) and prefill-sized (GEMM) products, ragged everywhere: 17 x 256 by 80 x 256
  // is the product whose bits once depended on the thread count.
  // The last two are large enough for Eigen to block the product's rows (and, at 1536 deep,
  // its depth): each range's blocks must still leave every feature in the same place.
  const Shape shapes[] = {{1, 45, 17, 45},       {3, 256, 1000, 260},    {17, 256, 80, 256},
                          {33, 100, 2100, 100},  {517, 63, 130, 70},     {1100, 31, 211, 31},
                          {1, 1536, 3001, 1536}, {600, 1536, 1000, 1540}};
  std::uint64_t offset = 470;
  for (const Shape& s : shapes) {
    CAPTURE(s.tokens);
    CAPTURE(s.in);
    CAPTURE(s.out);
    dt::Random rng(offset++);
    const std::vector<float> x = rng.uniform(std::size_t(s.tokens * s.x_stride));
    const std::vector<float> w = rng.uniform(std::size_t(s.out * s.in));
    const std::vector<float> one = run_linear(1, s, x, w);
    std::vector<double> want(one.size());
    for (index_t t = 0; t < s.tokens; ++t)
      for (index_t o = 0; o < s.out; ++o) {
        double sum = 0.0;
        for (index_t k = 0; k < s.in; ++k)
          sum += double(x[std::size_t(t * s.x_stride + k)]) * double(w[std::size_t(o * s.in + k)]);
        want[std::size_t(t * s.out + o)] = sum;
      }
    CHECK(tol::row_relative_error(one, want, std::size_t(s.out)) <= tol::fp32_vs_reference(s.in));
    for (int threads : {2, 3, 5, 7}) {
      CAPTURE(threads);
      const std::vector<float> many = run_linear(threads, s, x, w);
      CHECK(std::memcmp(many.data(), one.data(), one.size() * sizeof(float)) == 0);
    }
  }
}
