// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/moe/balance.hpp"
#include "daedalus/moe/cuda/routing_plan.cuh"

/// Auxiliary-loss-free balancing on the GPU (arXiv 2408.15664, Algorithm 1; DeepSeek-V3 report,
/// section 2.1.2): the per-expert counts of each step are accumulated on the device from the
/// routing plan, and the selection bias is updated on the device, so a training step needs no
/// host round trip. The host reads the statistics when it wants them (one copy).
///
/// The balance losses of moe/balance.hpp (the sequence-wise loss of DeepSeek-V3, eqs. 17-20, and
/// the classic auxiliary loss) on device scores, in fp64 like the CPU functions and in a fixed
/// reduction order (no floating-point atomics): the same inputs give the same bits on every run.
namespace daedalus::moe {

namespace detail::balance_kernels {

struct RecordParams {
  const std::int32_t* routed_counts;  // [experts] this step's load (the plan's, before capacity)
  int experts;
  unsigned long long* step;   // [experts] out
  unsigned long long* total;  // [experts] in/out
  double* sum_max_vio_batch;  // [1] in/out
  unsigned long long* steps;  // [1] in/out
};

/// One block: copies the step's counts, adds them to the totals and adds the step's MaxVio to
/// the running sum, in the same arithmetic as LoadStats (max_violation in double).
// Kernels are templates (`template <int = 0>` where nothing else varies), so that every
// translation unit that includes this header may define them without breaking the ODR.
template <int = 0>
__global__ void record_step(RecordParams p) {
  __shared__ unsigned long long block_total;
  __shared__ unsigned long long block_most;
  if (threadIdx.x == 0) {
    block_total = 0;
    block_most = 0;
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < p.experts; e += static_cast<int>(blockDim.x)) {
    const auto c = static_cast<unsigned long long>(p.routed_counts[e]);
    p.step[e] = c;
    p.total[e] += c;
    atomicAdd(&block_total, c);
    atomicMax(&block_most, c);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (block_total > 0) {
      const double mean = double(block_total) / double(p.experts);
      *p.sum_max_vio_batch += (double(block_most) - mean) / mean;
    }
    *p.steps += 1;
  }
}

struct UpdateParams {
  const unsigned long long* counts;  // [experts] the step's counts
  int experts;
  int rule;            // BiasUpdate
  double update_rate;  // u
  float* bias;         // [experts] in/out
  int* rejected;       // [1] out: set to 1 + the first bad expert when the step is refused
};

/// One block: validates the bias (finite; positive for the multiplicative rule), then applies
/// BiasBalancer::update's arithmetic (double, rounded to float once). A refused step changes no
/// bias and records the first bad expert for DeviceBiasBalancer::check.
template <int = 0>
__global__ void update_bias(UpdateParams p) {
  __shared__ unsigned long long block_total;
  __shared__ int first_bad;
  if (threadIdx.x == 0) {
    block_total = 0;
    first_bad = p.experts;
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < p.experts; e += static_cast<int>(blockDim.x)) {
    const float b = p.bias[e];
    const bool finite = (b - b) == 0.0f;
    const bool ok = finite && (p.rule != int(BiasUpdate::multiplicative) || b > 0.0f);
    if (!ok) atomicMin(&first_bad, e);
    atomicAdd(&block_total, p.counts[e]);
  }
  __syncthreads();
  if (first_bad < p.experts) {
    if (threadIdx.x == 0 && *p.rejected == 0) *p.rejected = 1 + first_bad;
    return;
  }
  if (block_total == 0) return;  // a step without tokens changes nothing
  const double mean = double(block_total) / double(p.experts);
  for (int e = static_cast<int>(threadIdx.x); e < p.experts; e += static_cast<int>(blockDim.x)) {
    const double shortfall = mean - double(p.counts[e]);  // e_i = c̄ − c_i
    const double sign = double((shortfall > 0.0) - (shortfall < 0.0));
    const double b = double(p.bias[e]);
    double next = b;
    if (p.rule == int(BiasUpdate::sign)) {
      next = b + p.update_rate * sign;
    } else if (p.rule == int(BiasUpdate::proportional)) {
      next = b + p.update_rate * shortfall / mean;
    } else {
      next = b * (1.0 + p.update_rate * sign);
    }
    p.bias[e] = float(next);
  }
}

inline constexpr int kThreads = 256;

}  // namespace detail::balance_kernels

/// LoadStats on the GPU: the counts of each step (from the routing plan, which already counted
/// them) and of the whole run, and the running MaxVio_batch sum, all in device memory. Recording
/// a step is one small kernel and no host round trip; the accessors copy to the host.
class DeviceLoadStats {
 public:
  /// @throws InvalidArgument when num_experts < 1.
  DeviceLoadStats(const CudaBackend& backend, int num_experts)
      : experts_(check_experts(num_experts)),
        step_(std::size_t(num_experts)),
        total_(std::size_t(num_experts)),
        sum_max_vio_(1),
        steps_(1) {
    reset(backend);
    // The zeros must be in place before any stream uses the statistics: methods take any
    // backend, and a non-blocking stream does not wait for this one.
    backend.synchronize();
  }

