// kvc/simd/quantize.hpp — the encode side of the integer formats: a row's max |x| and a row
// rounded to int8 codes or ggml q4_0 nibbles, with a scalar reference for each.
//
// Why: append encodes every key and value row it stores. Written as scalar loops (a division
// and two libm calls, fmin/fmax, per value) the encoders ran at 0.3 GB/s: 7 µs per token for
// 8 kv heads × 128 channels of K and V — 25× a memcpy of the same floats. These kernels round
// a batch of lanes at a time.
//
// Kernels (S: float, Eigen::half or Eigen::bfloat16, widened in registers):
//   max_abs(x, n)                         max |x[i]| (0 for n = 0); a NaN does not enter it
//   min_max(x, n)                         {min, max} of x[0..n), n ≥ 1, from x[0] on: a later
//                                         NaN does not enter them (as std::min/max(acc, x))
//   column_min_max(rows, count, ld, n, lo, hi)  lo[c] / hi[c] = min / max over rows t < count
//                                         (count ≥ 1) of rows[t·ld + c], c < n: per channel,
//                                         as min_max per row (a key group's range in Kivi)
//   max_magnitude_value(x, n)             the first x[i] of largest |x[i]|, sign kept (0 for
//                                         n = 0 or all zeros; never a NaN) — q4_0's signed max
//   quantize_div(x, n, scale, limit, q)   q[i] = clamp(nearbyint(x[i] / scale), ±limit)
//                                         (quant::Int8, quant::Bfp: ties to even, true division)
//   quantize_away(x, n, inverse, q)       q[i] = clamp(round(x[i] · inverse), ±127)
//                                         (quant::Q8_0: ggml's roundf, ties away from zero)
//   quantize_affine(x, n, m, s, levels, q)  q[i] = clamp(nearbyint((x[i] − m_i) / s_i), 0,
//                                         levels) as u8, 0 where s_i is not > 0 (quant::Kivi);
//                                         m, s: one float each, or per-value arrays of float
//                                         or Eigen::half (a key group's fp16 parameters)
//   q4_0_nibbles(x, inverse, nibbles)     32 values → 16 bytes: code = min(15, trunc(max(0,
//                                         x · inverse + 8.5))); byte j = code(x[j]) |
//                                         code(x[j + 16]) << 4 (ggml's quantize_row_q4_0_ref)
// A NaN x gives the clamp's lower end (−limit, −127, code 0): max(NaN, lo) is lo, as
// std::fmax; a KvCache with check_finite (the default) never passes one. Every kernel equals
// its reference in kvc::simd::reference bit for bit: both divide, multiply and round once per
// value in fp32 under the default rounding mode.
#pragma once

#include <kvc/simd/convert.hpp>
#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <xsimd/xsimd.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace kvc::simd {

namespace reference {

// The comparisons keep fmax/fmin's NaN rule without their libm calls: `a > b ? a : b` is b
// when a is NaN.
inline float clamp_nan_low(float x, float lo, float hi) noexcept {
  const float above = x > lo ? x : lo;
  return above < hi ? above : hi;
}

template <class S>
inline float max_abs(const S* x, std::size_t n) noexcept {
  float amax = 0.0F;
  for (std::size_t i = 0; i < n; ++i) {
    const float a = std::abs(static_cast<float>(x[i]));
    amax = a > amax ? a : amax;
  }
  return amax;
}

template <class S>
inline std::pair<float, float> min_max(const S* x, std::size_t n) noexcept {
  float lo = static_cast<float>(x[0]);
  float hi = lo;
  for (std::size_t i = 1; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  return {lo, hi};
}

inline void column_min_max(const float* rows, std::size_t count, std::size_t ld, std::size_t n,
                           float* lo, float* hi) noexcept {
  for (std::size_t c = 0; c < n; ++c) {
    lo[c] = rows[c];
    hi[c] = rows[c];
    for (std::size_t t = 1; t < count; ++t) {
      const float v = rows[t * ld + c];
      lo[c] = v < lo[c] ? v : lo[c];
      hi[c] = v > hi[c] ? v : hi[c];
    }
  }
}

template <class S>
inline float max_magnitude_value(const S* x, std::size_t n) noexcept {
  float amax = 0.0F;
  float value = 0.0F;
  for (std::size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (amax < std::abs(v)) {  // strict: the first of equal magnitudes stays; NaN never enters
      amax = std::abs(v);
      value = v;
    }
  }
  return value;
}

template <class S>
inline void quantize_div(const S* x, std::size_t n, float scale, float limit,
                         std::int8_t* q) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const float rounded = std::nearbyint(static_cast<float>(x[i]) / scale);
    q[i] = static_cast<std::int8_t>(clamp_nan_low(rounded, -limit, limit));
  }
}

