// SPDX-License-Identifier: Apache-2.0
#pragma once

/// Marks a function usable from host and device code when compiled by nvcc; a no-op for g++.
#if defined(__CUDACC__)
#define DAEDALUS_HOST_DEVICE __host__ __device__
#else
#define DAEDALUS_HOST_DEVICE
#endif

/// Version of the library, kept equal to the CMake project version.
#define DAEDALUS_VERSION_MAJOR 0
#define DAEDALUS_VERSION_MINOR 1
#define DAEDALUS_VERSION_PATCH 0
