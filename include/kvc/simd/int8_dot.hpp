// kvc/simd/int8_dot.hpp — integer dot-product kernels of the int8 KV formats (quant::Int8,
// quant::Q8_0): q·K and P·V computed on the int8 codes with VNNI (vpdpbusd), never widened.
//
// Why: at GQA 4 a decode step does 2 · group · d multiply-adds per stored token. In fp32 that
// is 2 · 4 · 128 / 16 = 64 AVX-512 FMAs per token, more than the DRAM time of a Dense<half>
// token on the machines kvc targets, so the cache is compute-bound and a smaller format only
// helps if its arithmetic is cheaper too. vpdpbusd does 64 (zmm) or 32 (ymm) u8 × s8
// multiply-adds in one instruction, 4× the lanes of an fp32 FMA.
//
// What is rounded (the price, stated exactly — see the reference functions below):
//   * queries: quantize_rows_s8 rounds each query row to int8 with one absmax scale per row,
//     q̂ = clamp(nearbyint(q · 127/m), ±127), m = max|q|, once per tile (llama.cpp does the
//     same with q8_0 blocks). A score then moves by at most (m/127)/2 · Σ_c|k̂_c|.
//   * weights: quantize_weights_u8 rounds the tile's non-negative softmax weights (already
//     multiplied by the value scales) to u8 against their maximum w_max in the tile:
//     ŵ = nearbyint(w · 255/w_max); a weight moves by at most w_max/510. The tile's output
//     is (w_max/255) · Σ_j ŵ_j v̂_j.
//   Both sums over codes are exact int32 (|Σ| ≤ 2^31 for d ≤ 2^17 and 2^14 tokens per call);
//   the kernels below are bit-identical to their references.
//
// Kernels (pure integer, reference twins in kvc::simd::reference):
//   quantize_rows_s8(x, rows, ldx, d, codes, scales)   fp32 rows → int8 codes + fp32 scale
//   quantize_weights_u8(w, n, out) → w_max / 255        non-negative fp32 → u8
//   dot_s8(q, rows, d, k, tokens, ldk, dots, ldo)        dots[r·ldo + j] = Σ_c q[r·d + c]·k[j·ldk +
//   c] accumulate_u8s8(w, rows, ldw, v, tokens, ldv, chunks, chunk_stride, acc, ldacc)
//       acc[r·ldacc + 32·b + c] = Σ_j w[b][r·ldw + j] · v[j·ldv + b·chunk_stride + c]
//       for b < chunks, c < 32: the channels come in chunks of 32 (a q8_0 block, or 32
//       consecutive int8 codes) and each chunk has its own weight rows w[b] (a chunk's value
//       scale is folded into its weights).
//   dot_planar<Bits>(q, rows, d, k, tokens, ldk, dots, ldo)   (Bits 2 or 4)
//       dots[r·ldo + j] = Σ_c q[r·d + c] · code_j(c), the codes packed planar (quant::Kivi):
//       channel c of token j is bits [(c / S)·Bits, +Bits) of byte k[j·ldk + c % S],
//       S = d·Bits/8. Shifted and masked in registers, each 32 bytes of a token give 32
//       consecutive channels as u8, straight into vpdpbusd: no widening, no sign bias.
//   accumulate_planar<Bits>(w, rows, ldw, v, tokens, ldv, d, acc, ldacc)   (Bits 2 or 4)
//       accumulate_u8s8's sums over planar codes (quant::Kivi's values): acc[r·ldacc + c] =
//       Σ_j w[c / 32][r·ldw + j] · code_j(c), the codes shifted and masked in registers.
// Paths: AVX-512 VNNI + VL (256-bit vpdpbusd on 32-channel chunks; 32 registers hold a 4-row
// × 4-token block) where the target has them (`has_int8_dot`), the references otherwise.
// The quantizers use these kernels only where has_int8_dot is true; elsewhere they keep their
// exact fp32 path (widen codes, fp32 FMA), which is faster there than scalar integer code.
#pragma once

