// kvc/simd/xsimd_compat.hpp — the few xsimd names that moved between releases.
//
// Provides, in kvc::simd::detail:
//   reduce_add(batch)   horizontal sum   (xsimd 8.1 `hadd`; renamed `reduce_add` in 9.0)
//   reduce_max(batch)   horizontal max   (absent in 8.1; `reduce_max` from 9.0)
//   reduce_min(batch)   horizontal min   (absent in 8.1; `reduce_min` from 9.0). Not
//                       −reduce_max(−x): xsimd 8's negation is 0 − x, which loses a −0.
//   bitcast<To>(batch)  reinterpret the lanes' bits as To (`bitwise_cast<batch<To, A>>` in
//                       8.x, `bitwise_cast<To>` later; told apart by the return type)
//   common_arch         the arch-independent fallback arch (`generic` until 13.x, `common`
//                       from 14.0), for code that wants to name it.
// Everything else kvc uses (batch, load/store_unaligned, fma, max, select, bitwise_cast,
// exp, default_arch) is stable from 8.1 on. XSIMD_VERSION_MAJOR comes from
// <xsimd/config/xsimd_config.hpp>, which <xsimd/xsimd.hpp> includes.
#pragma once

#include <kvc/simd/intrinsics.hpp>

#include <cstddef>
#include <type_traits>

#if !defined(XSIMD_VERSION_MAJOR)
#error "kvc/simd: XSIMD_VERSION_MAJOR is not defined; is <xsimd/xsimd.hpp> xsimd >= 8.1?"
#endif

namespace kvc::simd::detail {

#if XSIMD_VERSION_MAJOR >= 14
using common_arch = xsimd::common;
#else
using common_arch = xsimd::generic;
#endif

template <class T, class Arch>
inline T reduce_add(const xsimd::batch<T, Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(x);
#else
  return xsimd::hadd(x);
#endif
}

template <class To, class From, class Arch>
inline xsimd::batch<To, Arch> bitcast(const xsimd::batch<From, Arch>& x) noexcept {
  // 8.x declares `template <class B, class T, class A> B bitwise_cast(batch<T, A>)`, so
  // bitwise_cast<To> would be declared to return a scalar To there; the body is never
  // instantiated, only the declaration is inspected.
  if constexpr (std::is_same_v<decltype(xsimd::bitwise_cast<To>(x)), xsimd::batch<To, Arch>>) {
    return xsimd::bitwise_cast<To>(x);
  } else {
    return xsimd::bitwise_cast<xsimd::batch<To, Arch>>(x);
  }
}

// xsimd 8.1's missing reductions: the lanes stored and scanned, keeping lane i where
// better(lane i, best) (a NaN lane never replaces a number after the first lane).
template <class T, class Arch, class Better>
inline T reduce_lanes(const xsimd::batch<T, Arch>& x, Better better) noexcept {
  alignas(64) T lanes[xsimd::batch<T, Arch>::size];
  x.store_aligned(lanes);
  T best = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<T, Arch>::size; ++i)
    best = better(lanes[i], best) ? lanes[i] : best;
  return best;
}

template <class T, class Arch>
inline T reduce_max(const xsimd::batch<T, Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_max(x);
#else
  return reduce_lanes(x, [](T a, T b) { return a > b; });
#endif
}

template <class T, class Arch>
inline T reduce_min(const xsimd::batch<T, Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_min(x);
#else
  return reduce_lanes(x, [](T a, T b) { return a < b; });
#endif
}

}  // namespace kvc::simd::detail
