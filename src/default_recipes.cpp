// src/default_recipes.cpp — one row of the default recipe registry, compiled once per build
// tree: src/CMakeLists.txt compiles this file once per row of kvc::recipe_quantizers with
// -DKVC_RECIPE_ROW=<row>, and library kvc_default_recipes holds the results. kvc's own
// programs that call make_cache with the default registry link it (with
// KVC_EXTERN_DEFAULT_RECIPES, which it brings), so that they instantiate no row themselves.
#include <kvc/runtime/recipe.hpp>

#ifndef KVC_RECIPE_ROW
#error "src/default_recipes.cpp: compile with -DKVC_RECIPE_ROW=<row> (see src/CMakeLists.txt)"
#endif
static_assert(KVC_RECIPE_ROW < KVC_DEFAULT_RECIPE_ROW_COUNT,
              "KVC_RECIPE_ROW is past the last row of kvc::recipe_quantizers");

KVC_INSTANTIATE_DEFAULT_RECIPE_ROW(KVC_RECIPE_ROW);
