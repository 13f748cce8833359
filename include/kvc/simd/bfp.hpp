// kvc/simd/bfp.hpp — kernels of block floating point (quant::Bfp): exponent bytes to steps,
// 4-bit mantissas to int8, rows widened to fp32, and q·k on int8 codes with one scale per
// block of channels (VNNI), each with a scalar reference twin in kvc::simd::reference.
//
// A BFP row of d channels, block b channels, m mantissa bits (see kvc/quant/bfp.hpp):
//   [uint8 exponent byte × d/b][mantissas]     x̂ = q · step(byte), step = 2^(byte − 127 − m + 2)
// m = 8: one int8 per element; m = 4: two's complement nibbles, element 2j in the low nibble
// of byte j, element 2j + 1 in the high one.
//
// Kernels:
//   bfp_steps<m>[byte]                    the step of an exponent byte (a table, exact: a
//                                         power of two, denormal below 2^−126)
//   expand_nibbles(packed, out, n)        n 4-bit codes → n int8 (n even)
//   dequantize_bfp<b, m>(row, out, d)     one row → d floats, bit for bit the reference
//                                         (q · step is exact in fp32: ≤ 8 significant bits)
//   dot_s8_scaled(q, rows, d, k, tokens, ldk, scales, block, lds, scores, ldo[, chunk_stride])
//       scores[r·ldo + j] = Σ_b scales[j·lds + b] · Σ_{c in block b} q[r·d + c]·k_j(c), where
//       k_j(c) = k[j·ldk + (c / 32)·chunk_stride + c mod 32]: a token's codes in chunks of 32,
//       chunk_stride bytes apart (32: one contiguous row; 34: q8_0's blocks, read in place)
//       Each block's sum is an exact int32 converted exactly to fp32 (|Σ| < 2^24 for
//       blocks of ≤ 64 channels), then scaled and summed in fp32 (in another order than the
//       reference: they differ by fp32 rounding only).
// Paths: AVX-512 VNNI + VL + BW (dot_s8_scaled: zmm vpdpbusd, 64 channels a step, each int32
// lane's 4-channel sum scaled by its block's step before the fp32 sum), AVX2 / SSE2 (nibble
// expansion), the simd::dequantize_int8 paths (widening), the references elsewhere — chosen
// by the target the translation unit is compiled for. Inputs need no alignment.
#pragma once

#include <kvc/simd/int8.hpp>
#include <kvc/simd/int8_dot.hpp>
#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/kernels.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace kvc::simd {

// step(byte) = 2^(byte − 127 − MantissaBits + 2) for every exponent byte, from its bits.
template <unsigned MantissaBits>
inline constexpr std::array<float, 256> bfp_steps = [] {
  std::array<float, 256> steps{};
  for (int byte = 0; byte < 256; ++byte) {
    const int s = byte - 127 - static_cast<int>(MantissaBits) + 2;
    steps[static_cast<std::size_t>(byte)] =
        s >= -126 ? std::bit_cast<float>(static_cast<std::uint32_t>(s + 127) << 23)
                  : std::bit_cast<float>(std::uint32_t{1} << (s + 149));
  }
  return steps;
}();

namespace reference {

// out[2j] = low nibble of packed[j], out[2j + 1] = high nibble, sign-extended.
inline void expand_nibbles(const std::byte* packed, std::int8_t* out, std::size_t n) noexcept {
  for (std::size_t j = 0; j < n / 2; ++j) {
    const auto byte = static_cast<std::uint8_t>(packed[j]);
    out[2 * j] = static_cast<std::int8_t>(static_cast<std::int8_t>(byte << 4) >> 4);
    out[2 * j + 1] = static_cast<std::int8_t>(static_cast<std::int8_t>(byte) >> 4);
  }
}

// x̂[i] = ldexp(q[i], byte − 127 − m + 2), element by element.
template <std::size_t Block, unsigned MantissaBits>
inline void dequantize_bfp(const std::byte* row, float* out, std::size_t d) noexcept {
  const std::byte* mantissas = row + d / Block;
  for (std::size_t i = 0; i < d; ++i) {
    int q = 0;
    if constexpr (MantissaBits == 8) {
      q = static_cast<std::int8_t>(mantissas[i]);
    } else {
      const auto byte = static_cast<std::uint8_t>(mantissas[i / 2]);
      q = i % 2 == 0 ? static_cast<std::int8_t>(byte << 4) >> 4
                     : static_cast<std::int8_t>(byte) >> 4;
    }
    const int exponent = static_cast<int>(static_cast<std::uint8_t>(row[i / Block])) - 127;
    out[i] = std::ldexp(static_cast<float>(q), exponent - static_cast<int>(MantissaBits) + 2);
  }
}

inline void dot_s8_scaled(const std::int8_t* q, std::size_t rows, std::size_t d,
                          const std::int8_t* k, std::size_t tokens, std::size_t ldk,
                          const float* scales, std::size_t block, std::size_t lds, float* scores,
                          std::size_t ldo, std::size_t chunk_stride = int8_chunk) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      float sum = 0.0F;
      for (std::size_t b = 0; b < d / block; ++b) {
        std::int32_t dot = 0;
        for (std::size_t c = b * block; c < (b + 1) * block; ++c) {
          dot += std::int32_t{q[r * d + c]} *
                 k[j * ldk + c / int8_chunk * chunk_stride + c % int8_chunk];
        }
        sum += scales[j * lds + b] * static_cast<float>(dot);
      }
      scores[r * ldo + j] = sum;
    }
  }
}

}  // namespace reference

