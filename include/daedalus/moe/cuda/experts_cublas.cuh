// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/blas.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/convert_rows.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/moe/cuda/experts.cuh"
#include "daedalus/moe/cuda/routing_plan.cuh"
#include "daedalus/moe/experts.hpp"

/// The routed SwiGLU experts through cuBLAS: the second implementation of moe::routed_experts on
/// the GPU, with the same plan, input and output (so moe::combine reads its output unchanged).
/// Each expert is one group of cublasGemmGroupedBatchedEx (cuBLAS 12.5 and later): its segment
/// of c_e kept rows differs from the others', so every group holds one problem.
///
/// DAEDALUS_CUBLAS_GROUPED_GEMM is 1 where the toolkit's cuBLAS has the grouped call
/// (CUBLAS_VERSION >= 120500) and 0 before; define it to 0 to force the fallback, one
/// cublasGemmEx per non-empty expert with the same products.
#if !defined(DAEDALUS_CUBLAS_GROUPED_GEMM)
#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120500
#define DAEDALUS_CUBLAS_GROUPED_GEMM 1
#else
#define DAEDALUS_CUBLAS_GROUPED_GEMM 0
#endif
#endif

namespace daedalus::moe {

/// How routed_experts_cublas issues its two GEMMs.
enum class CublasExpertCalls {
  /// One cublasGemmGroupedBatchedEx per projection, every expert a group (the default where
  /// DAEDALUS_CUBLAS_GROUPED_GEMM is 1; per_expert otherwise).
  grouped,
  /// One cublasGemmEx per non-empty expert and projection: what toolkits before cuBLAS 12.5 run.
  per_expert,
};

namespace detail {
struct CublasExperts;
}  // namespace detail

/// The device memory of routed_experts_cublas, grown to the largest plan it has served and
/// reused: 16-bit copies of the dispatched rows [rows, dim], of the gate/up products [rows,
/// 2 · inter], of the hidden activations [rows, inter] and of the output [rows, dim] (bf16 or
/// fp16 alike: the same 2 bytes per value), cuBLAS's device arrays of per-expert matrix pointers,
/// the per-expert segment starts and kept rows, and their host copies with the host-side size
/// arrays the grouped call takes. One workspace serves one stream at a time.
class CublasExpertWorkspace {
 public:
  CublasExpertWorkspace() = default;

  /// Bytes of device memory held.
  [[nodiscard]] std::size_t device_bytes() const noexcept {
    return x_.bytes() + gate_up_.bytes() + hidden_.bytes() + y_.bytes() + operands_.bytes() +
           results_.bytes() + segments_.bytes();
  }

 private:
  friend struct detail::CublasExperts;

  /// Grows every buffer to hold `rows` rows of a config with `dim`, `inter` and `experts`.
  void reserve(std::size_t rows, std::size_t dim, std::size_t inter, std::size_t experts) {
    cuda::grow(x_, rows * dim);
    cuda::grow(gate_up_, rows * 2 * inter);
    cuda::grow(hidden_, rows * inter);
    cuda::grow(y_, rows * dim);
    cuda::grow(operands_, 4 * experts);
    cuda::grow(results_, 2 * experts);
    cuda::grow(segments_, 2 * experts + 1);
    if (host_segments_.size() < 2 * experts + 1) host_segments_.resize(2 * experts + 1);
  }

