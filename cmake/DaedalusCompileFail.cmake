# SPDX-License-Identifier: Apache-2.0
#
# Compile-fail tests: every tests/compile_fail/*.cpp (and *.cu when CUDA is on) is a misuse of the
# library that must NOT compile, and must fail with the sentence its `// expected-error: <regex>`
# lines give (every such line must match the compiler's output; CMake regex syntax).
#
#   daedalus_add_compile_fail_tests()   (tests/CMakeLists.txt) one EXCLUDE_FROM_ALL object library
#                                       and one CTest test "compile_fail.<name>" per file
#   cmake -P DaedalusCompileFail.cmake  (what each test runs) builds that library and passes when
#                                       the build fails AND every expected-error regex matches
#
# Why a driver rather than CTest's WILL_FAIL + PASS_REGULAR_EXPRESSION: CTest ignores the exit
# code once PASS_REGULAR_EXPRESSION is set and WILL_FAIL then inverts the regex verdict, so the two
# cannot be combined into "fails, and with this message". The driver checks both.

if(CMAKE_SCRIPT_MODE_FILE)
  foreach(var BUILD_DIR TARGET SOURCE)
    if(NOT DEFINED ${var})
      message(FATAL_ERROR "DaedalusCompileFail.cmake: -D${var}=... is required")
    endif()
  endforeach()
  file(STRINGS "${SOURCE}" expected REGEX "^// expected-error: ")
  if(NOT expected)
    message(FATAL_ERROR "${SOURCE}: no '// expected-error: <regex>' line; every compile-fail "
                        "case must say which sentence it expects")
  endif()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}"
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)
  if(result EQUAL 0)
    message(FATAL_ERROR "${SOURCE} compiled, but it is a misuse that must not compile")
  endif()
  set(missing "")
  foreach(line IN LISTS expected)
    string(REGEX REPLACE "^// expected-error: " "" regex "${line}")
    if(NOT output MATCHES "${regex}")
      string(APPEND missing "\n  ${regex}")
    endif()
  endforeach()
  if(missing)
    message("${output}")
    message(FATAL_ERROR "${SOURCE} failed to compile, but the output above lacks:${missing}")
  endif()
  message(STATUS "${SOURCE}: fails to compile, as expected, with every expected sentence")
  return()
endif()

include_guard(GLOBAL)

function(daedalus_add_compile_fail_tests)
  set(dir "${PROJECT_SOURCE_DIR}/tests/compile_fail")
  file(GLOB cases CONFIGURE_DEPENDS "${dir}/*.cpp")
  if(CMAKE_CUDA_COMPILER_LOADED)
    file(GLOB cuda_cases CONFIGURE_DEPENDS "${dir}/*.cu")
    list(APPEND cases ${cuda_cases})
  endif()
  foreach(source IN LISTS cases)
    get_filename_component(name "${source}" NAME_WE)
    get_filename_component(ext "${source}" LAST_EXT)
    set(target compile_fail_${name})
    add_library(${target} OBJECT EXCLUDE_FROM_ALL "${source}")
    if(ext STREQUAL ".cu")
      target_link_libraries(${target} PRIVATE daedalus::cuda)
    else()
      target_link_libraries(${target} PRIVATE daedalus::daedalus)
    endif()
    set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF CUDA_EXTENSIONS OFF)
    add_test(NAME compile_fail.${name}
      COMMAND "${CMAKE_COMMAND}" -DBUILD_DIR=${PROJECT_BINARY_DIR} -DTARGET=${target}
              -DSOURCE=${source} -P "${PROJECT_SOURCE_DIR}/cmake/DaedalusCompileFail.cmake")
    # Builds in this build tree: one at a time, never beside another `cmake --build` of it.
    set_tests_properties(compile_fail.${name} PROPERTIES
      RESOURCE_LOCK daedalus_build_tree LABELS compile_fail)
  endforeach()
endfunction()
