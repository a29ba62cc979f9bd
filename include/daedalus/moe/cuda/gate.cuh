// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/math.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/blas.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/cuda/shared_memory.cuh"
#include "daedalus/moe/gate.hpp"

/// The DeepSeek gate's routing on the GPU (moe/gate.hpp, steps 1-6), fused in one kernel with one
/// warp per token: scores, selection bias, group scores, group limit, top-k and the weights. The
/// scores are computed with daedalus::detail::exp_f32 and the softmax sum in a fixed order, the
/// same operations as the CPU backend, so both choose the same experts from the same logits.
namespace daedalus::moe::detail {

namespace gate_kernels {

/// Warps per block; each warp routes one token at a time.
inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
/// Largest expert count one warp routes from shared memory (DeepSeek-V3 has 256).
inline constexpr int kMaxExperts = 1024;

struct RouteParams {
  const float* logits;  // [tokens, experts]
  const float* bias;    // [experts] or null
  std::int32_t* ids;    // [tokens, k] out
  float* weights;       // [tokens, k] out
  int tokens;
  int experts;
  int groups;
  int limited_groups;
  int k;
  int softmax;         // 1: softmax scores, 0: sigmoid
  int multiplicative;  // 1: selection = score · bias, 0: score + bias
  int normalize;
  float route_scale;
};

/// Sum of the 32 lanes' values in the fixed butterfly order (xor 16, 8, 4, 2, 1): every lane gets
/// the same bits, and the CPU backend reproduces the order (moe/cpu/gate.hpp).
__device__ __forceinline__ float warp_sum_butterfly(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

/// (value desc, id asc): true when candidate a ranks before candidate b.
__device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

/// Shared memory of one warp: the token's scores and selection scores [2, experts], the group
/// scores and kept flags [2, groups], the chosen ids [k].
__host__ __device__ __forceinline__ std::size_t warp_shared_floats(int experts, int groups, int k) {
  return std::size_t(2 * experts + 2 * groups + k);
}

/// Step 1 for one token, by one warp: scores[e] = sigmoid(logits[e]), or the softmax with
/// e^{l - max} summed in lane-strided order per lane (expert lane, lane + 32, ...), then across
/// lanes in butterfly order, times 1 / sum: the order the CPU's warp_order_sum reproduces.
/// Each lane reads only the logits it writes the scores of (after the warp's max), so `scores`
/// may alias `logits`.
__device__ __forceinline__ void warp_token_scores(const float* logits, int experts, int lane,
                                                  bool softmax, float* scores) {
  if (softmax) {
    float max = -INFINITY;
    for (int e = lane; e < experts; e += 32) max = logits[e] > max ? logits[e] : max;
    max = warp_max(max);
    float partial = 0.0f;
    for (int e = lane; e < experts; e += 32) {
      const float x = daedalus::detail::exp_f32(logits[e] - max);
      scores[e] = x;
      partial += x;
    }
    const float inverse = 1.0f / warp_sum_butterfly(partial);
    for (int e = lane; e < experts; e += 32) scores[e] *= inverse;
  } else {
    for (int e = lane; e < experts; e += 32) scores[e] = daedalus::detail::sigmoid_f32(logits[e]);
  }
}

/// Routes tokens warp by warp (shared memory per warp: warp_shared_floats).
// Kernels are templates (`template <int = 0>` where nothing else varies), so that every
// translation unit that includes this header may define them without breaking the ODR.
template <int = 0>
__global__ void __launch_bounds__(kThreads) route_tokens(RouteParams p) {
  float* shared = daedalus::cuda::dynamic_shared_memory<float>();
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float* scores =
      shared + std::int64_t(warp) * std::int64_t(warp_shared_floats(p.experts, p.groups, p.k));
  float* selection = scores + p.experts;
  float* group_score = selection + p.experts;
  float* group_kept = group_score + p.groups;
  auto* chosen = reinterpret_cast<int*>(group_kept + p.groups);
  const int per_group = p.experts / p.groups;
  const bool limit_groups = p.groups > 1 && p.limited_groups < p.groups;
  const float minus_inf = -INFINITY;

  for (int token = static_cast<int>(blockIdx.x) * kWarps + warp; token < p.tokens;
       token += static_cast<int>(gridDim.x) * kWarps) {
    const float* logits = p.logits + std::int64_t(token) * p.experts;
    // Step 1: scores.
    warp_token_scores(logits, p.experts, lane, p.softmax != 0, scores);
    // Step 2: selection scores.
    for (int e = lane; e < p.experts; e += 32) {
      float s = scores[e];
      if (p.bias != nullptr) s = p.multiplicative != 0 ? s * p.bias[e] : s + p.bias[e];
      selection[e] = s;
    }
    __syncwarp();
    // Step 3: group scores (max without a bias, the sum of the two largest with one; equal
    // values count twice) and the n_limited_groups best groups, ties to the lower group.
    if (limit_groups) {
      for (int g = lane; g < p.groups; g += 32) {
        const float* v = selection + std::int64_t(g) * per_group;
        float first = minus_inf, second = minus_inf;
        for (int j = 0; j < per_group; ++j) {
          const float x = v[j];
          if (x > first) {
            second = first;
            first = x;
          } else if (x > second) {
            second = x;
          }
        }
        group_score[g] = p.bias != nullptr && per_group > 1 ? first + second : first;
      }
      __syncwarp();
      for (int g = lane; g < p.groups; g += 32) {
        int rank = 0;
        for (int h = 0; h < p.groups; ++h) {
          rank += (group_score[h] > group_score[g] || (h < g && group_score[h] == group_score[g]))
                      ? 1
                      : 0;
        }
        group_kept[g] = rank < p.limited_groups ? 1.0f : 0.0f;
      }
      __syncwarp();
    }
    // Step 4: top-k by (selection desc, id asc) over the kept groups' experts: k rounds of a
    // warp-wide arg-max. Experts of dropped groups never compete (the -inf mask: k never exceeds
    // what the kept groups hold, validated on the host); a chosen expert's selection score
    // becomes -inf, so it ranks after every finite candidate in the later rounds.
    for (int j = 0; j < p.k; ++j) {
      float best = minus_inf;
      int best_id = INT_MAX;
      for (int e = lane; e < p.experts; e += 32) {
        if (limit_groups && group_kept[e / per_group] == 0.0f) continue;
        if (ranks_before(selection[e], e, best, best_id)) {
          best = selection[e];
          best_id = e;
        }
      }
      for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
        if (ranks_before(other, other_id, best, best_id)) {
          best = other;
          best_id = other_id;
        }
      }
      if (lane == 0) chosen[j] = best_id;
      if (lane == best_id % 32) selection[best_id] = minus_inf;
      __syncwarp();
    }
    // Steps 5-6: weights from the unbiased scores, normalised if configured, times route_scale
    // (the CPU's arithmetic: the sum in choice order, plus 1e-20).
    if (lane == 0) {
      float scale = p.route_scale;
      if (p.normalize != 0) {
        float sum = 0.0f;
        for (int j = 0; j < p.k; ++j) sum += scores[chosen[j]];
        scale /= (sum + 1e-20f);
      }
      for (int j = 0; j < p.k; ++j) {
        p.ids[std::int64_t(token) * p.k + j] = chosen[j];
        p.weights[std::int64_t(token) * p.k + j] = scores[chosen[j]] * scale;
      }
    }
    __syncwarp();
  }
}

struct ScoresParams {
  const float* logits;  // [tokens, experts]
  float* scores;        // [tokens, experts] out; may be `logits`
  int tokens;
  int experts;
  int softmax;  // 1: softmax, 0: sigmoid
};

/// compute_scores: step 1 of route_tokens alone, one warp per token, written to memory.
template <int = 0>
__global__ void __launch_bounds__(kThreads) token_scores(ScoresParams p) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int token = static_cast<int>(blockIdx.x) * kWarps + warp; token < p.tokens;
       token += static_cast<int>(gridDim.x) * kWarps) {
    const std::int64_t row = std::int64_t(token) * p.experts;
    warp_token_scores(p.logits + row, p.experts, lane, p.softmax != 0, p.scores + row);
  }
}

