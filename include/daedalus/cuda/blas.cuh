// SPDX-License-Identifier: Apache-2.0
#pragma once

// Row-major GEMMs on cuBLAS: what the MLA projections and the prefill attention products call.
// daedalus stores matrices row-major ([out, in] weights as nn.Linear, [tokens, features]
// activations); cuBLAS is column-major. A row-major [r, c] matrix with leading dimension ld is the
// column-major [c, r] matrix with the same ld, i.e. its transpose, so the row-major product
// Y = X·op(W) is computed as the column-major Yᵀ = op(W)ᵀ·Xᵀ: cuBLAS's A is W, its B is X, and
// m and n swap (the cuBLAS documentation, "Data layout").

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/platform.cuh"

namespace daedalus::cuda {

/// A cuBLAS call failed: the message names the call as written, the file and line, and cuBLAS's
/// status name and text; `status()` keeps the code.
class CublasError : public CudaError {
 public:
  CublasError(const std::string& what, cublasStatus_t status) : CudaError(what), status_(status) {}
  [[nodiscard]] cublasStatus_t status() const noexcept { return status_; }

 private:
  cublasStatus_t status_;
};

namespace detail {

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, unsigned line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw CublasError(::daedalus::detail::message(file, ":", line, ": ", call,
                                                " failed: ", cublasGetStatusName(status), ": ",
                                                cublasGetStatusString(status)),
                    status);
}

}  // namespace detail

