// SPDX-License-Identifier: Apache-2.0
#pragma once

// The cuBLAS subset daedalus uses (include/daedalus/cuda/blas.cuh), for the CUDA emulation layer:
// handles and streams, cublasGemmEx and cublasGemmStridedBatchedEx with fp32 / fp16 / bf16
// inputs, an fp32 output (or, for 16-bit inputs, one of the inputs' type) and
// CUBLAS_COMPUTE_32F, and cublasGemmGroupedBatchedEx, computed on the host with plain loops.
// Included at the end of cuda_emulation.hpp; not meant to be included on its own.
//
// What it follows from the cuBLAS documentation ("cublasGemmEx", "cublasGemmStridedBatchedEx",
// "cublasGemmGroupedBatchedEx", "Data layout", "cublasSetStream"):
//   - matrices are column-major: element (i, j) of A is A[i + j·lda]; op(A) is A (CUBLAS_OP_N) or
//     Aᵀ (CUBLAS_OP_T / CUBLAS_OP_C, the same for real types);
//   - C = alpha·op(A)·op(B) + beta·C with op(A) m×k, op(B) k×n, C m×n; alpha and beta are host
//     floats (the default pointer mode); when beta is 0, C is not read (a NaN there does not
//     propagate), as in the reference BLAS;
//   - batch i uses A + i·strideA, B + i·strideB, C + i·strideC (a stride may be 0);
//   - CUBLAS_STATUS_INVALID_VALUE for m, n, k or batchCount < 0, lda < max(1, rows of A as
//     stored), ldb likewise, ldc < max(1, m); CUBLAS_STATUS_NOT_SUPPORTED for a type combination
//     outside {A = B in fp32, fp16, bf16} × C fp32 or C = A in fp16 / bf16 ×
//     CUBLAS_COMPUTE_32F; CUBLAS_STATUS_NOT_INITIALIZED for a null handle; nothing is computed
//     when m, n or batchCount is 0; when k is 0, C = beta·C;
//   - cublasGemmGroupedBatchedEx: group g has group_size[g] problems sharing transa_array[g],
//     m/n/k/lda/ldb/ldc_array[g], alpha_array[g] and beta_array[g] (all HOST arrays of
//     group_count entries); problem i (over all groups, in order) multiplies Aarray[i] and
//     Barray[i] into Carray[i] (DEVICE arrays of device pointers, one entry per problem); types
//     A = B = C in fp32, fp16 or bf16 with CUBLAS_COMPUTE_32F, anything else
//     CUBLAS_STATUS_NOT_SUPPORTED; CUBLAS_STATUS_INVALID_VALUE for a null array, a negative
//     group_count, group size, m, n or k, or a leading dimension as for cublasGemmEx; zero sizes
//     are allowed (nothing computed).
// Products accumulate in fp32 (each term the product of the widened inputs, added in k order),
// as the tensor cores accumulate, and a 16-bit C is rounded to nearest even once at the end; the
// summation order differs from cuBLAS's, which is within the fp32 rounding every caller's
// tolerance already allows. A matrix (or a pointer array) that does not lie inside a device
// allocation (a host pointer, an overrun) gives CUBLAS_STATUS_EXECUTION_FAILED, where a GPU would
// fault; every matrix is checked before any is written.

#include <cstddef>
#include <cstdint>
#include <cstring>

/// The cuBLAS release this subset follows (cublas_api.h's encoding: major · 10000 + minor · 100 +
/// patch): 12.5, the first with cublasGemmGroupedBatchedEx.
#if !defined(CUBLAS_VERSION)
#define CUBLAS_VERSION 120500
#endif

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

/// Stores fp32 `value` as element `index` of a matrix of type `type` (rounded to nearest even).
inline void store(void* base, cudaDataType type, std::int64_t index, float value) {
  switch (type) {
    case CUDA_R_32F:
      static_cast<float*>(base)[index] = value;
      return;
    case CUDA_R_16F:
      static_cast<__half*>(base)[index] = __half(value);
      return;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(base)[index] = __nv_bfloat16(value);
      return;
  }
}

/// One product C = alpha·op(A)·op(B) + beta·C (C not read when beta is 0), arguments checked.
inline void multiply(bool ta, bool tb, int m, int n, int k, float alpha, const void* a,
                     cudaDataType a_type, int lda, const void* b, cudaDataType b_type, int ldb,
                     float beta, void* c, cudaDataType c_type, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int p = 0; p < k; ++p) {
        // op(A)(i, p) and op(B)(p, j), column-major as stored.
        const std::int64_t ai = ta ? p + std::int64_t(i) * lda : i + std::int64_t(p) * lda;
        const std::int64_t bi = tb ? j + std::int64_t(p) * ldb : p + std::int64_t(j) * ldb;
        acc += load(a, a_type, ai) * load(b, b_type, bi);
      }
      const std::int64_t ci = i + std::int64_t(j) * ldc;
      store(c, c_type, ci, beta == 0.0f ? alpha * acc : alpha * acc + beta * load(c, c_type, ci));
    }
  }
}