  cuda::DeviceBuffer<std::uint16_t> x_;        // [rows, dim] T bits
  cuda::DeviceBuffer<std::uint16_t> gate_up_;  // [rows, 2 · inter] T bits: g then u per row
  cuda::DeviceBuffer<std::uint16_t> hidden_;   // [rows, inter] T bits
  cuda::DeviceBuffer<std::uint16_t> y_;        // [rows, dim] T bits
  cuda::DeviceBuffer<const void*> operands_;   // [4, experts]: w13_e, x_e, w2_e, hidden_e
  cuda::DeviceBuffer<void*> results_;          // [2, experts]: gate_up_e, y_e
  cuda::DeviceBuffer<std::int32_t> segments_;  // [2 · experts + 1]: offsets, then counts
  std::vector<std::int32_t> host_segments_;    // the host copy of segments_
  // The grouped call's host arrays, one entry per expert (group).
  std::vector<cublasOperation_t> trans_a_, trans_b_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_, group_size_;
  std::vector<float> alpha_, beta_;
};

namespace detail::cublas_expert_kernels {

/// Threads per block of the element-wise kernels (one block per row).
inline constexpr int kThreads = 128;

template <class D>
struct SegmentParams {
  const std::int32_t* offsets;  // [experts + 1] the plan's segment starts
  const std::int32_t* counts;   // [experts] the plan's kept rows
  const D* w13;                 // [experts, 2 · inter, dim]
  const D* w2;                  // [experts, dim, inter]
  const D* x;                   // [rows, dim]
  const D* hidden;              // [rows, inter]
  D* gate_up;                   // [rows, 2 · inter]
  D* y;                         // [rows, dim]
  const void** operands;        // [4, experts] out
  void** results;               // [2, experts] out
  std::int32_t* segments;       // [2 · experts + 1] out: offsets, then counts
  int experts;
  int dim;
  int inter;
};

/// cuBLAS's per-expert matrix pointers, from the plan's device offsets (so they never wait for
/// the host copy), and the segment starts and kept rows packed for one device-to-host copy.
/// Each A or B pointer is its buffer's start (cudaMalloc: 256-byte aligned) plus a multiple of
/// that product's k elements, so it has the alignment cuBLAS wants for k (16 bytes when
/// 2·k is a multiple of 16, 4 when of 4).
template <class D>
__global__ void expert_segments(SegmentParams<D> p) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e > p.experts) return;
  p.segments[e] = p.offsets[e];
  if (e == p.experts) return;
  p.segments[p.experts + 1 + e] = p.counts[e];
  const std::int64_t row = p.offsets[e], dim = p.dim, inter = p.inter;
  p.operands[e] = p.w13 + std::int64_t(e) * 2 * inter * dim;
  p.operands[p.experts + e] = p.x + row * dim;
  p.operands[2 * p.experts + e] = p.w2 + std::int64_t(e) * dim * inter;
  p.operands[3 * p.experts + e] = p.hidden + row * inter;
  p.results[e] = p.gate_up + row * 2 * inter;
  p.results[p.experts + e] = p.y + row * dim;
}

template <class In, class D>
struct SwigluParams {
  const std::int32_t* row_slot;  // [rows] −1 for padding; null: every row is computed
  const In* gate_up;             // [rows, 2 · inter]: g then u (T, or fp32 for the shared MLP)
  D* hidden;                     // [rows, inter]
  int inter;
};

/// hidden = silu(g) · u in fp32 from g and u, rounded to T; padding rows (which no GEMM wrote)
/// are skipped. One block per row. expf (within 2 ulp), as the mma kernel's epilogue.
template <class In, class D>
__global__ void swiglu_rows(SwigluParams<In, D> p) {
  const std::int64_t row = blockIdx.x;
  if (p.row_slot != nullptr && p.row_slot[row] < 0) return;
  const In* gu = p.gate_up + row * 2 * p.inter;
  for (int i = static_cast<int>(threadIdx.x); i < p.inter; i += static_cast<int>(blockDim.x)) {
    const float g = ::daedalus::cuda::to_float(gu[i]);
    const float u = ::daedalus::cuda::to_float(gu[p.inter + i]);
    p.hidden[row * p.inter + i] = ::daedalus::cuda::from_float<D>(g / (1.0f + expf(-g)) * u);
  }
}

template <class D>
struct WidenParams {
  const std::int32_t* row_slot;  // [rows] −1 for padding
  const D* y;                    // [rows, dim]
  float* out;                    // [rows, dim] fp32
  int dim;
};

/// out = y widened to fp32; padding rows (inside a segment past its kept rows, or past the last
/// segment) become zeros, as the grouped mma kernel leaves them. One block per row.
template <class D>
__global__ void widen_rows(WidenParams<D> p) {
  const std::int64_t row = blockIdx.x;
  const bool padding = p.row_slot[row] < 0;
  for (int i = static_cast<int>(threadIdx.x); i < p.dim; i += static_cast<int>(blockDim.x))
    p.out[row * p.dim + i] = padding ? 0.0f : ::daedalus::cuda::to_float(p.y[row * p.dim + i]);
}

}  // namespace detail::cublas_expert_kernels

