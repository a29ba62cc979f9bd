# SPDX-License-Identifier: Apache-2.0
#
# Package tests: build the consumer project in tests/package/ the way a user would.
#
#   daedalus_add_package_tests()        (tests/CMakeLists.txt) registers the CTest tests
#       package.find_package            install to a fresh prefix, find_package(daedalus CONFIG
#                                       REQUIRED), build and run the CPU consumer
#       package.find_package.cuda       the same with COMPONENTS cuda and a .cu consumer linking
#                                       daedalus::cuda: compiled and linked, not run (no GPU needed)
#       package.add_subdirectory        the consumer with add_subdirectory(<this source tree>); it
#                                       also checks that daedalus, as a subproject, defines only
#                                       the library targets, registers no tests, looks for neither
#                                       doctest nor Google Benchmark, and (without .cuda) neither
#                                       enables the CUDA language nor looks for a CUDA compiler
#       package.fetch_content           the same, with FetchContent_Declare(SOURCE_DIR <this
#                                       source tree>) and FetchContent_MakeAvailable
#       package.add_subdirectory.cuda   add_subdirectory with the .cu consumer: the consumer
#                                       enables CUDA and sets DAEDALUS_ENABLE_CUDA=ON
#   cmake -P DaedalusPackageTest.cmake  (what each test runs)
#
# Each test works in its own directory under <build>/package_test/, removed first, so a run never
# sees what an earlier one left; the install prefix is the only place find_package may look.

if(CMAKE_SCRIPT_MODE_FILE)
  foreach(var SOURCE_DIR BUILD_DIR WORK_DIR MODE CUDA GENERATOR CXX_COMPILER)
    if(NOT DEFINED ${var})
      message(FATAL_ERROR "DaedalusPackageTest.cmake: -D${var}=... is required")
    endif()
  endforeach()

  function(run step)
    message(STATUS "package test: ${ARGN}")
    execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
    if(NOT result EQUAL 0)
      message(FATAL_ERROR "package test (${MODE}, CUDA ${CUDA}): ${step} failed (${result})")
    endif()
  endfunction()

  file(REMOVE_RECURSE "${WORK_DIR}")
  file(MAKE_DIRECTORY "${WORK_DIR}")
  set(consumer_args
    -G "${GENERATOR}"
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DCONSUMER_CUDA=${CUDA}
    # Only the prefix below may provide daedalus: not the user package registry, not a build tree.
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
  if(CUDA)
    list(APPEND consumer_args -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}
                              "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}")
  endif()

  if(MODE STREQUAL "find_package")
    set(prefix "${WORK_DIR}/prefix")
    run(install "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
    list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${prefix} -DCONSUMER_EXPECTED_PREFIX=${prefix})
  elseif(MODE STREQUAL "add_subdirectory")
    list(APPEND consumer_args -DCONSUMER_DAEDALUS_SOURCE_DIR=${SOURCE_DIR})
  elseif(MODE STREQUAL "fetch_content")
    list(APPEND consumer_args -DCONSUMER_DAEDALUS_SOURCE_DIR=${SOURCE_DIR}
                              -DCONSUMER_FETCH_CONTENT=ON)
  else()
    message(FATAL_ERROR "DaedalusPackageTest.cmake: MODE is '${MODE}'; expected find_package, "
                        "add_subdirectory or fetch_content")
  endif()

  run(configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/package" -B "${WORK_DIR}/build"
      ${consumer_args})
  run(build "${CMAKE_COMMAND}" --build "${WORK_DIR}/build" -j 2)
  # The CPU consumer runs on any machine; the CUDA one is only compiled and linked.
  run(run "${WORK_DIR}/build/consumer")
  return()
endif()

include_guard(GLOBAL)

function(daedalus_add_package_tests)
  set(common
    -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -DBUILD_DIR=${PROJECT_BINARY_DIR}
    "-DGENERATOR=${CMAKE_GENERATOR}" -DCXX_COMPILER=${CMAKE_CXX_COMPILER})
  set(script "${PROJECT_SOURCE_DIR}/cmake/DaedalusPackageTest.cmake")
  set(work "${PROJECT_BINARY_DIR}/package_test")

  add_test(NAME package.find_package
    COMMAND "${CMAKE_COMMAND}" ${common} -DMODE=find_package -DCUDA=OFF
            -DWORK_DIR=${work}/find_package -P "${script}")
  add_test(NAME package.add_subdirectory
    COMMAND "${CMAKE_COMMAND}" ${common} -DMODE=add_subdirectory -DCUDA=OFF
            -DWORK_DIR=${work}/add_subdirectory -P "${script}")
  add_test(NAME package.fetch_content
    COMMAND "${CMAKE_COMMAND}" ${common} -DMODE=fetch_content -DCUDA=OFF
            -DWORK_DIR=${work}/fetch_content -P "${script}")
  set(tests package.find_package package.add_subdirectory package.fetch_content)
  if(DAEDALUS_ENABLE_CUDA)
    set(cuda_common -DCUDA=ON -DCUDA_COMPILER=${CMAKE_CUDA_COMPILER}
                    "-DCUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES}")
    add_test(NAME package.find_package.cuda
      COMMAND "${CMAKE_COMMAND}" ${common} -DMODE=find_package ${cuda_common}
              -DWORK_DIR=${work}/find_package_cuda -P "${script}")
    add_test(NAME package.add_subdirectory.cuda
      COMMAND "${CMAKE_COMMAND}" ${common} -DMODE=add_subdirectory ${cuda_common}
              -DWORK_DIR=${work}/add_subdirectory_cuda -P "${script}")
    list(APPEND tests package.find_package.cuda package.add_subdirectory.cuda)
  endif()
  set_tests_properties(${tests} PROPERTIES LABELS package)
endfunction()
