// SPDX-License-Identifier: Apache-2.0
#pragma once

// Test bodies of the GPU absorbed decode (mla/cuda/absorbed_decode.cuh), shared by the device
// test binary (nvcc, a real GPU) and the emulated one (g++, emulation/): the
// same pools, references and tolerances.
//
// Data. A paged pool built by hand as FlashMLA's tests build theirs: block ids drawn from a
// shuffled permutation, every byte first set to 0xFF (NaN in bf16 and fp16), then each
// sequence's rows encoded into its blocks; so rows past a sequence's end in its last block and
// whole unused blocks are NaN, and a kernel that reads one shows it. Table entries past a
// sequence's last block hold -1 or 2^30 (never read). The contiguous form holds the same rows at
// row offsets with a NaN gap between sequences. Queries are scaled so that scores spread over a
// few units (a peaked softmax), as in the CPU tests.
//
// References. (1) An fp64 computation written here, from the rows the pool holds and the query
// rounded to the storage type as the kernel rounds it (attention.hpp): the remaining differences
// are the kernel's own roundings. (2) The CPU backend's mla::absorbed_attention over a host
// PagedLatentView of the same pool.
//
// Tolerance of (1), per output row r, derived from the kernel's operations (Higham's γ_K =
// 1.01·K·u for fp32 sums):
//   - each probability is rounded to the storage type: relative u_s (2^-8 bf16, 2^-11 fp16; fp16
//     probabilities below 2^-14 are subnormal, absolute 2^-25 against a row sum ≥ 1, since the
//     running maximum gives a 1);
//   - each fp32 score q̃·k errs by δ ≤ γ_D·Σ_j|q̃_j k_j| (times the scale), which moves its weight
//     by a factor e^{±δ};
//   - the normalised weights then err by at most 2·(u_s + 2δ) relative, and split pieces merged
//     by their log-sum-exp add as much again; the value sums (n terms) add γ_n.
//   So |o - o_ref| ≤ max_t|v_t| · (5·u_s + 8·δ + 2·γ_n) + n·2^-24·max|v| for fp16: rigorous, far
//   below a wrong mask, row, column or scale in the cases here, which move outputs by ~0.1-1
//   times the row's magnitude on these short contexts.
// The CPU backend may run fp32 kernels (no AVX512-BF16, or fp16 pools), i.e. without rounding q:
// against it the bound adds the query's rounding, a score shift of at most u_s·Σ|q_j k_j|·scale,
// which moves the weights by 2× that (doubled for both sides).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <daedalus/cuda.cuh>
#include <daedalus/mla/cuda/absorbed_decode.cuh>
#include <numeric>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/random.hpp"

namespace daedalus::testing::decode_checks {

/// 16 heads over DeepSeek's 512 + 64 latent (V2-Lite's attention, named for what it tests).
struct Latent576Heads16 : daedalus::DeepSeekYarnDefaults {
  static constexpr const char* name = "Latent576Heads16";
  static constexpr int dim = 256;
  static constexpr int n_heads = 16;
  static constexpr int q_lora_rank = 0;
  static constexpr double mscale = 0.707;
};

/// Tiny's latent (40 + 8: not a multiple of the 16-wide k-steps or the 64-wide tiles) with 40
/// heads, so that q_len 2 gives 80 folded rows: two tiles of 64 rows, the second partial.
struct TinyWide : daedalus::Tiny {
  static constexpr const char* name = "TinyWide";
  static constexpr int n_heads = 40;
};

template <class Storage>
constexpr double unit_roundoff() {
  return std::is_same_v<Storage, daedalus::bfloat16> ? 0x1p-8 : 0x1p-11;
}

/// One warp: loads fragments of a 16×24 tile of codes (element (r, c) holds r·32 + c, exact in
/// bf16 and fp16) from shared memory with the ldmatrix loaders and with the per-lane loaders,
/// and counts, per lane, the registers that differ. The tile's leading dimension is 24 (16-byte
/// rows, as the loaders require) and the second B tile starts at column 8.
template <class T>
__global__ void ldmatrix_agreement(const T* codes /* [16, 24] */, int* mismatches /* [32] */) {
  __shared__ __align__(16) T tile[16 * 24];
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = lane; e < 16 * 24; e += 32) tile[e] = codes[e];
  __syncwarp();
  int wrong = 0;
  const auto a = cuda::load_fragment_a(tile + 8, 24, lane);
  const auto a4 = cuda::load_fragment_a_x4(tile + 8, 24, lane);
  for (int i = 0; i < 4; ++i) wrong += a.reg[i] != a4.reg[i];
  const auto bt = cuda::load_fragments_b_transposed_x4(tile + 8, 24, lane);
  for (int n = 0; n < 2; ++n) {
    const auto one = cuda::load_fragment_b_transposed(tile + 8 + n * 8 * 24, 24, lane);
    for (int i = 0; i < 2; ++i) wrong += one.reg[i] != bt.tile[n].reg[i];
  }
  const auto b = cuda::load_fragments_b_x4(tile + 8, 24, lane);
  for (int n = 0; n < 2; ++n) {
    const auto one = cuda::load_fragment_b(tile + 8 + n * 8, 24, lane);
    for (int i = 0; i < 2; ++i) wrong += one.reg[i] != b.tile[n].reg[i];
  }
  mismatches[lane] = wrong;
}

