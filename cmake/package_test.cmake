# cmake -P cmake/package_test.cmake
#
# Proves the installed package works for a consumer outside the tree:
#   1. cmake --install <BUILD_DIR> --prefix <BUILD_DIR>/package-test/prefix  (fresh prefix)
#   2. configure tests/package with CMAKE_PREFIX_PATH=<prefix>; check kvc was found THERE
#   3. build it and run it.
# Options (before -P): -DBUILD_DIR=<configured kvc build dir> (default build/release; it is
#   configured with tests/bench/examples OFF if it does not exist yet),
#   -DCUDA=ON (also require find_package(kvc COMPONENTS cuda); BUILD_DIR must have
#   KVC_ENABLE_CUDA=ON), -DKVC_JOBS=<n>.
include("${CMAKE_CURRENT_LIST_DIR}/KvcScript.cmake")
if(NOT DEFINED BUILD_DIR)
  set(BUILD_DIR "${KVC_SOURCE_DIR}/build/release")
endif()
get_filename_component(BUILD_DIR "${BUILD_DIR}" ABSOLUTE BASE_DIR "${KVC_SOURCE_DIR}")
if(NOT DEFINED CUDA)
  set(CUDA OFF)
endif()

if(NOT EXISTS "${BUILD_DIR}/CMakeCache.txt")
  kvc_configure("${BUILD_DIR}" -DCMAKE_BUILD_TYPE=Release
    -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF)
endif()

set(work "${BUILD_DIR}/package-test")
set(prefix "${work}/prefix")
set(consumer "${work}/build")
file(REMOVE_RECURSE "${work}")

kvc_run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")

kvc_generator_args(gen)
kvc_run("${CMAKE_COMMAND}" -S "${KVC_SOURCE_DIR}/tests/package" -B "${consumer}" ${gen}
  -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix}" -DKVC_PACKAGE_CUDA=${CUDA})

file(STRINGS "${consumer}/CMakeCache.txt" found REGEX "^kvc_DIR:PATH=")
string(REPLACE "kvc_DIR:PATH=" "" found "${found}")
string(FIND "${found}" "${prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "kvc: the consumer found kvc in '${found}', not in the fresh prefix ${prefix}")
endif()

kvc_run("${CMAKE_COMMAND}" --build "${consumer}" -j ${KVC_JOBS})
kvc_run("${consumer}/kvc_package_test")
message(STATUS "kvc: package test passed (installed to ${prefix}, found at ${found})")
