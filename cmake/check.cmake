# cmake -P cmake/check.cmake
#
# Everything CI checks, in order; any failure stops with a non-zero exit:
#   release  Release build (KVC_WERROR=ON) in build/release; ctest (unit tests, header check,
#            bench/example smoke tests)
#   asan     Debug -O1 build with KVC_SANITIZE=ON (ASan+UBSan) in build/asan: builds only
#            kvc_tests (no bench/examples/header check); ctest
#   package  install build/release to a temp prefix; find_package(kvc) from tests/package
#   cuda     if nvcc exists: KVC_ENABLE_CUDA=ON build in build/cuda compiling every
#            include/kvc/cuda header with nvcc (compile only, no GPU) + package test with
#            COMPONENTS cuda; else skipped
#   format   clang-format --dry-run -Werror over include/ tests/ bench/ examples/ (if present)
# On Debian/Ubuntu as root, missing packages are installed first (apt-get).
# Options (before -P): -DSTEPS="release;format" (a subset, same order), -DKVC_JOBS=<n> (2),
#                      -DNVCC=<path to nvcc>.
include("${CMAKE_CURRENT_LIST_DIR}/KvcScript.cmake")
set(all_steps release asan package cuda format)
if(NOT DEFINED STEPS)
  set(STEPS ${all_steps})
endif()
string(REPLACE "," ";" STEPS "${STEPS}")
foreach(step IN LISTS STEPS)
  if(NOT step IN_LIST all_steps)
    message(FATAL_ERROR "kvc: unknown step '${step}' (steps: ${all_steps})")
  endif()
endforeach()
set(build "${KVC_SOURCE_DIR}/build")
string(TIMESTAMP started "%s")

kvc_banner("kvc check: dependencies")
kvc_ensure_debs(REQUIRED ${KVC_DEBS_BUILD} ${KVC_DEBS_TEST} OPTIONAL ${KVC_DEBS_EXTRA})

if("release" IN_LIST STEPS)
  kvc_banner("kvc check [release]: Release build, KVC_WERROR=ON, all tests")
  kvc_configure("${build}/release" -DCMAKE_BUILD_TYPE=Release -DKVC_WERROR=ON
    -DKVC_SANITIZE=OFF -DKVC_ENABLE_CUDA=OFF
    -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=ON -DKVC_BUILD_EXAMPLES=ON)
  kvc_run("${CMAKE_COMMAND}" --build "${build}/release" -j ${KVC_JOBS})
  kvc_run("${CMAKE_CTEST_COMMAND}" --test-dir "${build}/release" --output-on-failure
    --no-tests=error -j ${KVC_JOBS})
endif()

if("asan" IN_LIST STEPS)
  kvc_banner("kvc check [asan]: Debug -O1, KVC_SANITIZE=ON (ASan + UBSan), unit tests")
  # -g1 (line tables, enough for ASan/UBSan stack traces) rather than -g: the recipe test's
  # TU, which instantiates every (scorer, quantizer) KvCache, compiles in 405 s instead of
  # 541 s under the sanitizers, and it is this stage's long pole.
  kvc_configure("${build}/asan" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1"
    -DKVC_SANITIZE=ON -DKVC_WERROR=OFF -DKVC_ENABLE_CUDA=OFF
    -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF)
  kvc_run("${CMAKE_COMMAND}" --build "${build}/asan" --target kvc_tests -j ${KVC_JOBS})
  set(ENV{ASAN_OPTIONS} "detect_leaks=1:strict_init_order=1:check_initialization_order=1")
  set(ENV{UBSAN_OPTIONS} "print_stacktrace=1:halt_on_error=1")
  kvc_run("${CMAKE_CTEST_COMMAND}" --test-dir "${build}/asan" --output-on-failure
    --no-tests=error -j ${KVC_JOBS})
endif()

if("package" IN_LIST STEPS)
  kvc_banner("kvc check [package]: install + find_package(kvc) consumer (tests/package)")
  kvc_run("${CMAKE_COMMAND}" "-DBUILD_DIR=${build}/release" -DKVC_JOBS=${KVC_JOBS}
    -P "${KVC_SOURCE_DIR}/cmake/package_test.cmake")
endif()

if("cuda" IN_LIST STEPS)
  if(NOT DEFINED NVCC)
    find_program(NVCC nvcc HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin)
  endif()
  if(NVCC)
    kvc_banner("kvc check [cuda]: KVC_ENABLE_CUDA=ON, nvcc compiles include/kvc/cuda (no GPU)")
    kvc_configure("${build}/cuda" -DCMAKE_BUILD_TYPE=Release -DKVC_ENABLE_CUDA=ON
      "-DCMAKE_CUDA_COMPILER=${NVCC}"
      -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF)
    kvc_run("${CMAKE_COMMAND}" --build "${build}/cuda" -j ${KVC_JOBS})
    kvc_run("${CMAKE_COMMAND}" "-DBUILD_DIR=${build}/cuda" -DCUDA=ON -DKVC_JOBS=${KVC_JOBS}
      -P "${KVC_SOURCE_DIR}/cmake/package_test.cmake")
  else()
    kvc_banner("kvc check [cuda]: SKIPPED (no nvcc on PATH or in /usr/local/cuda/bin)")
  endif()
endif()

if("format" IN_LIST STEPS)
  find_program(CLANG_FORMAT NAMES clang-format clang-format-19 clang-format-18 clang-format-17
               clang-format-16 clang-format-15 clang-format-14)
  if(CLANG_FORMAT)
    kvc_banner("kvc check [format]: clang-format --dry-run -Werror")
    set(sources "")
    foreach(dir include tests bench examples)
      file(GLOB_RECURSE found "${KVC_SOURCE_DIR}/${dir}/*.hpp" "${KVC_SOURCE_DIR}/${dir}/*.h"
           "${KVC_SOURCE_DIR}/${dir}/*.cpp" "${KVC_SOURCE_DIR}/${dir}/*.cuh"
           "${KVC_SOURCE_DIR}/${dir}/*.cu")
      list(APPEND sources ${found})
    endforeach()
    list(LENGTH sources count)
    execute_process(COMMAND "${CLANG_FORMAT}" --version)
    if(count EQUAL 0)
      message(STATUS "kvc: no sources to check")
    else()
      message(STATUS "$ ${CLANG_FORMAT} --dry-run -Werror <${count} files>")
      execute_process(COMMAND "${CLANG_FORMAT}" --style=file --dry-run -Werror ${sources}
                      RESULT_VARIABLE rc)
      if(NOT rc EQUAL 0)
        message(FATAL_ERROR "kvc: clang-format found unformatted files (see above); fix with\n"
                            "  clang-format -i $(git ls-files '*.hpp' '*.cpp' '*.cuh' '*.cu')")
      endif()
    endif()
  else()
    kvc_banner("kvc check [format]: SKIPPED (no clang-format)")
  endif()
endif()

string(TIMESTAMP finished "%s")
math(EXPR seconds "${finished} - ${started}")
kvc_banner("kvc check: all requested steps passed (${STEPS}) in ${seconds} s")