struct FiniteParams {
  const float* logits;  // [tokens, experts]
  std::int64_t count;
  const float* bias;  // [experts] or null
  int experts;
  unsigned long long* first_bad;  // [2] in/out: the lowest non-finite logit index, bias index
};

/// The first non-finite logit in row-major order: its token is the lowest failing token and its
/// column that token's first bad expert, which route_logits' NumericError names (as the CPU's).
template <int = 0>
__global__ void find_non_finite(FiniteParams p) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  const std::int64_t end =
      p.bias != nullptr && p.experts > p.count ? std::int64_t(p.experts) : p.count;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    if (i < p.count) {
      const float x = p.logits[i];
      if (!((x - x) == 0.0f)) atomicMin(p.first_bad, static_cast<unsigned long long>(i));
    }
    if (p.bias != nullptr && i < p.experts) {
      const float b = p.bias[i];
      if (!((b - b) == 0.0f)) atomicMin(p.first_bad + 1, static_cast<unsigned long long>(i));
    }
  }
}

}  // namespace gate_kernels

/// The gate on the GPU: the logits GEMM on cuBLAS (fp32), the fused routing kernel, the scores.
template <>
struct GateImpl<CudaBackend> {
  static void route_logits(const CudaBackend& cuda, const GateSettings& settings,
                           TensorView<const float, 2, DeviceMemory> logits,
                           TensorView<const float, 1, DeviceMemory> bias,
                           TensorView<std::int32_t, 2, DeviceMemory> topk_ids,
                           TensorView<float, 2, DeviceMemory> topk_weights) {
    route_from_logits(cuda, "daedalus::moe::route_logits", settings, logits, bias, topk_ids,
                      topk_weights);
  }