#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/kernels.hpp>  // detail::unroll

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace kvc::simd {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
inline constexpr bool has_int8_dot = true;
#else
inline constexpr bool has_int8_dot = false;
#endif

// Channels per chunk of the integer kernels (the width of one ymm of int8 codes).
inline constexpr std::size_t int8_chunk = 32;

namespace reference {

// codes[r·d + c] = clamp(nearbyint(x[r·ldx + c] · (127 / m_r)), −127, 127) and
// scales[r] = m_r / 127, where m_r = max_c |x[r·ldx + c]|. A row whose 127 / m_r is not
// finite (all zeros, or m_r below ~3.7e−37) gets codes 0 and scale 0.
inline void quantize_rows_s8(const float* x, std::size_t rows, std::size_t ldx, std::size_t d,
                             std::int8_t* codes, float* scales) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    float m = 0.0F;
    for (std::size_t c = 0; c < d; ++c) m = std::max(m, std::abs(row[c]));
    const float inverse = 127.0F / m;
    const bool usable = std::isfinite(inverse);
    scales[r] = usable ? m / 127.0F : 0.0F;
    for (std::size_t c = 0; c < d; ++c) {
      const float q = usable ? std::nearbyint(row[c] * inverse) : 0.0F;
      codes[r * d + c] = static_cast<std::int8_t>(std::clamp(q, -127.0F, 127.0F));
    }
  }
}

// out[j] = min(nearbyint(w[j] · (255 / w_max)), 255) for w[j] ≥ 0; returns w_max / 255
// (0, with out all 0, when 255 / w_max is not finite).
inline float quantize_weights_u8(const float* w, std::size_t n, std::uint8_t* out) noexcept {
  float m = 0.0F;
  for (std::size_t j = 0; j < n; ++j) m = std::max(m, w[j]);
  const float inverse = 255.0F / m;
  if (!std::isfinite(inverse)) {
    std::fill(out, out + n, std::uint8_t{0});
    return 0.0F;
  }
  for (std::size_t j = 0; j < n; ++j) {
    out[j] = static_cast<std::uint8_t>(std::min(std::nearbyint(w[j] * inverse), 255.0F));
  }
  return m / 255.0F;
}

inline void dot_s8(const std::int8_t* q, std::size_t rows, std::size_t d, const std::int8_t* k,
                   std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                   std::size_t ldo) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      std::int32_t sum = 0;
      for (std::size_t c = 0; c < d; ++c) sum += std::int32_t{q[r * d + c]} * k[j * ldk + c];
      dots[r * ldo + j] = sum;
    }
  }
}

template <unsigned Bits>
inline void dot_planar(const std::int8_t* q, std::size_t rows, std::size_t d, const std::uint8_t* k,
                       std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                       std::size_t ldo) noexcept {
  const std::size_t stride = d * Bits / 8;
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      std::int32_t sum = 0;
      for (std::size_t c = 0; c < d; ++c) {
        const unsigned code =
            (unsigned{k[j * ldk + c % stride]} >> (c / stride * Bits)) & ((1U << Bits) - 1U);
        sum += std::int32_t{q[r * d + c]} * static_cast<std::int32_t>(code);
      }
      dots[r * ldo + j] = sum;
    }
  }
}

inline void accumulate_u8s8(const std::uint8_t* const* w, std::size_t rows, std::size_t ldw,
                            const std::int8_t* v, std::size_t tokens, std::size_t ldv,
                            std::size_t chunks, std::size_t chunk_stride, std::int32_t* acc,
                            std::size_t ldacc) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t b = 0; b < chunks; ++b) {
      for (std::size_t c = 0; c < int8_chunk; ++c) {
        std::int32_t sum = 0;
        for (std::size_t j = 0; j < tokens; ++j) {
          sum += std::int32_t{w[b][r * ldw + j]} * v[j * ldv + b * chunk_stride + c];
        }
        acc[r * ldacc + b * int8_chunk + c] = sum;
      }
    }
  }
}

