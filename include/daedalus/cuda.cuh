// SPDX-License-Identifier: Apache-2.0
#pragma once

/// Umbrella header for CUDA users: everything in <daedalus/daedalus.hpp> plus the CUDA backend
/// (CudaBackend, DeviceBuffer, copies, DAEDALUS_CUDA_CHECK, the launch helper, cuBLAS GEMMs), the
/// device building blocks kernels use (dynamic shared memory, the m16n8k16 tensor-core wrapper),
/// the device latent caches (PagedLatentCache and ContiguousLatentCache with CudaBackend), and MLA
/// on the GPU (DeviceMlaWeights; mla::project / prefill / decode / absorbed_attention /
/// naive_attention with CudaBackend; the absorbed decode kernel).
/// Include it from .cu files compiled by nvcc. (daedalus's own tests also compile it with a
/// host compiler after the test-only CUDA emulation layer, which runs kernels on CPU threads.)
#if !defined(__CUDACC__) && !defined(DAEDALUS_CUDA_EMULATION)
#error \
    "<daedalus/cuda.cuh> must be compiled by nvcc (a .cu file in a target linked to daedalus::cuda); plain C++ code includes <daedalus/daedalus.hpp>"
#endif

#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/blas.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/convert_rows.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/cuda/element.cuh"
#include "daedalus/cuda/launch.cuh"
#include "daedalus/cuda/mma.cuh"
#include "daedalus/cuda/platform.cuh"
#include "daedalus/cuda/shared_memory.cuh"
#include "daedalus/daedalus.hpp"
// The device latent caches and MLA on the GPU (after the CPU headers they specialise).
#include "daedalus/kv_cache/cuda/contiguous.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/kv_cache/cuda/encode_rows.cuh"
#include "daedalus/kv_cache/cuda/paged.cuh"
#include "daedalus/mla/cuda/absorbed_decode.cuh"
#include "daedalus/mla/cuda/attention.cuh"
#include "daedalus/mla/cuda/norm_rope.cuh"
#include "daedalus/mla/cuda/prefill.cuh"
#include "daedalus/mla/cuda/weights.cuh"
#include "daedalus/moe/cuda/balance.cuh"
#include "daedalus/moe/cuda/dispatch.cuh"
#include "daedalus/moe/cuda/experts.cuh"
#include "daedalus/moe/cuda/experts_cublas.cuh"
#include "daedalus/moe/cuda/gate.cuh"
#include "daedalus/moe/cuda/layer.cuh"
#include "daedalus/moe/cuda/routing_plan.cuh"