  [[nodiscard]] int num_experts() const { return experts_; }

  /// Records one step: the routed counts (before capacity) of `plan`.
  /// @throws InvalidArgument when the plan is empty or has another number of experts.
  void record(const CudaBackend& backend, const DeviceRoutingPlan& plan) {
    constexpr std::string_view fn = "daedalus::moe::DeviceLoadStats::record";
    daedalus::detail::require<InvalidArgument>(plan.k() >= 1, fn,
                                               ": 'plan' is empty; expected a built plan");
    daedalus::detail::require<InvalidArgument>(plan.num_experts() == experts_, fn,
                                               ": 'plan' routes to ", plan.num_experts(),
                                               " experts; expected ", experts_);
    namespace bk = detail::balance_kernels;
    cuda::launch(backend, {dim3(1), dim3(bk::kThreads)}, bk::record_step<>,
                 bk::RecordParams{plan.routed_counts(), experts_, step_.data(), total_.data(),
                                  sum_max_vio_.data(), steps_.data()});
  }

  /// Device arrays: [num_experts] counts of the last step, and summed over the run.
  [[nodiscard]] const unsigned long long* step_counts_device() const { return step_.data(); }
  [[nodiscard]] const unsigned long long* total_counts_device() const { return total_.data(); }

  /// Host copies (synchronise the backend's stream).
  [[nodiscard]] std::vector<std::int64_t> step_counts(const CudaBackend& backend) const {
    return widen(cuda::to_host(backend, step_));
  }
  [[nodiscard]] std::vector<std::int64_t> total_counts(const CudaBackend& backend) const {
    return widen(cuda::to_host(backend, total_));
  }
  [[nodiscard]] std::int64_t steps(const CudaBackend& backend) const {
    return std::int64_t(cuda::to_host(backend, steps_).front());
  }
  /// MaxVio_batch of the last step, its mean over the steps, and MaxVio_global (LoadStats').
  [[nodiscard]] double max_vio_batch(const CudaBackend& backend) const {
    return max_violation(step_counts(backend));
  }
  [[nodiscard]] double mean_max_vio_batch(const CudaBackend& backend) const {
    const std::int64_t n = steps(backend);
    return n > 0 ? cuda::to_host(backend, sum_max_vio_).front() / double(n) : 0.0;
  }
  [[nodiscard]] double max_vio_global(const CudaBackend& backend) const {
    return max_violation(total_counts(backend));
  }

  /// Forgets every step.
  void reset(const CudaBackend& backend) {
    const auto zero = [&](auto& buffer) {
      DAEDALUS_CUDA_CHECK(cudaMemsetAsync(buffer.data(), 0, buffer.bytes(), backend.stream()));
    };
    zero(step_);
    zero(total_);
    zero(sum_max_vio_);
    zero(steps_);
  }

