# Helpers shared by the `cmake -P` driver scripts (demo.cmake, check.cmake, package_test.cmake).
# Not used by the build itself, not installed.
cmake_minimum_required(VERSION 3.21)

get_filename_component(KVC_SOURCE_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
if(NOT DEFINED KVC_JOBS)
  set(KVC_JOBS 2)
endif()

# Debian packages, by purpose. Running as root installs whatever is missing (apt-get).
# KVC_DEBS_BUILD: configure + build kvc and its examples; KVC_DEBS_TEST: tests and benchmarks;
# KVC_DEBS_EXTRA: nice to have (ninja is faster than make; clang-format for the format step).
set(KVC_DEBS_BUILD g++ make libeigen3-dev libxsimd-dev libfmt-dev nlohmann-json3-dev)
set(KVC_DEBS_TEST catch2 libbenchmark-dev)
set(KVC_DEBS_EXTRA ninja-build clang-format)

function(kvc_banner text)
  string(TIMESTAMP now "%H:%M:%S")
  message(STATUS "")
  message(STATUS "================================================================================")
  message(STATUS "== ${text}   [${now}]")
  message(STATUS "================================================================================")
endfunction()

# kvc_run(<command> [args...]): run it (output streams through), stop the script on failure.
function(kvc_run)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "$ ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kvc: command failed (${rc}): ${shown}")
  endif()
endfunction()

# kvc_ensure_debs(REQUIRED <package>... [OPTIONAL <package>...]): on Debian/Ubuntu, install
# whatever is missing when root; otherwise stop with the apt-get line if a REQUIRED package is
# missing (a missing OPTIONAL one only warns). Elsewhere, say what is assumed and go on.
function(kvc_ensure_debs)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "" "REQUIRED;OPTIONAL")
  find_program(KVC_DPKG_QUERY dpkg-query)
  if(NOT KVC_DPKG_QUERY)
    string(REPLACE ";" " " list "${arg_REQUIRED};${arg_OPTIONAL}")
    message(STATUS "kvc: not a dpkg system; assuming the equivalents of these are installed: ${list}")
    return()
  endif()
  set(missing "")
  set(missing_required "")
  foreach(pkg IN LISTS arg_REQUIRED arg_OPTIONAL)
    execute_process(COMMAND "${KVC_DPKG_QUERY}" -W -f=\${Status} ${pkg}
                    OUTPUT_VARIABLE status ERROR_QUIET RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0 OR NOT status MATCHES "install ok installed")
      list(APPEND missing ${pkg})
      if(pkg IN_LIST arg_REQUIRED)
        list(APPEND missing_required ${pkg})
      endif()
    endif()
  endforeach()
  if(NOT missing)
    return()
  endif()
  string(REPLACE ";" " " missing_text "${missing}")
  execute_process(COMMAND id -u OUTPUT_VARIABLE uid OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT uid STREQUAL "0")
    if(missing_required)
      message(FATAL_ERROR "kvc: missing Debian packages: ${missing_text}\n"
                          "Install them (as root), then run this again:\n"
                          "  sudo apt-get install -y ${missing_text}")
    endif()
    message(WARNING "kvc: optional Debian packages missing (the steps needing them are "
                    "skipped): ${missing_text}\n  sudo apt-get install -y ${missing_text}")
    return()
  endif()
  message(STATUS "kvc: installing missing Debian packages: ${missing_text}")
  set(ENV{DEBIAN_FRONTEND} noninteractive)
  kvc_run(apt-get update -q)
  kvc_run(apt-get install -y -q --no-install-recommends ${missing})
endfunction()

# Ninja when available (it is in KVC_DEBS_BUILD), else CMake's default generator.
function(kvc_generator_args out_var)
  find_program(KVC_NINJA NAMES ninja ninja-build)
  if(KVC_NINJA)
    set(${out_var} -G Ninja PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

# kvc_configure(<build dir> [cmake -D args...]): configure kvc's source tree into <build dir>;
# a build dir made with another generator is wiped first.
function(kvc_configure build_dir)
  kvc_generator_args(gen)
  if(EXISTS "${build_dir}/CMakeCache.txt")
    file(STRINGS "${build_dir}/CMakeCache.txt" cached REGEX "^CMAKE_GENERATOR:INTERNAL=")
    string(REPLACE "CMAKE_GENERATOR:INTERNAL=" "" cached "${cached}")
    set(wanted "Ninja")
    if(NOT gen)
      set(wanted "Unix Makefiles")
    endif()
    if(NOT cached STREQUAL wanted)
      message(STATUS "kvc: ${build_dir} was made by '${cached}', starting it afresh")
      file(REMOVE_RECURSE "${build_dir}")
    endif()
  endif()
  kvc_run("${CMAKE_COMMAND}" -S "${KVC_SOURCE_DIR}" -B "${build_dir}" ${gen} ${ARGN})
endfunction()