/// True when the leading dimensions fit op(A) m×k, op(B) k×n and C m×n as cuBLAS requires.
inline bool valid_leading_dimensions(bool ta, bool tb, int m, int n, int k, int lda, int ldb,
                                     int ldc) {
  const int a_rows = ta ? k : m;  // A as stored: a_rows × (ta ? m : k)
  const int b_rows = tb ? n : k;
  return lda >= (a_rows > 1 ? a_rows : 1) && ldb >= (b_rows > 1 ? b_rows : 1) &&
         ldc >= (m > 1 ? m : 1);
}

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
  if (m < 0 || n < 0 || k < 0 || batch < 0 ||
      !valid_leading_dimensions(ta, tb, m, n, k, lda, ldb, ldc) || alpha == nullptr ||
      beta == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const bool supported_input =
      a_type == CUDA_R_32F || a_type == CUDA_R_16F || a_type == CUDA_R_16BF;
  if (!supported_input || b_type != a_type || (c_type != CUDA_R_32F && c_type != a_type) ||
      compute != CUBLAS_COMPUTE_32F) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const float al = *static_cast<const float*>(alpha);
  const float be = *static_cast<const float*>(beta);
  const int a_rows = ta ? k : m, b_rows = tb ? n : k;
  if ((k > 0 && (!inside_device_memory(a, a_type, a_rows, ta ? m : k, lda, stride_a, batch) ||
                 !inside_device_memory(b, b_type, b_rows, tb ? k : n, ldb, stride_b, batch))) ||
      !inside_device_memory(c, c_type, m, n, ldc, stride_c, batch)) {
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  for (int batch_index = 0; batch_index < batch; ++batch_index) {
    const auto offset = [&](const void* base, long long stride, cudaDataType type) {
      return static_cast<const std::byte*>(base) +
             std::int64_t(batch_index) * stride * std::int64_t(element_bytes(type));
    };
    multiply(ta, tb, m, n, k, al, offset(a, stride_a, a_type), a_type, lda,
             offset(b, stride_b, b_type), b_type, ldb, be,
             const_cast<std::byte*>(offset(c, stride_c, c_type)), c_type, ldc);
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasStatus_t gemm_grouped(cublasHandle_t handle, const cublasOperation_t* transa,
                                   const cublasOperation_t* transb, const int* m, const int* n,
                                   const int* k, const void* alpha, const void* const* a,
                                   cudaDataType a_type, const int* lda, const void* const* b,
                                   cudaDataType b_type, const int* ldb, const void* beta,
                                   void* const* c, cudaDataType c_type, const int* ldc,
                                   int group_count, const int* group_size,
                                   cublasComputeType_t compute) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (group_count == 0) return CUBLAS_STATUS_SUCCESS;
  if (transa == nullptr || transb == nullptr || m == nullptr || n == nullptr || k == nullptr ||
      alpha == nullptr || a == nullptr || lda == nullptr || b == nullptr || ldb == nullptr ||
      beta == nullptr || c == nullptr || ldc == nullptr || group_size == nullptr) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  std::int64_t problems = 0;
  for (int g = 0; g < group_count; ++g) {
    const bool ta = transa[g] != CUBLAS_OP_N, tb = transb[g] != CUBLAS_OP_N;
    if (m[g] < 0 || n[g] < 0 || k[g] < 0 || group_size[g] < 0 ||
        !valid_leading_dimensions(ta, tb, m[g], n[g], k[g], lda[g], ldb[g], ldc[g])) {
      return CUBLAS_STATUS_INVALID_VALUE;
    }
    problems += group_size[g];
  }
  const bool supported = a_type == CUDA_R_32F || a_type == CUDA_R_16F || a_type == CUDA_R_16BF;
  if (!supported || b_type != a_type || c_type != a_type || compute != CUBLAS_COMPUTE_32F) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  // The pointer arrays are read on the device: they must lie in device memory.
  const std::size_t array_bytes = std::size_t(problems) * sizeof(void*);
  if (problems > 0 && (!detail::allocations().contains(a, array_bytes) ||
                       !detail::allocations().contains(b, array_bytes) ||
                       !detail::allocations().contains(c, array_bytes))) {
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  const auto* alphas = static_cast<const float*>(alpha);
  const auto* betas = static_cast<const float*>(beta);
  // Every matrix is checked before any is written.
  for (int pass = 0; pass < 2; ++pass) {
    std::int64_t i = 0;
    for (int g = 0; g < group_count; ++g) {
      const bool ta = transa[g] != CUBLAS_OP_N, tb = transb[g] != CUBLAS_OP_N;
      for (int p = 0; p < group_size[g]; ++p, ++i) {
        if (m[g] == 0 || n[g] == 0) continue;
        if (pass == 0) {
          if ((k[g] > 0 && (!inside_device_memory(a[i], a_type, ta ? k[g] : m[g], ta ? m[g] : k[g],
                                                  lda[g], 0, 1) ||
                            !inside_device_memory(b[i], b_type, tb ? n[g] : k[g], tb ? k[g] : n[g],
                                                  ldb[g], 0, 1))) ||
              !inside_device_memory(c[i], c_type, m[g], n[g], ldc[g], 0, 1)) {
            return CUBLAS_STATUS_EXECUTION_FAILED;
          }
        } else {
          multiply(ta, tb, m[g], n[g], k[g], alphas[g], a[i], a_type, lda[g], b[i], b_type, ldb[g],
                   betas[g], c[i], c_type, ldc[g]);
        }
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

inline cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[],
    const cublasOperation_t transb_array[], const int m_array[], const int n_array[],
    const int k_array[], const void* alpha_array, const void* const Aarray[], cudaDataType_t Atype,
    const int lda_array[], const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
    const void* beta_array, void* const Carray[], cudaDataType_t Ctype, const int ldc_array[],
    int group_count, const int group_size[], cublasComputeType_t computeType) {
  return daedalus::cuda_emulation::blas::gemm_grouped(
      handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, Aarray, Atype,
      lda_array, Barray, Btype, ldb_array, beta_array, Carray, Ctype, ldc_array, group_count,
      group_size, computeType);
}
