// SPDX-License-Identifier: Apache-2.0
// The absorbed and naive attention cores over a paged pool given as FlashMLA's arguments
// (PagedLatentView): pools built here by hand, blocks handed out in a shuffled order, every byte
// that no sequence uses (rows past a sequence's length in its last block, whole unused blocks)
// poisoned with NaN as FlashMLA's tests poison them. Checked:
//   - paged == contiguous bit for bit (same kernel, same summation order) for fp32/bf16/fp16
//   - every storage type against the fp64 reference over the rows the pool holds (kernel error
//     only) and over the fp32 rows before storage (with a bound derived from the storage's
//     documented rounding)
//   - split-KV: the plan cuts a long sequence by its length alone, the merge equals the fp64
//     result and gives the same bits for any thread count
//   - zero-length sequences give zeros and do not disturb their neighbours
//   - the table-driven fp8 widening equals LatentRowFormat::decode bit for bit
//   - a view that points outside the pool is refused with a typed error, output untouched
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <daedalus/daedalus.hpp>
#include <numeric>
#include <span>
#include <vector>

#include "support/mla_fixture.hpp"
#include "support/reference/mla_reference.hpp"
#include "support/tolerance.hpp"

namespace {

using daedalus::ContiguousLatentCache;
using daedalus::CpuBackend;
using daedalus::Fp8E4m3Latent;
using daedalus::HostView;
using daedalus::index_t;
using daedalus::LatentRowFormat;
using daedalus::MlaShape;
using daedalus::PagedLatentView;
namespace dt = daedalus::testing;
namespace tol = daedalus::testing::tolerance;
namespace mla = daedalus::mla;

/// A test case's types: config, storage and block size.
template <class Config, class StorageType, int Block>
struct Case {
  using C = Config;
  using Storage = StorageType;
  static constexpr int block = Block;
};

/// A pool of `num_blocks` blocks holding one sequence per entry of `lengths`, built by hand: block
/// ids drawn from a shuffled permutation, every byte first set to 0xFF (NaN in fp32, bf16, fp16,
/// e4m3, and in the fp32 scales of fp8 rows), then each sequence's rows encoded into its blocks.
/// Table entries past a sequence's last block hold -1 or an id far outside the pool (never read).
template <class C, class Storage, int BS>
struct HandPool {
  using Format = LatentRowFormat<C, Storage>;
  static constexpr index_t D = MlaShape<C>::latent_dim;

  index_t num_blocks = 0;
  index_t max_blocks = 0;
  std::vector<std::byte> pool;
  std::vector<std::int32_t> table;
  std::vector<std::int32_t> seqlens;
  std::vector<std::vector<float>> original;  // per sequence [len, D]: what was encoded
  std::vector<std::vector<float>> stored;    // per sequence [len, D]: what the pool holds