namespace detail {

/// The cuBLAS routed experts after the argument checks.
struct CublasExperts {
  template <MoeConfig C, class T>
  static void run(const CudaBackend& cuda, const DeviceExpertWeights<C, T>& weights,
                  const DeviceRoutingPlan& plan, TensorView<const float, 2, DeviceMemory> in,
                  CublasExpertWorkspace& ws, TensorView<float, 2, DeviceMemory> out,
                  CublasExpertCalls calls) {
    namespace ck = cublas_expert_kernels;
    using D = typename DeviceExpertWeights<C, T>::device_type;
    static_assert(sizeof(D) == sizeof(std::uint16_t), "the workspace holds 16-bit values");
    constexpr int experts = C::n_routed_experts;
    constexpr int dim = int(C::dim), inter = int(C::moe_inter_dim);
    const index_t rows = plan.rows();
    if (rows == 0) return;
    ws.reserve(std::size_t(rows), std::size_t(dim), std::size_t(inter), std::size_t(experts));
    D* x = reinterpret_cast<D*>(ws.x_.data());
    D* gate_up = reinterpret_cast<D*>(ws.gate_up_.data());
    D* hidden = reinterpret_cast<D*>(ws.hidden_.data());
    D* y = reinterpret_cast<D*>(ws.y_.data());
    const dim3 row_grid(static_cast<unsigned>(rows)), row_block(ck::kThreads);

    cuda::launch_convert_rows(cuda, in.data(), rows, dim, dim, x, dim);
    cuda::launch(cuda, {dim3(unsigned((experts + ck::kThreads) / ck::kThreads)), row_block},
                 ck::expert_segments<D>,
                 ck::SegmentParams<D>{plan.offsets(), plan.counts(), weights.w13(), weights.w2(), x,
                                      hidden, gate_up, y, ws.operands_.data(), ws.results_.data(),
                                      ws.segments_.data(), experts, dim, inter});
    // The host needs each expert's kept rows: cuBLAS takes its sizes from host memory.
    std::int32_t* host = ws.host_segments_.data();
    DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(host, ws.segments_.data(),
                                        std::size_t(2 * experts + 1) * sizeof(std::int32_t),
                                        cudaMemcpyDeviceToHost, cuda.stream()));
    cuda.synchronize();
    const std::int32_t* offsets = host;
    const std::int32_t* counts = host + experts + 1;

    cublasHandle_t handle = cuda::blas_handle(cuda);
    constexpr cudaDataType type = cuda::blas_type<D>();
    // Row-major Y_e[c_e, N] = X_e[c_e, K] · W_e[N, K]ᵀ is column-major Y_eᵀ = op_T(W_e) · X_eᵀ:
    // m = N, n = c_e, k = K, A = W_e (lda K, transposed), B = X_e (ldb K), C = Y_e (ldc N).
    const auto project = [&](int n_out, int k_in, const D* w, const D* a, D* result, int op) {
      if (calls == CublasExpertCalls::grouped && DAEDALUS_CUBLAS_GROUPED_GEMM) {
#if DAEDALUS_CUBLAS_GROUPED_GEMM
        ws.trans_a_.assign(experts, CUBLAS_OP_T);
        ws.trans_b_.assign(experts, CUBLAS_OP_N);
        ws.m_.assign(experts, n_out);
        ws.n_.assign(counts, counts + experts);
        ws.k_.assign(experts, k_in);
        ws.lda_.assign(experts, k_in);
        ws.ldb_.assign(experts, k_in);
        ws.ldc_.assign(experts, n_out);
        ws.group_size_.assign(experts, 1);
        ws.alpha_.assign(experts, 1.0f);
        ws.beta_.assign(experts, 0.0f);
        DAEDALUS_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
            handle, ws.trans_a_.data(), ws.trans_b_.data(), ws.m_.data(), ws.n_.data(),
            ws.k_.data(), ws.alpha_.data(), ws.operands_.data() + 2 * op * experts, type,
            ws.lda_.data(), ws.operands_.data() + (2 * op + 1) * experts, type, ws.ldb_.data(),
            ws.beta_.data(), ws.results_.data() + op * experts, type, ws.ldc_.data(), experts,
            ws.group_size_.data(), CUBLAS_COMPUTE_32F));
#else
        static_cast<void>(op);
#endif
        return;
      }
      const float one = 1.0f, zero = 0.0f;
      for (int e = 0; e < experts; ++e) {
        if (counts[e] == 0) continue;
        const std::int64_t row = offsets[e];
        DAEDALUS_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n_out, counts[e], k_in,
                                           &one, w + std::int64_t(e) * n_out * k_in, type, k_in,
                                           a + row * k_in, type, k_in, &zero, result + row * n_out,
                                           type, n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
    };
    project(2 * inter, dim, weights.w13(), x, gate_up, 0);
    cuda::launch(cuda, {row_grid, row_block}, ck::swiglu_rows<D, D>,
                 ck::SwigluParams<D, D>{plan.row_slot(), gate_up, hidden, inter});
    project(dim, inter, weights.w2(), hidden, y, 1);
    cuda::launch(cuda, {row_grid, row_block}, ck::widen_rows<D>,
                 ck::WidenParams<D>{plan.row_slot(), y, out.data(), dim});
  }
};

}  // namespace detail

