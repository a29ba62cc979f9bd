// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <utility>

#include "daedalus/core/backend.hpp"
#include "daedalus/cuda/check.cuh"

namespace daedalus {

/// The CUDA backend: kernels and copies go to one CUDA stream, in order. Cheap to copy; does not
/// own the stream. `CudaBackend{}` uses the legacy default stream; `.on(stream)` gives the same
/// backend on another stream, as Thrust's `thrust::cuda::par.on(stream)`:
/// `mla::decode(cuda.on(stream), ...)`.
class CudaBackend {
 public:
  using memory_space = DeviceMemory;
  static constexpr const char* name = "cuda";

  CudaBackend() = default;

  /// @param stream the stream every operation is issued to (not owned).
  explicit CudaBackend(cudaStream_t stream) : stream_(stream) {}

  /// This backend on `stream`.
  [[nodiscard]] CudaBackend on(cudaStream_t stream) const { return CudaBackend(stream); }

  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  /// Waits until everything issued to the stream has finished.
  /// @throws CudaError when the stream reports an error (including one from an earlier kernel).
  void synchronize() const { DAEDALUS_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
};

static_assert(Backend<CudaBackend>);

namespace cuda {

/// An owned, non-blocking CUDA stream (RAII): created in the constructor, destroyed with the
/// object. Move-only.
class Stream {
 public:
  /// @throws CudaError when the stream cannot be created.
  Stream() { DAEDALUS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~Stream() { reset(); }
  Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept {
    if (this != &other) {
      reset();
      stream_ = std::exchange(other.stream_, nullptr);
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }
  operator cudaStream_t() const noexcept { return stream_; }  // NOLINT: a stream is a stream

 private:
  void reset() noexcept {
    // A destructor cannot throw; a failure to destroy a stream leaves nothing to recover.
    if (stream_ != nullptr) static_cast<void>(cudaStreamDestroy(stream_));
    stream_ = nullptr;
  }
  cudaStream_t stream_ = nullptr;
};

}  // namespace cuda
}  // namespace daedalus