template <class S>
inline void quantize_away(const S* x, std::size_t n, float inverse, std::int8_t* q) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const float rounded = std::round(static_cast<float>(x[i]) * inverse);
    q[i] = static_cast<std::int8_t>(clamp_nan_low(rounded, -127.0F, 127.0F));
  }
}

// The parameter of value i: a scalar shared by all, or element i of an array.
template <class P>
inline float param_at(const P& param, std::size_t i) noexcept {
  if constexpr (std::is_pointer_v<P>) {
    return static_cast<float>(param[i]);
  } else {
    return param;
  }
}

template <class S, class P>
inline void quantize_affine(const S* x, std::size_t n, P minimum, P scale, float levels,
                            std::uint8_t* q) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const float s = param_at(scale, i);
    const float rounded = std::nearbyint((static_cast<float>(x[i]) - param_at(minimum, i)) / s);
    q[i] = s > 0.0F ? static_cast<std::uint8_t>(clamp_nan_low(rounded, 0.0F, levels)) : 0;
  }
}

template <class S>
inline void q4_0_nibbles(const S* x, float inverse, std::byte* nibbles) noexcept {
  const auto code = [inverse](float v) {
    return static_cast<unsigned>(clamp_nan_low(v * inverse + 8.5F, 0.0F, 15.0F));
  };
  for (std::size_t j = 0; j < 16; ++j) {
    const unsigned low = code(static_cast<float>(x[j]));
    const unsigned high = code(static_cast<float>(x[j + 16]));
    nibbles[j] = static_cast<std::byte>(low | (high << 4));
  }
}

}  // namespace reference

namespace detail {

// The low byte of each lane of v, stored as `lanes` consecutive bytes at destination,
// unaligned: a truncating narrow (vpmovdb), so lanes holding −128..255 keep their byte.
template <class Arch>
inline void store_low_bytes(const xsimd::batch<std::int32_t, Arch>& v, void* destination) noexcept {
  constexpr std::size_t lanes = xsimd::batch<std::int32_t, Arch>::size;
#if defined(__AVX512F__)
  if constexpr (lanes == 16) {
    _mm_storeu_si128(static_cast<__m128i*>(destination), _mm512_cvtepi32_epi8(v));
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (lanes == 8) {
    // Masked to 0..255 first, the unsigned saturating packs keep each low byte as it is.
    const __m256i wide = _mm256_and_si256(v, _mm256_set1_epi32(0xFF));
    const __m128i words =
        _mm_packus_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    _mm_storel_epi64(static_cast<__m128i*>(destination), _mm_packus_epi16(words, words));
    return;
  }
#endif
  alignas(64) std::int32_t lanes_out[lanes];
  v.store_aligned(lanes_out);
  auto* bytes = static_cast<std::uint8_t*>(destination);
  for (std::size_t i = 0; i < lanes; ++i) bytes[i] = static_cast<std::uint8_t>(lanes_out[i]);
}

}  // namespace detail

template <class Arch = default_arch, class S>
inline float max_abs(const S* x, std::size_t n) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  // Two accumulators: the max's latency, not its throughput, bounds one chain.
  floats acc0(0.0F), acc1(0.0F);
  std::size_t i = 0;
  // max(|x|, acc) is acc when x is NaN (maxps returns its second operand on NaN).
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = xsimd::max(xsimd::abs(load_as_float<Arch>(x + i)), acc0);
    acc1 = xsimd::max(xsimd::abs(load_as_float<Arch>(x + i + lanes)), acc1);
  }
  for (; i + lanes <= n; i += lanes) {
    acc0 = xsimd::max(xsimd::abs(load_as_float<Arch>(x + i)), acc0);
  }
  const float vector_max = detail::reduce_max(xsimd::max(acc0, acc1));
  const float tail_max = reference::max_abs(x + i, n - i);
  return tail_max > vector_max ? tail_max : vector_max;
}