/// The routed experts through cuBLAS: for each expert e and each kept row r of its segment,
/// expert_out[r] = w2_e(silu(w1_e expert_in[r]) ⊙ w3_e expert_in[r]), padding rows zero: the
/// contract of moe::routed_experts with CudaBackend, so moe::combine reads the output unchanged.
///
/// The steps: expert_in rounded to T; both projections of every expert as one
/// cublasGemmGroupedBatchedEx each (fp32 accumulation, 16-bit T out; one cublasGemmEx per
/// non-empty expert before cuBLAS 12.5), silu(g) · u formed in fp32 from the 16-bit g and u and
/// rounded to T in between; the 16-bit output widened to fp32. Compared with the grouped mma
/// kernel of routed_experts, g, u and the output are rounded to T once more each.
///
/// cuBLAS takes the problem sizes from host memory, so each call copies the per-expert segment
/// starts and kept rows (4 · (2E + 1) bytes) to the host and synchronises the backend's stream
/// before the first GEMM: the host waits for everything queued before the call. routed_experts
/// needs no such round trip (its tiles read the plan on the device).
///
/// @tparam C, T  the config and the weights' 16-bit storage type (bfloat16 or half)
/// @param weights    the routed experts, T on the device
/// @param plan       a DeviceRoutingPlan built for C's experts
/// @param expert_in  [plan.rows(), dim] dispatched rows (moe::dispatch's output), fp32
/// @param workspace  grown to the plan's rows on first use and reused; serves one stream at a time
/// @param expert_out [plan.rows(), dim] out, fp32
/// @param calls      CublasExpertCalls::per_expert forces one cublasGemmEx per expert (the
///                   fallback of older toolkits); grouped is that fallback where
///                   DAEDALUS_CUBLAS_GROUPED_GEMM is 0
/// @throws InvalidArgument as routed_experts (naming routed_experts_cublas) when the plan is
///         empty, was built for another number of experts, or the extents disagree with it;
///         CudaError / cuda::CublasError on a CUDA or cuBLAS failure
template <MoeConfig C, class T>
void routed_experts_cublas(const CudaBackend& backend, const DeviceExpertWeights<C, T>& weights,
                           const DeviceRoutingPlan& plan,
                           TensorView<const float, 2, DeviceMemory> expert_in,
                           CublasExpertWorkspace& workspace,
                           TensorView<float, 2, DeviceMemory> expert_out,
                           CublasExpertCalls calls = CublasExpertCalls::grouped) {
  constexpr std::string_view fn = "daedalus::moe::routed_experts_cublas";
  const index_t rows = detail::check_routed_plan_and_input<C>(fn, plan, expert_in);
  daedalus::detail::check_extents(fn, "expert_out", expert_out, {rows, index_t(C::dim)});
  daedalus::detail::require<InvalidArgument>(rows <= std::int64_t(INT32_MAX), fn, ": 'plan' has ",
                                             rows, " rows; expected at most ", INT32_MAX,
                                             " (cuBLAS takes int sizes)");
  detail::CublasExperts::run(backend, weights, plan, expert_in, workspace, expert_out, calls);
}

/// The device memory of shared_experts_cublas, grown to the largest batch it has served and
/// reused: a 16-bit copy of x [tokens, dim], the fp32 gate/up products [tokens, 2 · width] and
/// the 16-bit hidden activations [tokens, width]. One workspace serves one stream at a time.
class CublasSharedExpertWorkspace {
 public:
  CublasSharedExpertWorkspace() = default;