/// The ldmatrix fragment loaders (mma.cuh) give the registers of the per-lane loaders, whose
/// layout the kernel checks of tests/cuda/cases/kernel_checks.hpp pin to the PTX ISA.
template <class Storage>
void check_ldmatrix_loaders(const CudaBackend& backend) {
  std::vector<Storage> codes(16 * 24);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 24; ++c)
      codes[std::size_t(r * 24 + c)] = daedalus::from_float<Storage>(float(r * 32 + c));
  const auto d_codes = cuda::to_device(backend, codes);
  cuda::DeviceBuffer<int> d_mismatches(32);
  cuda::launch(backend, {dim3(1), dim3(32)}, &ldmatrix_agreement<cuda::device_storage_t<Storage>>,
               d_codes.data(), d_mismatches.data());
  const std::vector<int> mismatches = cuda::to_host(backend, d_mismatches);
  CHECK(std::accumulate(mismatches.begin(), mismatches.end(), 0) == 0);
}

/// A paged pool filled by hand, its device copies, and the same rows in a contiguous pool.
template <class C, class Storage, int BS>
struct DecodePool {
  using Format = LatentRowFormat<C, Storage>;
  static constexpr int D = MlaShape<C>::latent_dim;

  index_t num_blocks = 0, max_blocks = 0;
  std::vector<std::byte> pool;           // [num_blocks, BS, row_bytes]
  std::vector<std::int32_t> table;       // [batch, max_blocks]
  std::vector<std::int32_t> seqlens;     // [batch]
  std::vector<std::vector<float>> rows;  // per entry [len, D]: what the pool holds, widened
  std::vector<std::byte> contiguous;     // rows of every entry, a NaN row between entries
  std::vector<std::int64_t> first_row;   // [batch]

  cuda::DeviceBuffer<std::byte> d_pool, d_contiguous;
  cuda::DeviceBuffer<std::int32_t> d_table, d_seqlens;
  cuda::DeviceBuffer<std::int64_t> d_first_row;

  DecodePool(const CudaBackend& backend, const std::vector<int>& lengths, index_t spare_blocks,
             std::uint64_t offset) {
    Random random(offset);
    const index_t batch = index_t(lengths.size());
    index_t used = 0;
    for (int len : lengths) {
      max_blocks = std::max<index_t>(max_blocks, (len + BS - 1) / BS);
      used += (len + BS - 1) / BS;
    }
    max_blocks += 1;
    num_blocks = used + spare_blocks;
    pool.assign(std::size_t(num_blocks) * BS * Format::row_bytes, std::byte{0xFF});
    std::vector<std::int32_t> ids(static_cast<std::size_t>(num_blocks));
    std::iota(ids.begin(), ids.end(), 0);
    for (std::size_t i = ids.size(); i > 1; --i)
      std::swap(ids[i - 1], ids[std::size_t(random.integer(0, index_t(i) - 1))]);
    table.assign(std::size_t(batch * max_blocks), -1);
    std::size_t next = 0;
    std::int64_t contiguous_rows = 0;
    for (index_t b = 0; b < batch; ++b) {
      const index_t len = lengths[std::size_t(b)];
      seqlens.push_back(std::int32_t(len));
      first_row.push_back(contiguous_rows);
      contiguous_rows += len + 1;  // one poisoned row after each entry
      const std::vector<float> original = random.uniform(std::size_t(len * D));
      rows.emplace_back(std::size_t(len * D));
      const index_t blocks = (len + BS - 1) / BS;
      for (index_t j = 0; j < blocks; ++j) table[std::size_t(b * max_blocks + j)] = ids[next++];
      if (b % 2 == 1) table[std::size_t(b * max_blocks + blocks)] = 1 << 30;  // never read
      for (index_t t = 0; t < len; ++t) {
        std::byte* row =
            pool.data() +
            (std::size_t(table[std::size_t(b * max_blocks + t / BS)]) * BS + std::size_t(t % BS)) *
                Format::row_bytes;
        Format::encode(original.data() + t * D, row);
        Format::decode(row, rows.back().data() + t * D);
      }
    }
    contiguous.assign(std::size_t(contiguous_rows) * Format::row_bytes, std::byte{0xFF});
    for (index_t b = 0; b < batch; ++b)
      for (index_t t = 0; t < seqlens[std::size_t(b)]; ++t)
        Format::encode(
            rows[std::size_t(b)].data() + t * D,
            contiguous.data() + std::size_t(first_row[std::size_t(b)] + t) * Format::row_bytes);
    d_pool = cuda::to_device(backend, pool);
    d_contiguous = cuda::to_device(backend, contiguous);
    d_table = cuda::to_device(backend, table);
    d_seqlens = cuda::to_device(backend, seqlens);
    d_first_row = cuda::to_device(backend, first_row);
  }

