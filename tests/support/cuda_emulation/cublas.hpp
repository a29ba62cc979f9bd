// SPDX-License-Identifier: Apache-2.0
#pragma once

// The cuBLAS subset daedalus uses (include/daedalus/cuda/blas.cuh), for the CUDA emulation layer:
// handles and streams, cublasGemmEx and cublasGemmStridedBatchedEx with fp32 / fp16 / bf16
// inputs, an fp32 output and CUBLAS_COMPUTE_32F, computed on the host with plain loops. Included
// at the end of cuda_emulation.hpp; not meant to be included on its own.
//
// What it follows from the cuBLAS documentation ("cublasGemmEx", "cublasGemmStridedBatchedEx",
// "Data layout", "cublasSetStream"):
//   - matrices are column-major: element (i, j) of A is A[i + j·lda]; op(A) is A (CUBLAS_OP_N) or
//     Aᵀ (CUBLAS_OP_T / CUBLAS_OP_C, the same for real types);
//   - C = alpha·op(A)·op(B) + beta·C with op(A) m×k, op(B) k×n, C m×n; alpha and beta are host
//     floats (the default pointer mode); when beta is 0, C is not read (a NaN there does not
//     propagate), as in the reference BLAS;
//   - batch i uses A + i·strideA, B + i·strideB, C + i·strideC (a stride may be 0);
//   - CUBLAS_STATUS_INVALID_VALUE for m, n, k or batchCount < 0, lda < max(1, rows of A as
//     stored), ldb likewise, ldc < max(1, m); CUBLAS_STATUS_NOT_SUPPORTED for a type combination
//     outside {A = B in fp32, fp16, bf16} × C fp32 × CUBLAS_COMPUTE_32F;
//     CUBLAS_STATUS_NOT_INITIALIZED for a null handle; nothing is computed when m, n or
//     batchCount is 0; when k is 0, C = beta·C.
// Products accumulate in fp32 (each term the product of the widened inputs, added in k order),
// as the tensor cores accumulate; the summation order differs from cuBLAS's, which is within the
// fp32 rounding every caller's tolerance already allows. A matrix that does not lie inside a
// device allocation (a host pointer, an overrun) gives CUBLAS_STATUS_EXECUTION_FAILED, where a
// GPU would fault.

#include <cstddef>
#include <cstdint>
#include <cstring>

/// cuBLAS's status codes, with their numeric values.
enum cublasStatus_t : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16,
};

enum cublasOperation_t : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };

/// The library data types cuBLAS takes (library_types.h values).
enum cudaDataType : int { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
using cudaDataType_t = cudaDataType;

enum cublasComputeType_t : int {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};

enum cublasGemmAlgo_t : int { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };

/// An emulated handle: its stream (work runs synchronously, so only the identity matters).
struct cublasContext {
  cudaStream_t stream = nullptr;
};
using cublasHandle_t = cublasContext*;

inline cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext{};
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t* stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

inline const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

inline const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "an error was detected when checking the current licensing";
  }
  return "unknown error";
}

