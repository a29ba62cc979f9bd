// SPDX-License-Identifier: Apache-2.0
// The entry point of daedalus_cuda_tests (compiled by the host compiler): prints the data seed,
// then runs the doctest cases of tests/cuda/*.cu on the first CUDA device. When no device
// answers it says so, names how many test cases it skipped, and exits with 77, which CTest
// reports as "skipped" (SKIP_RETURN_CODE), not as a failure.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "support/seed_main.hpp"

namespace {

/// The number of test cases doctest would run with these arguments (its --count output).
int count_test_cases(int argc, char** argv) {
  std::vector<const char*> arguments(argv, argv + argc);
  arguments.push_back("--count");
  std::ostringstream out;
  doctest::Context context(static_cast<int>(arguments.size()), arguments.data());
  context.setCout(&out);
  context.run();
  const std::string text = out.str();
  const auto colon = text.find_last_of(':');
  return colon == std::string::npos ? -1 : std::atoi(text.c_str() + colon + 1);
}

}  // namespace

int main(int argc, char** argv) {
  daedalus::testing::test_binary_name() = "daedalus_cuda_tests";
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf(
        "daedalus_cuda_tests: no CUDA device answered (%s); skipped %d test cases (exit 77). "
        "The same kernels run on the CPU in daedalus_emulated_tests.\n",
        status != cudaSuccess ? cudaGetErrorString(status)
                              : "cudaGetDeviceCount reported 0 devices",
        count_test_cases(argc, argv));
    return 77;
  }
  daedalus::testing::print_seed();
  doctest::Context context(argc, argv);
  return context.run();
}
