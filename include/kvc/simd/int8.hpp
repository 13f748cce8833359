// kvc/simd/int8.hpp — kernels of the integer KV formats (quant::Int8, quant::Q8_0,
// quant::Q4_0): widening codes × scale into an fp32 tile, with a scalar reference for each.
//
// attend never decodes a cache whole: the quantizers widen one page tile at a time into the
// caller's L1 scratch with these kernels, then reuse simd::dot_block / simd::axpy_block, so
// the scores and outputs are exact (fp32) functions of the stored codes.
//
// Kernels:
//   dequantize_int8(q, scale, out, n)   out[i] = scale · q[i]            (int8 codes)
//   dequantize_q8_0(blocks, out, n)     n/32 ggml block_q8_0 → n floats  (n % 32 == 0)
//   dequantize_q4_0(blocks, out, n)     n/32 ggml block_q4_0 → n floats  (n % 32 == 0)
//   expand_q4_0(blocks, out, n)         n/32 ggml block_q4_0 → n int8 codes (nibble − 8),
//                                       for the integer score path (simd::dot_s8_scaled)
//   load_fp16 / store_fp16              the fp16 `d` of a ggml block, unaligned
//   gather_fp16(first, stride, n, out)  out[j] = the fp16 at first + j·stride (a scale per
//                                       row of a tile: ggml blocks, Kivi's value groups)
//   transpose_fp16(first, stride, n, fields, out, ldo)
//                                       out[i·ldo + j] = the fp16 at first + j·stride + 2i:
//                                       `fields` consecutive fp16s of n rows, one row of n
//                                       floats per field (Kivi's value (m̂, ŝ) per group)
// Every kernel has a twin in kvc::simd::reference (same signature, plain C++) that tests
// compare against. Paths: AVX-512F (16 lanes), AVX2 (8 lanes), scalar — chosen by the
// target the translation unit is compiled for. Inputs need no alignment (a ggml block is 34
// or 18 bytes, so its fields are at odd addresses).
#pragma once

#include <kvc/simd/intrinsics.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvc::simd {

// The fp16 scale of a ggml block: 2 bytes, little-endian IEEE half, any alignment.
inline float load_fp16(const std::byte* bytes) noexcept {
  std::uint16_t bits = 0;
  std::memcpy(&bits, bytes, sizeof bits);
#if defined(__F16C__)
  // One vcvtph2ps instead of Eigen's portable bit manipulation (both exact).
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
#endif
}

// Round to nearest even (as Eigen::half), stored as 2 little-endian bytes. A NaN stores some
// quiet NaN (the payload may differ from Eigen's 0x7e00).
inline void store_fp16(float value, std::byte* bytes) noexcept {
#if defined(__F16C__)
  // One vcvtps2ph: Eigen without EIGEN_HAS_FP16_C converts in software, which was a visible
  // part of q8_0 / q4_0 append.
  const auto bits = static_cast<std::uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT));
#else
  const auto bits = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value));
#endif
  std::memcpy(bytes, &bits, sizeof bits);
}

namespace reference {

inline void gather_fp16(const std::byte* first, std::size_t stride, std::size_t n,
                        float* out) noexcept {
  for (std::size_t j = 0; j < n; ++j) out[j] = load_fp16(first + j * stride);
}

inline void transpose_fp16(const std::byte* first, std::size_t stride, std::size_t n,
                           std::size_t fields, float* out, std::size_t ldo) noexcept {
  for (std::size_t i = 0; i < fields; ++i) gather_fp16(first + 2 * i, stride, n, out + i * ldo);
}

inline void dequantize_int8(const std::int8_t* q, float scale, float* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = scale * static_cast<float>(q[i]);
}

// block_q8_0 = {fp16 d; int8 q[32]}: x[j] = d · q[j].
inline void dequantize_q8_0(const std::byte* blocks, float* out, std::size_t n) noexcept {
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 34;
    const float d = load_fp16(block);
    for (std::size_t j = 0; j < 32; ++j) {
      out[b * 32 + j] = d * static_cast<float>(static_cast<std::int8_t>(block[2 + j]));
    }
  }
}

// block_q4_0 = {fp16 d; uint8 q[16]}: x[j] = d · ((q[j] & 15) − 8), x[j + 16] = d · ((q[j] >> 4) −
// 8).
inline void dequantize_q4_0(const std::byte* blocks, float* out, std::size_t n) noexcept {
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 18;
    const float d = load_fp16(block);
    for (std::size_t j = 0; j < 16; ++j) {
      const auto byte = static_cast<int>(block[2 + j]);
      out[b * 32 + j] = d * static_cast<float>((byte & 15) - 8);
      out[b * 32 + j + 16] = d * static_cast<float>((byte >> 4) - 8);
    }
  }
}

