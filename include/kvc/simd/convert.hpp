// kvc/simd/convert.hpp — f16 / bf16 <-> f32: one register at a time (load_as_float, for fused
// kernels) and whole rows (convert).
//
// xsimd 8.1 has no half-precision types, so widening uses the x86 conversion instructions when
// the target has them and integer bit manipulation in xsimd batches otherwise:
//   f16 -> f32   AVX-512F vcvtph2ps (16 lanes), F16C (8 or 4 lanes), else the exact
//                bit construction Eigen itself uses without F16C (any arch, SSE2 included)
//   bf16 -> f32  the 16 bits become the top half of the float: a widening load and a shift
//   f32 -> f16   AVX-512F / F16C vcvtps2ph, else Eigen::half scalar
//   f32 -> bf16  round to nearest even in integer lanes (any arch), NaN -> 0x7fc0 | sign
// Which path runs is chosen at compile time by Arch (its lane count) and by the target macros
// (__AVX512F__, __F16C__, __AVX2__, __SSE2__). Every path agrees bit for bit with
// static_cast through Eigen::half / Eigen::bfloat16 on every finite value and infinity; a NaN
// stays a NaN of the same sign (f16 -> f32 may quiet a signalling NaN, as F16C does).
#pragma once

#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/reference.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kvc::simd {

using default_arch = xsimd::default_arch;

namespace detail {

template <class T>
inline constexpr bool is_half_v = std::is_same_v<T, Eigen::half>;
template <class T>
inline constexpr bool is_bfloat16_v = std::is_same_v<T, Eigen::bfloat16>;
template <class T>
inline constexpr bool is_storage_element_v =
    std::is_same_v<T, float> || is_half_v<T> || is_bfloat16_v<T>;

// `lanes` consecutive 16-bit patterns, zero-extended into 32-bit lanes.
template <class Arch>
inline xsimd::batch<std::uint32_t, Arch> load_u16_as_u32(const void* source) noexcept {
  using wide = xsimd::batch<std::uint32_t, Arch>;
#if defined(__AVX512F__)
  if constexpr (wide::size == 16) {
    return wide(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(source))));
  }
#endif
#if defined(__AVX2__)
  if constexpr (wide::size == 8) {
    return wide(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(source))));
  }
#endif
#if defined(__SSE2__)
  if constexpr (wide::size == 4) {
    const __m128i bits = _mm_loadl_epi64(static_cast<const __m128i*>(source));
    return wide(_mm_unpacklo_epi16(bits, _mm_setzero_si128()));
  }
#endif
  std::uint16_t narrow[wide::size];
  std::memcpy(narrow, source, sizeof narrow);
  alignas(64) std::uint32_t widened[wide::size];
  for (std::size_t i = 0; i < wide::size; ++i) widened[i] = narrow[i];
  return wide::load_aligned(widened);
}

// IEEE binary16 bits (in the low half of each lane) -> float, exactly as Eigen's half_to_float
// without F16C: move exponent and mantissa into place and rebias; an all-ones exponent stays
// all ones (inf/NaN); a zero exponent (zero/denormal) is renormalized by one float subtraction,
// which is exact.
template <class Arch>
inline xsimd::batch<float, Arch> half_bits_to_float(
    const xsimd::batch<std::uint32_t, Arch>& half) noexcept {
  using wide = xsimd::batch<std::uint32_t, Arch>;
  using floats = xsimd::batch<float, Arch>;
  constexpr std::uint32_t exponent_mask = 0x7c00U << 13;  // f16 exponent, moved into f32 place
  const wide shifted = (half & wide(0x7fffU)) << 13;
  const wide exponent = shifted & wide(exponent_mask);
  wide bits = shifted + wide((127U - 15U) << 23);
  bits = xsimd::select(exponent == wide(exponent_mask), bits + wide((128U - 16U) << 23), bits);
  const floats renormalized =
      bitcast<float>(bits + wide(1U << 23)) - bitcast<float>(wide(113U << 23));
  bits = xsimd::select(exponent == wide(0U), bitcast<std::uint32_t>(renormalized), bits);
  return bitcast<float>(bits | ((half & wide(0x8000U)) << 16));
}

