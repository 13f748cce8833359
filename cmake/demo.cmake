# cmake -P cmake/demo.cmake
#
# Builds and runs the demo (examples/kvc_demo.cpp -> target kvc-demo) in Release, in build/.
# On Debian/Ubuntu as root it first installs the missing packages with apt-get.
# Options (before -P): -DBUILD_DIR=<dir> (default build/), -DKVC_JOBS=<n> (default 2),
#                      -DDEMO_ARGS="arg1;arg2" (passed to kvc-demo).
include("${CMAKE_CURRENT_LIST_DIR}/KvcScript.cmake")
if(NOT DEFINED BUILD_DIR)
  set(BUILD_DIR "${KVC_SOURCE_DIR}/build")
endif()
get_filename_component(BUILD_DIR "${BUILD_DIR}" ABSOLUTE BASE_DIR "${KVC_SOURCE_DIR}")

kvc_banner("kvc demo: dependencies")
kvc_ensure_debs(REQUIRED ${KVC_DEBS_BUILD} OPTIONAL ninja-build)

kvc_banner("kvc demo: configure (Release) in ${BUILD_DIR}")
kvc_configure("${BUILD_DIR}" -DCMAKE_BUILD_TYPE=Release
  -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON)

kvc_banner("kvc demo: build kvc-demo")
kvc_run("${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target kvc-demo -j ${KVC_JOBS})

kvc_banner("kvc demo: run")
set(demo "${BUILD_DIR}/bin/kvc-demo")
if(NOT EXISTS "${demo}")
  file(GLOB_RECURSE demo "${BUILD_DIR}/kvc-demo")
endif()
if(NOT demo)
  message(FATAL_ERROR "kvc: built kvc-demo but cannot find the executable under ${BUILD_DIR}")
endif()
kvc_run("${demo}" ${DEMO_ARGS})
