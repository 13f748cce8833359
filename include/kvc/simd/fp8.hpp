// kvc/simd/fp8.hpp — kernels of the FP8 KV formats (quant::Fp8E4M3, quant::Fp8E5M2): round
// to OCP FP8, widen FP8 codes in registers, and the fused tile kernels of attend, each with a
// scalar reference beside it (kvc::simd::reference).
//
// Formats (OCP 8-bit Floating Point Specification, OFP8, 2023):
//   E4M3 ("e4m3fn")  S.EEEE.MMM, bias 7, max ±448 (S.1111.110), subnormal step 2^-9, no
//                    infinities, NaN = S.1111.111
//   E5M2             S.EEEEE.MM, bias 15, max ±57344 (S.11110.11), subnormal step 2^-16,
//                    ±inf = S.11111.00, NaN = S.11111.{01,10,11} (IEEE-like: the top byte
//                    of an IEEE binary16)
// Row layout (what quant::Fp8 stores per token, for K and for V alike):
//   [fp32 scale, little-endian][one code per channel]      row_bytes = 4 + n
//   scale = amax / max (fp32 division; 0 for a row of zeros), code = round(x / scale),
//   x̂ = scale · value(code). See quant/fp8.hpp for the accuracy bound.
//
// Kernels:
//   round_to_fp8<F>(y)                  fp32 lanes → codes (round to nearest even,
//                                       saturating at ±max; never an inf or NaN code)
//   load_as_float<Arch>(Fp8Code<F>*)    `lanes` codes widened to fp32 in registers
//   encode_fp8<F>(x, n, row)            scale + codes of one row (x: float, half, bfloat16)
//   decode_fp8<F>(row, n, out)          out[i] = scale · value(code i)
//   score_fp8<F>(q, rows, ldq, keys, tokens, stride, d, scores, lds)
//                                       scores[r·lds + j] = q_r · x̂_j (row j at keys + j·stride)
//   accumulate_fp8<F>(p, rows, ldp, values, tokens, stride, d, acc, ldacc, scratch)
//                                       acc[r·ldacc + c] += Σ_j p[r·ldp + j] · x̂_j[c]
//
// Widening: an FP8 code is widened through IEEE binary16, which holds every FP8 value:
// E5M2's byte is the top byte of the binary16 of the same value (code << 8); E4M3's bits
// shifted into a binary16 (sign to bit 15, the 7 other bits to bits 13..7) give the value
// times 2^-8 for every code, subnormals included (2^-8 = 2^(7 − 15), the bias difference).
// The 2^8 is folded into the row's scale (`Fp8Traits<F>::widened_unit`), so a code costs a
// byte widening, a shift (and a mask) and one vcvtph2ps / F16C instruction per 16 / 8 / 4
// lanes; without F16C, the exact binary16 bit construction of simd/convert.hpp. Fp8Code<F>
// (one byte) converts to that widened value with static_cast<float>, and load_as_float is
// overloaded for it, so simd::dot_block / simd::axpy_block (kernels.hpp, which find the
// overload by argument-dependent lookup) run their register-blocked GQA tiles directly on
// the codes: the codes are never staged as fp32. score_fp8 multiplies each token's scores by
// its scale afterwards; accumulate_fp8 multiplies the weights by it beforehand (in
// `scratch`), which is exact algebra, so the results differ from float64 on the decoded
// rows by fp32 rounding only.
//
// The NaN codes are never written by encode. Every reader here (SIMD and reference) reads
// E4M3's S.1111.111 as ±480, the value of its bits as a normal number, and E5M2's inf/NaN
// codes as inf/NaN.
//
// Paths: xsimd, generic over Arch like kernels.hpp. Byte widening and narrowing use AVX-512F
// (16 lanes), AVX2/SSE4.1 + F16C (8 and 4 lanes) where the target has them, and plain
// xsimd integer code otherwise. Inputs need no alignment.
#pragma once

#include <kvc/simd/convert.hpp>
#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/kernels.hpp>
#include <kvc/simd/quantize.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace kvc::simd {

enum class Fp8Format { E4M3, E5M2 };

template <Fp8Format F>
struct Fp8Traits;