/// Checks the cublasStatus_t that `call` returns; throws daedalus::cuda::CublasError (a
/// CudaError) naming the call, file and line when it is not CUBLAS_STATUS_SUCCESS.
#define DAEDALUS_CUBLAS_CHECK(call) \
  ::daedalus::cuda::detail::check_cublas((call), #call, __FILE__, __LINE__)

namespace detail {

/// The calling thread's handles, one per device: cuBLAS handles are not meant to be shared by
/// host threads that issue work concurrently (cuBLAS documentation, "Thread Safety"), a handle
/// belongs to the device that was current when it was created (its workspace lives there), and
/// creating one costs a device allocation. So each thread creates one per device on first use
/// there and keeps it until it ends.
class ThreadBlasHandles {
 public:
  ThreadBlasHandles() = default;
  ~ThreadBlasHandles() {
    // A destructor cannot throw; at thread or process exit there is nothing left to recover.
    for (const auto& [device, handle] : handles_) static_cast<void>(cublasDestroy(handle));
  }
  ThreadBlasHandles(const ThreadBlasHandles&) = delete;
  ThreadBlasHandles& operator=(const ThreadBlasHandles&) = delete;

  /// The handle of the current device.
  cublasHandle_t get() {
    int device = 0;
    DAEDALUS_CUDA_CHECK(cudaGetDevice(&device));
    for (const auto& [owner, handle] : handles_)
      if (owner == device) return handle;
    cublasHandle_t handle = nullptr;
    DAEDALUS_CUBLAS_CHECK(cublasCreate(&handle));
    handles_.emplace_back(device, handle);
    return handle;
  }

 private:
  std::vector<std::pair<int, cublasHandle_t>> handles_;
};

}  // namespace detail

/// The calling thread's cuBLAS handle for the current device, bound to the backend's stream
/// (cublasSetStream on every call: the same thread may use several streams).
/// @throws CublasError when the handle cannot be created or bound.
inline cublasHandle_t blas_handle(const CudaBackend& backend) {
  static thread_local detail::ThreadBlasHandles handles;
  cublasHandle_t h = handles.get();
  DAEDALUS_CUBLAS_CHECK(cublasSetStream(h, backend.stream()));
  return h;
}

/// The cuBLAS data type of a device element type: fp32, bf16 or fp16.
template <class T>
constexpr cudaDataType blas_type() {
  if constexpr (std::is_same_v<T, float>) {
    return CUDA_R_32F;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return CUDA_R_16BF;
  } else {
    static_assert(std::is_same_v<T, __half>,
                  "daedalus::cuda::blas_type: the GEMM helpers take float, __nv_bfloat16 or __half "
                  "inputs");
    return CUDA_R_16F;
  }
}

/// How the second operand of a row-major product is stored.
enum class Weight {
  /// w is [n, k] (nn.Linear's [out, in], or keys [tokens, d]): the product uses wᵀ.
  transposed,
  /// w is [k, n] (values [tokens, d], or a [in, out] matrix): the product uses w as is.
  as_stored,
};

/// One row-major operand of a strided-batched product: batch i starts at data + i·stride, its
/// rows are ld elements apart.
template <class T>
struct RowMajorOperand {
  const T* data = nullptr;
  index_t ld = 0;
  index_t stride = 0;
};

/// The row-major output of a strided-batched product (fp32).
struct RowMajorOutput {
  float* data = nullptr;
  index_t ld = 0;
  index_t stride = 0;
};

namespace detail {

inline int blas_int(index_t value, const char* what) {
  ::daedalus::detail::require<InvalidArgument>(
      value >= 0 && value <= INT_MAX, "daedalus::cuda::gemm: '", what, "' is ", value,
      "; expected a value in [0, ", INT_MAX, "] (cuBLAS takes int sizes)");
  return static_cast<int>(value);
}

}  // namespace detail

/// For each batch i < batch: y_i[m, n] = alpha · x_i[m, k] · op(w_i) + beta · y_i, row-major,
/// with T inputs (fp32, bf16 or fp16), fp32 accumulation (CUBLAS_COMPUTE_32F) and fp32 output,
/// on the backend's stream. op(w) is wᵀ for Weight::transposed (w_i is [n, k]) and w for
/// Weight::as_stored (w_i is [k, n]). With beta = 0, y is not read.
/// @throws InvalidArgument for a negative size or one past int; CublasError when cuBLAS refuses.
template <class T>
void gemm_strided_batched(const CudaBackend& backend, index_t batch, index_t m, index_t n,
                          index_t k, RowMajorOperand<T> x, RowMajorOperand<T> w, Weight layout,
                          RowMajorOutput y, float alpha = 1.0f, float beta = 0.0f) {
  const int bi = detail::blas_int(batch, "batch");
  const int mi = detail::blas_int(m, "m");
  const int ni = detail::blas_int(n, "n");
  const int ki = detail::blas_int(k, "k");
  if (bi == 0 || mi == 0 || ni == 0) return;
  // Column-major: Yᵀ[n, m] = op(W)ᵀ · Xᵀ. A row-major [n, k] w is the column-major k × n matrix
  // wᵀ, so op(W)ᵀ = w needs CUBLAS_OP_T; a row-major [k, n] w is already the column-major n × k
  // matrix op(W)ᵀ (CUBLAS_OP_N). Xᵀ is x's row-major storage read column-major (CUBLAS_OP_N).
  const cublasOperation_t op_w = layout == Weight::transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  constexpr cudaDataType type = blas_type<T>();
  cublasHandle_t handle = blas_handle(backend);
  if (bi == 1) {
    DAEDALUS_CUBLAS_CHECK(cublasGemmEx(
        handle, op_w, CUBLAS_OP_N, ni, mi, ki, &alpha, w.data, type, detail::blas_int(w.ld, "ldw"),
        x.data, type, detail::blas_int(x.ld, "ldx"), &beta, y.data, CUDA_R_32F,
        detail::blas_int(y.ld, "ldy"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else {
    DAEDALUS_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, op_w, CUBLAS_OP_N, ni, mi, ki, &alpha, w.data, type, detail::blas_int(w.ld, "ldw"),
        static_cast<long long>(w.stride), x.data, type, detail::blas_int(x.ld, "ldx"),
        static_cast<long long>(x.stride), &beta, y.data, CUDA_R_32F, detail::blas_int(y.ld, "ldy"),
        static_cast<long long>(y.stride), bi, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

/// y[m, n] = alpha · x[m, k] · op(w) + beta · y, row-major (one product of the batched form).
template <class T>
void gemm(const CudaBackend& backend, index_t m, index_t n, index_t k, RowMajorOperand<T> x,
          RowMajorOperand<T> w, Weight layout, RowMajorOutput y, float alpha = 1.0f,
          float beta = 0.0f) {
  gemm_strided_batched(backend, 1, m, n, k, x, w, layout, y, alpha, beta);
}

/// y[m, n] = x[m, k] · w[n, k]ᵀ for packed row-major x and y and an nn.Linear weight w
/// ([out, in]): what every projection of a layer is.
template <class T>
void linear(const CudaBackend& backend, const T* x, index_t m, index_t k, const T* w, index_t n,
            float* y) {
  gemm(backend, m, n, k, RowMajorOperand<T>{x, k}, RowMajorOperand<T>{w, k}, Weight::transposed,
       RowMajorOutput{y, n});
}

}  // namespace daedalus::cuda
