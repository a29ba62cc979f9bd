// SPDX-License-Identifier: Apache-2.0
// LatentRowFormat: row sizes (FlashMLA's 656-byte fp8 row), the byte layout of an fp8 row, and
// read-back accuracy of every storage type against its documented bound, on Tiny (a latent that
// is not a multiple of the 128-wide scale tile) and DeepSeek-V3 shapes, with tiles of very
// different magnitudes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <vector>

#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::bfloat16;
using daedalus::DeepSeekV3;
using daedalus::Fp8E4m3;
using daedalus::Fp8E4m3Latent;
using daedalus::half;
using daedalus::LatentRowFormat;
using daedalus::Tiny;
using daedalus::testing::Random;
namespace tol = daedalus::testing::tolerance;

/// A random latent row whose 128-wide tiles have magnitudes far apart (2^-12 .. 2^12), so a
/// scale shared across tiles, or a wrong tile index, shows; k_pe is of order 1.
template <class C>
std::vector<float> random_row(Random& random) {
  constexpr int rank = daedalus::MlaShape<C>::kv_lora_rank;
  constexpr int dim = daedalus::MlaShape<C>::latent_dim;
  std::vector<float> row = random.uniform(dim);
  for (int t = 0; t * 128 < rank; ++t) {
    const float tile_scale = float(std::exp2(random.next(-12.0, 12.0)));
    for (int i = t * 128; i < std::min(rank, t * 128 + 128); ++i) row[std::size_t(i)] *= tile_scale;
  }
  return row;
}

template <class C>
void check_fp8_bound(std::uint64_t seed) {
  using Format = LatentRowFormat<C, Fp8E4m3Latent>;
  constexpr int rank = Format::kv_lora_rank;
  Random random(seed);
  std::vector<std::byte> stored(Format::row_bytes);
  std::vector<float> read(Format::latent_dim);
  double worst_ratio = 0.0;  // largest error / bound seen: how close the data comes to the bound
  for (int r = 0; r < 200; ++r) {
    const std::vector<float> row = random_row<C>(random);
    Format::encode(row.data(), stored.data());
    Format::decode(stored.data(), read.data());
    for (int t = 0; t < Format::num_tiles; ++t) {
      double amax = 0.0;
      for (int i = t * 128; i < std::min(rank, t * 128 + 128); ++i)
        amax = std::max(amax, std::abs(double(row[std::size_t(i)])));
      // The scale is amax / 448 as documented; the bound is in terms of the exact value.
      const double scale = amax / 448.0;
      CHECK(double(Format::tile_scale(stored.data(), t)) == doctest::Approx(scale).epsilon(1e-6));
      for (int i = t * 128; i < std::min(rank, t * 128 + 128); ++i) {
        const double x = row[std::size_t(i)];
        const double error = std::abs(double(read[std::size_t(i)]) - x);
        const double bound =
            (Format::latent_relative_bound + Format::latent_fp32_slack) * std::abs(x) +
            Format::latent_scale_bound * scale * (1.0 + 1e-6);
        CAPTURE(i);
        CAPTURE(x);
        REQUIRE(error <= bound);
        // The looser, per-tile form of the bound: within 2^-4 of the tile's amax.
        REQUIRE(error <= 0x1p-4 * amax);
        worst_ratio = std::max(worst_ratio, error / bound);
      }
    }
    for (int i = rank; i < Format::latent_dim; ++i) {
      const double x = row[std::size_t(i)];
      REQUIRE(std::abs(double(read[std::size_t(i)]) - x) <=
              Format::rope_relative_bound * std::abs(x));
    }
  }
  // The bound is tight, not loose by orders of magnitude: random data comes near it.
  CHECK(worst_ratio > 0.5);
}

template <class C, class Storage>
void check_plain_round_trip(std::uint64_t seed) {
  using Format = LatentRowFormat<C, Storage>;
  constexpr tol::RoundTrip bound = tol::round_trip<Storage>();
  Random random(seed);
  std::vector<std::byte> stored(Format::row_bytes);
  std::vector<float> read(Format::latent_dim);
  for (int r = 0; r < 50; ++r) {
    const std::vector<float> row = random.uniform(Format::latent_dim, 3.0);
    Format::encode(row.data(), stored.data());
    Format::decode(stored.data(), read.data());
    for (std::size_t i = 0; i < row.size(); ++i) {
      // The stored bytes are the row as a plain array of Storage (FlashMLA reads them so).
      Storage element;
      std::memcpy(&element, stored.data() + i * sizeof(Storage), sizeof(Storage));
      REQUIRE(float(element) == read[i]);
      REQUIRE(std::abs(double(read[i]) - double(row[i])) <=
              bound.relative * std::abs(double(row[i])) + bound.absolute);
    }
  }
}

}  // namespace

