// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "daedalus/core/macros.hpp"

#if defined(__AVX512F__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#endif

/// Elementary functions whose results are the same bits on every backend. The MoE gate chooses
/// experts by comparing scores; for the CPU and CUDA backends to choose the same experts from the
/// same logits (ties included), the scores must be computed by the same sequence of correctly
/// rounded IEEE operations on both: every multiply-add here is an explicit fma (so no compiler
/// contraction can differ), the rest are single +, *, / and exact bit manipulations. Vectorised
/// code (moe/cpu/gate.hpp) repeats the same operations lane by lane.
namespace daedalus::detail {

/// Coefficients of exp on the reduced range: the Taylor series of e^r to degree 7, evaluated by
/// Horner's rule. For |r| ≤ ln2/2 the truncation error is below r^8/8! ≈ 5e-9 (0.1 ulp); the
/// result is within 2 ulp of e^x over the whole range.
struct ExpConstants {
  static constexpr float log2e = 1.44269504088896341f;
  // ln 2 = ln2_hi + ln2_lo, ln2_hi with 11 trailing zero bits so that n · ln2_hi is exact for
  // |n| < 2^11 (Cody and Waite's reduction).
  static constexpr float ln2_hi = 0.693145751953125f;
  static constexpr float ln2_lo = 1.42860682030941723212e-6f;
  static constexpr float c7 = 1.0f / 5040.0f;
  static constexpr float c6 = 1.0f / 720.0f;
  static constexpr float c5 = 1.0f / 120.0f;
  static constexpr float c4 = 1.0f / 24.0f;
  static constexpr float c3 = 1.0f / 6.0f;
  static constexpr float c2 = 0.5f;
  /// Below min_x the result is 0 (e^x would be near or below FLT_MIN); above max_x it is +inf
  /// (the largest x whose n = round(x / ln 2) is 127, so that 2^n is a normal float).
  static constexpr float min_x = -87.0f;
  static constexpr float max_x = 88.37f;
};

/// e^x in fp32, the same bits on the host and on the device. NaN gives NaN; x > 88.37 gives
/// +inf (the true value is then within a factor 1.4 of FLT_MAX), x < -87 gives 0.
DAEDALUS_HOST_DEVICE inline float exp_f32(float x) {
  using K = ExpConstants;
  if (!(x == x)) return x;  // NaN
  if (x > K::max_x) return INFINITY;
  if (x < K::min_x) return 0.0f;
  // n = round(x / ln 2) (nearest, ties to even): one rounded product, then an exact rounding.
  const float n = rintf(x * K::log2e);
  float r = fmaf(-n, K::ln2_hi, x);
  r = fmaf(-n, K::ln2_lo, r);
  float p = K::c7;
  p = fmaf(p, r, K::c6);
  p = fmaf(p, r, K::c5);
  p = fmaf(p, r, K::c4);
  p = fmaf(p, r, K::c3);
  p = fmaf(p, r, K::c2);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  // 2^n as a float built from its bits (n in [-126, 127] for the clamped range): exact.
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

/// The logistic sigmoid 1 / (1 + e^{-x}) in fp32, the same bits on every backend.
DAEDALUS_HOST_DEVICE inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/// The sum of x[0..n) in the order of a 32-lane warp reduction: lane l first adds x[l], x[l + 32],
/// x[l + 64], ... in turn, then the lanes are combined by the butterfly v_l + v_{l xor o} for
/// o = 16, 8, 4, 2, 1 (what `__shfl_xor_sync` reductions compute; every lane ends with the same
/// bits). The CUDA gate sums softmax terms this way; the CPU gate calls this to get its bits.
inline float warp_order_sum(const float* x, int n) {
  float lanes[32] = {};
  for (int i = 0; i < n; ++i) lanes[i % 32] += x[i];
  for (int offset = 16; offset > 0; offset /= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    for (int l = 0; l < 32; ++l) lanes[l] = next[l];
  }
  return lanes[0];
}

#if defined(__AVX512F__) && !defined(__CUDA_ARCH__)
/// exp_f32 on 16 lanes: the same IEEE operations in the same order (fused multiply-adds, a
/// round to nearest even, an exact power-of-two scaling), hence the same bits in every lane as
/// the scalar function, whatever the data's alignment.
inline __m512 exp_f32(__m512 x) {
  using K = ExpConstants;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(K::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::ln2_lo), r);
  __m512 p = _mm512_set1_ps(K::c7);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::c2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  // Lanes outside [min_x, max_x] compute garbage here and are replaced below.
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(K::max_x), _CMP_GT_OQ),
                         _mm512_set1_ps(INFINITY));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(K::min_x), _CMP_LT_OQ),
                         _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN stays NaN
}

/// sigmoid_f32 on 16 lanes (the same bits as the scalar function).
inline __m512 sigmoid_f32(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_f32(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_div_ps(one, _mm512_add_ps(one, e));
}
#endif

}  // namespace daedalus::detail
