// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <type_traits>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/kv_cache/fp8.hpp"

namespace daedalus {

/// Storage tag for a latent cache row quantised as FlashMLA's fp8 path stores it: the
/// kv_lora_rank latent values as e4m3 with one fp32 scale per 128-wide tile, then k_pe in bf16
/// (512 + 4·4 + 64·2 = 656 bytes for DeepSeek). k_pe stays 16-bit because the rotary part carries
/// the position signal and is only 64 of the 576 values.
struct Fp8E4m3Latent {
  /// Latent values that share one scale.
  static constexpr int tile_width = 128;
};

/// True for the storage types whose cache rows are a plain array of latent_dim values that the
/// fp32 and bf16 kernels read directly.
template <class S>
concept PlainLatentStorage =
    std::same_as<S, float> || std::same_as<S, bfloat16> || std::same_as<S, half>;

/// A storage type a latent cache row can have: one of the plain types or Fp8E4m3Latent.
template <class S>
concept LatentStorage = PlainLatentStorage<S> || std::same_as<S, Fp8E4m3Latent>;

/// How one cached token (the normed latent c, kv_lora_rank values, then the rotated k_pe,
/// qk_rope_head_dim values; DeepSeek-V2 paper, section 2.1.2) is laid out in `row_bytes` bytes
/// of a paged pool, and how fp32 rows are converted to and from it.
///
///   - `row_bytes`: bytes per row (576·sizeof(Storage) for DeepSeek's plain types, 656 for fp8)
///   - `encode(row, dst)`: writes the fp32 row [latent_dim] to dst [row_bytes]; every value of
///     `row` must be finite (the caches check before they encode anything)
///   - `decode(src, row)`: widens the stored row [row_bytes] to fp32 [latent_dim]
///   - `is_plain`: the row is `Storage[latent_dim]`, readable in place
template <MlaConfig C, class Storage>
struct LatentRowFormat {
  static_assert(LatentStorage<Storage>,
                "daedalus::LatentRowFormat: a latent cache stores float, bfloat16, half or "
                "Fp8E4m3Latent");
};

/// fp32, bf16 and fp16 rows: latent_dim values of Storage, each rounded to nearest even.
template <MlaConfig C, PlainLatentStorage Storage>
struct LatentRowFormat<C, Storage> {
  using element_type = Storage;
  static constexpr bool is_plain = true;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr std::size_t row_bytes = std::size_t(latent_dim) * sizeof(Storage);
  static constexpr const char* name = StorageTraits<Storage>::name;

  static void encode(const float* row /* [latent_dim] */, std::byte* dst /* [row_bytes] */) {
    Storage* out = reinterpret_cast<Storage*>(dst);
    for (int i = 0; i < latent_dim; ++i) out[i] = from_float<Storage>(row[i]);
  }
  static void decode(const std::byte* src /* [row_bytes] */, float* row /* [latent_dim] */) {
    const Storage* in = reinterpret_cast<const Storage*>(src);
    for (int i = 0; i < latent_dim; ++i) row[i] = to_float(in[i]);
  }
};

/// fp8 rows, FlashMLA's layout: [kv_lora_rank e4m3 | num_tiles fp32 scales | rope bf16].
///
/// Scale of tile t (latent values [128·t, min(128·t + 128, kv_lora_rank))): s = amax / 448, so
/// the tile's largest magnitude maps to e4m3's largest finite value (an all-zero tile gets s = 1).
/// Each value is stored as e4m3(x / s), rounded to nearest even, and read back as e4m3 · s.
///
/// Error bound (what tests/kv_cache/storage_test.cpp checks): for a latent value x of a tile with
/// scale s, |read − x| ≤ 2^-4·|x| + 2^-10·s + 2^-21·|x|. The first term is half an ulp at 3
/// mantissa bits for the normal range, the second half the subnormal spacing (2^-9, times s), the
/// third the fp32 roundings of x / s and e4m3 · s. Since |x| ≤ amax = 448·s, every value is
/// within about 2^-4 of its tile's amax; values near the amax keep about 2^-4 relative accuracy,
/// values far below it (past 2^-6·amax) only the absolute 2^-10·s. k_pe is rounded to bf16:
/// |read − x| ≤ 2^-8·|x|.
template <MlaConfig C>
struct LatentRowFormat<C, Fp8E4m3Latent> {
  using element_type = Fp8E4m3;
  static constexpr bool is_plain = false;
  static constexpr int latent_dim = MlaShape<C>::latent_dim;
  static constexpr int kv_lora_rank = MlaShape<C>::kv_lora_rank;
  static constexpr int rope_dim = MlaShape<C>::rope;
  static constexpr int tile_width = Fp8E4m3Latent::tile_width;
  static constexpr int num_tiles = (kv_lora_rank + tile_width - 1) / tile_width;
  /// Byte offsets of the three parts of a row.
  static constexpr std::size_t scales_offset = std::size_t(kv_lora_rank);
  static constexpr std::size_t rope_offset = scales_offset + sizeof(float) * num_tiles;
  static constexpr std::size_t row_bytes = rope_offset + sizeof(bfloat16) * rope_dim;
  static constexpr const char* name = "fp8 e4m3 (+bf16 k_pe)";