inline void expand_nibbles(const std::byte* packed, std::int8_t* out, std::size_t n) noexcept {
  std::size_t j = 0;  // packed bytes done
#if defined(__AVX2__)
  {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i eight = _mm256_set1_epi8(8);
    for (; j + 32 <= n / 2; j += 32) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + j));
      // ((nibble ^ 8) − 8) sign-extends a 4-bit two's complement field.
      const __m256i low =
          _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(bytes, mask), eight), eight);
      const __m256i high = _mm256_sub_epi8(
          _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), eight), eight);
      // Per 128-bit lane: unpacklo holds bytes 0..7 of the lane, unpackhi 8..15.
      const __m256i first = _mm256_unpacklo_epi8(low, high);
      const __m256i second = _mm256_unpackhi_epi8(low, high);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j),
                          _mm256_permute2x128_si256(first, second, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j + 32),
                          _mm256_permute2x128_si256(first, second, 0x31));
    }
  }
#endif
#if defined(__SSE2__)
  {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i eight = _mm_set1_epi8(8);
    for (; j + 16 <= n / 2; j += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + j));
      const __m128i low = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(bytes, mask), eight), eight);
      const __m128i high =
          _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), eight), eight);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * j), _mm_unpacklo_epi8(low, high));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * j + 16), _mm_unpackhi_epi8(low, high));
    }
  }
#endif
  reference::expand_nibbles(packed + j, out + 2 * j, n - 2 * j);
}

// Blocks widened through simd::dequantize_int8 (step · q, one rounding-free product per
// element); 4-bit rows are expanded to int8 first, up to 256 elements at a time.
template <std::size_t Block, unsigned MantissaBits>
inline void dequantize_bfp(const std::byte* row, float* out, std::size_t d) noexcept {
  const std::size_t blocks = d / Block;
  const std::byte* mantissas = row + blocks;
  const std::array<float, 256>& steps = bfp_steps<MantissaBits>;
  if constexpr (MantissaBits == 8) {
    for (std::size_t b = 0; b < blocks; ++b) {
      dequantize_int8(reinterpret_cast<const std::int8_t*>(mantissas + b * Block),
                      steps[static_cast<std::uint8_t>(row[b])], out + b * Block, Block);
    }
  } else {
    constexpr std::size_t batch = 256;  // elements expanded at a time (a multiple of Block)
    std::array<std::int8_t, batch> codes;
    for (std::size_t first = 0; first < d; first += batch) {
      const std::size_t n = std::min(batch, d - first);
      expand_nibbles(mantissas + first / 2, codes.data(), n);
      for (std::size_t i = 0; i < n; i += Block) {
        dequantize_int8(codes.data() + i,
                        steps[static_cast<std::uint8_t>(row[(first + i) / Block])], out + first + i,
                        Block);
      }
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
namespace detail {

// Rows query rows × Tokens keys, 64 channels a step. vpdpbusd multiplies u8 by s8, so the
// key codes are shifted to u8 (k + 128) and each lane's accumulator starts at
// −128 · Σ (its 4 query channels) (neg_bias, per row and 64-channel step): every int32 lane
// ends as the exact Σ q·k of its 4 channels, which is converted to fp32 and multiplied by
// its block's step (fma into the row's fp32 accumulator).
template <std::size_t Rows, std::size_t Tokens>
inline void dot_s8_scaled_block(const std::int8_t* q, std::size_t d, const __m512i* neg_bias,
                                const std::int8_t* k, std::size_t ldk, std::size_t chunk_stride,
                                const float* scales, std::size_t block, std::size_t lds,
                                float* scores, std::size_t ldo) noexcept {
  using batch = xsimd::batch<float, default_arch>;
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  // Lane i of a 64-channel step covers channels 4i..4i + 3 of it: block 4i / block (block ≤
  // 64) of the step's first block, or that block itself (block a multiple of 64).
  const __m512i index =
      block == 16   ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
      : block == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                    : _mm512_setzero_si512();
  const auto mask = static_cast<__mmask16>(block >= 64 ? 1 : (1U << (64 / block)) - 1);
  __m512 acc[Rows][Tokens];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE { acc[r][t] = _mm512_setzero_ps(); });
  });
  for (std::size_t c = 0, step = 0; c < d; c += 64, ++step) {
    __m512i key[Tokens];
    __m512 scale[Tokens];
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
      // Channels c..c + 63: one load from a contiguous row, else its two 32-channel chunks.
      const std::int8_t* chunk = k + t * ldk + c / int8_chunk * chunk_stride;
      const __m512i codes =
          chunk_stride == int8_chunk
              ? _mm512_loadu_si512(chunk)
              : _mm512_inserti64x4(
                    _mm512_castsi256_si512(
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk))),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + chunk_stride)), 1);
      key[t] = _mm512_xor_si512(codes, sign);
      scale[t] =
          _mm512_permutexvar_ps(index, _mm512_maskz_loadu_ps(mask, scales + t * lds + c / block));
    });
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const __m512i query = in_register(_mm512_loadu_si512(q + r * d + c));
      const __m512i bias = neg_bias[r * (d / 64) + step];
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        const __m512i dot = _mm512_dpbusd_epi32(bias, key[t], query);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale[t], acc[r][t]);
      });
    });
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    if constexpr (Tokens == 4) {
      reduce_add_4<default_arch>(batch(acc[r][0]), batch(acc[r][1]), batch(acc[r][2]),
                                 batch(acc[r][3]), scores + r * ldo);
    } else {
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        scores[r * ldo + t] = _mm512_reduce_add_ps(acc[r][t]);
      });
    }
  });
}