  HandPool(const std::vector<index_t>& lengths, index_t spare_blocks, std::uint64_t offset) {
    dt::Random rng(offset);
    const index_t batch = index_t(lengths.size());
    index_t used = 0;
    for (index_t len : lengths) {
      max_blocks = std::max(max_blocks, (len + BS - 1) / BS);
      used += (len + BS - 1) / BS;
    }
    max_blocks += 1;  // one column past every sequence's last block
    num_blocks = used + spare_blocks;
    pool.assign(std::size_t(num_blocks) * BS * Format::row_bytes, std::byte{0xFF});
    std::vector<std::int32_t> ids(static_cast<std::size_t>(num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    for (std::size_t i = ids.size(); i > 1; --i)
      std::swap(ids[i - 1], ids[std::size_t(rng.integer(0, index_t(i) - 1))]);
    table.assign(std::size_t(batch * max_blocks), -1);
    std::size_t next = 0;
    for (index_t b = 0; b < batch; ++b) {
      const index_t len = lengths[std::size_t(b)];
      seqlens.push_back(std::int32_t(len));
      original.push_back(rng.uniform(std::size_t(len * D)));
      stored.emplace_back(std::size_t(len * D));
      const index_t blocks = (len + BS - 1) / BS;
      for (index_t j = 0; j < blocks; ++j) table[std::size_t(b * max_blocks + j)] = ids[next++];
      if (b % 2 == 1) table[std::size_t(b * max_blocks + blocks)] = 1 << 30;  // unused: not read
      for (index_t t = 0; t < len; ++t) {
        std::byte* row =
            pool.data() +
            (std::size_t(table[std::size_t(b * max_blocks + t / BS)]) * BS + std::size_t(t % BS)) *
                Format::row_bytes;
        Format::encode(original.back().data() + t * D, row);
        Format::decode(row, stored.back().data() + t * D);
      }
    }
  }

  [[nodiscard]] index_t batch() const { return index_t(seqlens.size()); }

  [[nodiscard]] PagedLatentView<C, Storage, BS> view() const {
    return {pool.data(), num_blocks,
            HostView<const std::int32_t, 2>(table.data(), {batch(), max_blocks}),
            HostView<const std::int32_t, 1>(seqlens.data(), {batch()})};
  }
};

/// A contiguous cache holding the same fp32 rows (rounded to Storage the same way).
template <class C, class Storage, int BS>
ContiguousLatentCache<C, CpuBackend, Storage> contiguous_copy(const HandPool<C, Storage, BS>& p) {
  constexpr index_t D = MlaShape<C>::latent_dim;
  ContiguousLatentCache<C, CpuBackend, Storage> cache(p.batch(), p.max_blocks * BS);
  for (index_t b = 0; b < p.batch(); ++b)
    cache.append(b, HostView<const float, 2>(p.original[std::size_t(b)].data(),
                                             {index_t(p.seqlens[std::size_t(b)]), D}));
  return cache;
}

/// Runs the paged absorbed attention; out is [batch, q_len, n_heads, kv_lora_rank].
template <class C, class Storage, int BS>
std::vector<float> paged_absorbed(const CpuBackend& cpu, const PagedLatentView<C, Storage, BS>& v,
                                  const std::vector<float>& q, index_t q_len) {
  using S = MlaShape<C>;
  const index_t batch = v.batch();
  std::vector<float> out(std::size_t(batch * q_len * S::n_heads * S::kv_lora_rank), -7.0f);
  mla::absorbed_attention(
      cpu, v, HostView<const float, 4>(q.data(), {batch, q_len, S::n_heads, S::latent_dim}),
      mla::softmax_scale<C>(),
      HostView<float, 4>(out.data(), {batch, q_len, S::n_heads, S::kv_lora_rank}));
  return out;
}

/// Queries scaled so that scores spread over a few units (a peaked softmax).
template <class C>
std::vector<float> random_queries(index_t batch, index_t q_len, std::uint64_t offset) {
  using S = MlaShape<C>;
  return dt::Random(offset).uniform(std::size_t(batch * q_len * S::n_heads * S::latent_dim),
                                    12.0 / std::sqrt(double(S::latent_dim)));
}

/// Whether the bf16 AVX512-BF16 kernels run for this config and storage (then q and the
/// probabilities are rounded to bf16, mla/attention.hpp).
template <class C, class Storage>
constexpr bool bf16_arithmetic() {
  return std::is_same_v<Storage, daedalus::bfloat16> &&
         daedalus::mla::cpu_kernels::bf16_kernels_fit(MlaShape<C>::latent_dim,
                                                      MlaShape<C>::kv_lora_rank);
}

/// Whether paged and contiguous attention run the very same floating-point operations: the
/// AVX-512 micro-kernels accumulate key by key whether a key block is one run or several pages,
/// but Eigen's GEMM (the portable path, and the value product when kv_lora_rank is not a whole
/// number of 64-wide panels, as in Tiny) blocks its reduction by the run's length. fp32 pools are
/// read in place; the others are widened into one contiguous block first, so the same operations
/// run on them.
template <class C, class Storage>
constexpr bool bitwise_equal_to_contiguous() {
  return !std::is_same_v<Storage, float> ||
         (daedalus::mla::cpu_kernels::has_avx512_kernels && MlaShape<C>::kv_lora_rank % 64 == 0);
}

/// |stored − x| ≤ bound for one value of a row encoded in `Storage` (the bounds the formats
/// document: LatentRowFormat for fp8, a unit roundoff for the 16-bit types).
template <class C, class Storage>
std::vector<double> storage_error_bounds(const std::vector<float>& rows, index_t len) {
  using S = MlaShape<C>;
  constexpr index_t D = S::latent_dim;
  std::vector<double> bound(rows.size());
  for (index_t t = 0; t < len; ++t) {
    const float* row = rows.data() + t * D;
    for (index_t j = 0; j < D; ++j) {
      const double x = std::abs(double(row[j]));
      double e = 0.0;
      if constexpr (std::is_same_v<Storage, Fp8E4m3Latent>) {
        using F = LatentRowFormat<C, Fp8E4m3Latent>;
        if (j < S::kv_lora_rank) {
          const index_t tile = j / F::tile_width;
          double amax = 0.0;
          for (index_t i = tile * F::tile_width;
               i < std::min<index_t>((tile + 1) * F::tile_width, S::kv_lora_rank); ++i)
            amax = std::max(amax, std::abs(double(row[i])));
          const double scale = amax / 448.0;
          e = F::latent_relative_bound * x + F::latent_scale_bound * scale +
              F::latent_fp32_slack * x;
        } else {
          e = F::rope_relative_bound * x;
        }
      } else {
        const auto rt = tol::round_trip<Storage>();
        e = rt.relative * x + rt.absolute;
      }
      bound[std::size_t(t * D + j)] = e;
    }
  }
  return bound;
}

/// Checks the attention output of one sequence computed from stored rows against the exact
/// fp64 attention over the rows before storage, allowing what the storage rounding can move it.
/// With p the exact probabilities, Δk_t the per-value bounds of row t and δ_r = scale·max_t
/// Σ_j |q_rj|·Δk_tj (how far any score of query row r can move), each probability moves by a
/// factor within e^{±2δ_r}, so for every output element
///   |o' − o| ≤ e^{2δ}·Σ_t p_t·Δc_tj + (e^{2δ} − 1)·Σ_t p_t·|c_tj|,
/// to which the fp32 kernel error (fp32_vs_reference) and, with the bf16 kernels, their
/// rounding of q and p to bf16 (≤ 2^-8 per product term, the same form with δ from u_bf16) add.
/// Returns the largest excess over that bound, relative to the row's magnitude (≤ 0 passes).
template <class C, class Storage>
double excess_over_storage_bound(const std::vector<float>& got /*[q_len·H, R]*/,
                                 const std::vector<float>& q /*[q_len·H, D]*/, index_t q_len,
                                 const std::vector<float>& rows, index_t len, double scale) {
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const std::vector<double> dk = storage_error_bounds<C, Storage>(rows, len);
  double worst = -1.0;
  for (index_t i = 0; i < q_len; ++i) {
    const index_t visible = len - q_len + i + 1;
    for (index_t h = 0; h < H; ++h) {
      const index_t r = i * H + h;
      const float* qr = q.data() + r * D;
      std::vector<double> s(static_cast<std::size_t>(std::max<index_t>(visible, 0)));
      double delta = 0.0, smax = -INFINITY;
      for (index_t t = 0; t < visible; ++t) {
        double dot = 0.0, shift = 0.0;
        for (index_t j = 0; j < D; ++j) {
          dot += double(qr[j]) * rows[std::size_t(t * D + j)];
          shift += std::abs(double(qr[j])) * dk[std::size_t(t * D + j)];
          if constexpr (bf16_arithmetic<C, Storage>())  // q rounded to bf16 too
            shift += tol::bf16_u * std::abs(double(qr[j]) * rows[std::size_t(t * D + j)]);
        }
        s[std::size_t(t)] = dot * scale;
        smax = std::max(smax, s[std::size_t(t)]);
        delta = std::max(delta, shift * scale);
      }
      double sum = 0.0;
      for (double& v : s) sum += (v = std::exp(v - smax));
      const double grow = std::exp(2.0 * delta);
      const double p_round = bf16_arithmetic<C, Storage>() ? tol::bf16_u : 0.0;
      double mag = 0.0, excess = -INFINITY;
      std::vector<double> want(R, 0.0), bound(R, 0.0);
      for (index_t t = 0; t < visible; ++t) {
        const double p = s[std::size_t(t)] / sum;
        for (index_t j = 0; j < R; ++j) {
          const double c = rows[std::size_t(t * D + j)];
          want[std::size_t(j)] += p * c;
          bound[std::size_t(j)] += grow * p * dk[std::size_t(t * D + j)] +
                                   (grow * (1.0 + p_round) - 1.0) * p * std::abs(c);
        }
      }
      for (index_t j = 0; j < R; ++j) mag = std::max(mag, std::abs(want[std::size_t(j)]));
      const double kernel = tol::fp32_vs_reference(std::max(D, len)) * mag;
      for (index_t j = 0; j < R; ++j) {
        const double err = std::abs(double(got[std::size_t(r * R + j)]) - want[std::size_t(j)]);
        excess = std::max(excess, (err - bound[std::size_t(j)] - kernel) / std::max(mag, 1e-30));
      }
      worst = std::max(worst, excess);
    }
  }
  return worst;
}

/// Lengths of the varlen batch: around and across the CPU key block (128) and the page size,
/// with a zero-length entry and one that is exactly q_len = 2 long.
const std::vector<index_t> kLengths = {130, 0, 2, 301, 64, 17};

}  // namespace

TEST_CASE_TEMPLATE("paged absorbed attention equals contiguous attention bit for bit", T,
                   Case<daedalus::Tiny, float, 16>, Case<daedalus::Tiny, float, 5>,
                   Case<daedalus::Tiny, daedalus::bfloat16, 7>,
                   Case<daedalus::Tiny, daedalus::half, 16>,
                   Case<daedalus::DeepSeekV2Lite, float, 64>,
                   Case<daedalus::DeepSeekV2Lite, daedalus::bfloat16, 64>,
                   Case<daedalus::DeepSeekV2Lite, daedalus::bfloat16, 5>) {
  using C = typename T::C;
  using Storage = typename T::Storage;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, R = S::kv_lora_rank;
  const HandPool<C, Storage, T::block> pool(kLengths, 3, 600);
  const auto contiguous = contiguous_copy(pool);
  std::vector<index_t> seqs(kLengths.size());
  std::iota(seqs.begin(), seqs.end(), 0);
  // The contiguous front needs every length ≥ q_len: compare the entries that have it.
  for (index_t q_len : {1, 2}) {
    const index_t batch = pool.batch();
    const std::vector<float> q = random_queries<C>(batch, q_len, 601 + std::uint64_t(q_len));
    for (int threads : {1, 3}) {
      CAPTURE(q_len);
      CAPTURE(threads);
      const CpuBackend cpu(threads);
      const std::vector<float> paged = paged_absorbed(cpu, pool.view(), q, q_len);
      for (index_t b = 0; b < batch; ++b) {
        CAPTURE(b);
        const std::size_t rows = std::size_t(q_len * H);
        if (pool.seqlens[std::size_t(b)] < q_len) {
          // Zero-length (and too-short) entries: query rows that see no token give zeros.
          for (index_t i = 0; i < q_len; ++i) {
            const bool sees_none = pool.seqlens[std::size_t(b)] - q_len + i < 0;
            for (index_t j = 0; j < H * R; ++j)
              if (sees_none) CHECK(paged[std::size_t((b * q_len + i) * H * R + j)] == 0.0f);
          }
          continue;
        }
        // The same entry alone in a contiguous batch, on one thread: sequences of a batch do
        // not interact, and the split plan depends on each sequence's own length only, so the
        // bits agree for any thread count where the row formats are read alike ...
        std::vector<float> want(rows * R);
        const index_t seq = b;
        mla::absorbed_attention(CpuBackend(1), contiguous, std::span<const index_t>(&seq, 1),
                                HostView<const float, 4>(q.data() + b * rows * S::latent_dim,
                                                         {1, q_len, H, S::latent_dim}),
                                mla::softmax_scale<C>(),
                                HostView<float, 4>(want.data(), {1, q_len, H, R}));
        const std::vector<float> got = dt::slice_rows(paged, b * q_len * H, (b + 1) * q_len * H, R);
        if (bitwise_equal_to_contiguous<C, Storage>()) {
          CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
        } else {
          // ... and elsewhere, where the summation order differs, by fp32 rounding only.
          CHECK(tol::row_relative_error(got, want, R) <=
                tol::fp32_vs_fp32(std::max<index_t>(S::latent_dim, pool.seqlens[std::size_t(b)])));
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("paged and contiguous attention agree on the same batch and threads", C,
                   daedalus::Tiny, daedalus::DeepSeekV2Lite) {
  // Every length ≥ q_len, so the contiguous front takes the whole batch: the split plan is the
  // same and so is every floating-point operation (bitwise_equal_to_contiguous).
  using S = MlaShape<C>;
  const std::vector<index_t> lengths = {300, 45, 129, 1000};
  const HandPool<C, float, 16> pool(lengths, 4, 610);
  const auto contiguous = contiguous_copy(pool);
  const std::vector<index_t> seqs = {0, 1, 2, 3};
  const index_t batch = 4, q_len = 2;
  const std::vector<float> q = random_queries<C>(batch, q_len, 611);
  for (int threads : {1, 2, 4}) {
    CAPTURE(threads);
    const CpuBackend cpu(threads);
    const std::vector<float> paged = paged_absorbed(cpu, pool.view(), q, q_len);
    std::vector<float> want(paged.size());
    mla::absorbed_attention(
        cpu, contiguous, std::span<const index_t>(seqs),
        HostView<const float, 4>(q.data(), {batch, q_len, S::n_heads, S::latent_dim}),
        mla::softmax_scale<C>(),
        HostView<float, 4>(want.data(), {batch, q_len, S::n_heads, S::kv_lora_rank}));
    if (bitwise_equal_to_contiguous<C, float>())
      CHECK(std::memcmp(paged.data(), want.data(), want.size() * sizeof(float)) == 0);
    else
      CHECK(tol::row_relative_error(paged, want, S::kv_lora_rank) <= tol::fp32_vs_fp32(1000));
  }
}

TEST_CASE_TEMPLATE("paged absorbed attention matches fp64 over the stored rows and the originals",
                   T, Case<daedalus::Tiny, float, 16>, Case<daedalus::Tiny, daedalus::bfloat16, 16>,
                   Case<daedalus::Tiny, daedalus::half, 9>, Case<daedalus::Tiny, Fp8E4m3Latent, 16>,
                   Case<daedalus::DeepSeekV2Lite, daedalus::bfloat16, 64>,
                   Case<daedalus::DeepSeekV2Lite, Fp8E4m3Latent, 64>) {
  using C = typename T::C;
  using Storage = typename T::Storage;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const std::vector<index_t> lengths = {150, 0, 70};
  const HandPool<C, Storage, T::block> pool(lengths, 2, 620);
  const double scale = mla::softmax_scale<C>();
  for (index_t q_len : {1, 3}) {
    CAPTURE(q_len);
    const std::vector<float> q = random_queries<C>(pool.batch(), q_len, 621 + std::uint64_t(q_len));
    const std::vector<float> out = paged_absorbed(CpuBackend(2), pool.view(), q, q_len);
    for (index_t b = 0; b < pool.batch(); ++b) {
      const index_t len = pool.seqlens[std::size_t(b)];
      CAPTURE(b);
      const std::vector<float> qb = dt::slice_rows(q, b * q_len * H, (b + 1) * q_len * H, D);
      const std::vector<float> got = dt::slice_rows(out, b * q_len * H, (b + 1) * q_len * H, R);
      if (len == 0) {
        CHECK(std::all_of(got.begin(), got.end(), [](float v) { return v == 0.0f; }));
        continue;
      }
      // Against the rows the pool holds: the kernel's own fp32 error (plus, with the bf16
      // kernels, the rounding of q and p to bf16: tolerance::cache_effect, as the contiguous
      // bf16 tests allow).
      const std::vector<double> want =
          mla_reference::latent_attention(int(H), int(R), int(D), dt::widen(qb), int(q_len),
                                          dt::widen(pool.stored[std::size_t(b)]), int(len), scale);
      const double bound =
          tol::fp32_vs_reference(std::max(D, len)) +
          (bf16_arithmetic<C, Storage>() ? tol::cache_effect<daedalus::bfloat16>() : 0.0);
      CHECK(tol::row_relative_error(got, want, R) <= bound);
      // Against the rows before storage, within what the storage's rounding can move the result.
      CHECK(excess_over_storage_bound<C, Storage>(got, qb, q_len, pool.original[std::size_t(b)],
                                                  len, scale) <= 0.0);
    }
  }
}

TEST_CASE("split-KV over a paged pool: pieces fixed by the length, merged to the fp64 result") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  using Impl = daedalus::mla::detail::MlaImpl<C, CpuBackend>;
  using Traits = daedalus::mla::CpuAttentionTraits;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  // One long sequence (1500 tokens: 12 key blocks, the last one partial) is cut into pieces of
  // at least split_min_blocks blocks whatever the thread count, merged by log-sum-exp.
  const std::vector<index_t> lengths = {1500};
  const HandPool<C, float, 16> pool(lengths, 1, 630);
  const auto view = pool.view();
  const double scale = mla::softmax_scale<C>();
  for (index_t q_len : {1, 2}) {
    CAPTURE(q_len);
    index_t partial_slots = 0;
    const auto items = Impl::plan_absorbed(
        daedalus::mla::detail::PagedLatentRows<C, float, 16>(view), q_len, partial_slots);
    const index_t blocks = (lengths[0] + Traits::key_block - 1) / Traits::key_block;
    CHECK(index_t(items.size()) ==
          (blocks + Traits::split_min_blocks - 1) / Traits::split_min_blocks);
    CHECK(partial_slots == index_t(items.size()));
    const std::vector<float> q = random_queries<C>(1, q_len, 631 + std::uint64_t(q_len));
    const std::vector<float> one = paged_absorbed(CpuBackend(1), view, q, q_len);
    const std::vector<double> want =
        mla_reference::latent_attention(int(H), int(R), int(D), dt::widen(q), int(q_len),
                                        dt::widen(pool.stored[0]), int(lengths[0]), scale);
    CHECK(tol::row_relative_error(one, want, R) <= tol::fp32_vs_reference(lengths[0]));
    for (int threads : {2, 3, 4}) {
      CAPTURE(threads);
      CHECK(dt::same_bits(paged_absorbed(CpuBackend(threads), view, q, q_len), one));
    }
  }
}

TEST_CASE("zero-length sequences give zeros and leave their neighbours as they are alone") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const std::vector<index_t> lengths = {0, 200, 0, 0, 33};
  const HandPool<C, float, 16> pool(lengths, 0, 640);
  const std::vector<float> q = random_queries<C>(pool.batch(), 1, 641);
  const std::vector<float> out = paged_absorbed(CpuBackend(2), pool.view(), q, 1);
  for (index_t b = 0; b < pool.batch(); ++b) {
    CAPTURE(b);
    const std::vector<float> got = dt::slice_rows(out, b * H, (b + 1) * H, R);
    if (lengths[std::size_t(b)] == 0) {
      CHECK(std::all_of(got.begin(), got.end(), [](float v) { return v == 0.0f; }));
      continue;
    }
    // The entry alone in a one-entry view of the same pool (its own row of the table).
    const PagedLatentView<C, float, 16> alone{
        pool.pool.data(), pool.num_blocks,
        HostView<const std::int32_t, 2>(pool.table.data() + b * pool.max_blocks,
                                        {1, pool.max_blocks}),
        HostView<const std::int32_t, 1>(pool.seqlens.data() + b, {1})};
    const std::vector<float> want =
        paged_absorbed(CpuBackend(2), alone, dt::slice_rows(q, b * H, (b + 1) * H, D), 1);
    CHECK(tol::row_relative_error(got, want, R) <= tol::fp32_vs_fp32(std::max(D, index_t(200))));
  }
  // A batch of nothing but empty sequences, and an empty batch.
  const HandPool<C, float, 16> empty({0, 0}, 1, 642);
  const std::vector<float> out_empty =
      paged_absorbed(CpuBackend(2), empty.view(), dt::slice_rows(q, 0, 2 * H, D), 1);
  CHECK(std::all_of(out_empty.begin(), out_empty.end(), [](float v) { return v == 0.0f; }));
  const HandPool<C, float, 16> none({}, 1, 643);
  CHECK(paged_absorbed(CpuBackend(2), none.view(), {}, 1).empty());
}

TEST_CASE_TEMPLATE("paged naive attention matches the fp64 up-projection over the stored rows", T,
                   Case<daedalus::Tiny, float, 16>, Case<daedalus::Tiny, Fp8E4m3Latent, 7>) {
  using C = typename T::C;
  using Storage = typename T::Storage;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, QK = S::qk_head_dim, VD = S::v_head_dim;
  const std::vector<index_t> lengths = {140, 3, 60};
  const HandPool<C, Storage, T::block> pool(lengths, 2, 650);
  const auto& model = dt::SharedModel<C>::get();
  const double scale = mla::softmax_scale<C>();
  const index_t batch = pool.batch(), q_len = 2;
  const std::vector<float> q = dt::Random(651).uniform(std::size_t(batch * q_len * H * QK), 4.0);
  std::vector<float> out(std::size_t(batch * q_len * H * VD), -1.0f);
  mla::naive_attention(CpuBackend(2), model.weights, pool.view(),
                       HostView<const float, 4>(q.data(), {batch, q_len, H, QK}), scale,
                       HostView<float, 4>(out.data(), {batch, q_len, H, VD}));
  for (index_t b = 0; b < batch; ++b) {
    CAPTURE(b);
    const index_t len = pool.seqlens[std::size_t(b)];
    const std::vector<double> want = mla_reference::naive_attention(
        dt::reference_sizes<C>(), model.reference,
        dt::widen(dt::slice_rows(q, b * q_len * H, (b + 1) * q_len * H, QK)), int(q_len),
        dt::widen(pool.stored[std::size_t(b)]), int(len), scale);
    CHECK(tol::row_relative_error(dt::slice_rows(out, b * q_len * H, (b + 1) * q_len * H, VD), want,
                                  VD) <=
          tol::fp32_vs_reference(std::max<index_t>(S::latent_dim, len)));
  }
}

TEST_CASE("the table-driven fp8 widening equals LatentRowFormat::decode bit for bit") {
  using C = daedalus::DeepSeekV2Lite;
  using F = LatentRowFormat<C, Fp8E4m3Latent>;
  constexpr index_t D = MlaShape<C>::latent_dim;
  constexpr index_t n = 9;
  std::vector<float> rows = dt::Random(660).uniform(std::size_t(n * D), 3.0);
  rows[5] = 1e-30f;  // far below its tile's amax: a subnormal code
  std::fill(rows.begin() + D + 128, rows.begin() + D + 256, 1e-3f);  // a flat tile
  std::vector<std::byte> stored(std::size_t(n) * F::row_bytes);
  for (index_t t = 0; t < n; ++t) F::encode(rows.data() + t * D, stored.data() + t * F::row_bytes);
  std::vector<float> want(std::size_t(n * D)), got(std::size_t(n * D));
  for (index_t t = 0; t < n; ++t) F::decode(stored.data() + t * F::row_bytes, want.data() + t * D);
  daedalus::mla::detail::LatentRowDecoder<C, Fp8E4m3Latent>::decode(
      stored.data(), n, index_t(F::row_bytes), got.data());
  CHECK(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0);
}

TEST_CASE("a paged view that points outside the pool is refused and nothing is written") {
  using C = daedalus::Tiny;
  using S = MlaShape<C>;
  constexpr index_t H = S::n_heads, D = S::latent_dim, R = S::kv_lora_rank;
  const std::vector<index_t> lengths = {40, 20};
  HandPool<C, float, 16> pool(lengths, 1, 670);
  const index_t batch = 2;
  const std::vector<float> q = random_queries<C>(batch, 1, 671);
  std::vector<float> out(std::size_t(batch * H * R), -3.0f);
  const auto run = [&](const PagedLatentView<C, float, 16>& v) {
    mla::absorbed_attention(CpuBackend(2), v, HostView<const float, 4>(q.data(), {batch, 1, H, D}),
                            mla::softmax_scale<C>(),
                            HostView<float, 4>(out.data(), {batch, 1, H, R}));
  };
  const auto untouched = [&] {
    return std::all_of(out.begin(), out.end(), [](float v) { return v == -3.0f; });
  };
  const std::size_t last_used = std::size_t(1 * pool.max_blocks + 1);  // entry [1, 1]
  const std::int32_t saved = pool.table[last_used];

  pool.table[last_used] = std::int32_t(pool.num_blocks);  // one past the pool
  CHECK_THROWS_WITH_AS(run(pool.view()),
                       doctest::Contains(doctest::String(
                           ("'block_table[1,1]' is " + std::to_string(pool.num_blocks)).c_str())),
                       daedalus::OutOfRange);
  CHECK(untouched());
  pool.table[last_used] = -1;  // a used entry marked unused
  CHECK_THROWS_AS(run(pool.view()), daedalus::OutOfRange);
  CHECK(untouched());
  pool.table[last_used] = saved;

  pool.seqlens[0] = -1;
  CHECK_THROWS_WITH_AS(run(pool.view()), doctest::Contains("'cache_seqlens[0]' is -1"),
                       daedalus::OutOfRange);
  pool.seqlens[0] = std::int32_t(pool.max_blocks * 16 + 1);  // more than the table can hold
  CHECK_THROWS_AS(run(pool.view()), daedalus::OutOfRange);
  CHECK(untouched());
  pool.seqlens[0] = 40;

  // block_table and cache_seqlens disagree on the batch; q has the wrong batch.
  auto bad = pool.view();
  bad.block_table = HostView<const std::int32_t, 2>(pool.table.data(), {1, pool.max_blocks});
  CHECK_THROWS_WITH_AS(run(bad), doctest::Contains("'block_table' has extents"),
                       daedalus::InvalidArgument);
  std::vector<float> q3(std::size_t(3 * H * D), 0.5f);
  CHECK_THROWS_AS(mla::absorbed_attention(
                      CpuBackend(2), pool.view(), HostView<const float, 4>(q3.data(), {3, 1, H, D}),
                      mla::softmax_scale<C>(), HostView<float, 4>(out.data(), {batch, 1, H, R})),
                  daedalus::InvalidArgument);
  auto no_pool = pool.view();
  no_pool.pool = nullptr;
  CHECK_THROWS_AS(run(no_pool), daedalus::InvalidArgument);
  CHECK(untouched());

  // The restored view runs, and entries past a sequence's last block are never looked at.
  run(pool.view());
  CHECK(std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }));
}