 private:
  static int check_experts(int n) {
    daedalus::detail::require<InvalidArgument>(
        n >= 1, "daedalus::moe::DeviceLoadStats: 'num_experts' is ", n, "; expected at least 1");
    return n;
  }
  static std::vector<std::int64_t> widen(const std::vector<unsigned long long>& v) {
    return {v.begin(), v.end()};
  }

  int experts_;
  cuda::DeviceBuffer<unsigned long long> step_, total_;
  cuda::DeviceBuffer<double> sum_max_vio_;
  cuda::DeviceBuffer<unsigned long long> steps_;
};

/// BiasBalancer on the GPU: the same update rules and arithmetic, applied to a device bias from
/// device counts without a host round trip. Validation that needs the bias's values (finite;
/// positive for the multiplicative rule) happens on the device: a step with a bad bias changes
/// nothing, and the next `check` reports it as BiasBalancer::update would have.
class DeviceBiasBalancer {
 public:
  /// @throws InvalidArgument as BiasBalancer's constructor.
  DeviceBiasBalancer(const CudaBackend& backend, int num_experts,
                     const BalancerSettings& settings = {})
      : host_rules_(num_experts, settings), rejected_(1) {
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(rejected_.data(), 0, sizeof(int), backend.stream()));
    backend.synchronize();  // zeroed before any other stream reads it
  }

  [[nodiscard]] int num_experts() const { return host_rules_.num_experts(); }
  [[nodiscard]] const BalancerSettings& settings() const { return host_rules_.settings(); }

  /// Updates `bias` from the last step recorded in `stats`.
  /// @param bias [num_experts] device selection bias
  /// @throws InvalidArgument for mismatched sizes (host-side checks only; see `check`).
  void update(const CudaBackend& backend, TensorView<float, 1, DeviceMemory> bias,
              const DeviceLoadStats& stats) const {
    constexpr std::string_view fn = "daedalus::moe::DeviceBiasBalancer::update";
    daedalus::detail::check_extents(fn, "bias", bias, {index_t(num_experts())});
    daedalus::detail::require<InvalidArgument>(stats.num_experts() == num_experts(), fn,
                                               ": 'stats' counts ", stats.num_experts(),
                                               " experts; expected ", num_experts());
    namespace bk = detail::balance_kernels;
    cuda::launch(backend, {dim3(1), dim3(bk::kThreads)}, bk::update_bias<>,
                 bk::UpdateParams{stats.step_counts_device(), num_experts(), int(settings().rule),
                                  settings().update_rate, bias.data(), rejected_.data()});
  }

  /// Reports a step the device refused since the last check (synchronises the stream).
  /// @throws InvalidArgument naming the first bad expert of the first refused step, as
  ///         BiasBalancer::update; the refusal is then cleared.
  void check(const CudaBackend& backend, TensorView<const float, 1, DeviceMemory> bias) const {
    const int rejected = cuda::to_host(backend, rejected_).front();
    if (rejected == 0) return;
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(rejected_.data(), 0, sizeof(int), backend.stream()));
    const int e = rejected - 1;
    float b = 0.0f;
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&b, bias.data() + e, sizeof(float), cudaMemcpyDeviceToHost,
                                        backend.stream()));
    backend.synchronize();
    constexpr std::string_view fn = "daedalus::moe::DeviceBiasBalancer::update";
    if (!std::isfinite(b)) {
      throw InvalidArgument(daedalus::detail::message(fn, ": 'bias' holds ", b, " at expert ", e,
                                                      "; expected a finite value"));
    }
    throw InvalidArgument(
        daedalus::detail::message(fn, ": 'bias' holds ", b, " at expert ", e,
                                  "; the multiplicative rule needs positive biases (start at 1)"));
  }

 private:
  BiasBalancer host_rules_;  // the validated settings (the host class checks them)
  mutable cuda::DeviceBuffer<int> rejected_;
};