  [[nodiscard]] index_t batch() const { return index_t(seqlens.size()); }

  [[nodiscard]] cuda::DeviceLatentBatch<cuda::PagedRowAddress> paged() const {
    return {d_pool.data(), Format::row_bytes,
            cuda::PagedRowAddress{d_table.data(), int(max_blocks), BS}, d_seqlens.data(),
            int(batch())};
  }
  [[nodiscard]] cuda::DeviceLatentBatch<cuda::ContiguousRowAddress> contiguous_batch() const {
    return {d_contiguous.data(), Format::row_bytes, cuda::ContiguousRowAddress{d_first_row.data()},
            d_seqlens.data(), int(batch())};
  }
  [[nodiscard]] PagedLatentView<C, Storage, BS> host_view() const {
    return {pool.data(), num_blocks,
            HostView<const std::int32_t, 2>(table.data(), {batch(), max_blocks}),
            HostView<const std::int32_t, 1>(seqlens.data(), {batch()})};
  }
  [[nodiscard]] PagedLatentView<C, Storage, BS, DeviceMemory> device_view() const {
    return {d_pool.data(), num_blocks,
            TensorView<const std::int32_t, 2, DeviceMemory>(d_table.data(), {batch(), max_blocks}),
            TensorView<const std::int32_t, 1, DeviceMemory>(d_seqlens.data(), {batch()})};
  }
};

/// The fp64 absorbed attention of one entry and its rigorous error bound (header comment).
struct ReferenceRows {
  std::vector<double> out;        // [rows_per_seq, V]
  std::vector<double> bound;      // [rows_per_seq]: absolute bound of the kernel against `out`
  std::vector<double> cpu_bound;  // [rows_per_seq]: against the CPU backend (-1: not compared)
};