inline void expand_q4_0(const std::byte* blocks, std::int8_t* out, std::size_t n) noexcept {
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 18;
    for (std::size_t j = 0; j < 16; ++j) {
      const auto byte = static_cast<int>(block[2 + j]);
      out[b * 32 + j] = static_cast<std::int8_t>((byte & 15) - 8);
      out[b * 32 + j + 16] = static_cast<std::int8_t>((byte >> 4) - 8);
    }
  }
}

}  // namespace reference

// out[j] = the fp16 at first + j·stride for j < n: a tile's per-row scales, which sit at a
// fixed offset in rows `stride` bytes apart. AVX-512: 16 rows per vpgatherdd, the 16-bit halves
// narrowed (vpmovdw) and widened to fp32 (vcvtph2ps) in registers, instead of 16 scalar loads
// and conversions. The gather reads 4 bytes at each address, so bytes [first + j·stride, +4)
// must be readable for every j < n (in kvc the scale is always followed by its codes).
inline void gather_fp16(const std::byte* first, std::size_t stride, std::size_t n,
                        float* out) noexcept {
  std::size_t j = 0;
#if defined(__AVX512F__)
  // int32 byte offsets: tiles are at most a page of rows, far below 2^31 bytes.
  if (n * stride <= std::size_t{0x7fffffff} - 16 * stride) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i offsets = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(stride)));
    for (; j < n; j += 16) {
      const std::size_t count = std::min<std::size_t>(16, n - j);
      // Lanes past n are masked off: their addresses are never read.
      const auto live = static_cast<__mmask16>((1U << count) - 1U);
      const __m512i words =
          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, first + j * stride, 1);
      _mm512_mask_storeu_ps(out + j, live, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words)));
    }
    return;
  }
#endif
  reference::gather_fp16(first + j * stride, stride, n - j, out + j);
}

// transpose_fp16 (see the list above). Eight fields (16 bytes a row: Kivi at d = 128, Group =
// 32) on AVX-512 BW: 16 rows a step as a 16 × 8 transpose of 16-bit words in registers — four
// zmm of four rows each, two rounds of vpermt2w, then vcvtph2ps per field — about 40
// instructions where per-field gathers take eight vpgatherdd. Other counts (and the last
// n mod 16 rows): gather_fp16 per field, which reads 4 bytes at each field, so bytes
// [row, row + 2·fields + 2) of every row must be readable (Kivi's codes follow its fields).
inline void transpose_fp16(const std::byte* first, std::size_t stride, std::size_t n,
                           std::size_t fields, float* out, std::size_t ldo) noexcept {
  std::size_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (fields == 8) {
    // Round 1: from rows 0–7 (a: rows 0–3, b: rows 4–7; word 8r + i is field i of row r),
    // fields 0–3 as [field][row] (low) and fields 4–7 (high). Round 2: from round 1's rows
    // 0–7 and 8–15, fields 2p and 2p + 1 of all 16 rows, [field][row].
    using Index = std::array<std::uint16_t, 32>;
    static constexpr Index low_index = [] {
      Index index{};
      for (std::size_t f = 0; f < 4; ++f) {
        for (std::size_t r = 0; r < 8; ++r)
          index[f * 8 + r] = static_cast<std::uint16_t>(r * 8 + f);
      }
      return index;
    }();
    static constexpr Index high_index = [] {
      Index index{};
      for (std::size_t k = 0; k < 32; ++k) index[k] = static_cast<std::uint16_t>(low_index[k] + 4);
      return index;
    }();
    static constexpr std::array<Index, 2> pair_index = [] {
      std::array<Index, 2> index{};
      for (std::size_t p = 0; p < 2; ++p) {
        for (std::size_t f = 0; f < 2; ++f) {
          const std::size_t field = 2 * p + f;
          for (std::size_t r = 0; r < 16; ++r) {
            index[p][f * 16 + r] =
                static_cast<std::uint16_t>(r < 8 ? field * 8 + r : 32 + field * 8 + (r - 8));
          }
        }
      }
      return index;
    }();
    const __m512i low = _mm512_loadu_si512(low_index.data());
    const __m512i high = _mm512_loadu_si512(high_index.data());
    const __m512i pairs[2] = {_mm512_loadu_si512(pair_index[0].data()),
                              _mm512_loadu_si512(pair_index[1].data())};
    const auto four_rows = [&](const std::byte* row) {
      __m512i x = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + stride)), 1);
      x = _mm512_inserti32x4(x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * stride)),
                             2);
      return _mm512_inserti32x4(
          x, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 3 * stride)), 3);
    };
    for (; j + 16 <= n; j += 16) {
      const std::byte* rows = first + j * stride;
      const __m512i a = four_rows(rows), b = four_rows(rows + 4 * stride);
      const __m512i c = four_rows(rows + 8 * stride), d = four_rows(rows + 12 * stride);
      // [f0..f3 of rows 0–7], [f4..f7 of rows 0–7], the same of rows 8–15.
      const __m512i first_low = _mm512_permutex2var_epi16(a, low, b);
      const __m512i first_high = _mm512_permutex2var_epi16(a, high, b);
      const __m512i second_low = _mm512_permutex2var_epi16(c, low, d);
      const __m512i second_high = _mm512_permutex2var_epi16(c, high, d);
      const __m512i field_pairs[4] = {_mm512_permutex2var_epi16(first_low, pairs[0], second_low),
                                      _mm512_permutex2var_epi16(first_low, pairs[1], second_low),
                                      _mm512_permutex2var_epi16(first_high, pairs[0], second_high),
                                      _mm512_permutex2var_epi16(first_high, pairs[1], second_high)};
      for (std::size_t p = 0; p < 4; ++p) {
        _mm512_storeu_ps(out + 2 * p * ldo + j,
                         _mm512_cvtph_ps(_mm512_castsi512_si256(field_pairs[p])));
        _mm512_storeu_ps(out + (2 * p + 1) * ldo + j,
                         _mm512_cvtph_ps(_mm512_extracti64x4_epi64(field_pairs[p], 1)));
      }
    }
    if (j == n) return;
  }
