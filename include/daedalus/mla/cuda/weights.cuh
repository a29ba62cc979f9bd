// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <concepts>
#include <cstddef>
#include <span>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/mla/weights.hpp"

namespace daedalus::mla {

/// One MLA layer's weights in device memory, what the MLA functions take with CudaBackend: the
/// projections in T (bf16 or fp16, rounded to nearest even from the fp32 MlaWeights, in the same
/// `[out, in]` row-major layout) for cuBLAS's tensor-core GEMMs, the two RMSNorm weights in fp32
/// (they scale fp32 values inside the norm kernels). Uploaded once; move-only.
///
/// @tparam C an MlaConfig
/// @tparam T bfloat16 (the default) or half
template <MlaConfig C, class T = bfloat16>
class DeviceMlaWeights {
  static_assert(std::same_as<T, bfloat16> || std::same_as<T, half>,
                "daedalus::mla::DeviceMlaWeights: the CUDA backend keeps projection weights in "
                "bfloat16 or half (cuBLAS GEMMs with fp32 accumulation)");

 public:
  using Shape = MlaShape<C>;
  using config = C;
  using memory_space = DeviceMemory;
  /// The host element type of the projections, and the device type that holds it.
  using element_type = T;
  using device_element_type = daedalus::cuda::device_storage_t<T>;

  /// Uploads `host` on the backend's stream: projections rounded to T, norms as they are. Waits
  /// for the copies (once), so that the weights may then be used on any stream.
  /// @throws CudaError when the device memory cannot be allocated or the copies fail.
  DeviceMlaWeights(const CudaBackend& backend, const MlaWeights<C>& host)
      : wq_a_(upload_rounded(backend, host.wq_a())),
        q_norm_(upload_exact(backend, host.q_norm())),
        wq_b_(upload_rounded(backend, host.wq_b())),
        wq_(upload_rounded(backend, host.wq())),
        wkv_a_(upload_rounded(backend, host.wkv_a())),
        kv_norm_(upload_exact(backend, host.kv_norm())),
        wkv_b_(upload_rounded(backend, host.wkv_b())),
        wo_(upload_rounded(backend, host.wo())) {
    backend.synchronize();
  }

  /// The weights the device computes with, on the host: every projection rounded to T and
  /// widened back to fp32, the norms unchanged. A CPU run with these weights differs from the
  /// device run only by the device's rounding of activations.
  static MlaWeights<C> rounded(const MlaWeights<C>& host) {
    const auto round = [](auto view) {
      std::vector<float> out(std::size_t(view.size()));
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(T(view.data()[i]));
      return out;
    };
    const auto copy = [](auto view) {
      return std::vector<float>(view.data(), view.data() + view.size());
    };
    const std::vector<float> wq_a = round(host.wq_a()), q_norm = copy(host.q_norm()),
                             wq_b = round(host.wq_b()), wq = round(host.wq()),
                             wkv_a = round(host.wkv_a()), kv_norm = copy(host.kv_norm()),
                             wkv_b = round(host.wkv_b()), wo = round(host.wo());
    return MlaWeights<C>::from_arrays({wq_a, q_norm, wq_b, wq, wkv_a, kv_norm, wkv_b, wo});
  }

  /// [q_lora_rank, dim] (null without query LoRA)
  [[nodiscard]] const device_element_type* wq_a() const { return wq_a_.data(); }
  /// [q_lora_rank] fp32 (null without query LoRA)
  [[nodiscard]] const float* q_norm() const { return q_norm_.data(); }
  /// [n_heads · qk_head_dim, q_lora_rank] (null without query LoRA)
  [[nodiscard]] const device_element_type* wq_b() const { return wq_b_.data(); }
  /// [n_heads · qk_head_dim, dim] (null with query LoRA)
  [[nodiscard]] const device_element_type* wq() const { return wq_.data(); }
  /// [kv_lora_rank + rope, dim]
  [[nodiscard]] const device_element_type* wkv_a() const { return wkv_a_.data(); }
  /// [kv_lora_rank] fp32
  [[nodiscard]] const float* kv_norm() const { return kv_norm_.data(); }
  /// [n_heads · (nope + v_head_dim), kv_lora_rank]: head h's W_UK[h] (nope rows) then W_UV[h]
  /// (v_head_dim rows), as MlaWeights::w_uk / w_uv view them.
  [[nodiscard]] const device_element_type* wkv_b() const { return wkv_b_.data(); }
  /// [dim, n_heads · v_head_dim]
  [[nodiscard]] const device_element_type* wo() const { return wo_.data(); }

  /// Bytes of device memory the weights take.
  [[nodiscard]] std::size_t bytes() const {
    return wq_a_.bytes() + q_norm_.bytes() + wq_b_.bytes() + wq_.bytes() + wkv_a_.bytes() +
           kv_norm_.bytes() + wkv_b_.bytes() + wo_.bytes();
  }

 private:
  static daedalus::cuda::DeviceBuffer<device_element_type> upload_rounded(
      const CudaBackend& backend, HostView<const float, 2> view) {
    std::vector<T> rounded(std::size_t(view.size()));
    for (std::size_t i = 0; i < rounded.size(); ++i) rounded[i] = T(view.data()[i]);
    // Pageable memory: the copy is staged before cudaMemcpyAsync returns, so `rounded` may go.
    return daedalus::cuda::to_device(backend, rounded);
  }
  static daedalus::cuda::DeviceBuffer<float> upload_exact(const CudaBackend& backend,
                                                          HostView<const float, 1> view) {
    return daedalus::cuda::to_device(backend,
                                     std::span<const float>(view.data(), std::size_t(view.size())));
  }

  daedalus::cuda::DeviceBuffer<device_element_type> wq_a_;
  daedalus::cuda::DeviceBuffer<float> q_norm_;
  daedalus::cuda::DeviceBuffer<device_element_type> wq_b_, wq_, wkv_a_;
  daedalus::cuda::DeviceBuffer<float> kv_norm_;
  daedalus::cuda::DeviceBuffer<device_element_type> wkv_b_, wo_;
};

}  // namespace daedalus::mla