  /// The bounds documented above, as numbers the tests and reports use.
  static constexpr double latent_relative_bound = Fp8E4m3::unit_roundoff;        // 2^-4
  static constexpr double latent_scale_bound = Fp8E4m3::subnormal_half_spacing;  // 2^-10
  static constexpr double latent_fp32_slack = 0x1p-21;
  static constexpr double rope_relative_bound = StorageTraits<bfloat16>::unit_roundoff;  // 2^-8

  static void encode(const float* row /* [latent_dim] */, std::byte* dst /* [row_bytes] */) {
    for (int t = 0; t < num_tiles; ++t) {
      const int begin = t * tile_width;
      const int end = std::min(begin + tile_width, kv_lora_rank);
      float amax = 0.0f;
      for (int i = begin; i < end; ++i) amax = std::max(amax, std::abs(row[i]));
      // A tile whose amax is so small that amax / 448 underflows to zero is stored as zeros
      // (its values are below 448 times the smallest fp32 subnormal).
      const bool zero_tile = !(amax / Fp8E4m3::max_finite > 0.0f);
      const float scale = zero_tile ? 1.0f : amax / Fp8E4m3::max_finite;
      for (int i = begin; i < end; ++i) {
        const Fp8E4m3 code = zero_tile ? Fp8E4m3{} : Fp8E4m3::from_float(row[i] / scale);
        dst[i] = std::byte{code.bits};
      }
      std::memcpy(dst + scales_offset + sizeof(float) * t, &scale, sizeof(float));
    }
    for (int i = 0; i < rope_dim; ++i) {
      const bfloat16 value = from_float<bfloat16>(row[kv_lora_rank + i]);
      std::memcpy(dst + rope_offset + sizeof(bfloat16) * i, &value, sizeof(bfloat16));
    }
  }

  static void decode(const std::byte* src /* [row_bytes] */, float* row /* [latent_dim] */) {
    for (int t = 0; t < num_tiles; ++t) {
      const float scale = tile_scale(src, t);
      const int end = std::min((t + 1) * tile_width, kv_lora_rank);
      for (int i = t * tile_width; i < end; ++i)
        row[i] = Fp8E4m3{std::to_integer<std::uint8_t>(src[i])}.to_float() * scale;
    }
    for (int i = 0; i < rope_dim; ++i) {
      bfloat16 value;
      std::memcpy(&value, src + rope_offset + sizeof(bfloat16) * i, sizeof(bfloat16));
      row[kv_lora_rank + i] = to_float(value);
    }
  }

  /// The scale of tile `tile` of a stored row.
  static float tile_scale(const std::byte* src /* [row_bytes] */, int tile) {
    float scale;
    std::memcpy(&scale, src + scales_offset + sizeof(float) * tile, sizeof(float));
    return scale;
  }
};

}  // namespace daedalus
