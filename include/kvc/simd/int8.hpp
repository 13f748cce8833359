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
// Every kernel has a twin in kvc::simd::reference (same signature, plain C++) that tests
// compare against. Paths: AVX-512F (16 lanes), AVX2 (8 lanes), scalar — chosen by the
// target the translation unit is compiled for. Inputs need no alignment (a ggml block is 34
// or 18 bytes, so its fields are at odd addresses).
#pragma once

#include <kvc/simd/intrinsics.hpp>

#include <Eigen/Core>

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