template <std::size_t Rows>
inline void dot_s8_scaled_rows(const std::int8_t* q, std::size_t d, const std::int8_t* k,
                               std::size_t tokens, std::size_t ldk, std::size_t chunk_stride,
                               const float* scales, std::size_t block, std::size_t lds,
                               float* scores, std::size_t ldo) noexcept {
  constexpr std::size_t max_steps = 4;  // d ≤ 256
  __m512i neg_bias[Rows * max_steps];
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (std::size_t r = 0; r < Rows; ++r) {
    for (std::size_t c = 0; c < d; c += 64) {
      const __m512i bias =
          _mm512_dpbusd_epi32(_mm512_setzero_si512(), sign, _mm512_loadu_si512(q + r * d + c));
      neg_bias[r * (d / 64) + c / 64] = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
    }
  }
  std::size_t j = 0;
  for (; j + 4 <= tokens; j += 4) {
    dot_s8_scaled_block<Rows, 4>(q, d, neg_bias, k + j * ldk, ldk, chunk_stride, scales + j * lds,
                                 block, lds, scores + j, ldo);
  }
  for (; j < tokens; ++j) {
    dot_s8_scaled_block<Rows, 1>(q, d, neg_bias, k + j * ldk, ldk, chunk_stride, scales + j * lds,
                                 block, lds, scores + j, ldo);
  }
}

}  // namespace detail
#endif

// Whether dot_s8_scaled runs on VNNI for this shape (else it is the reference).
constexpr bool dot_s8_scaled_fits(std::size_t d, std::size_t block) noexcept {
  return has_int8_dot && d % 64 == 0 && d <= 256 &&
         (block == 16 || block == 32 || (block % 64 == 0 && d % block == 0));
}

inline void dot_s8_scaled(const std::int8_t* q, std::size_t rows, std::size_t d,
                          const std::int8_t* k, std::size_t tokens, std::size_t ldk,
                          const float* scales, std::size_t block, std::size_t lds, float* scores,
                          std::size_t ldo, std::size_t chunk_stride = int8_chunk) noexcept {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  if (dot_s8_scaled_fits(d, block)) {
    std::size_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      detail::dot_s8_scaled_rows<4>(q + r * d, d, k, tokens, ldk, chunk_stride, scales, block, lds,
                                    scores + r * ldo, ldo);
    }
    const std::size_t left = rows - r;
    const auto run = [&]<std::size_t Rows>(std::integral_constant<std::size_t, Rows>) {
      detail::dot_s8_scaled_rows<Rows>(q + r * d, d, k, tokens, ldk, chunk_stride, scales, block,
                                       lds, scores + r * ldo, ldo);
    };
    if (left == 3) run(std::integral_constant<std::size_t, 3>{});
    if (left == 2) run(std::integral_constant<std::size_t, 2>{});
    if (left == 1) run(std::integral_constant<std::size_t, 1>{});
    return;
  }
#endif
  reference::dot_s8_scaled(q, rows, d, k, tokens, ldk, scales, block, lds, scores, ldo,
                           chunk_stride);
}

}  // namespace kvc::simd
