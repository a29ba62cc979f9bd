// SPDX-License-Identifier: Apache-2.0
#pragma once

/// Umbrella header for plain C++ users: the core, the model configs, and every component with
/// its CPU (Eigen) backend. CUDA users include <daedalus/cuda.cuh> from .cu files instead.

#include "daedalus/config/concepts.hpp"
#include "daedalus/config/presets.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/dtype.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/macros.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/kv_cache/block_allocator.hpp"
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/fp8.hpp"
#include "daedalus/kv_cache/memory.hpp"
#include "daedalus/kv_cache/paged.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/kv_cache/storage.hpp"
#include "daedalus/mla/attention.hpp"
#include "daedalus/mla/cpu/attention.hpp"
#include "daedalus/mla/rope.hpp"
#include "daedalus/mla/weights.hpp"
#include "daedalus/moe/balance.hpp"
#include "daedalus/moe/cpu/dispatch.hpp"
#include "daedalus/moe/cpu/experts.hpp"
#include "daedalus/moe/cpu/gate.hpp"
#include "daedalus/moe/dispatch.hpp"
#include "daedalus/moe/experts.hpp"
#include "daedalus/moe/gate.hpp"
#include "daedalus/moe/layer.hpp"
#include "daedalus/moe/routing_plan.hpp"