template <>
struct Fp8Traits<Fp8Format::E4M3> {
  static constexpr int mantissa_bits = 3;
  static constexpr int exponent_bias = 7;
  static constexpr float max = 448.0F;
  static constexpr std::uint8_t max_code = 0x7E;  // S.1111.110
  // value(code) = widened_unit · (the binary16 the code is widened through).
  static constexpr float widened_unit = 256.0F;
};

template <>
struct Fp8Traits<Fp8Format::E5M2> {
  static constexpr int mantissa_bits = 2;
  static constexpr int exponent_bias = 15;
  static constexpr float max = 57344.0F;
  static constexpr std::uint8_t max_code = 0x7B;  // S.11110.11
  static constexpr float widened_unit = 1.0F;
};

namespace reference {

// The value of an FP8 code (OCP formula), with the NaN rule above: E4M3 S.1111.111 reads as
// ±480; E5M2 S.11111.00 is ±inf and S.11111.{01,10,11} NaN.
template <Fp8Format F>
inline float fp8_to_float(std::uint8_t code) noexcept {
  using traits = Fp8Traits<F>;
  constexpr int m = traits::mantissa_bits;
  const int exponent = (code & 0x7F) >> m;
  const int mantissa = code & ((1 << m) - 1);
  const float sign = (code & 0x80) != 0 ? -1.0F : 1.0F;
  if (F == Fp8Format::E5M2 && exponent == 31) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity()
                         : std::numeric_limits<float>::quiet_NaN();
  }
  if (exponent == 0)
    return sign * std::ldexp(static_cast<float>(mantissa), 1 - traits::exponent_bias - m);
  return sign *
         std::ldexp(static_cast<float>((1 << m) + mantissa), exponent - traits::exponent_bias - m);
}

// The code of y: round |y| to nearest even on the format's grid (the subnormal step below
// its smallest normal), saturate at max_code, keep the sign (−0 → S = 1). Written with
// frexp / nearbyint, independently of the SIMD bit manipulation. NaN saturates too.
template <Fp8Format F>
inline std::uint8_t round_to_fp8(float y) noexcept {
  using traits = Fp8Traits<F>;
  constexpr int m = traits::mantissa_bits;
  const auto sign = static_cast<std::uint8_t>(std::signbit(y) ? 0x80 : 0);
  const float magnitude = std::abs(y);
  if (!(magnitude <= traits::max)) return sign | traits::max_code;
  if (magnitude == 0.0F) return sign;
  int binade = 0;
  std::frexp(magnitude, &binade);  // magnitude ∈ [2^(binade−1), 2^binade)
  const int exponent = std::max(binade - 1, 1 - traits::exponent_bias);
  // Steps of 2^(exponent − m) in this binade; exact (a power-of-two scaling).
  const float steps = std::nearbyint(std::ldexp(magnitude, m - exponent));
  // A round-up to 2^(m + 1) steps carries into the next exponent; subnormals (exponent
  // 1 − bias) come out as code = steps, the smallest normal included.
  const int code = ((exponent + traits::exponent_bias) << m) + static_cast<int>(steps) - (1 << m);
  return sign | static_cast<std::uint8_t>(std::min<int>(code, traits::max_code));
}

}  // namespace reference

namespace detail {

// `lanes` consecutive bytes, zero-extended into 32-bit lanes.
template <class Arch>
inline xsimd::batch<std::uint32_t, Arch> load_u8_as_u32(const std::uint8_t* source) noexcept {
  using wide = xsimd::batch<std::uint32_t, Arch>;
#if defined(__AVX512F__)
  if constexpr (wide::size == 16) {
    return wide(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))));
  }
#endif
#if defined(__AVX2__)
  if constexpr (wide::size == 8) {
    return wide(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source))));
  }
#endif
  alignas(64) std::uint32_t widened[wide::size];
  for (std::size_t i = 0; i < wide::size; ++i) widened[i] = source[i];
  return wide::load_aligned(widened);
}

// FP8 codes (low byte of each lane) → the binary16 bits they are widened through (low half).
template <Fp8Format F, class Arch>
inline xsimd::batch<std::uint32_t, Arch> fp8_to_half_bits(
    const xsimd::batch<std::uint32_t, Arch>& code) noexcept {
  using wide = xsimd::batch<std::uint32_t, Arch>;
  if constexpr (F == Fp8Format::E5M2) {
    return code << 8;
  } else {
    return ((code & wide(0x7FU)) << 7) | ((code & wide(0x80U)) << 8);
  }
}