  /// logits = x · Wᵀ in fp32 (DeepSeek-V3's Gate computes its scores in fp32), then the routing
  /// of route_logits, whose errors name `moe::route`. `logits` is a workspace of the caller's.
  static void route(const CudaBackend& cuda, const GateSettings& settings,
                    TensorView<const float, 2, DeviceMemory> weight,
                    TensorView<const float, 1, DeviceMemory> bias,
                    TensorView<const float, 2, DeviceMemory> x,
                    TensorView<float, 2, DeviceMemory> logits,
                    TensorView<std::int32_t, 2, DeviceMemory> topk_ids,
                    TensorView<float, 2, DeviceMemory> topk_weights) {
    const index_t tokens = x.extent(0), dim = x.extent(1), experts = weight.extent(0);
    cuda::gemm(cuda, tokens, experts, dim, cuda::RowMajorOperand<float>{x.data(), dim},
               cuda::RowMajorOperand<float>{weight.data(), dim}, cuda::Weight::transposed,
               cuda::RowMajorOutput{logits.data(), experts});
    route_from_logits(cuda, "daedalus::moe::route", settings,
                      TensorView<const float, 2, DeviceMemory>(logits), bias, topk_ids,
                      topk_weights);
  }

  /// The scores alone (step 1 of the routing kernel, the same operations), after the finiteness
  /// check of the logits (one 16-byte copy and a synchronisation, as route_logits).
  static void compute_scores(const CudaBackend& cuda, ScoreFunc score_func,
                             TensorView<const float, 2, DeviceMemory> logits,
                             TensorView<float, 2, DeviceMemory> scores) {
    namespace gk = gate_kernels;
    constexpr std::string_view fn = "daedalus::moe::compute_scores";
    const index_t tokens = logits.extent(0);
    const index_t experts = logits.extent(1);
    daedalus::detail::require<InvalidArgument>(
        tokens <= INT_MAX && experts <= INT_MAX, fn, ": 'logits' has extents ",
        daedalus::detail::format_extents<index_t>(logits.extents()), "; expected at most ", INT_MAX,
        " tokens and experts (the kernel indexes with int)");
    check_finite(cuda, fn, logits.data(), tokens, int(experts), nullptr);
    if (tokens == 0 || experts == 0) return;
    const unsigned blocks =
        unsigned(std::min<index_t>((tokens + gk::kWarps - 1) / gk::kWarps, 65535));
    cuda::launch(cuda, {dim3(blocks), dim3(gk::kThreads)}, gk::token_scores<>,
                 gk::ScoresParams{logits.data(), scores.data(), int(tokens), int(experts),
                                  score_func == ScoreFunc::softmax ? 1 : 0});
  }