template <class Arch = default_arch, class S>
inline std::pair<float, float> min_max(const S* x, std::size_t n) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const float first = static_cast<float>(x[0]);
  // min/max(v, acc) keep acc on a NaN v; a NaN x[0] stays (as in the reference).
  floats lo(first), hi(first);
  const std::size_t vector_end = n - n % lanes;
  for (std::size_t i = 0; i < vector_end; i += lanes) {
    const floats v = load_as_float<Arch>(x + i);
    lo = xsimd::min(v, lo);
    hi = xsimd::max(v, hi);
  }
  float low = detail::reduce_min(lo);
  float high = detail::reduce_max(hi);
  for (std::size_t i = vector_end; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  return {low, high};
}

template <class Arch = default_arch>
inline void column_min_max(const float* rows, std::size_t count, std::size_t ld, std::size_t n,
                           float* lo, float* hi) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  // A batch of channels at a time down all rows: one contiguous load per row, instead of a
  // strided scalar chain per channel.
  const std::size_t vector_end = n - n % lanes;
  for (std::size_t c = 0; c < vector_end; c += lanes) {
    floats low = floats::load_unaligned(rows + c);
    floats high = low;
    for (std::size_t t = 1; t < count; ++t) {
      const floats v = floats::load_unaligned(rows + t * ld + c);
      low = xsimd::min(v, low);
      high = xsimd::max(v, high);
    }
    low.store_unaligned(lo + c);
    high.store_unaligned(hi + c);
  }
  reference::column_min_max(rows + vector_end, count, ld, n - vector_end, lo + vector_end,
                            hi + vector_end);
}

template <class Arch = default_arch, class S>
inline float max_magnitude_value(const S* x, std::size_t n) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  // The largest and the smallest value (each against 0): whichever is farther from 0 is the
  // answer, without a data-dependent branch per value. min/max(v, acc) keep acc on a NaN.
  floats top(0.0F), bottom(0.0F);
  // n − n % lanes, not i + lanes ≤ n: GCC then sees the vector loop dead for a short n
  // known at compile time, instead of warning (-Warray-bounds) on its loads.
  const std::size_t vector_end = n - n % lanes;
  std::size_t i = 0;
  for (; i < vector_end; i += lanes) {
    const floats v = load_as_float<Arch>(x + i);
    top = xsimd::max(v, top);
    bottom = xsimd::min(v, bottom);
  }
  float high = detail::reduce_max(top);
  float low = detail::reduce_min(bottom);
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    high = v > high ? v : high;
    low = v < low ? v : low;
  }
  if (high > -low) return high;
  if (-low > high) return low;
  return reference::max_magnitude_value(x, n);  // a tie (or all zeros): the first one wins
}