  /// Bytes of device memory held.
  [[nodiscard]] std::size_t device_bytes() const noexcept {
    return x_.bytes() + gate_up_.bytes() + hidden_.bytes();
  }

 private:
  template <MoeConfig C, class T>
  friend void shared_experts_cublas(const CudaBackend&, const DeviceSharedExpertWeights<C, T>&,
                                    TensorView<const float, 2, DeviceMemory>,
                                    CublasSharedExpertWorkspace&,
                                    TensorView<float, 2, DeviceMemory>);

  void reserve(std::size_t tokens, std::size_t dim, std::size_t width) {
    cuda::grow(x_, tokens * dim);
    cuda::grow(gate_up_, tokens * 2 * width);
    cuda::grow(hidden_, tokens * width);
  }

  cuda::DeviceBuffer<std::uint16_t> x_;       // [tokens, dim] T bits
  cuda::DeviceBuffer<float> gate_up_;         // [tokens, 2 · width]: g then u per row
  cuda::DeviceBuffer<std::uint16_t> hidden_;  // [tokens, width] T bits
};

/// The shared experts through cuBLAS: out = w2(silu(w1 x) ⊙ w3 x) over every token, as
/// moe::shared_experts with CudaBackend, overwriting `out` (zeros without shared experts). x is
/// rounded to T, both products run as one cublasGemmEx each (T inputs, fp32 accumulation and fp32
/// output), silu(g) · u is formed in fp32 and rounded to T: exactly the roundings of the grouped
/// mma kernel (only the order of the fp32 sums differs), at cuBLAS's speed on a product whose
/// sizes are all known on the host (no round trip).
///
/// @param x         [tokens, dim] device activations
/// @param workspace grown to the batch on first use and reused; serves one stream at a time
/// @param out       [tokens, dim] out
/// @throws InvalidArgument when the extents disagree; CudaError / cuda::CublasError on a CUDA
///         or cuBLAS failure
template <MoeConfig C, class T>
void shared_experts_cublas(const CudaBackend& backend,
                           const DeviceSharedExpertWeights<C, T>& weights,
                           TensorView<const float, 2, DeviceMemory> x,
                           CublasSharedExpertWorkspace& workspace,
                           TensorView<float, 2, DeviceMemory> out) {
  namespace ck = detail::cublas_expert_kernels;
  using D = typename DeviceSharedExpertWeights<C, T>::device_type;
  constexpr std::string_view fn = "daedalus::moe::shared_experts_cublas";
  constexpr index_t dim = C::dim, width = DeviceSharedExpertWeights<C, T>::width;
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, dim});
  daedalus::detail::check_extents(fn, "out", out, {tokens, dim});
  daedalus::detail::require<InvalidArgument>(tokens <= std::int64_t(INT32_MAX), fn, ": 'x' has ",
                                             tokens, " rows; expected at most ", INT32_MAX,
                                             " (cuBLAS takes int sizes)");
  if (tokens == 0) return;
  if (width == 0) {  // no shared experts: out = 0
    DAEDALUS_CUDA_CHECK(
        cudaMemsetAsync(out.data(), 0, out.size() * sizeof(float), backend.stream()));
    return;
  }
  workspace.reserve(std::size_t(tokens), std::size_t(dim), std::size_t(width));
  D* x16 = reinterpret_cast<D*>(workspace.x_.data());
  D* hidden = reinterpret_cast<D*>(workspace.hidden_.data());
  float* gate_up = workspace.gate_up_.data();
  const dim3 row_grid(static_cast<unsigned>(tokens)), row_block(ck::kThreads);
  cuda::launch_convert_rows(backend, x.data(), tokens, dim, dim, x16, dim);
  cuda::linear(backend, static_cast<const D*>(x16), tokens, dim, weights.w13(), 2 * width, gate_up);
  cuda::launch(backend, {row_grid, row_block}, ck::swiglu_rows<float, D>,
               ck::SwigluParams<float, D>{nullptr, gate_up, hidden, int(width)});
  cuda::linear(backend, static_cast<const D*>(hidden), tokens, width, weights.w2(), dim,
               out.data());
}

}  // namespace daedalus::moe
