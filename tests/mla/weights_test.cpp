// SPDX-License-Identifier: Apache-2.0
// MlaWeights: from_arrays copies DeepSeek-layout arrays and rejects a wrong size naming the
// array; the accessors and the absorbed views (W_UK, W_UV) address the right rows of wkv_b.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <daedalus/daedalus.hpp>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/mla_fixture.hpp"

namespace {

using daedalus::index_t;
using daedalus::MlaShape;
namespace dt = daedalus::testing;
namespace mla = daedalus::mla;

using daedalus::testing::message_of;

}  // namespace

TEST_CASE_TEMPLATE("MlaWeights::from_arrays keeps every array and exposes it in [out, in] views", C,
                   daedalus::Tiny, daedalus::TinyNoQLora) {
  using S = MlaShape<C>;
  const dt::WeightArrays<C> a = dt::WeightArrays<C>::random(700);
  const mla::MlaWeights<C> w = a.weights();
  auto same = [](const auto& view, const std::vector<float>& v) {
    return view.size() == index_t(v.size()) && std::equal(v.begin(), v.end(), view.data());
  };
  if constexpr (S::has_q_lora) {
    CHECK(w.wq_a().extents() == std::array<index_t, 2>{S::q_lora_rank, S::dim});
    CHECK(w.wq_b().extents() ==
          std::array<index_t, 2>{S::n_heads * S::qk_head_dim, S::q_lora_rank});
    CHECK(same(w.wq_a(), a.wq_a));
    CHECK(same(w.q_norm(), a.q_norm));
    CHECK(same(w.wq_b(), a.wq_b));
    CHECK(w.wq().size() == 0);
  } else {
    CHECK(w.wq().extents() == std::array<index_t, 2>{S::n_heads * S::qk_head_dim, S::dim});
    CHECK(same(w.wq(), a.wq));
    CHECK(w.wq_a().size() == 0);
    CHECK(w.wq_b().size() == 0);
  }
  CHECK(w.wkv_a().extents() == std::array<index_t, 2>{S::latent_dim, S::dim});
  CHECK(w.wkv_b().extents() ==
        std::array<index_t, 2>{S::n_heads * S::kv_b_rows_per_head, S::kv_lora_rank});
  CHECK(w.wo().extents() == std::array<index_t, 2>{S::dim, S::n_heads * S::v_head_dim});
  CHECK(same(w.wkv_a(), a.wkv_a));
  CHECK(same(w.kv_norm(), a.kv_norm));
  CHECK(same(w.wkv_b(), a.wkv_b));
  CHECK(same(w.wo(), a.wo));
  // wkv_b viewed as [n_heads, nope + v, kv_lora_rank]: W_UK[h] is rows 0..nope-1 of head h,
  // W_UV[h] the v_head_dim rows after them.
  for (int h = 0; h < S::n_heads; ++h) {
    CHECK(w.w_uk(h).extents() == std::array<index_t, 2>{S::nope, S::kv_lora_rank});
    CHECK(w.w_uv(h).extents() == std::array<index_t, 2>{S::v_head_dim, S::kv_lora_rank});
    CHECK(w.w_uk(h)(3, 5) ==
          a.wkv_b[std::size_t((h * S::kv_b_rows_per_head + 3) * S::kv_lora_rank + 5)]);
    CHECK(w.w_uv(h)(2, 7) ==
          a.wkv_b[std::size_t((h * S::kv_b_rows_per_head + S::nope + 2) * S::kv_lora_rank + 7)]);
  }
}

TEST_CASE("MlaWeights::from_arrays rejects an array of the wrong size, naming it") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  const dt::WeightArrays<C> good = dt::WeightArrays<C>::random(701);
  SUBCASE("wkv_b one value short") {
    dt::WeightArrays<C> bad = good;
    bad.wkv_b.pop_back();
    const std::size_t expected = std::size_t(S::n_heads) * S::kv_b_rows_per_head * S::kv_lora_rank;
    const std::string what = message_of<daedalus::InvalidArgument>([&] { (void)bad.weights(); });
    CHECK(what.find("daedalus::mla::MlaWeights::from_arrays") != std::string::npos);
    CHECK(what.find("'wkv_b' has " + std::to_string(expected - 1) + " values; expected " +
                    std::to_string(expected)) != std::string::npos);
  }
  SUBCASE("each array, one by one") {
    for (const char* name : {"wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wo"}) {
      CAPTURE(name);
      dt::WeightArrays<C> bad = good;
      const std::string n = name;
      std::vector<float>& v = n == "wq_a"      ? bad.wq_a
                              : n == "q_norm"  ? bad.q_norm
                              : n == "wq_b"    ? bad.wq_b
                              : n == "wkv_a"   ? bad.wkv_a
                              : n == "kv_norm" ? bad.kv_norm
                                               : bad.wo;
      v.push_back(1.0f);
      const std::string what = message_of<daedalus::InvalidArgument>([&] { (void)bad.weights(); });
      CHECK(what.find("'" + n + "' has") != std::string::npos);
    }
  }
  SUBCASE("a wq given to a config with query LoRA") {
    dt::WeightArrays<C> bad = good;
    bad.wq = std::vector<float>(10, 1.0f);
    const std::string what = message_of<daedalus::InvalidArgument>([&] { (void)bad.weights(); });
    CHECK(what.find("'wq' has 10 values; expected 0") != std::string::npos);
  }
}

TEST_CASE("MlaWeights::from_arrays without query LoRA wants wq and no wq_a") {
  using C = daedalus::TinyNoQLora;
  dt::WeightArrays<C> bad = dt::WeightArrays<C>::random(702);
  bad.wq.clear();
  CHECK_THROWS_WITH_AS((void)bad.weights(), doctest::Contains("'wq' has 0 values"),
                       daedalus::InvalidArgument);
  bad = dt::WeightArrays<C>::random(702);
  bad.wq_a = std::vector<float>(5, 1.0f);
  CHECK_THROWS_WITH_AS((void)bad.weights(), doctest::Contains("'wq_a' has 5 values; expected 0"),
                       daedalus::InvalidArgument);
}

TEST_CASE("MlaWeights::random is deterministic per seed and never all zeros") {
  using C = daedalus::Tiny;
  const auto a = mla::MlaWeights<C>::random(7);
  const auto b = mla::MlaWeights<C>::random(7);
  const auto c = mla::MlaWeights<C>::random(8);
  const auto n = a.wkv_b().size();
  CHECK(std::equal(a.wkv_b().data(), a.wkv_b().data() + n, b.wkv_b().data()));
  CHECK_FALSE(std::equal(a.wkv_b().data(), a.wkv_b().data() + n, c.wkv_b().data()));
  CHECK(
      std::any_of(a.wo().data(), a.wo().data() + a.wo().size(), [](float v) { return v != 0.0f; }));
}