template <unsigned Bits>
inline void accumulate_planar(const std::uint8_t* const* w, std::size_t rows, std::size_t ldw,
                              const std::uint8_t* v, std::size_t tokens, std::size_t ldv,
                              std::size_t d, std::int32_t* acc, std::size_t ldacc) noexcept {
  const std::size_t stride = d * Bits / 8;
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < d; ++c) {
      std::int32_t sum = 0;
      for (std::size_t j = 0; j < tokens; ++j) {
        const unsigned code =
            (unsigned{v[j * ldv + c % stride]} >> (c / stride * Bits)) & ((1U << Bits) - 1U);
        sum += std::int32_t{w[c / int8_chunk][r * ldw + j]} * static_cast<std::int32_t>(code);
      }
      acc[r * ldacc + c] = sum;
    }
  }
}

}  // namespace reference

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
namespace detail {

// The four int32 sums of four ymm accumulators, [Σa, Σb, Σc, Σd].
KVC_SIMD_ALWAYS_INLINE inline __m128i reduce_add_4_epi32(__m256i a, __m256i b, __m256i c,
                                                         __m256i d) noexcept {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

KVC_SIMD_ALWAYS_INLINE inline __m256i fold_512(__m512i x) noexcept {
  return _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64(x, 1));
}

// Rows query rows × Tokens keys. vpdpbusd multiplies u8 by s8, so the key codes are shifted
// to u8 (k + 128: an xor of the sign bit, one per key vector, shared by all rows) and
// 128 · Σ_c q_c, one number per query row, is subtracted at the end. Channels go 64 at a
// time (zmm), then a last 32 (ymm) when d % 64 == 32. Every array below is indexed by
// compile-time constants only (unroll), so it lives in registers (16 accumulators, 4 keys
// and a query of AVX-512's 32).
template <std::size_t Rows, std::size_t Tokens>
inline void dot_s8_block(const std::int8_t* q, std::size_t d, const std::int32_t* row_bias,
                         const std::int8_t* k, std::size_t ldk, std::int32_t* dots,
                         std::size_t ldo) noexcept {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[Rows][Tokens];
  unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE { acc[r][t] = _mm512_setzero_si512(); });
  });
  std::size_t c = 0;
  for (; c + 2 * int8_chunk <= d; c += 2 * int8_chunk) {
    __m512i key[Tokens];
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
      key[t] = _mm512_xor_si512(_mm512_loadu_si512(k + t * ldk + c), sign);
    });
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const __m512i query = in_register(_mm512_loadu_si512(q + r * d + c));
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], key[t], query);
      });
    });
  }
  __m256i total[Rows][Tokens];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE { total[r][t] = fold_512(acc[r][t]); });
  });
  if (c < d) {  // the last 32 channels
    const __m256i sign256 = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i key[Tokens];
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
      key[t] = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + t * ldk + c)), sign256);
    });
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const __m256i query = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * d + c));
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        total[r][t] = _mm256_dpbusd_epi32(total[r][t], key[t], query);
      });
    });
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    if constexpr (Tokens == 4) {
      const __m128i sums = reduce_add_4_epi32(total[r][0], total[r][1], total[r][2], total[r][3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + r * ldo),
                       _mm_sub_epi32(sums, _mm_set1_epi32(row_bias[r])));
    } else {
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        const __m256i x = total[r][t];
        const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        const __m128i h2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        dots[r * ldo + t] =
            _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 0xB1))) - row_bias[r];
      });
    }
  });
}

template <std::size_t Rows>
inline void dot_s8_rows(const std::int8_t* q, std::size_t d, const std::int8_t* k,
                        std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                        std::size_t ldo) noexcept {
  std::int32_t row_bias[Rows];
  const __m512i ones = _mm512_set1_epi8(1);
  for (std::size_t r = 0; r < Rows; ++r) {
    __m512i sum = _mm512_setzero_si512();
    std::size_t c = 0;
    for (; c + 64 <= d; c += 64)
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(q + r * d + c));
    std::int32_t total = _mm512_reduce_add_epi32(sum);
    for (; c < d; ++c) total += q[r * d + c];
    row_bias[r] = 128 * total;
  }
  std::size_t j = 0;
  for (; j + 4 <= tokens; j += 4) {
    dot_s8_block<Rows, 4>(q, d, row_bias, k + j * ldk, ldk, dots + j, ldo);
  }
  for (; j < tokens; ++j) dot_s8_block<Rows, 1>(q, d, row_bias, k + j * ldk, ldk, dots + j, ldo);
}

