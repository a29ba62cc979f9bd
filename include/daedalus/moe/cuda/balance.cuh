// SPDX-License-Identifier: Apache-2.0
#pragma once

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

}  // namespace daedalus::moe
