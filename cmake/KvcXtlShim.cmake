# Debian 12's xsimd 8.1 CMake export says INTERFACE_LINK_LIBRARIES "xtl" but xtl is not
# installed with it, so linking xsimd ends in `cannot find -lxtl`. Use the real xtl if it is
# installed, else define an empty imported `xtl` target. Include this BEFORE find_package(xsimd).
# Installed next to kvcConfig.cmake, which includes it too.
if(NOT TARGET xtl)
  find_package(xtl QUIET CONFIG)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