// float -> bf16 bits (in the low half of each lane), as Eigen::bfloat16: round to nearest even
// by adding 0x7fff plus the lowest kept bit, then truncate; NaN becomes 0x7fc0 with its sign.
template <class Arch>
inline xsimd::batch<std::uint32_t, Arch> float_to_bfloat16_bits(
    const xsimd::batch<float, Arch>& value) noexcept {
  using wide = xsimd::batch<std::uint32_t, Arch>;
  const wide bits = bitcast<std::uint32_t>(value);
  const wide lowest_kept = (bits >> 16) & wide(1U);
  const wide rounded = (bits + wide(0x7fffU) + lowest_kept) >> 16;
  const wide quiet_nan = ((bits >> 16) & wide(0x8000U)) | wide(0x7fc0U);
  const auto is_nan = (bits & wide(0x7fffffffU)) > wide(0x7f800000U);
  return xsimd::select(is_nan, quiet_nan, rounded);
}

}  // namespace detail

// One batch of fp32 lanes from `lanes` consecutive elements of T (float, Eigen::half or
// Eigen::bfloat16), widened in registers so fused kernels never stage a converted copy in
// memory. No alignment requirement.
template <class Arch, class T>
inline xsimd::batch<float, Arch> load_as_float(const T* source) noexcept {
  static_assert(detail::is_storage_element_v<T>, "load_as_float: T is float, half or bfloat16");
  using floats = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<T, float>) {
    return floats::load_unaligned(source);
  } else if constexpr (detail::is_bfloat16_v<T>) {
    return detail::bitcast<float>(detail::load_u16_as_u32<Arch>(source) << 16);
  } else {
#if defined(__AVX512F__)
    if constexpr (floats::size == 16) {
      return floats(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source))));
    }
#endif
#if defined(__F16C__)
    if constexpr (floats::size == 8) {
      return floats(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))));
    }
    if constexpr (floats::size == 4) {
      return floats(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source))));
    }
#endif
    return detail::half_bits_to_float<Arch>(detail::load_u16_as_u32<Arch>(source));
  }
}

// Stores the lanes of `value` rounded to T (float, Eigen::half or Eigen::bfloat16) at
// `destination` (no alignment requirement); rounding and NaNs as static_cast<T>.
template <class Arch, class T>
inline void store_from_float(const xsimd::batch<float, Arch>& value, T* destination) noexcept {
  static_assert(detail::is_storage_element_v<T>, "store_from_float: T is float, half or bfloat16");
  using floats = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<T, float>) {
    value.store_unaligned(destination);
  } else if constexpr (detail::is_half_v<T>) {
#if defined(__AVX512F__)
    if constexpr (floats::size == 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination),
                          _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
#endif
#if defined(__F16C__)
    if constexpr (floats::size == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(destination),
                       _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
    if constexpr (floats::size == 4) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(destination),
                       _mm_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT));
      return;
    }
#endif
    alignas(64) float lanes[floats::size];
    value.store_aligned(lanes);
    reference::convert(lanes, destination, floats::size);
  } else {
    // Integer rounding rather than AVX512-BF16's vcvtneps2bf16, which flushes denormal inputs
    // to zero and would disagree with Eigen::bfloat16.
    const auto bits = detail::float_to_bfloat16_bits<Arch>(value);
#if defined(__AVX512F__)
    if constexpr (floats::size == 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination), _mm512_cvtepi32_epi16(bits));
      return;
    }
#endif
    alignas(64) std::uint32_t lanes[floats::size];
    bits.store_aligned(lanes);
    std::uint16_t narrow[floats::size];
    for (std::size_t i = 0; i < floats::size; ++i) narrow[i] = static_cast<std::uint16_t>(lanes[i]);
    std::memcpy(static_cast<void*>(destination), narrow, sizeof narrow);
  }
}

// destination[i] = static_cast<D>(source[i]) for S, D in {float, Eigen::half, Eigen::bfloat16};
// rows of any length, no alignment requirement.
template <class Arch = default_arch, class S, class D>
  requires(detail::is_storage_element_v<S>&& detail::is_storage_element_v<D>)
inline void convert(const S* source, D* destination, std::size_t n) noexcept {
  if constexpr (std::is_same_v<S, D>) {
    if (n != 0) std::memcpy(static_cast<void*>(destination), source, n * sizeof(S));
  } else if constexpr (!std::is_same_v<S, float> && !std::is_same_v<D, float>) {
    reference::convert(source, destination, n);  // f16 <-> bf16: rare, through f32
  } else {
    constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes) {
      store_from_float<Arch>(load_as_float<Arch>(source + i), destination + i);
    }
    reference::convert(source + i, destination + i, n - i);
  }
}

}  // namespace kvc::simd