// Value codes of four tokens, interleaved so that each int32 lane holds one channel's four
// codes (token order): in each 128-bit lane L (16 channels, 16L..16L + 15) of result x, int32
// lane i holds channel 16L + 4x + i. vpdpbusd against four broadcast u8 weights then adds a
// group of four tokens into every channel.
KVC_SIMD_ALWAYS_INLINE inline void interleave_4(const __m512i* t, __m512i* x) noexcept {
  const __m512i a = _mm512_unpacklo_epi8(t[0], t[1]), b = _mm512_unpackhi_epi8(t[0], t[1]);
  const __m512i c = _mm512_unpacklo_epi8(t[2], t[3]), e = _mm512_unpackhi_epi8(t[2], t[3]);
  x[0] = _mm512_unpacklo_epi16(a, c);
  x[1] = _mm512_unpackhi_epi16(a, c);
  x[2] = _mm512_unpacklo_epi16(b, e);
  x[3] = _mm512_unpackhi_epi16(b, e);
}

KVC_SIMD_ALWAYS_INLINE inline void interleave_4(const __m256i* t, __m256i* x) noexcept {
  const __m256i a = _mm256_unpacklo_epi8(t[0], t[1]), b = _mm256_unpackhi_epi8(t[0], t[1]);
  const __m256i c = _mm256_unpacklo_epi8(t[2], t[3]), e = _mm256_unpackhi_epi8(t[2], t[3]);
  x[0] = _mm256_unpacklo_epi16(a, c);
  x[1] = _mm256_unpackhi_epi16(a, c);
  x[2] = _mm256_unpacklo_epi16(b, e);
  x[3] = _mm256_unpackhi_epi16(b, e);
}

// The register type of Pair (two chunks, zmm) or one chunk (ymm); a trait rather than
// std::conditional_t, which would drop the vector types' attributes (-Wignored-attributes).
template <bool Pair>
struct ChunkVector {
  using type = __m256i;
};
template <>
struct ChunkVector<true> {
  using type = __m512i;
};

KVC_SIMD_ALWAYS_INLINE inline std::uint32_t load_weights_4(const std::uint8_t* w,
                                                           std::size_t count) noexcept {
  std::uint32_t word = 0;
  std::memcpy(&word, w, count);  // little-endian: token j in the low byte
  return word;
}

