// kvc/simd/xsimd_compat.hpp — the few xsimd names that moved between releases.
//
// xsimd 8.1 (Debian 12) calls the horizontal sum `hadd`; 9.0 renamed it `reduce_add`.
// Everything else kvc uses (batch, load/store_unaligned, fma, max, exp, default_arch) is
// stable from 8.1 on.
#pragma once

#include <kvc/simd/intrinsics.hpp>

namespace kvc::simd::detail {

template <class T, class Arch>
inline T reduce_add(const xsimd::batch<T, Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_add(x);
#else
  return xsimd::hadd(x);
#endif
}

template <class T, class Arch>
inline T reduce_max(const xsimd::batch<T, Arch>& x) noexcept {
#if XSIMD_VERSION_MAJOR >= 9
  return xsimd::reduce_max(x);
#else
  alignas(64) T lanes[xsimd::batch<T, Arch>::size];
  x.store_aligned(lanes);
  T best = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<T, Arch>::size; ++i)
    best = lanes[i] > best ? lanes[i] : best;
  return best;
#endif
}

}  // namespace kvc::simd::detail
