// SPDX-License-Identifier: Apache-2.0
// The device latent caches on a real device: the same bodies that daedalus_emulated_tests runs
// on the CPU (tests/cuda/cases/kv_cache_checks.hpp).
#include <daedalus/cuda.cuh>
#include <daedalus/kv_cache/cuda/contiguous.cuh>
#include <daedalus/kv_cache/cuda/paged.cuh>

#include "cuda/cases/kv_cache_checks.hpp"