// One or two 32-channel chunks (Pair: a zmm holding chunk b in its low and chunk b + 1 in
// its high 256 bits) of rows [0, Rows), over every token. Bits == 8: the chunks are int8 codes
// at v and v + second. Bits 2 or 4: they are planar codes (accumulate_planar): the bytes at v
// shifted right by shift0 (chunk b) and at v + second by shift1 (chunk b + 1), masked to Bits
// bits in registers (a code never crosses its byte, so what the 16-bit shift brings in from
// the next byte lands above the mask). Registers: Rows · 4 accumulators, 4 code vectors,
// 4 interleaved, the weights.
template <std::size_t Rows, bool Pair, unsigned Bits>
inline void accumulate_chunks(const std::uint8_t* w0, const std::uint8_t* w1, std::size_t ldw,
                              const std::int8_t* v, std::ptrdiff_t second, unsigned shift0,
                              unsigned shift1, std::size_t tokens, std::size_t ldv,
                              std::int32_t* acc, std::size_t ldacc) noexcept {
  using V = typename ChunkVector<Pair>::type;
  constexpr std::size_t lanes128 = sizeof(V) / 16;
  constexpr auto chunk = static_cast<std::ptrdiff_t>(int8_chunk);
  const bool shared_weights = w0 == w1;
  V shifts{};
  V mask{};
  if constexpr (Bits < 8) {
    const auto low_bits = static_cast<char>((1U << Bits) - 1U);
    if constexpr (Pair) {
      shifts = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(shift0)),
                                  _mm256_set1_epi16(static_cast<short>(shift1)), 1);
      mask = _mm512_set1_epi8(low_bits);
    } else {
      shifts = _mm256_set1_epi16(static_cast<short>(shift0));
      mask = _mm256_set1_epi8(low_bits);
    }
  }
  const auto load = [&](const std::int8_t* codes) KVC_SIMD_ALWAYS_INLINE {
    V raw;
    if constexpr (Pair) {
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
      if (second == chunk) {
        raw = _mm512_loadu_si512(codes);
      } else if (second == 0) {  // both chunks from the same bytes (planar: other planes)
        raw = _mm512_broadcast_i64x4(low);
      } else {
        raw = _mm512_inserti64x4(
            _mm512_castsi256_si512(low),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + second)), 1);
      }
    } else {
      raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    }
    if constexpr (Bits == 8) {
      return raw;
    } else if constexpr (Pair) {
      return _mm512_and_si512(_mm512_srlv_epi16(raw, shifts), mask);
    } else {
      return _mm256_and_si256(_mm256_srlv_epi16(raw, shifts), mask);
    }
  };
  const auto broadcast = [&](std::size_t r, std::size_t j,
                             std::size_t count) KVC_SIMD_ALWAYS_INLINE {
    const auto low = static_cast<int>(load_weights_4(w0 + r * ldw + j, count));
    if constexpr (Pair) {
      if (shared_weights) return _mm512_set1_epi32(low);
      const auto high = static_cast<int>(load_weights_4(w1 + r * ldw + j, count));
      return _mm512_inserti64x4(_mm512_set1_epi32(low), _mm256_set1_epi32(high), 1);
    } else {
      return _mm256_set1_epi32(low);
    }
  };
  V sum[Rows][4];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<4>([&](auto x) KVC_SIMD_ALWAYS_INLINE { sum[r][x] = V{}; });
  });
  const auto step = [&](const V* codes, std::size_t j, std::size_t count) KVC_SIMD_ALWAYS_INLINE {
    V x[4];
    interleave_4(codes, x);
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const V weights = broadcast(r, j, count);
      unroll<4>([&](auto i) KVC_SIMD_ALWAYS_INLINE {
        if constexpr (Pair) {
          sum[r][i] = _mm512_dpbusd_epi32(sum[r][i], weights, x[i]);
        } else {
          sum[r][i] = _mm256_dpbusd_epi32(sum[r][i], weights, x[i]);
        }
      });
    });
  };
  std::size_t j = 0;
  for (; j + 4 <= tokens; j += 4) {
    V codes[4];
    unroll<4>([&](auto t) KVC_SIMD_ALWAYS_INLINE { codes[t] = load(v + (j + t) * ldv); });
    step(codes, j, 4);
  }
  if (j < tokens) {  // 1–3 tokens left: the missing ones read as zero codes and weights
    V codes[4];
    unroll<4>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
      codes[t] = j + t < tokens ? load(v + (j + t) * ldv) : V{};
    });
    step(codes, j, tokens - j);
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<4>([&](auto x) KVC_SIMD_ALWAYS_INLINE {
      alignas(64) std::int32_t lanes[sizeof(V) / 4];
      std::memcpy(lanes, &sum[r][x], sizeof(V));
      for (std::size_t lane = 0; lane < lanes128; ++lane) {
        std::memcpy(acc + r * ldacc + 16 * lane + 4 * x, lanes + 4 * lane, 16);
      }
    });
  });
}

// accumulate_chunks over every row: blocks of 4 rows, then the last 1–3 in one block (each
// code vector loaded serves all of them).
template <bool Pair, unsigned Bits>
inline void accumulate_chunk_rows(const std::uint8_t* w0, const std::uint8_t* w1, std::size_t rows,
                                  std::size_t ldw, const std::int8_t* v, std::ptrdiff_t second,
                                  unsigned shift0, unsigned shift1, std::size_t tokens,
                                  std::size_t ldv, std::int32_t* acc, std::size_t ldacc) noexcept {
  const auto run = [&]<std::size_t Rows>(std::integral_constant<std::size_t, Rows>, std::size_t r) {
    accumulate_chunks<Rows, Pair, Bits>(w0 + r * ldw, w1 + r * ldw, ldw, v, second, shift0, shift1,
                                        tokens, ldv, acc + r * ldacc, ldacc);
  };
  std::size_t r = 0;
  for (; r + 4 <= rows; r += 4) run(std::integral_constant<std::size_t, 4>{}, r);
  const std::size_t left = rows - r;
  if (left == 3) run(std::integral_constant<std::size_t, 3>{}, r);
  if (left == 2) run(std::integral_constant<std::size_t, 2>{}, r);
  if (left == 1) run(std::integral_constant<std::size_t, 1>{}, r);
}

