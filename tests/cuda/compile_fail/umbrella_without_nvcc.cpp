// SPDX-License-Identifier: Apache-2.0
// Must NOT compile: <daedalus/cuda.cuh> is for nvcc. CTest (cuda_umbrella_requires_nvcc) runs the
// host compiler on this file and expects the header's sentence in its output.
#include <daedalus/cuda.cuh>