#if defined(__SSE4_1__)
// 128-bit lanes of 16-bit integers: sign- (E4M3) or zero-extended (E5M2) bytes → binary16
// bits. E4M3: the sign-extended byte shifted left by 7 has the sign in bits 15 and 14;
// clearing bit 14 leaves S.0EEEE.MMM0000000.
template <Fp8Format F>
inline __m128i fp8_to_half_bits_128(__m128i bytes) noexcept {
  if constexpr (F == Fp8Format::E5M2) {
    return _mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8);
  } else {
    return _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7), _mm_set1_epi16(-16385));
  }
}
#endif
#if defined(__AVX2__)
template <Fp8Format F>
inline __m256i fp8_to_half_bits_256(__m128i bytes) noexcept {
  if constexpr (F == Fp8Format::E5M2) {
    return _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8);
  } else {
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                            _mm256_set1_epi16(-16385));  // 0xBFFF
  }
}
#endif

// scale = amax / max; if scale · max would overflow to inf (amax within an ulp of FLT_MAX),
// one ulp less, so that every decoded value stays finite (x / scale then saturates at max).
template <Fp8Format F>
inline float fp8_scale(float amax) noexcept {
  constexpr float max = Fp8Traits<F>::max;
  float scale = amax / max;
  if (!(scale * max <= std::numeric_limits<float>::max())) scale = std::nextafter(scale, 0.0F);
  return scale;
}

inline float load_scale(const std::byte* row) noexcept {
  float scale = 0.0F;
  std::memcpy(&scale, row, sizeof scale);
  return scale;
}

}  // namespace detail

// Fp8Code and its load_as_float live in their own namespace: argument-dependent lookup on an
// Fp8Code then finds load_as_float (which kernels.hpp's tiles call unqualified) and nothing
// else of kvc::simd (reference::dot_block's unqualified dot would otherwise also see
// simd::dot). Both are also visible as kvc::simd::Fp8Code / kvc::simd::load_as_float.
namespace fp8 {

// One stored FP8 code. static_cast<float> gives the binary16 it is widened through, i.e.
// value / Fp8Traits<F>::widened_unit (exact), as load_as_float does for a batch.
template <Fp8Format F>
struct Fp8Code {
  std::uint8_t bits;

  explicit operator float() const noexcept {
    return reference::fp8_to_float<F>(bits) / Fp8Traits<F>::widened_unit;
  }
};
static_assert(sizeof(Fp8Code<Fp8Format::E4M3>) == 1 && sizeof(Fp8Code<Fp8Format::E5M2>) == 1);

// `lanes` FP8 codes widened to fp32 (value / widened_unit, see above), in registers.
template <class Arch, Fp8Format F>
inline xsimd::batch<float, Arch> load_as_float(const Fp8Code<F>* source) noexcept {
  using floats = xsimd::batch<float, Arch>;
  (void)sizeof(floats);  // used only on the x86 paths below
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(source);
#if defined(__AVX512F__) && defined(__AVX2__)
  if constexpr (floats::size == 16) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    return floats(_mm512_cvtph_ps(detail::fp8_to_half_bits_256<F>(codes)));
  }
#endif
#if defined(__F16C__) && defined(__SSE4_1__)
  if constexpr (floats::size == 8) {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    return floats(_mm256_cvtph_ps(detail::fp8_to_half_bits_128<F>(codes)));
  }
  if constexpr (floats::size == 4) {
    std::int32_t word = 0;
    std::memcpy(&word, bytes, sizeof word);
    return floats(_mm_cvtph_ps(detail::fp8_to_half_bits_128<F>(_mm_cvtsi32_si128(word))));
  }
#endif
  return detail::half_bits_to_float<Arch>(
      detail::fp8_to_half_bits<F, Arch>(detail::load_u8_as_u32<Arch>(bytes)));
}

}  // namespace fp8

using fp8::Fp8Code;
using fp8::load_as_float;

