// kvc/simd/convert.hpp — f16 / bf16 <-> f32 conversion of whole rows.
//
// xsimd 8.1 has no half-precision types, so this header uses the x86 conversion
// instructions directly when the target has them (AVX-512F: 16 lanes; F16C/AVX2: 8 lanes)
// and Eigen's scalar conversions otherwise. Every path
// rounds to nearest even and agrees bit for bit with Eigen::half / Eigen::bfloat16 on
// finite values and infinities; a NaN stays a NaN (its payload may differ).
#pragma once

#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/reference.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstring>
#include <type_traits>

namespace kvc::simd {

// half -> float
inline void convert(const Eigen::half* source, float* destination, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source + i));
    _mm512_storeu_ps(destination + i, _mm512_cvtph_ps(bits));
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
    _mm256_storeu_ps(destination + i, _mm256_cvtph_ps(bits));
  }
#endif
  reference::convert(source + i, destination + i, n - i);
}

// bfloat16 -> float: the 16 bits are the top half of the float.
inline void convert(const Eigen::bfloat16* source, float* destination, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source + i));
    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
    _mm512_storeu_ps(destination + i, _mm512_castsi512_ps(wide));
  }
#endif
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
    _mm256_storeu_ps(destination + i, _mm256_castsi256_ps(wide));
  }
#endif
  reference::convert(source + i, destination + i, n - i);
}

// float -> half, round to nearest even.
inline void convert(const float* source, Eigen::half* destination, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm512_cvtps_ph(_mm512_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination + i), bits);
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm256_cvtps_ph(_mm256_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(destination + i), bits);
  }
#endif
  reference::convert(source + i, destination + i, n - i);
}

// float -> bfloat16, round to nearest even: bits + 0x7fff + (bit 16), then the top half;
// NaN stays a (quiet) NaN. Integer AVX-512 rather than AVX512-BF16's vcvtneps2bf16, which
// flushes denormal inputs to zero and would disagree with Eigen::bfloat16.
inline void convert(const float* source, Eigen::bfloat16* destination, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  const __m512i round_bias = _mm512_set1_epi32(0x7fff);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    const __m512 value = _mm512_loadu_ps(source + i);
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    __m512i top = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, round_bias), odd), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    top = _mm512_mask_mov_epi32(top, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination + i), _mm512_cvtepi32_epi16(top));
  }
#endif
  reference::convert(source + i, destination + i, n - i);
}

// Same type, and half <-> bfloat16 (through f32, which holds both exactly).
template <class S, class D>
  requires(std::is_same_v<S, D> || (!std::is_same_v<S, float> && !std::is_same_v<D, float>))
inline void convert(const S* source, D* destination, std::size_t n) noexcept {
  if constexpr (std::is_same_v<S, D>) {
    if (n != 0) std::memcpy(static_cast<void*>(destination), source, n * sizeof(S));
  } else {
    reference::convert(source, destination, n);
  }
}

}  // namespace kvc::simd