// Rows query rows × Tokens tokens of planar Bits-bit codes (dot_planar): per 32 bytes of
// each token's codes, every plane k gives channels [k·S + i, +32) as u8 by a 16-bit shift
// and a byte mask (a code never crosses its byte, so the bits shifted in from the next byte
// land above the mask). 16 accumulators, 4 raw and 4 code vectors and a query: 25 of the 32
// registers.
template <unsigned Bits, std::size_t Rows, std::size_t Tokens>
inline void dot_planar_block(const std::int8_t* q, std::size_t d, const std::uint8_t* k,
                             std::size_t ldk, std::int32_t* dots, std::size_t ldo) noexcept {
  constexpr unsigned planes = 8 / Bits;
  const std::size_t stride = d * Bits / 8;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1U << Bits) - 1U));
  __m256i acc[Rows][Tokens];
  unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE { acc[r][t] = _mm256_setzero_si256(); });
  });
  for (std::size_t i = 0; i < stride; i += int8_chunk) {
    __m256i raw[Tokens];
    unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
      raw[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + t * ldk + i));
    });
    unroll<planes>([&](auto plane) KVC_SIMD_ALWAYS_INLINE {
      __m256i code[Tokens];
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        code[t] = _mm256_and_si256(_mm256_srli_epi16(raw[t], plane * Bits), mask);
      });
      unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
        const __m256i query =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * d + plane * stride + i));
        unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
          acc[r][t] = _mm256_dpbusd_epi32(acc[r][t], code[t], query);
        });
      });
    });
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    if constexpr (Tokens == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots + r * ldo),
                       reduce_add_4_epi32(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      unroll<Tokens>([&](auto t) KVC_SIMD_ALWAYS_INLINE {
        const __m256i x = acc[r][t];
        const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        const __m128i h2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        dots[r * ldo + t] = _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 0xB1)));
      });
    }
  });
}

// dot_planar_block on eight tokens with zmm: each register holds a pair of tokens (token 2p
// in the low 256 bits, 2p + 1 in the high), the query row broadcast to both halves, so one
// vpdpbusd serves two tokens — half the shifts, masks and multiply-adds of the ymm block
// per token. 16 accumulators, 4 raw and 4 code vectors, a query, the mask: 26 registers.
template <unsigned Bits, std::size_t Rows>
inline void dot_planar_block_8(const std::int8_t* q, std::size_t d, const std::uint8_t* k,
                               std::size_t ldk, std::int32_t* dots, std::size_t ldo) noexcept {
  constexpr unsigned planes = 8 / Bits;
  constexpr std::size_t pairs = 4;
  const std::size_t stride = d * Bits / 8;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1U << Bits) - 1U));
  __m512i acc[Rows][pairs];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<pairs>([&](auto p) KVC_SIMD_ALWAYS_INLINE { acc[r][p] = _mm512_setzero_si512(); });
  });
  for (std::size_t i = 0; i < stride; i += int8_chunk) {
    __m512i raw[pairs];
    unroll<pairs>([&](auto p) KVC_SIMD_ALWAYS_INLINE {
      const std::uint8_t* even = k + 2 * p * ldk + i;
      raw[p] = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + ldk)), 1);
    });
    unroll<planes>([&](auto plane) KVC_SIMD_ALWAYS_INLINE {
      __m512i code[pairs];
      unroll<pairs>([&](auto p) KVC_SIMD_ALWAYS_INLINE {
        code[p] = _mm512_and_si512(_mm512_srli_epi16(raw[p], plane * Bits), mask);
      });
      unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
        const __m512i query = in_register(_mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * d + plane * stride + i))));
        unroll<pairs>([&](auto p) KVC_SIMD_ALWAYS_INLINE {
          acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], code[p], query);
        });
      });
    });
  }
  // Per row: the four registers' 128-bit lanes summed to [Σ pair 0..3] per lane (lanes 0, 1:
  // the even tokens, 2, 3: the odd), the two lanes of each half added, then even and odd
  // interleaved into token order.
  const __m512i token_order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0);
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    const __m512i* a = acc[r];
    const __m512i ab =
        _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i cd =
        _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    const __m512i lanes =
        _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m512i halves = _mm512_add_epi32(lanes, _mm512_shuffle_i32x4(lanes, lanes, 0xB1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + r * ldo),
                        _mm512_castsi512_si256(_mm512_permutexvar_epi32(token_order, halves)));
  });
}