template <class Arch = default_arch, class S>
inline void quantize_div(const S* x, std::size_t n, float scale, float limit,
                         std::int8_t* q) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const floats divisor(scale), lo(-limit), hi(limit);
  // n − n % lanes, not i + lanes ≤ n: GCC then sees the vector loop dead for a short n
  // known at compile time, instead of warning (-Warray-bounds) on its loads.
  const std::size_t vector_end = n - n % lanes;
  std::size_t i = 0;
  for (; i < vector_end; i += lanes) {
    const floats rounded = xsimd::nearbyint(load_as_float<Arch>(x + i) / divisor);
    // max(NaN, lo) = lo; the clamped value is an integer in ±limit, so to_int (truncating)
    // is exact.
    detail::store_low_bytes<Arch>(xsimd::to_int(xsimd::min(xsimd::max(rounded, lo), hi)), q + i);
  }
  reference::quantize_div(x + i, n - i, scale, limit, q + i);
}

template <class Arch = default_arch, class S>
inline void quantize_away(const S* x, std::size_t n, float inverse, std::int8_t* q) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const floats multiplier(inverse), lo(-127.0F), hi(127.0F);
  // n − n % lanes, not i + lanes ≤ n: GCC then sees the vector loop dead for a short n
  // known at compile time, instead of warning (-Warray-bounds) on its loads.
  const std::size_t vector_end = n - n % lanes;
  std::size_t i = 0;
  for (; i < vector_end; i += lanes) {
    const floats rounded = xsimd::round(load_as_float<Arch>(x + i) * multiplier);  // ties away
    detail::store_low_bytes<Arch>(xsimd::to_int(xsimd::min(xsimd::max(rounded, lo), hi)), q + i);
  }
  reference::quantize_away(x + i, n - i, inverse, q + i);
}

template <class Arch = default_arch, class S, class P>
inline void quantize_affine(const S* x, std::size_t n, P minimum, P scale, float levels,
                            std::uint8_t* q) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  const auto params_at = [&](const P& param, std::size_t i) {
    if constexpr (std::is_pointer_v<P>) {
      return load_as_float<Arch>(param + i);
    } else {
      return floats(param);
    }
  };
  const floats zero(0.0F), top(levels);
  // n − n % lanes, not i + lanes ≤ n: GCC then sees the vector loop dead for a short n
  // known at compile time, instead of warning (-Warray-bounds) on its loads.
  const std::size_t vector_end = n - n % lanes;
  std::size_t i = 0;
  for (; i < vector_end; i += lanes) {
    const floats s = params_at(scale, i);
    const floats rounded =
        xsimd::nearbyint((load_as_float<Arch>(x + i) - params_at(minimum, i)) / s);
    const floats clamped =
        xsimd::select(s > zero, xsimd::min(xsimd::max(rounded, zero), top), zero);
    detail::store_low_bytes<Arch>(xsimd::to_int(clamped), q + i);
  }
  if constexpr (std::is_pointer_v<P>) {
    reference::quantize_affine(x + i, n - i, minimum + i, scale + i, levels, q + i);
  } else {
    reference::quantize_affine(x + i, n - i, minimum, scale, levels, q + i);
  }
}

template <class Arch = default_arch, class S>
inline void q4_0_nibbles(const S* x, float inverse, std::byte* nibbles) noexcept {
  using floats = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = floats::size;
  if constexpr (lanes > 16) {
    reference::q4_0_nibbles(x, inverse, nibbles);
  } else {
    const floats multiplier(inverse), bias(8.5F), lo(0.0F), hi(15.0F);
    const auto codes = [&](const S* from) {
      // x · inverse + 8.5 rounded once, then the fma-free add: as the reference's two steps.
      const floats shifted = load_as_float<Arch>(from) * multiplier + bias;
      return xsimd::to_int(xsimd::min(xsimd::max(shifted, lo), hi));
    };
    for (std::size_t j = 0; j < 16; j += lanes) {
      const auto packed = codes(x + j) | (codes(x + j + 16) << 4);
      detail::store_low_bytes<Arch>(packed, nibbles + j);
    }
  }
}

}  // namespace kvc::simd
