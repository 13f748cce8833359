// kvc/core/format.hpp — includes {fmt} the way every kvc header needs it.
//
// nvcc's front end claims consteval support but rejects fmt 9's consteval format-string
// constructor; under nvcc only, format strings are therefore checked at run time instead
// of compile time (the host compiler still checks them in every non-CUDA build).
#pragma once

#if defined(__CUDACC__) && !defined(FMT_CONSTEVAL)
#define FMT_CONSTEVAL
#endif

#include <fmt/format.h>