template <unsigned Bits, std::size_t Rows>
inline void dot_planar_rows(const std::int8_t* q, std::size_t d, const std::uint8_t* k,
                            std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                            std::size_t ldo) noexcept {
  std::size_t j = 0;
  for (; j + 8 <= tokens; j += 8) {
    dot_planar_block_8<Bits, Rows>(q, d, k + j * ldk, ldk, dots + j, ldo);
  }
  for (; j + 4 <= tokens; j += 4) {
    dot_planar_block<Bits, Rows, 4>(q, d, k + j * ldk, ldk, dots + j, ldo);
  }
  for (; j < tokens; ++j) dot_planar_block<Bits, Rows, 1>(q, d, k + j * ldk, ldk, dots + j, ldo);
}

}  // namespace detail
#endif

// Whether dot_planar<Bits> runs on VNNI at this head_dim (each plane whole 32-byte chunks).
template <unsigned Bits>
constexpr bool dot_planar_fits(std::size_t d) noexcept {
  return has_int8_dot && (Bits == 2 || Bits == 4) && d * Bits / 8 % int8_chunk == 0 &&
         d * Bits % 8 == 0;
}

template <unsigned Bits>
inline void dot_planar(const std::int8_t* q, std::size_t rows, std::size_t d, const std::uint8_t* k,
                       std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                       std::size_t ldo) noexcept {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  if (dot_planar_fits<Bits>(d)) {
    std::size_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      detail::dot_planar_rows<Bits, 4>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    }
    const std::size_t left = rows - r;
    if (left == 3)
      detail::dot_planar_rows<Bits, 3>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    if (left == 2)
      detail::dot_planar_rows<Bits, 2>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    if (left == 1)
      detail::dot_planar_rows<Bits, 1>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    return;
  }
#endif
  reference::dot_planar<Bits>(q, rows, d, k, tokens, ldk, dots, ldo);
}

inline void quantize_rows_s8(const float* x, std::size_t rows, std::size_t ldx, std::size_t d,
                             std::int8_t* codes, float* scales) noexcept {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (std::size_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx;
    __m512 m16 = _mm512_setzero_ps();
    std::size_t c = 0;
    for (; c + 16 <= d; c += 16) m16 = _mm512_max_ps(m16, _mm512_abs_ps(_mm512_loadu_ps(row + c)));
    float m = _mm512_reduce_max_ps(m16);
    for (; c < d; ++c) m = std::max(m, std::abs(row[c]));
    const float inverse = 127.0F / m;
    if (!std::isfinite(inverse)) {
      scales[r] = 0.0F;
      std::memset(codes + r * d, 0, d);
      continue;
    }
    scales[r] = m / 127.0F;
    const __m512 i16 = _mm512_set1_ps(inverse);
    for (c = 0; c + 16 <= d; c += 16) {
      // cvtps rounds to nearest even (the default MXCSR mode), as nearbyint; |x·127/m| ≤ 127
      // up to one rounding, which nearbyint brings back to 127.
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + c), i16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + r * d + c), _mm512_cvtsepi32_epi8(q));
    }
    for (; c < d; ++c) {
      codes[r * d + c] =
          static_cast<std::int8_t>(std::clamp(std::nearbyint(row[c] * inverse), -127.0F, 127.0F));
    }
  }
#else
  reference::quantize_rows_s8(x, rows, ldx, d, codes, scales);
#endif
}

inline float quantize_weights_u8(const float* w, std::size_t n, std::uint8_t* out) noexcept {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 m16 = _mm512_setzero_ps();
  std::size_t j = 0;
  for (; j + 16 <= n; j += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(w + j));
  float m = _mm512_reduce_max_ps(m16);
  for (; j < n; ++j) m = std::max(m, w[j]);
  const float inverse = 255.0F / m;
  if (!std::isfinite(inverse)) {
    std::memset(out, 0, n);
    return 0.0F;
  }
  const __m512 i16 = _mm512_set1_ps(inverse);
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(w + j), i16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtusepi32_epi8(q));
  }
  for (; j < n; ++j) {
    out[j] = static_cast<std::uint8_t>(std::min(std::nearbyint(w[j] * inverse), 255.0F));
  }
  return m / 255.0F;
#else
  return reference::quantize_weights_u8(w, n, out);
#endif
}