// Codes of the lanes of y (round to nearest even, saturating), one per int32 lane (0..255).
// Normal range: round the fp32 mantissa to m bits by adding 2^(22 − m) − 1 plus the lowest
// kept bit, then rebias the exponent (a carry moves into the exponent; beyond max_code it
// saturates). Below the smallest normal: adding 2^(1 − bias − m + 23), whose ulp is the
// subnormal step, makes the fp32 adder round to that step; its low bits are the code.
// Signed 32-bit lanes throughout: |y|'s bits fit, and signed compares are native on x86.
template <Fp8Format F, class Arch>
inline xsimd::batch<std::int32_t, Arch> round_to_fp8(const xsimd::batch<float, Arch>& y) noexcept {
  using lanes = xsimd::batch<std::int32_t, Arch>;
  using traits = Fp8Traits<F>;
  constexpr int m = traits::mantissa_bits;
  constexpr int shift = 23 - m;
  constexpr std::int32_t round_bias = (1 << (shift - 1)) - 1;
  constexpr std::int32_t rebias = (127 - traits::exponent_bias) << 23;
  constexpr std::int32_t smallest_normal = (127 + 1 - traits::exponent_bias) << 23;
  constexpr std::int32_t magic = (127 + 1 - traits::exponent_bias - m + 23) << 23;
  const lanes bits = detail::bitcast<std::int32_t>(y);
  const lanes sign = (bits >> 24) & lanes(0x80);
  const lanes magnitude = bits & lanes(0x7FFFFFFF);
  // Negative for lanes below the smallest normal; the select below discards those.
  lanes normal =
      ((magnitude - lanes(rebias)) + lanes(round_bias) + ((magnitude >> shift) & lanes(1))) >>
      shift;
  normal = xsimd::select(normal > lanes(traits::max_code), lanes(traits::max_code), normal);
  const lanes subnormal = detail::bitcast<std::int32_t>(detail::bitcast<float>(magnitude) +
                                                        detail::bitcast<float>(lanes(magic))) -
                          lanes(magic);
  return xsimd::select(magnitude < lanes(smallest_normal), subnormal, normal) | sign;
}

namespace reference {

template <Fp8Format F, class S>
inline void encode_fp8(const S* x, std::size_t n, std::byte* row) noexcept {
  float amax = 0.0F;
  for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(static_cast<float>(x[i])));
  const float scale = detail::fp8_scale<F>(amax);
  std::memcpy(row, &scale, sizeof scale);
  auto* codes = reinterpret_cast<std::uint8_t*>(row + sizeof scale);
  for (std::size_t i = 0; i < n; ++i) {
    codes[i] = scale > 0.0F ? round_to_fp8<F>(static_cast<float>(x[i]) / scale) : 0;
  }
}

template <Fp8Format F>
inline void decode_fp8(const std::byte* row, std::size_t n, float* out) noexcept {
  const float scale = detail::load_scale(row);
  const auto* codes = reinterpret_cast<const std::uint8_t*>(row + sizeof scale);
  for (std::size_t i = 0; i < n; ++i) out[i] = scale * fp8_to_float<F>(codes[i]);
}

template <Fp8Format F>
inline void score_fp8(const float* q, std::size_t rows, std::size_t ldq, const std::byte* keys,
                      std::size_t tokens, std::size_t stride, std::size_t d, float* scores,
                      std::size_t lds) noexcept {
  for (std::size_t j = 0; j < tokens; ++j) {
    const std::byte* row = keys + j * stride;
    const float scale = detail::load_scale(row);
    const auto* codes = reinterpret_cast<const std::uint8_t*>(row + sizeof scale);
    for (std::size_t r = 0; r < rows; ++r) {
      float sum = 0.0F;
      for (std::size_t c = 0; c < d; ++c)
        sum += q[r * ldq + c] * (scale * fp8_to_float<F>(codes[c]));
      scores[r * lds + j] = sum;
    }
  }
}

template <Fp8Format F>
inline void accumulate_fp8(const float* p, std::size_t rows, std::size_t ldp,
                           const std::byte* values, std::size_t tokens, std::size_t stride,
                           std::size_t d, float* acc, std::size_t ldacc) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      const std::byte* row = values + j * stride;
      const float scale = detail::load_scale(row);
      const auto* codes = reinterpret_cast<const std::uint8_t*>(row + sizeof scale);
      for (std::size_t c = 0; c < d; ++c) {
        acc[r * ldacc + c] += p[r * ldp + j] * (scale * fp8_to_float<F>(codes[c]));
      }
    }
  }
}

}  // namespace reference