template <class C, class Storage>
ReferenceRows reference_rows(const std::vector<float>& q /* [rows_per_seq, D], fp32 */,
                             const std::vector<float>& rows /* [len, D] */, int len, int q_len,
                             double scale) {
  using S = MlaShape<C>;
  constexpr int D = S::latent_dim, V = S::kv_lora_rank, H = S::n_heads;
  const double u = unit_roundoff<Storage>();
  const int rows_per_seq = q_len * H;
  ReferenceRows ref{std::vector<double>(std::size_t(rows_per_seq) * V, 0.0),
                    std::vector<double>(std::size_t(rows_per_seq), 0.0),
                    std::vector<double>(std::size_t(rows_per_seq), 0.0)};
  std::vector<double> score(static_cast<std::size_t>(std::max(len, 1)));
  for (int r = 0; r < rows_per_seq; ++r) {
    const int visible = std::min(len, len - q_len + r / H + 1);
    if (visible <= 0) {
      // Sees no key: zeros, exactly, against the fp64 reference. Not compared with the CPU
      // backend, whose portable (non-AVX-512) build returns inf for such rows of a bf16 pool.
      ref.cpu_bound[std::size_t(r)] = -1.0;
      continue;
    }
    double top = -INFINITY, max_dot_magnitude = 0.0, max_value = 0.0;
    for (int t = 0; t < visible; ++t) {
      double dot = 0.0, magnitude = 0.0;
      for (int j = 0; j < D; ++j) {
        // The kernel rounds the query to the storage type (attention.hpp).
        const double qj =
            double(daedalus::to_float(daedalus::from_float<Storage>(q[std::size_t(r) * D + j])));
        const double kj = rows[std::size_t(t) * D + j];
        dot += qj * kj;
        magnitude += std::abs(qj * kj);
      }
      score[std::size_t(t)] = dot * scale;
      top = std::max(top, score[std::size_t(t)]);
      max_dot_magnitude = std::max(max_dot_magnitude, magnitude * scale);
      for (int j = 0; j < V; ++j)
        max_value = std::max(max_value, std::abs(double(rows[std::size_t(t) * D + j])));
    }
    double sum = 0.0;
    for (int t = 0; t < visible; ++t)
      sum += (score[std::size_t(t)] = std::exp(score[std::size_t(t)] - top));
    for (int t = 0; t < visible; ++t)
      for (int j = 0; j < V; ++j)
        ref.out[std::size_t(r) * V + j] +=
            score[std::size_t(t)] / sum * rows[std::size_t(t) * D + j];
    const double gamma_d = 1.01 * D * 0x1p-24, gamma_n = 1.01 * visible * 0x1p-24;
    const double delta = gamma_d * max_dot_magnitude;
    double bound = max_value * (5.0 * u + 8.0 * delta + 2.0 * gamma_n);
    if constexpr (std::is_same_v<Storage, daedalus::half>) bound += visible * 0x1p-24 * max_value;
    ref.bound[std::size_t(r)] = bound;
    ref.cpu_bound[std::size_t(r)] = 2.0 * bound + 4.0 * u * max_dot_magnitude * max_value;
  }
  return ref;
}

/// Largest |got - expected| / bound over the rows of an entry; ≤ 1 passes. Rows that see no key
/// must be exactly zero (a bound of 0); rows with a negative bound are not compared.
inline double worst_ratio(const float* got, const std::vector<double>& expected,
                          const std::vector<double>& bound, int v) {
  double worst = 0.0;
  for (std::size_t r = 0; r < bound.size(); ++r) {
    for (int j = 0; j < v; ++j) {
      const double diff = std::abs(double(got[r * std::size_t(v) + std::size_t(j)]) -
                                   expected[r * std::size_t(v) + std::size_t(j)]);
      if (bound[r] < 0.0) continue;  // not compared
      double ratio = 0.0;
      if (std::isnan(diff) || (bound[r] == 0.0 && diff != 0.0))
        ratio = INFINITY;
      else if (bound[r] > 0.0)
        ratio = diff / bound[r];
      worst = std::max(worst, ratio);
    }
  }
  return worst;
}

/// Runs the GPU decode over `batch` (paged or contiguous); the output starts as NaN so that every
/// element the kernels leave unwritten shows.
template <class C, class Storage, class Address>
std::vector<float> run_decode(const CudaBackend& backend,
                              const cuda::DeviceLatentBatch<Address>& batch, int q_len,
                              const cuda::DeviceBuffer<float>& q, double scale,
                              mla::cuda::AbsorbedDecodeWorkspace& workspace) {
  using S = MlaShape<C>;
  cuda::DeviceBuffer<float> out(std::size_t(batch.batch) * q_len * S::n_heads * S::kv_lora_rank);
  DAEDALUS_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xFF, out.bytes(), backend.stream()));
  mla::cuda::absorbed_decode<C, Storage>(backend, batch, q_len, q.data(), float(scale), out.data(),
                                         workspace);
  return cuda::to_host(backend, out);
}