// d must be a multiple of int8_chunk on the VNNI path (the quantizers only call it so).
inline void dot_s8(const std::int8_t* q, std::size_t rows, std::size_t d, const std::int8_t* k,
                   std::size_t tokens, std::size_t ldk, std::int32_t* dots,
                   std::size_t ldo) noexcept {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  if (d % int8_chunk == 0) {
    std::size_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      detail::dot_s8_rows<4>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    }
    // The last 1–3 rows in one block: each key vector loaded serves all of them.
    const std::size_t left = rows - r;
    if (left == 3) detail::dot_s8_rows<3>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    if (left == 2) detail::dot_s8_rows<2>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    if (left == 1) detail::dot_s8_rows<1>(q + r * d, d, k, tokens, ldk, dots + r * ldo, ldo);
    return;
  }
#endif
  reference::dot_s8(q, rows, d, k, tokens, ldk, dots, ldo);
}

inline void accumulate_u8s8(const std::uint8_t* const* w, std::size_t rows, std::size_t ldw,
                            const std::int8_t* v, std::size_t tokens, std::size_t ldv,
                            std::size_t chunks, std::size_t chunk_stride, std::int32_t* acc,
                            std::size_t ldacc) noexcept {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  const auto second = static_cast<std::ptrdiff_t>(chunk_stride);
  for (std::size_t b = 0; b < chunks; b += 2) {
    const std::int8_t* codes = v + b * chunk_stride;
    std::int32_t* out = acc + b * int8_chunk;
    if (b + 1 < chunks) {
      detail::accumulate_chunk_rows<true, 8>(w[b], w[b + 1], rows, ldw, codes, second, 0, 0, tokens,
                                             ldv, out, ldacc);
    } else {
      detail::accumulate_chunk_rows<false, 8>(w[b], w[b], rows, ldw, codes, second, 0, 0, tokens,
                                              ldv, out, ldacc);
    }
  }
#else
  reference::accumulate_u8s8(w, rows, ldw, v, tokens, ldv, chunks, chunk_stride, acc, ldacc);
#endif
}

// accumulate_u8s8 on planar Bits-bit codes (quant::Kivi's values; the layout of dot_planar):
// acc[r·ldacc + c] = Σ_j w[c / 32][r·ldw + j] · code_j(c) for c < d. Each 32-channel chunk
// is 32 bytes of one plane shifted and masked in registers on its way into vpdpbusd — the
// codes are never widened into a scratch row. VNNI where dot_planar_fits<Bits>(d), else the
// reference.
template <unsigned Bits>
inline void accumulate_planar(const std::uint8_t* const* w, std::size_t rows, std::size_t ldw,
                              const std::uint8_t* v, std::size_t tokens, std::size_t ldv,
                              std::size_t d, std::int32_t* acc, std::size_t ldacc) noexcept {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  if (dot_planar_fits<Bits>(d)) {
    const std::size_t stride = d * Bits / 8;  // bytes per plane
    const std::size_t chunks = d / int8_chunk;
    const auto* codes = reinterpret_cast<const std::int8_t*>(v);
    // Chunk b (channels [32b, 32b + 32)) is bytes [32b mod S, +32) of plane 32b / S.
    const auto offset = [&](std::size_t b) { return b * int8_chunk % stride; };
    const auto shift = [&](std::size_t b) {
      return static_cast<unsigned>(b * int8_chunk / stride * Bits);
    };
    for (std::size_t b = 0; b < chunks; b += 2) {
      std::int32_t* out = acc + b * int8_chunk;
      if (b + 1 < chunks) {
        const auto second =
            static_cast<std::ptrdiff_t>(offset(b + 1)) - static_cast<std::ptrdiff_t>(offset(b));
        detail::accumulate_chunk_rows<true, Bits>(w[b], w[b + 1], rows, ldw, codes + offset(b),
                                                  second, shift(b), shift(b + 1), tokens, ldv, out,
                                                  ldacc);
      } else {
        detail::accumulate_chunk_rows<false, Bits>(w[b], w[b], rows, ldw, codes + offset(b), 0,
                                                   shift(b), shift(b), tokens, ldv, out, ldacc);
      }
    }
    return;
  }
#endif
  reference::accumulate_planar<Bits>(w, rows, ldw, v, tokens, ldv, d, acc, ldacc);
}

}  // namespace kvc::simd