 private:
  /// Throws the CPU backend's NumericError (naming `fn`) for the first non-finite bias value or
  /// logit; one 16-byte copy and a stream synchronisation when all are finite.
  static void check_finite(const CudaBackend& cuda, std::string_view fn, const float* logits,
                           index_t tokens, int experts, const float* bias) {
    namespace gk = gate_kernels;
    // Two words: the lowest index of a non-finite logit, and of a non-finite bias.
    // The calling thread's scratch: this function synchronises the stream before it returns.
    unsigned long long* first_bad = cuda::thread_scratch<unsigned long long>(2);
    const unsigned long long none[2] = {~0ull, ~0ull};
    DAEDALUS_CUDA_CHECK(
        cudaMemcpyAsync(first_bad, none, sizeof(none), cudaMemcpyHostToDevice, cuda.stream()));
    const std::int64_t count = std::int64_t(tokens) * experts;
    const unsigned scan_blocks = unsigned(
        std::clamp<std::int64_t>((std::max<std::int64_t>(count, experts) + 255) / 256, 1, 4096));
    cuda::launch(cuda, {dim3(scan_blocks), dim3(256)}, gk::find_non_finite<>,
                 gk::FiniteParams{logits, count, bias, experts, first_bad});
    unsigned long long found[2] = {none[0], none[1]};
    DAEDALUS_CUDA_CHECK(
        cudaMemcpyAsync(found, first_bad, sizeof(found), cudaMemcpyDeviceToHost, cuda.stream()));
    cuda.synchronize();
    if (found[1] != none[1]) {
      float b = 0.0f;
      DAEDALUS_CUDA_CHECK(
          cudaMemcpyAsync(&b, bias + found[1], sizeof(b), cudaMemcpyDeviceToHost, cuda.stream()));
      cuda.synchronize();
      throw NumericError(daedalus::detail::message(fn, ": 'bias' holds a non-finite value (", b,
                                                   ") at expert ", found[1],
                                                   "; expected finite biases"));
    }
    if (found[0] != none[0]) {
      throw NumericError(daedalus::detail::message(
          fn, ": token ", found[0] / unsigned(experts),
          " has a non-finite logit (NaN or infinite) at expert ", found[0] % unsigned(experts),
          "; expected finite logits (check x and the gate weight)"));
    }
  }

  /// Validates the logits and the bias on the device (check_finite), so that a NaN throws
  /// before the outputs change, naming what the CPU backend names, then routes every token in
  /// one launch.
  static void route_from_logits(const CudaBackend& cuda, std::string_view fn,
                                const GateSettings& settings,
                                TensorView<const float, 2, DeviceMemory> logits,
                                TensorView<const float, 1, DeviceMemory> bias,
                                TensorView<std::int32_t, 2, DeviceMemory> topk_ids,
                                TensorView<float, 2, DeviceMemory> topk_weights) {
    namespace gk = gate_kernels;
    const index_t tokens = logits.extent(0);
    const int experts = settings.n_routed_experts;
    daedalus::detail::require<InvalidArgument>(experts <= gk::kMaxExperts, fn,
                                               ": 'settings.n_routed_experts' is ", experts,
                                               "; the CUDA gate routes at most ", gk::kMaxExperts,
                                               " experts (a token's scores live in shared memory)");
    const float* bias_data = bias.extent(0) > 0 ? bias.data() : nullptr;
    check_finite(cuda, fn, logits.data(), tokens, experts, bias_data);
    if (tokens == 0) return;
    const std::size_t shared_bytes =
        std::size_t(gk::kWarps) *
        gk::warp_shared_floats(experts, settings.n_expert_groups, settings.topk) * sizeof(float);
    const unsigned blocks =
        unsigned(std::min<index_t>((tokens + gk::kWarps - 1) / gk::kWarps, 65535));
    cuda::launch(
        cuda, {dim3(blocks), dim3(gk::kThreads), shared_bytes}, gk::route_tokens<>,
        gk::RouteParams{logits.data(), bias_data, topk_ids.data(), topk_weights.data(), int(tokens),
                        experts, settings.n_expert_groups, settings.n_limited_groups, settings.topk,
                        settings.score_func == ScoreFunc::softmax ? 1 : 0,
                        settings.bias_mode == BiasMode::multiplicative ? 1 : 0,
                        settings.normalize ? 1 : 0, float(settings.route_scale)});
  }
};

}  // namespace daedalus::moe::detail