namespace detail::loss_kernels {

inline constexpr int kThreads = 256;
/// Tokens per partial column sum of P_i: each (chunk, expert) pair is summed in token order by
/// one thread, then the chunks in chunk order, so the order of the fp64 additions depends on T
/// only (not on the launch or the schedule).
inline constexpr int kChunk = 64;
inline constexpr unsigned long long kNone = ~0ull;
/// The loss a call computes (and a refusal names).
inline constexpr int kSequence = 1;
inline constexpr int kAuxiliary = 2;
/// Words of the refusal record: function, score key, id slot, id value, experts, k.
inline constexpr int kRefusalWords = 6;

struct RowParams {
  const float* scores;      // [tokens, experts]
  const std::int32_t* ids;  // [tokens, k] the gate's choice (auxiliary), or null (sequence-wise:
                            // the top-K of the unbiased scores, eq. 18)
  long long tokens;
  int experts;
  int k;
  double* sums;                   // [tokens] out: Σ_j s_{j,t} in fp64, in expert order
  unsigned* counts;               // [experts] in/out (zeroed): the numerators of f_i
  unsigned long long* first_bad;  // [2] in/out (kNone): lowest bad score key, lowest bad id slot
};

/// (value desc, id asc): the order of the CPU's partial_sort (ties go to the lower expert).
__device__ __forceinline__ bool loss_ranks_before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

/// One thread per token: validates the row as check_loss_scores does (the first score that is
/// not finite and non-negative, else a zero sum; key t·(E+1) + expert, or + E for the sum), sums
/// it in fp64 in expert order (the CPU's order), and counts the token's experts: its slots of
/// topk_ids (ids outside [0, E) give the lowest bad slot), or its top-K scores found by K passes
/// of "the best candidate ranked after the previous pick". Integer atomics only.
template <int = 0>
__global__ void loss_rows(RowParams p) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; t < p.tokens;
       t += stride) {
    const float* row = p.scores + t * p.experts;
    double sum = 0.0;
    int bad = -1;
    for (int i = 0; i < p.experts; ++i) {
      const float s = row[i];
      if (!((s - s) == 0.0f && s >= 0.0f)) {
        bad = i;
        break;
      }
      sum += double(s);
    }
    if (bad < 0 && !(sum > 0.0)) bad = p.experts;
    if (bad >= 0) {
      atomicMin(p.first_bad, static_cast<unsigned long long>(t) *
                                     static_cast<unsigned long long>(p.experts + 1) +
                                 static_cast<unsigned long long>(bad));
      p.sums[t] = 1.0;  // unused: the call is refused
      continue;
    }
    p.sums[t] = sum;
    if (p.ids != nullptr) {
      for (int j = 0; j < p.k; ++j) {
        const long long slot = t * p.k + j;
        const int e = p.ids[slot];
        if (e < 0 || e >= p.experts) {
          atomicMin(p.first_bad + 1, static_cast<unsigned long long>(slot));
        } else {
          atomicAdd(p.counts + e, 1u);
        }
      }
      continue;
    }
    float previous_value = 0.0f;
    int previous = -1;
    for (int j = 0; j < p.k; ++j) {
      float best_value = 0.0f;
      int best = -1;
      for (int i = 0; i < p.experts; ++i) {
        const float v = row[i];
        if (previous >= 0 && !loss_ranks_before(previous_value, previous, v, i)) continue;
        if (best < 0 || loss_ranks_before(v, i, best_value, best)) {
          best_value = v;
          best = i;
        }
      }
      atomicAdd(p.counts + best, 1u);
      previous_value = best_value;
      previous = best;
    }
  }
}

