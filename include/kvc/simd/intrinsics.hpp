// kvc/simd/intrinsics.hpp — includes <immintrin.h> and xsimd for every kvc/simd header.
//
// g++ 12's AVX-512 intrinsic headers initialize their "undefined" vectors from themselves
// (`__m512 __Y = __Y;`), which -Wmaybe-uninitialized reports wherever they are inlined
// (GCC bug 105593, fixed in GCC 13). The warning's location is inside those headers, so it
// is silenced for them here, where they are first included — kvc's users keep the warning
// for their own code.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif
#include <xsimd/xsimd.hpp>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