/// One decode batch: the GPU kernel (paged with several split settings, and contiguous) against
/// the fp64 reference and the CPU backend; split against unsplit; the split counts the schedule
/// reports. `forced_parts` must split at least one entry.
template <class C, class Storage, int BS>
void check_absorbed_decode(const CudaBackend& backend, const std::vector<int>& lengths, int q_len,
                           int forced_parts, std::uint64_t offset) {
  using S = MlaShape<C>;
  constexpr int D = S::latent_dim, V = S::kv_lora_rank, H = S::n_heads;
  CAPTURE(C::name);
  CAPTURE(q_len);
  const DecodePool<C, Storage, BS> pool(backend, lengths, 3, offset);
  const index_t batch = pool.batch();
  const int rows_per_seq = q_len * H;
  const std::vector<float> q =
      Random(offset + 1)
          .uniform(std::size_t(batch) * rows_per_seq * D, 12.0 / std::sqrt(double(D)));
  const auto d_q = cuda::to_device(backend, q);
  const double scale = mla::softmax_scale<C>();

  // The CPU backend on the same pool.
  std::vector<float> cpu_out(std::size_t(batch) * rows_per_seq * V, -7.0f);
  mla::absorbed_attention(CpuBackend{}, pool.host_view(),
                          HostView<const float, 4>(q.data(), {batch, q_len, H, D}), scale,
                          HostView<float, 4>(cpu_out.data(), {batch, q_len, H, V}));

  std::vector<ReferenceRows> refs;
  for (index_t b = 0; b < batch; ++b) {
    const std::vector<float> q_b(q.begin() + std::ptrdiff_t(b * rows_per_seq * D),
                                 q.begin() + std::ptrdiff_t((b + 1) * rows_per_seq * D));
    refs.push_back(reference_rows<C, Storage>(q_b, pool.rows[std::size_t(b)],
                                              pool.seqlens[std::size_t(b)], q_len, scale));
  }
  auto check_against_references = [&](const std::vector<float>& out) {
    for (index_t b = 0; b < batch; ++b) {
      CAPTURE(b);
      CAPTURE(pool.seqlens[std::size_t(b)]);
      const float* got = out.data() + std::size_t(b) * rows_per_seq * V;
      const ReferenceRows& ref = refs[std::size_t(b)];
      CHECK(worst_ratio(got, ref.out, ref.bound, V) <= 1.0);
      std::vector<double> cpu(cpu_out.begin() + std::ptrdiff_t(b * rows_per_seq * V),
                              cpu_out.begin() + std::ptrdiff_t((b + 1) * rows_per_seq * V));
      CHECK(worst_ratio(got, cpu, ref.cpu_bound, V) <= 1.0);
    }
  };

  mla::cuda::AbsorbedDecodeWorkspace unsplit(1), forced(forced_parts), automatic;
  const std::vector<float> out_unsplit =
      run_decode<C, Storage>(backend, pool.paged(), q_len, d_q, scale, unsplit);
  check_against_references(out_unsplit);
  for (std::int32_t splits : unsplit.split_counts(backend)) CHECK(splits <= 1);

  const std::vector<float> out_forced =
      run_decode<C, Storage>(backend, pool.paged(), q_len, d_q, scale, forced);
  check_against_references(out_forced);
  const std::vector<std::int32_t> splits = forced.split_counts(backend);
  REQUIRE(splits.size() == std::size_t(batch));
  CHECK(*std::max_element(splits.begin(), splits.end()) > 1);  // the case really splits
  for (index_t b = 0; b < batch; ++b)
    CHECK((splits[std::size_t(b)] == 0) == (pool.seqlens[std::size_t(b)] == 0));
  // Split == unsplit within the rounding of both (each within `bound` of the reference).
  for (index_t b = 0; b < batch; ++b) {
    const ReferenceRows& ref = refs[std::size_t(b)];
    std::vector<double> unsplit_b(out_unsplit.begin() + std::ptrdiff_t(b * rows_per_seq * V),
                                  out_unsplit.begin() + std::ptrdiff_t((b + 1) * rows_per_seq * V));
    std::vector<double> twice(ref.bound.size());
    for (std::size_t r = 0; r < twice.size(); ++r) twice[r] = 2.0 * ref.bound[r];
    CHECK(worst_ratio(out_forced.data() + std::size_t(b) * rows_per_seq * V, unsplit_b, twice, V) <=
          1.0);
  }

  check_against_references(
      run_decode<C, Storage>(backend, pool.paged(), q_len, d_q, scale, automatic));
  // The contiguous addressing reads the same rows: the same operations, the same bits.
  mla::cuda::AbsorbedDecodeWorkspace forced_again(forced_parts);
  const std::vector<float> out_contiguous =
      run_decode<C, Storage>(backend, pool.contiguous_batch(), q_len, d_q, scale, forced_again);
  CHECK(std::memcmp(out_contiguous.data(), out_forced.data(), out_forced.size() * sizeof(float)) ==
        0);
}