#endif
  for (std::size_t i = 0; i < fields; ++i) {
    gather_fp16(first + j * stride + 2 * i, stride, n - j, out + i * ldo + j);
  }
}

inline void dequantize_int8(const std::int8_t* q, float scale, float* out, std::size_t n) noexcept {
  std::size_t i = 0;
#if defined(__AVX512F__)
  const __m512 s16 = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(s16, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))));
  }
#endif
#if defined(__AVX2__)
  const __m256 s8 = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))));
  }
#endif
  reference::dequantize_int8(q + i, scale, out + i, n - i);
}

inline void dequantize_q8_0(const std::byte* blocks, float* out, std::size_t n) noexcept {
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 34;
    dequantize_int8(reinterpret_cast<const std::int8_t*>(block + 2), load_fp16(block), out + b * 32,
                    32);
  }
}

inline void dequantize_q4_0(const std::byte* blocks, float* out, std::size_t n) noexcept {
#if defined(__AVX512F__)
  const __m512i low_mask = _mm512_set1_epi32(15);
  const __m512i eight = _mm512_set1_epi32(8);
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 18;
    const __m512 d = _mm512_set1_ps(load_fp16(block));
    const __m512i bytes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)));
    const __m512i low = _mm512_sub_epi32(_mm512_and_si512(bytes, low_mask), eight);
    const __m512i high = _mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight);
    _mm512_storeu_ps(out + b * 32, _mm512_mul_ps(d, _mm512_cvtepi32_ps(low)));
    _mm512_storeu_ps(out + b * 32 + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(high)));
  }
#elif defined(__AVX2__)
  const __m256i low_mask = _mm256_set1_epi32(15);
  const __m256i eight = _mm256_set1_epi32(8);
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::byte* block = blocks + b * 18;
    const __m256 d = _mm256_set1_ps(load_fp16(block));
    for (std::size_t half = 0; half < 16; half += 8) {
      const __m256i bytes =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + half)));
      const __m256i low = _mm256_sub_epi32(_mm256_and_si256(bytes, low_mask), eight);
      const __m256i high = _mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight);
      _mm256_storeu_ps(out + b * 32 + half, _mm256_mul_ps(d, _mm256_cvtepi32_ps(low)));
      _mm256_storeu_ps(out + b * 32 + 16 + half, _mm256_mul_ps(d, _mm256_cvtepi32_ps(high)));
    }
  }
#else
  reference::dequantize_q4_0(blocks, out, n);
#endif
}

inline void expand_q4_0(const std::byte* blocks, std::int8_t* out, std::size_t n) noexcept {
#if defined(__SSE2__)
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i eight = _mm_set1_epi8(8);
  for (std::size_t b = 0; b < n / 32; ++b) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + b * 18 + 2));
    const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, mask), eight);
    const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32 + 16), high);
  }
#else
  reference::expand_q4_0(blocks, out, n);
#endif
}

}  // namespace kvc::simd
