// SPDX-License-Identifier: Apache-2.0
// Smoke test of the CUDA build: the core headers compile under nvcc, a kernel using
// DAEDALUS_HOST_DEVICE launches on the device and returns the right numbers.
//
// Exit codes: 0 all passed, 1 a check failed, 77 no CUDA device answered (CTest's
// SKIP_RETURN_CODE for daedalus_cuda_tests, so machines without a GPU report "skipped").
#include <cuda_runtime.h>

#include <cstdio>
#include <daedalus/daedalus.hpp>
#include <vector>

// Local stand-in until the library's DAEDALUS_CUDA_CHECK (daedalus/cuda/) exists: reports the
// call, file:line and CUDA's error string, then fails the test case.
#define SMOKE_CUDA_CHECK(call)                                                          \
  do {                                                                                  \
    const cudaError_t smoke_status_ = (call);                                           \
    if (smoke_status_ != cudaSuccess) {                                                 \
      std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #call,    \
                   cudaGetErrorString(smoke_status_), cudaGetErrorName(smoke_status_)); \
      return false;                                                                     \
    }                                                                                   \
  } while (0)

namespace {

DAEDALUS_HOST_DEVICE inline float add(float a, float b) { return a + b; }

__global__ void add_kernel(const float* a,  // [n]
                           const float* b,  // [n]
                           float* c,        // [n]
                           int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) c[i] = add(a[i], b[i]);
}

/// Adds two arrays of a size that is not a multiple of the block size, so the bounds check in
/// the kernel is exercised, and compares every element with the host result.
bool vector_add_matches_host() {
  constexpr int n = 1000;
  constexpr int block = 128;
  std::vector<float> a(n), b(n), c(n, -1.0f);
  for (int i = 0; i < n; ++i) {
    a[i] = 0.5f * static_cast<float>(i);
    b[i] = 3.0f - static_cast<float>(i % 7);
  }
  const std::size_t bytes = n * sizeof(float);

  float* d_a = nullptr;
  float* d_b = nullptr;
  float* d_c = nullptr;
  SMOKE_CUDA_CHECK(cudaMalloc(&d_a, bytes));
  SMOKE_CUDA_CHECK(cudaMalloc(&d_b, bytes));
  SMOKE_CUDA_CHECK(cudaMalloc(&d_c, bytes));
  SMOKE_CUDA_CHECK(cudaMemcpy(d_a, a.data(), bytes, cudaMemcpyHostToDevice));
  SMOKE_CUDA_CHECK(cudaMemcpy(d_b, b.data(), bytes, cudaMemcpyHostToDevice));
  add_kernel<<<(n + block - 1) / block, block>>>(d_a, d_b, d_c, n);
  SMOKE_CUDA_CHECK(cudaGetLastError());
  SMOKE_CUDA_CHECK(cudaDeviceSynchronize());
  SMOKE_CUDA_CHECK(cudaMemcpy(c.data(), d_c, bytes, cudaMemcpyDeviceToHost));
  SMOKE_CUDA_CHECK(cudaFree(d_a));
  SMOKE_CUDA_CHECK(cudaFree(d_b));
  SMOKE_CUDA_CHECK(cudaFree(d_c));

  int wrong = 0;
  for (int i = 0; i < n; ++i) {
    // One float addition on either side, same rounding: the results must be identical.
    if (c[i] != add(a[i], b[i])) {
      if (wrong < 5) {
        std::fprintf(stderr, "vector_add_matches_host: c[%d] = %g; expected %g\n", i,
                     static_cast<double>(c[i]), static_cast<double>(add(a[i], b[i])));
      }
      ++wrong;
    }
  }
  if (wrong != 0) std::fprintf(stderr, "vector_add_matches_host: %d of %d wrong\n", wrong, n);
  return wrong == 0;
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("daedalus_cuda_tests: no CUDA device answered (%s); skipped 1 test case\n",
                status != cudaSuccess ? cudaGetErrorString(status)
                                      : "cudaGetDeviceCount reported 0 devices");
    return 77;
  }

  const bool passed = vector_add_matches_host();
  std::printf("daedalus_cuda_tests: %s vector_add_matches_host\n", passed ? "PASS" : "FAIL");
  std::printf("daedalus_cuda_tests: %d passed, %d failed\n", passed ? 1 : 0, passed ? 0 : 1);
  return passed ? 0 : 1;
}