struct ColumnParams {
  const float* scores;  // [tokens, experts]
  const double* sums;   // [tokens]
  long long tokens;
  int experts;
  long long chunks;  // ceil(tokens / kChunk)
  double* partial;   // [chunks, experts] out: Σ_{t in chunk} s_{i,t} / Σ_j s_{j,t}
};

/// One thread per (chunk, expert), consecutive threads on consecutive experts (coalesced rows):
/// the chunk's normalised scores s'_{i,t} = s_{i,t} / Σ_j s_{j,t} (the CPU's quotient) summed in
/// token order.
template <int = 0>
__global__ void loss_columns(ColumnParams p) {
  const long long n = p.chunks * p.experts;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long g = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; g < n;
       g += stride) {
    const long long chunk = g / p.experts;
    const long long e = g % p.experts;
    const long long begin = chunk * kChunk;
    const long long end = begin + kChunk < p.tokens ? begin + kChunk : p.tokens;
    double acc = 0.0;
    for (long long t = begin; t < end; ++t) acc += double(p.scores[t * p.experts + e]) / p.sums[t];
    p.partial[g] = acc;
  }
}

struct FinishParams {
  const double* partial;                // [chunks, experts]
  const unsigned* counts;               // [experts]
  const unsigned long long* first_bad;  // [2]
  const float* scores;                  // [tokens, experts], for the refusal record
  const std::int32_t* ids;              // [tokens, k] or null
  long long tokens;
  long long chunks;
  int experts;
  int k;
  int function;  // kSequence or kAuxiliary
  double alpha;
  double* terms;         // [experts] scratch
  double* out;           // [1] the loss; written only when the call is accepted
  long long* refusal;    // [kRefusalWords] in/out: the first refused call since the last check
  float* refused_score;  // [1] in/out: its bad score
};

/// One block: a refused call (a bad score or id) leaves `out` as it was and, when no refusal is
/// pending, records what check() reports; otherwise P_i = (Σ over the chunks, in order) / T, the
/// E terms f_i·P_i, and their sum in expert order (the CPU's formula and order).
template <int = 0>
__global__ void loss_finish(FinishParams p) {
  const unsigned long long bad_score = p.first_bad[0];
  const unsigned long long bad_id = p.first_bad[1];
  if (bad_score != kNone || bad_id != kNone) {
    if (threadIdx.x == 0 && p.refusal[0] == 0) {
      p.refusal[0] = p.function;
      p.refusal[1] = bad_score == kNone ? -1 : static_cast<long long>(bad_score);
      p.refusal[2] = bad_id == kNone ? -1 : static_cast<long long>(bad_id);
      p.refusal[3] = bad_id == kNone ? 0 : p.ids[bad_id];
      p.refusal[4] = p.experts;
      p.refusal[5] = p.k;
      if (bad_score != kNone) {
        const auto width = static_cast<unsigned long long>(p.experts + 1);
        const unsigned long long i = bad_score % width;
        *p.refused_score = i < static_cast<unsigned long long>(p.experts)
                               ? p.scores[(bad_score / width) * p.experts + i]
                               : 0.0f;
      }
    }
    return;  // the same branch for the whole block
  }
  const double f_scale = p.function == kSequence
                             ? double(p.experts) / (double(p.k) * double(p.tokens))
                             : 1.0 / (double(p.tokens) * double(p.k));
  for (int e = static_cast<int>(threadIdx.x); e < p.experts; e += static_cast<int>(blockDim.x)) {
    double column = 0.0;
    for (long long c = 0; c < p.chunks; ++c) column += p.partial[c * p.experts + e];
    const double mean = column / double(p.tokens);  // P_i
    p.terms[e] = f_scale * double(p.counts[e]) * mean;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int e = 0; e < p.experts; ++e) sum += p.terms[e];
    *p.out = p.function == kSequence ? p.alpha * sum : p.alpha * double(p.experts) * sum;
  }
}

}  // namespace detail::loss_kernels