namespace daedalus::cuda_emulation::blas {

/// Element `index` of a matrix of type `type`, widened to fp32 (exact).
inline float load(const void* base, cudaDataType type, std::int64_t index) {
  switch (type) {
    case CUDA_R_32F:
      return static_cast<const float*>(base)[index];
    case CUDA_R_16F:
      return static_cast<float>(static_cast<const __half*>(base)[index]);
    case CUDA_R_16BF:
      return static_cast<float>(static_cast<const __nv_bfloat16*>(base)[index]);
  }
  return 0.0f;
}

inline std::size_t element_bytes(cudaDataType type) { return type == CUDA_R_32F ? 4 : 2; }

/// True when the elements of a rows × cols column-major matrix (leading dimension ld) of every
/// batch lie inside one device allocation each.
inline bool inside_device_memory(const void* base, cudaDataType type, std::int64_t rows,
                                 std::int64_t cols, std::int64_t ld, long long stride, int batch) {
  if (rows == 0 || cols == 0 || batch == 0) return true;
  const std::size_t bytes =
      std::size_t((cols - 1) * ld + rows) * element_bytes(type);  // first to last element
  for (int i = 0; i < batch; ++i) {
    const auto* p = static_cast<const std::byte*>(base) +
                    std::int64_t(i) * stride * std::int64_t(element_bytes(type));
    if (!detail::allocations().contains(p, bytes)) return false;
  }
  return true;
}

inline cublasStatus_t gemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const void* alpha,
                           const void* a, cudaDataType a_type, int lda, long long stride_a,
                           const void* b, cudaDataType b_type, int ldb, long long stride_b,
                           const void* beta, void* c, cudaDataType c_type, int ldc,
                           long long stride_c, int batch, cublasComputeType_t compute) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const bool ta = transa != CUBLAS_OP_N;
  const bool tb = transb != CUBLAS_OP_N;
  const int a_rows = ta ? k : m;  // A as stored: a_rows × (ta ? m : k)
  const int b_rows = tb ? n : k;
  if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < (a_rows > 1 ? a_rows : 1) ||
      ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1) || alpha == nullptr ||
      beta == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const bool supported_input =
      a_type == CUDA_R_32F || a_type == CUDA_R_16F || a_type == CUDA_R_16BF;
  if (!supported_input || b_type != a_type || c_type != CUDA_R_32F ||
      compute != CUBLAS_COMPUTE_32F) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const float al = *static_cast<const float*>(alpha);
  const float be = *static_cast<const float*>(beta);
  if ((k > 0 && (!inside_device_memory(a, a_type, a_rows, ta ? m : k, lda, stride_a, batch) ||
                 !inside_device_memory(b, b_type, b_rows, tb ? k : n, ldb, stride_b, batch))) ||
      !inside_device_memory(c, c_type, m, n, ldc, stride_c, batch)) {
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  for (int batch_index = 0; batch_index < batch; ++batch_index) {
    const auto* a_base = static_cast<const std::byte*>(a) +
                         std::int64_t(batch_index) * stride_a * std::int64_t(element_bytes(a_type));
    const auto* b_base = static_cast<const std::byte*>(b) +
                         std::int64_t(batch_index) * stride_b * std::int64_t(element_bytes(b_type));
    float* c_base = static_cast<float*>(c) + std::int64_t(batch_index) * stride_c;
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (int p = 0; p < k; ++p) {
          // op(A)(i, p) and op(B)(p, j), column-major as stored.
          const std::int64_t ai = ta ? p + std::int64_t(i) * lda : i + std::int64_t(p) * lda;
          const std::int64_t bi = tb ? j + std::int64_t(p) * ldb : p + std::int64_t(j) * ldb;
          acc += load(a_base, a_type, ai) * load(b_base, b_type, bi);
        }
        float& out = c_base[i + std::int64_t(j) * ldc];
        out = be == 0.0f ? al * acc : al * acc + be * out;
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace daedalus::cuda_emulation::blas

inline cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                                   cublasOperation_t transb, int m, int n, int k, const void* alpha,
                                   const void* A, cudaDataType Atype, int lda, const void* B,
                                   cudaDataType Btype, int ldb, const void* beta, void* C,
                                   cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                   cublasGemmAlgo_t) {
  return daedalus::cuda_emulation::blas::gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda,
                                              0, B, Btype, ldb, 0, beta, C, Ctype, ldc, 0, 1,
                                              computeType);
}

inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA,
    const void* B, cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C,
    cudaDataType Ctype, int ldc, long long int strideC, int batchCount,
    cublasComputeType_t computeType, cublasGemmAlgo_t) {
  return daedalus::cuda_emulation::blas::gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda,
                                              strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc,
                                              strideC, batchCount, computeType);
}