namespace daedalus::moe {

/// The gate's parameters for config `C` in device memory: the fp32 weight [n_routed_experts, dim]
/// (fp32 as DeepSeek-V3's Gate, whose scores are computed in fp32) and, when the host gate has
/// one, the fp32 selection bias [n_routed_experts], which a DeviceBiasBalancer updates in place
/// (bias_mut).
template <MoeConfig C>
class DeviceGateWeights {
 public:
  using config = C;
  using memory_space = DeviceMemory;
  static constexpr int experts = C::n_routed_experts;
  static constexpr index_t dim = C::dim;

  /// Uploads `host`'s weight and bias (synchronises the backend's stream).
  DeviceGateWeights(const CudaBackend& backend, const GateWeights<C>& host)
      : weight_(std::size_t(experts) * std::size_t(dim)),
        bias_(host.has_bias() ? std::size_t(experts) : 0) {
    const HostView<const float, 2> w = host.weight();
    cuda::copy(backend, weight_, std::span<const float>(w.data(), std::size_t(w.size())));
    if (host.has_bias()) {
      const HostView<const float, 1> b = host.bias();
      cuda::copy(backend, bias_, std::span<const float>(b.data(), std::size_t(b.size())));
    }
    backend.synchronize();  // the host arrays may go away on return
  }

  /// [experts, dim], device.
  [[nodiscard]] TensorView<const float, 2, DeviceMemory> weight() const {
    return {weight_.data(), {experts, dim}};
  }
  [[nodiscard]] bool has_bias() const { return !bias_.empty(); }
  /// [experts], device; extent 0 when the gate has no selection bias.
  [[nodiscard]] TensorView<const float, 1, DeviceMemory> bias() const {
    return {bias_.data(), {index_t(bias_.size())}};
  }
  /// The bias, writable: what DeviceBiasBalancer::update takes.
  [[nodiscard]] TensorView<float, 1, DeviceMemory> bias_mut() {
    return {bias_.data(), {index_t(bias_.size())}};
  }
  /// A host copy of the bias (empty without one; synchronises the backend's stream).
  [[nodiscard]] std::vector<float> download_bias(const CudaBackend& backend) const {
    return cuda::to_host(backend, bias_);
  }

 private:
  cuda::DeviceBuffer<float> weight_;  // [experts, dim]
  cuda::DeviceBuffer<float> bias_;    // [experts] or empty
};

/// The whole gate of config `C` on the GPU: logits = x · Wᵀ with cuda::gemm (fp32 inputs, fp32
/// accumulation and output, into `logits`), then the fused routing of route_logits with the
/// gate's bias. The same checks and errors as the host `moe::route` (InvalidArgument for the
/// settings and extents, NumericError naming the token whose logits are not finite); the logits
/// check costs one 16-byte copy and a stream synchronisation.
///
/// @param x            [tokens, dim] fp32 activations, device
/// @param logits       [tokens, n_routed_experts] device workspace; holds the batch's logits on
///                     return (also after a NumericError: it is written before the check)
/// @param topk_ids     [tokens, n_activated_experts] out, device
/// @param topk_weights [tokens, n_activated_experts] out, device
/// @param settings     defaults to GateSettings::from_config<C>()
/// @throws InvalidArgument, NumericError as moe::route; the outputs are then unchanged.
template <MoeConfig C>
void route(const CudaBackend& backend, const DeviceGateWeights<C>& gate,
           TensorView<const float, 2, DeviceMemory> x, TensorView<float, 2, DeviceMemory> logits,
           TensorView<std::int32_t, 2, DeviceMemory> topk_ids,
           TensorView<float, 2, DeviceMemory> topk_weights,
           const GateSettings& settings = GateSettings::from_config<C>()) {
  constexpr std::string_view fn = "daedalus::moe::route";
  detail::check_route_arguments<C>(fn, settings, gate.bias(), x, topk_ids, topk_weights);
  daedalus::detail::check_extents(fn, "logits", logits,
                                  {x.extent(0), index_t(C::n_routed_experts)});
  detail::GateImpl<CudaBackend>::route(backend, settings, gate.weight(), gate.bias(), x, logits,
                                       topk_ids, topk_weights);
}

}  // namespace daedalus::moe