TEST_CASE("LatentRowFormat: row sizes of every storage type, FlashMLA's 656-byte fp8 row") {
  CHECK(LatentRowFormat<DeepSeekV3, float>::row_bytes == 2304);
  CHECK(LatentRowFormat<DeepSeekV3, bfloat16>::row_bytes == 1152);
  CHECK(LatentRowFormat<DeepSeekV3, half>::row_bytes == 1152);
  using V3Fp8 = LatentRowFormat<DeepSeekV3, Fp8E4m3Latent>;
  CHECK(V3Fp8::row_bytes == 656);
  CHECK(V3Fp8::num_tiles == 4);
  CHECK(V3Fp8::scales_offset == 512);
  CHECK(V3Fp8::rope_offset == 528);
  // Tiny: a 40-wide latent is one partial tile: 40 + 4 + 8·2.
  CHECK(LatentRowFormat<Tiny, Fp8E4m3Latent>::row_bytes == 60);
  CHECK(LatentRowFormat<Tiny, Fp8E4m3Latent>::num_tiles == 1);
  CHECK(LatentRowFormat<Tiny, float>::is_plain);
  CHECK_FALSE(LatentRowFormat<Tiny, Fp8E4m3Latent>::is_plain);
}

TEST_CASE("LatentRowFormat<fp8>: the bytes are e4m3 codes, fp32 scales and bf16 k_pe") {
  using Format = LatentRowFormat<DeepSeekV3, Fp8E4m3Latent>;
  Random random(811);
  const std::vector<float> row = random_row<DeepSeekV3>(random);
  std::vector<std::byte> stored(Format::row_bytes);
  Format::encode(row.data(), stored.data());
  for (int t = 0; t < 4; ++t) {
    float scale;
    std::memcpy(&scale, stored.data() + 512 + 4 * t, 4);
    double amax = 0.0;
    for (int i = 128 * t; i < 128 * t + 128; ++i)
      amax = std::max(amax, std::abs(double(row[std::size_t(i)])));
    CHECK(double(scale) == doctest::Approx(amax / 448.0).epsilon(1e-6));
    int saturated = 0;  // the amax element maps to ±448
    for (int i = 128 * t; i < 128 * t + 128; ++i) {
      const Fp8E4m3 code{std::to_integer<std::uint8_t>(stored[std::size_t(i)])};
      CHECK(code.bits == Fp8E4m3::from_float(row[std::size_t(i)] / scale).bits);
      if ((code.bits & 0x7f) == 0x7e) ++saturated;
    }
    CHECK(saturated >= 1);
  }
  for (int i = 0; i < 64; ++i) {
    bfloat16 value;
    std::memcpy(&value, stored.data() + 528 + 2 * i, 2);
    CHECK(float(value) == float(bfloat16(row[std::size_t(512 + i)])));
  }
}

TEST_CASE("LatentRowFormat<fp8>: read-back within the documented bound (Tiny and V3 shapes)") {
  check_fp8_bound<Tiny>(821);
  check_fp8_bound<DeepSeekV3>(822);
}

TEST_CASE("LatentRowFormat<fp8>: an all-zero tile stores zeros with scale 1") {
  using Format = LatentRowFormat<DeepSeekV3, Fp8E4m3Latent>;
  Random random(823);
  std::vector<float> row = random.uniform(Format::latent_dim);
  std::fill(row.begin() + 128, row.begin() + 256, 0.0f);
  std::vector<std::byte> stored(Format::row_bytes);
  std::vector<float> read(Format::latent_dim);
  Format::encode(row.data(), stored.data());
  Format::decode(stored.data(), read.data());
  CHECK(Format::tile_scale(stored.data(), 1) == 1.0f);
  for (int i = 128; i < 256; ++i) CHECK(read[std::size_t(i)] == 0.0f);
}

TEST_CASE("LatentRowFormat: fp32 exact, bf16 and fp16 within their round-trip bounds") {
  check_plain_round_trip<Tiny, float>(831);
  check_plain_round_trip<Tiny, bfloat16>(832);
  check_plain_round_trip<Tiny, half>(833);
  check_plain_round_trip<DeepSeekV3, bfloat16>(834);
}