/// validate_on_device against the host check on the same tables: a valid view passes; a bad
/// length and a bad used block id throw OutOfRange with the host's message, word for word.
template <class C, class Storage, int BS>
void check_validate_on_device(const CudaBackend& backend) {
  using Pool = DecodePool<C, Storage, BS>;
  constexpr const char* caller = "daedalus::mla::absorbed_attention";
  Pool pool(backend, {5, 0, 2 * BS + 3, BS}, 2, 901);
  mla::cuda::validate_on_device(backend, pool.device_view(), caller);  // valid: no throw
  auto both_messages = [&](Pool& p) {
    p.d_table = cuda::to_device(backend, p.table);
    p.d_seqlens = cuda::to_device(backend, p.seqlens);
    const std::string host = message_of<OutOfRange>([&] { p.host_view().validate(caller); });
    const std::string device = message_of<OutOfRange>(
        [&] { mla::cuda::validate_on_device(backend, p.device_view(), caller); });
    CHECK(host == device);
    return device;
  };
  {
    Pool bad(backend, {5, 0, 2 * BS + 3, BS}, 2, 901);
    bad.seqlens[2] = std::int32_t(bad.max_blocks * BS + 1);
    bad.seqlens[3] = -1;  // a later bad entry: the first one is named
    const std::string message = both_messages(bad);
    CHECK(contains(message, "'cache_seqlens[2]' is "));
  }
  {
    Pool bad(backend, {5, 0, 2 * BS + 3, BS}, 2, 901);
    bad.table[std::size_t(2 * bad.max_blocks + 2)] = std::int32_t(bad.num_blocks);
    bad.table[std::size_t(3 * bad.max_blocks)] = -5;
    const std::string message = both_messages(bad);
    CHECK(contains(message, "'block_table[2,2]' is "));
  }
  {
    Pool bad(backend, {5, 0, 2 * BS + 3, BS}, 2, 901);
    bad.seqlens[0] = -3;
    CHECK(contains(both_messages(bad), "'cache_seqlens[0]' is -3"));
  }
}

/// absorbed_decode's own argument checks: typed errors naming the argument, output untouched.
template <class C, class Storage, int BS>
void check_decode_bad_arguments(const CudaBackend& backend) {
  using S = MlaShape<C>;
  const DecodePool<C, Storage, BS> pool(backend, {3, 7}, 1, 902);
  const std::vector<float> q(std::size_t(2) * S::n_heads * S::latent_dim, 0.5f);
  const auto d_q = cuda::to_device(backend, q);
  const std::vector<float> sentinel(std::size_t(2) * S::n_heads * S::kv_lora_rank, -7.0f);
  auto d_out = cuda::to_device(backend, sentinel);
  mla::cuda::AbsorbedDecodeWorkspace workspace;
  const std::string q_len_message = message_of<InvalidArgument>([&] {
    mla::cuda::absorbed_decode<C, Storage>(backend, pool.paged(), 0, d_q.data(), 0.1f, d_out.data(),
                                           workspace);
  });
  CHECK(contains(q_len_message, "'q_len' is 0"));
  CHECK(contains(message_of<InvalidArgument>([&] {
                   mla::cuda::absorbed_decode<C, Storage>(
                       backend, pool.paged(), 1 << 30, d_q.data(), 0.1f, d_out.data(), workspace);
                 }),
                 "'q_len' is 1073741824; expected at most "));
  auto no_query = pool.paged();
  CHECK(contains(message_of<InvalidArgument>([&] {
                   mla::cuda::absorbed_decode<C, Storage>(backend, no_query, 1, nullptr, 0.1f,
                                                          d_out.data(), workspace);
                 }),
                 "'q'"));
  auto misaligned = pool.paged();
  misaligned.pool += 2;
  CHECK(contains(message_of<InvalidArgument>([&] {
                   mla::cuda::absorbed_decode<C, Storage>(backend, misaligned, 1, d_q.data(), 0.1f,
                                                          d_out.data(), workspace);
                 }),
                 "'cache.pool' is not 16-byte aligned"));
  auto wrong_rows = pool.paged();
  wrong_rows.row_bytes += 2;
  CHECK(contains(message_of<InvalidArgument>([&] {
                   mla::cuda::absorbed_decode<C, Storage>(backend, wrong_rows, 1, d_q.data(), 0.1f,
                                                          d_out.data(), workspace);
                 }),
                 "'cache.row_bytes' is "));
  CHECK(cuda::to_host(backend, d_out) == sentinel);
  CHECK(
      contains(message_of<InvalidArgument>([] { mla::cuda::AbsorbedDecodeWorkspace negative(-1); }),
               "'parts' is -1"));
}

}  // namespace daedalus::testing::decode_checks