// One row: [fp32 scale = amax / max][n codes]; a row of zeros gets scale 0 and codes 0.
// Bit-identical to reference::encode_fp8 for finite inputs. x is float, Eigen::half or
// Eigen::bfloat16 (widened exactly first).
template <Fp8Format F, class Arch = default_arch, class S>
inline void encode_fp8(const S* x, std::size_t n, std::byte* row) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const std::size_t vector_end = n / lanes * lanes;
  const float scale = detail::fp8_scale<F>(max_abs<Arch>(x, n));
  std::memcpy(row, &scale, sizeof scale);
  auto* codes = reinterpret_cast<std::uint8_t*>(row + sizeof scale);
  if (!(scale > 0.0F)) {
    std::memset(codes, 0, n);
    return;
  }
  const floats divisor(scale);
  for (std::size_t i = 0; i < vector_end; i += lanes) {
    detail::store_low_bytes<Arch>(round_to_fp8<F, Arch>(load_as_float<Arch>(x + i) / divisor),
                                  codes + i);
  }
  for (std::size_t i = vector_end; i < n; ++i) {
    codes[i] = reference::round_to_fp8<F>(static_cast<float>(x[i]) / scale);
  }
}

// out[i] = scale · value(code i); bit-identical to reference::decode_fp8 (scale · 2^8 is
// exact, so (scale · 2^8) · (value · 2^-8) rounds the same product once).
template <Fp8Format F, class Arch = default_arch>
inline void decode_fp8(const std::byte* row, std::size_t n, float* out) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const float factor = detail::load_scale(row) * Fp8Traits<F>::widened_unit;
  const auto* codes = reinterpret_cast<const Fp8Code<F>*>(row + sizeof(float));
  const std::size_t vector_end = n / lanes * lanes;
  for (std::size_t i = 0; i < vector_end; i += lanes) {
    (floats(factor) * load_as_float<Arch>(codes + i)).store_unaligned(out + i);
  }
  for (std::size_t i = vector_end; i < n; ++i) out[i] = factor * static_cast<float>(codes[i]);
}

// scores[r·lds + j] = q_r · x̂_j for r < rows, j < tokens; token j's row (scale, codes) at
// keys + j·stride. simd::dot_block on the codes (widened in registers), then × the scale.
template <Fp8Format F, class Arch = default_arch>
inline void score_fp8(const float* q, std::size_t rows, std::size_t ldq, const std::byte* keys,
                      std::size_t tokens, std::size_t stride, std::size_t d, float* scores,
                      std::size_t lds) noexcept {
  const auto* codes = reinterpret_cast<const Fp8Code<F>*>(keys + sizeof(float));
  dot_block<Arch>(q, rows, ldq, codes, tokens, stride, d, scores, lds);
  for (std::size_t j = 0; j < tokens; ++j) {
    const float factor = detail::load_scale(keys + j * stride) * Fp8Traits<F>::widened_unit;
    for (std::size_t r = 0; r < rows; ++r) scores[r * lds + j] *= factor;
  }
}

// acc[r·ldacc + c] += Σ_j p[r·ldp + j] · x̂_j[c]; token j's row at values + j·stride. The
// weights times each token's scale go to `scratch` (≥ tokens · d floats), up to d rows at a
// time, then simd::axpy_block runs on the codes (widened in registers).
template <Fp8Format F, class Arch = default_arch>
inline void accumulate_fp8(const float* p, std::size_t rows, std::size_t ldp,
                           const std::byte* values, std::size_t tokens, std::size_t stride,
                           std::size_t d, float* acc, std::size_t ldacc, float* scratch) noexcept {
  if (tokens == 0 || d == 0) return;
  const auto* codes = reinterpret_cast<const Fp8Code<F>*>(values + sizeof(float));
  for (std::size_t first = 0; first < rows; first += d) {
    const std::size_t block = std::min(d, rows - first);
    for (std::size_t j = 0; j < tokens; ++j) {
      const float factor = detail::load_scale(values + j * stride) * Fp8Traits<F>::widened_unit;
      for (std::size_t r = 0; r < block; ++r) {
        scratch[r * tokens + j] = p[(first + r) * ldp + j] * factor;
      }
    }
    axpy_block<Arch>(scratch, block, tokens, codes, tokens, stride, d, acc + first * ldacc, ldacc);
  }
}

}  // namespace kvc::simd