/// The balance losses of moe/balance.hpp on the GPU, for training loops that keep everything on
/// the device: each call is three small kernels on the backend's stream that write the loss into
/// a device scalar, with no host round trip. The scratch arrays are kept and grown as needed.
///
/// Sums run in fp64 (as on the CPU) in a fixed order: row sums Σ_j s_{j,t} in expert order (the
/// CPU's), the normalised scores in chunks of 64 tokens and then over the chunks, the E terms in
/// expert order. Two calls on the same data give the same bits; the value differs from the
/// CPU's by the reordering of the fp64 sums over tokens (relative ~T·2⁻⁵³), and the auxiliary
/// loss's f_i = c_i / (T·K) is one division where the CPU adds 1/(T·K) c_i times.
///
/// Shapes and k are checked on the host (throwing before anything is enqueued, as the CPU
/// functions). Scores and ids are checked on the device: a call with a bad score or id leaves
/// its output unchanged, and the next check() throws what the CPU function throws for that
/// input (the first bad token, as its message names it). The functions that return the value
/// check at once.
class DeviceBalanceLoss {
 public:
  explicit DeviceBalanceLoss(const CudaBackend& backend)
      : first_bad_(2), refusal_(detail::loss_kernels::kRefusalWords), refused_score_(1) {
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(refusal_.data(), 0, refusal_.bytes(), backend.stream()));
    DAEDALUS_CUDA_CHECK(
        cudaMemsetAsync(refused_score_.data(), 0, refused_score_.bytes(), backend.stream()));
    backend.synchronize();  // zeroed before any other stream reads them
  }

  /// The complementary sequence-wise balance loss (DeepSeek-V3 eqs. 17-20) of one sequence, as
  /// sequence_balance_loss(scores, k, alpha), written to `loss` on the device.
  /// @param scores [T, E] device unbiased scores (softmax or sigmoid outputs) of one sequence
  /// @param k      K, the experts each token activates, in [1, E]
  /// @param alpha  the balance factor; DeepSeek-V3 uses 0.0001
  /// @param loss   [1] device fp64 out; unchanged when the call is refused
  /// @throws InvalidArgument for bad extents or k (nothing enqueued). Bad scores: see check().
  void sequence(const CudaBackend& backend, TensorView<const float, 2, DeviceMemory> scores, int k,
                double alpha, TensorView<double, 1, DeviceMemory> loss) {
    constexpr std::string_view fn = "daedalus::moe::sequence_balance_loss";
    detail::check_loss_score_extents(fn, scores);
    detail::check_loss_k(fn, k, scores.extent(1));
    daedalus::detail::check_extents(fn, "loss", loss, {1});
    enqueue(backend, scores, nullptr, k, alpha, loss.data(), detail::loss_kernels::kSequence);
  }

  /// The classic auxiliary balance loss (GShard; Switch eq. 4; DeepSeek-V2), as
  /// auxiliary_balance_loss(scores, topk_ids, alpha), written to `loss` on the device.
  /// @param scores   [T, E] device unbiased scores
  /// @param topk_ids [T, K] device expert ids chosen for each token
  /// @param alpha    the loss weight; DeepSeek-V2 uses 0.003
  /// @param loss     [1] device fp64 out; unchanged when the call is refused
  /// @throws InvalidArgument for mismatched extents (nothing enqueued). Bad scores or ids: see
  ///         check().
  void auxiliary(const CudaBackend& backend, TensorView<const float, 2, DeviceMemory> scores,
                 TensorView<const std::int32_t, 2, DeviceMemory> topk_ids, double alpha,
                 TensorView<double, 1, DeviceMemory> loss) {
    constexpr std::string_view fn = "daedalus::moe::auxiliary_balance_loss";
    detail::check_loss_score_extents(fn, scores);
    detail::check_loss_id_extents(fn, scores.extent(0), topk_ids);
    daedalus::detail::check_extents(fn, "loss", loss, {1});
    enqueue(backend, scores, topk_ids.data(), int(topk_ids.extent(1)), alpha, loss.data(),
            detail::loss_kernels::kAuxiliary);
  }

  /// The same, returning the value: the call, two small copies and one synchronisation.
  /// @throws as sequence_balance_loss(scores, k, alpha) on the host; a refusal still pending
  ///         from an earlier device-scalar call (not yet check()ed) is reported first.
  [[nodiscard]] double sequence(const CudaBackend& backend,
                                TensorView<const float, 2, DeviceMemory> scores, int k,
                                double alpha) {
    sequence(backend, scores, k, alpha, value_view());
    return value_or_throw(backend);
  }
  /// @throws as auxiliary_balance_loss(scores, topk_ids, alpha) on the host.
  [[nodiscard]] double auxiliary(const CudaBackend& backend,
                                 TensorView<const float, 2, DeviceMemory> scores,
                                 TensorView<const std::int32_t, 2, DeviceMemory> topk_ids,
                                 double alpha) {
    auxiliary(backend, scores, topk_ids, alpha, value_view());
    return value_or_throw(backend);
  }

  /// Reports the first call refused since the last check (synchronises the stream), then clears
  /// it.
  /// @throws NumericError naming the first token with a score that is not finite and
  ///         non-negative (and the expert) or with scores summing to 0; OutOfRange naming the
  ///         token and slot of the first id outside [0, E): the CPU function's messages.
  void check(const CudaBackend& backend) const {
    std::array<long long, detail::loss_kernels::kRefusalWords> refusal{};
    float score = 0.0f;
    download_refusal(backend, refusal, score);
    backend.synchronize();
    throw_refusal(backend, refusal, score);
  }

 private:
  TensorView<double, 1, DeviceMemory> value_view() {
    if (value_.size() == 0) value_ = cuda::DeviceBuffer<double>(1);
    return {value_.data(), {1}};
  }

  void enqueue(const CudaBackend& backend, TensorView<const float, 2, DeviceMemory> scores,
               const std::int32_t* ids, int k, double alpha, double* out, int function) {
    namespace lk = detail::loss_kernels;
    const long long tokens = scores.extent(0);
    const int experts = int(scores.extent(1));
    const long long chunks = (tokens + lk::kChunk - 1) / lk::kChunk;
    cuda::grow(sums_, std::size_t(tokens));
    cuda::grow(counts_, std::size_t(experts));
    cuda::grow(terms_, std::size_t(experts));
    cuda::grow(partial_, std::size_t(chunks) * std::size_t(experts));
    DAEDALUS_CUDA_CHECK(
        cudaMemsetAsync(first_bad_.data(), 0xff, first_bad_.bytes(), backend.stream()));
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(counts_.data(), 0, std::size_t(experts) * sizeof(unsigned),
                                        backend.stream()));
    const auto blocks = [](long long n) {
      return dim3(unsigned(std::clamp<long long>((n + lk::kThreads - 1) / lk::kThreads, 1, 4096)));
    };
    cuda::launch(backend, {blocks(tokens), dim3(lk::kThreads)}, lk::loss_rows<>,
                 lk::RowParams{scores.data(), ids, tokens, experts, k, sums_.data(), counts_.data(),
                               first_bad_.data()});
    cuda::launch(
        backend, {blocks(chunks * experts), dim3(lk::kThreads)}, lk::loss_columns<>,
        lk::ColumnParams{scores.data(), sums_.data(), tokens, experts, chunks, partial_.data()});
    cuda::launch(backend, {dim3(1), dim3(lk::kThreads)}, lk::loss_finish<>,
                 lk::FinishParams{partial_.data(), counts_.data(), first_bad_.data(), scores.data(),
                                  ids, tokens, chunks, experts, k, function, alpha, terms_.data(),
                                  out, refusal_.data(), refused_score_.data()});
  }

  void download_refusal(const CudaBackend& backend,
                        std::array<long long, detail::loss_kernels::kRefusalWords>& refusal,
                        float& score) const {
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(refusal.data(), refusal_.data(), refusal_.bytes(),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&score, refused_score_.data(), sizeof(float),
                                        cudaMemcpyDeviceToHost, backend.stream()));
  }

  /// Throws the recorded refusal, if any, as the CPU function would, after clearing it.
  void throw_refusal(const CudaBackend& backend,
                     const std::array<long long, detail::loss_kernels::kRefusalWords>& refusal,
                     float score) const {
    if (refusal[0] == 0) return;
    DAEDALUS_CUDA_CHECK(cudaMemsetAsync(refusal_.data(), 0, refusal_.bytes(), backend.stream()));
    const std::string_view fn = refusal[0] == detail::loss_kernels::kSequence
                                    ? "daedalus::moe::sequence_balance_loss"
                                    : "daedalus::moe::auxiliary_balance_loss";
    const index_t experts = index_t(refusal[4]);
    if (refusal[1] >= 0) {
      const index_t t = index_t(refusal[1]) / (experts + 1);
      const index_t i = index_t(refusal[1]) % (experts + 1);
      if (i == experts) throw detail::loss_zero_row_error(fn, t);
      throw detail::loss_score_error(fn, t, i, score);
    }
    throw detail::loss_id_error(fn, index_t(refusal[2]), index_t(refusal[5]),
                                std::int32_t(refusal[3]), experts);
  }

  double value_or_throw(const CudaBackend& backend) const {
    std::array<long long, detail::loss_kernels::kRefusalWords> refusal{};
    float score = 0.0f;
    double value = 0.0;
    download_refusal(backend, refusal, score);
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(&value, value_.data(), sizeof(double),
                                        cudaMemcpyDeviceToHost, backend.stream()));
    backend.synchronize();
    throw_refusal(backend, refusal, score);
    return value;
  }

  cuda::DeviceBuffer<double> sums_, partial_, terms_, value_;
  cuda::DeviceBuffer<unsigned> counts_;
  cuda::DeviceBuffer<unsigned long long> first_bad_;
  mutable cuda::DeviceBuffer<long long> refusal_;
  cuda::DeviceBuffer<float> refused_score_;
};

/// sequence_balance_loss (DeepSeek-V3 eqs. 17-20) on device scores: the value, computed on the
/// device (DeviceBalanceLoss; 8 bytes and the refusal record copied back). Same parameters, checks
/// and errors as the host function.
/// @param scores [T, E] device unbiased scores of one sequence
/// @param k      K in [1, E]
/// @param alpha  the balance factor; DeepSeek-V3 uses 0.0001
/// @throws InvalidArgument for bad extents or k; NumericError naming the token for a
///         non-finite or negative score or an all-zero row.
inline double sequence_balance_loss(const CudaBackend& backend,
                                    TensorView<const float, 2, DeviceMemory> scores, int k,
                                    double alpha = 1e-4) {
  return DeviceBalanceLoss(backend).sequence(backend, scores, k, alpha);
}

/// auxiliary_balance_loss (GShard/Switch) on device scores and ids: the value, computed on the
/// device (a few bytes copied back). Same parameters, checks and errors as the host function.
/// @param scores   [T, E] device unbiased scores
/// @param topk_ids [T, K] device expert ids
/// @param alpha    the loss weight; DeepSeek-V2 uses 0.003
/// @throws InvalidArgument for mismatched extents; OutOfRange naming the token and slot of an id
///         outside [0, E); NumericError naming the token for a bad score row.
inline double auxiliary_balance_loss(const CudaBackend& backend,
                                     TensorView<const float, 2, DeviceMemory> scores,
                                     TensorView<const std::int32_t, 2, DeviceMemory> topk_ids,
                                     double alpha = 0.003) {
  return DeviceBalanceLoss(backend).auxiliary(backend, scores, topk_ids, alpha);
}

}  // namespace daedalus::moe
