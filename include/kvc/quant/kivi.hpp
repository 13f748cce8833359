// kvc/quant/kivi.hpp — quant::Kivi<Bits, Group, Residual>: KIVI's asymmetric 2/4/8-bit cache,
// keys per channel over groups of tokens, values per token, newest tokens in full precision.
//
// Paper:      Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
//             ICML 2024 (github.com/jy-yuan/KIVI, models/llama_kivi.py).
// Format:     L = 2^Bits − 1 levels. Asymmetric codes: x̂ = m + s · q, q ∈ [0, L], with
//             m and s little-endian IEEE fp16 (KIVI keeps them in the model's fp16).
//             Codes are packed Bits per channel, planar: with k = 8 / Bits codes per byte
//             and n = d / k bytes per row, byte j holds channels j, j + n, …, j + (k−1)·n at
//             bits 0, Bits, …, so unpacking is k passes of contiguous shift-and-mask.
//   keys      per channel, over a group of Group consecutive stored tokens: each channel has
//             its own (m, s), so a group's parameters are [fp16 m × d][fp16 s × d]
//             (key_group_bytes = 4 · d) and each token's key row holds only codes
//             (key_bytes = d · Bits / 8). New keys wait in full precision (fp32); when
//             Residual of them have accumulated, they are quantized at once, Residual / Group
//             groups (KIVI's decode step; its prefill quantizes ⌊n / R⌋ · R and keeps the rest).
//   values    per token, in groups of Group channels: [fp16 m, fp16 s] × (d / Group), then
//             the codes (value_bytes = d · Bits / 8 + 4 · d / Group). The newest Residual
//             values stay in full precision (a sliding window): each appended token pushes
//             the oldest one out into codes.
//             At d = 128, Group = 32: Kivi<2> holds 32 + 16 (key groups) + 48 = 96 bytes per
//             quantized token (Dense<half>: 512), Kivi<4> 64 + 16 + 80 = 160.
// Keeps:      per (channel, token group) for keys, per (token, channel group) for values:
//             m̂ = the largest fp16 ≤ min x, ŝ = the smallest fp16 ≥ (max x − m̂) / L,
//             q = clamp(nearbyint((x − m̂) / ŝ), 0, L): every x of the group lies in
//             [m̂, m̂ + L·ŝ], so |x − x̂| ≤ ŝ / 2 (up to fp32 rounding of the arithmetic).
//             A constant group whose value is an fp16 gets ŝ = 0 and is exact (the reference
//             divides by zero there). |x| ≤ 65504 (fp16), larger inputs are rejected.
// Needs:      nothing from the host. head_dim % Group == 0 (value groups).
// Cost/step:  attend scores the quantized keys group by group (one tile per run of tokens
//             sharing a group): q·k̂ = q·m + (q∘s)·codes, so per run each query row is
//             multiplied by the group's scales once and the tokens' codes are only widened to
//             fp32 (no dequantizing multiply); values are widened per token (m + s·code) in
//             the caller's L1 scratch. The full-precision tail runs through plain fp32
//             kernels in the same online softmax ("quantized part + full-precision part in
//             one softmax"). Where the target has AVX-512 VNNI (simd::has_int8_dot, d ≤ 256,
//             d and Group multiples of 32, Bits < 8: the codes must fit int8) both products
//             run on simd/int8_dot.hpp's integer kernels — both code planes straight from
//             their bytes where each plane is whole 32-byte chunks (simd::dot_planar for keys,
//             simd::accumulate_planar for values), else widened to int8 first —
//             rounding what Int8<32>'s path rounds: each row q∘s to int8 (per row scale), each
//             tile's weights p·s to u8; the m terms (q·m, Σ p·m) stay fp32. Tiles that ask for
//             exact scores (observe) and other targets take the fp32 path, an exact function of the
//             codes. Appending a token encodes one value row; every Residual tokens a head
//             quantizes Residual keys (O(Residual · d)).
// Eviction:   a stored token keeps its codes and its group's parameters whatever is evicted
//             around it, so a partly evicted group still decodes exactly as before; a group's
//             parameters are freed with its last token. Tokens evicted while in the residual
//             window are never quantized (KvCache keeps the window per kv head).
// Choices:    m̂ rounded down and ŝ up (not to nearest) so the clamp never cuts a value: the
//             bound above holds for every element. fp32 residual, not the model's fp16: the
//             cache takes fp32/bf16 inputs too, and the window is small (2 · R · d · 4 bytes
//             per kv head).
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/int8_fused.hpp>
#include <kvc/simd/int8.hpp>
#include <kvc/simd/int8_dot.hpp>
#include <kvc/simd/kernels.hpp>
#include <kvc/simd/quantize.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

namespace kvc::quant {

namespace detail {

// The fp16 next to `value` in the direction asked, from the nearest one.
inline std::uint16_t fp16_bits(float value) noexcept {
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value));
}
inline float fp16_value(std::uint16_t bits) noexcept {
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // exact, as Eigen's software widening
#else
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
#endif
}
// The largest fp16 ≤ value (value finite, ≥ −65504): from the nearest one, portably.
inline std::uint16_t fp16_at_most_reference(float value) noexcept {
  std::uint16_t bits = fp16_bits(value);
  if (fp16_value(bits) > value) {
    if (bits == 0x0000U) return 0x8001U;                                  // +0 → −denormal
    bits = (bits & 0x8000U) != 0 ? static_cast<std::uint16_t>(bits + 1)   // more negative
                                 : static_cast<std::uint16_t>(bits - 1);  // less positive
  }
  return bits;
}
// The smallest fp16 ≥ value (value finite, ≥ 0, ≤ 65504): from the nearest one, portably.
inline std::uint16_t fp16_at_least_reference(float value) noexcept {
  std::uint16_t bits = fp16_bits(value);
  if (fp16_value(bits) < value) {
    bits = (bits & 0x8000U) != 0
               ? (bits == 0x8000U ? std::uint16_t{0x0001U} : static_cast<std::uint16_t>(bits - 1))
               : static_cast<std::uint16_t>(bits + 1);
  }
  return bits;
}
// The same with F16C: one vcvtps2ph rounding toward −∞ / +∞ (Eigen converts in software,
// which was a visible part of Kivi's append). Equal bit for bit on the domains above.
inline std::uint16_t fp16_at_most(float value) noexcept {
#if defined(__F16C__)
  return static_cast<std::uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#else
  return fp16_at_most_reference(value);
#endif
}
inline std::uint16_t fp16_at_least(float value) noexcept {
#if defined(__F16C__)
  return static_cast<std::uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
#else
  return fp16_at_least_reference(value);
#endif
}

// Asymmetric codes of Bits bits, packed (8 / Bits) per byte, channel c at bit (c mod per) · Bits.
template <unsigned Bits>
struct AsymmetricCodes {
  static_assert(Bits == 2 || Bits == 4 || Bits == 8, "Kivi: Bits is 2, 4 or 8");
  static constexpr unsigned levels = (1U << Bits) - 1U;
  static constexpr std::size_t per_byte = 8 / Bits;

  static constexpr std::size_t packed_bytes(std::size_t channels) noexcept {
    return channels / per_byte;
  }

  // (m̂, ŝ) for values in [lo, hi] (see the header: the range always fits the codes).
  static void params(float lo, float hi, std::uint16_t& min_bits,
                     std::uint16_t& scale_bits) noexcept {
    min_bits = fp16_at_most(lo);
    const float span = hi - fp16_value(min_bits);
    scale_bits = fp16_at_least(std::max(span, 0.0F) / static_cast<float>(levels));
  }

  // Channel c of a row of `channels` codes (planar: see the format).
  static unsigned get(const std::byte* codes, std::size_t c, std::size_t channels) noexcept {
    const std::size_t stride = channels / per_byte;
    const auto byte = std::to_integer<unsigned>(codes[c % stride]);
    return (byte >> ((c / stride) * Bits)) & levels;
  }

  // One row's codes, packed planar: quantize(c0, count, q) writes the u8 codes of channels
  // c0 .. c0 + count − 1 (count ≤ 256, all within one plane) to q. Byte j of the row is
  // Σ_k q[k·n + j] << (k·Bits), n = channels / per_byte: a plane at a time, in pieces that
  // fit a 256-byte scratch whatever the head_dim, in contiguous passes the compiler
  // vectorizes.
  template <class Quantize>
  static void encode(std::size_t channels, std::byte* codes, Quantize quantize) noexcept {
    constexpr std::size_t piece = 256;
    const std::size_t stride = channels / per_byte;
    auto* bytes = reinterpret_cast<std::uint8_t*>(codes);
    std::array<std::uint8_t, piece> q;
    for (std::size_t k = 0; k < per_byte; ++k) {
      const unsigned shift = static_cast<unsigned>(k) * Bits;
      for (std::size_t first = 0; first < stride; first += piece) {
        const std::size_t count = std::min(piece, stride - first);
        quantize(k * stride + first, count, q.data());
        std::uint8_t* out = bytes + first;
        if (k == 0) {
          std::memcpy(out, q.data(), count);
        } else {
          for (std::size_t j = 0; j < count; ++j) {
            out[j] = static_cast<std::uint8_t>(out[j] | (q[j] << shift));
          }
        }
      }
    }
  }

  // out[c] = code of channel c, as T (float, or int8 for the integer kernels): per_byte
  // contiguous passes the compiler vectorizes (shift, mask, convert), the scalar reference
  // and the kernel in one.
  template <class T>
  static void widen(const std::byte* codes, std::size_t channels, T* out) noexcept {
    const std::size_t stride = channels / per_byte;
    const auto* bytes = reinterpret_cast<const std::uint8_t*>(codes);
    if constexpr (sizeof(T) == 1) {
      // Bytes out (the integer kernels): 8 codes per 64-bit word, shifted and masked in
      // place — a code never crosses its byte, so (word >> shift) & 0x0303… (2 bits) keeps
      // exactly the byte-wise result without widening to 16-bit lanes and packing back.
      if (stride % 8 == 0) {
        constexpr std::uint64_t mask = 0x0101010101010101ULL * levels;
        for (std::size_t k = 0; k < per_byte; ++k) {
          const unsigned shift = static_cast<unsigned>(k) * Bits;
          for (std::size_t j = 0; j < stride; j += 8) {
            std::uint64_t word;
            std::memcpy(&word, bytes + j, sizeof word);
            word = (word >> shift) & mask;
            std::memcpy(out + k * stride + j, &word, sizeof word);
          }
        }
        return;
      }
    }
    for (std::size_t k = 0; k < per_byte; ++k) {
      T* part = out + k * stride;
      const unsigned shift = static_cast<unsigned>(k) * Bits;
      for (std::size_t j = 0; j < stride; ++j) {
        part[j] = static_cast<T>((static_cast<unsigned>(bytes[j]) >> shift) & levels);
      }
    }
  }
};

}  // namespace detail

template <unsigned Bits, std::size_t Group = 32, std::size_t Residual = 128>
struct Kivi {
  static_assert(Bits == 2 || Bits == 4 || Bits == 8, "quant::Kivi<Bits>: Bits is 2, 4 or 8");
  static_assert(Group > 0 && Group % 8 == 0, "quant::Kivi: Group is a positive multiple of 8");
  static_assert(Residual >= Group && Residual % Group == 0,
                "quant::Kivi: Residual is a positive multiple of Group (KIVI's R % G == 0)");

  using Codes = detail::AsymmetricCodes<Bits>;
  static constexpr unsigned bits = Bits;
  // KvCache's GroupsKeys protocol: keys per channel over groups of this many tokens, the
  // newest tokens held in full precision until `residual_tokens` of them wait.
  static constexpr std::size_t key_group_tokens = Group;
  static constexpr std::size_t residual_tokens = Residual;

  static constexpr std::string_view name() noexcept {
    if constexpr (Bits == 2) {
      return "kivi2";
    } else if constexpr (Bits == 4) {
      return "kivi4";
    } else {
      return "kivi8";
    }
  }
  static constexpr float max_magnitude() noexcept { return 65504.0F; }

  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim > 0 && head_dim % Group == 0;
  }
  constexpr std::size_t key_bytes(std::size_t head_dim) const noexcept {
    return Codes::packed_bytes(head_dim);
  }
  constexpr std::size_t value_bytes(std::size_t head_dim) const noexcept {
    return value_param_bytes(head_dim) + Codes::packed_bytes(head_dim);
  }
  // One key group's parameters: [fp16 m × d][fp16 s × d].
  constexpr std::size_t key_group_bytes(std::size_t head_dim) const noexcept {
    return 4 * head_dim;
  }

  // ---- keys: per channel over a group of `count` (≤ Group) tokens -------------------------

  // rows: count × d fp32 keys; params: key_group_bytes; codes: count rows of key_bytes.
  void encode_key_group(const float* rows, std::size_t count, std::size_t head_dim,
                        std::byte* params, std::byte* codes) const noexcept {
    const std::size_t d = head_dim;
    // Each channel's range over the group, 64 channels at a time (a stack piece whatever d).
    constexpr std::size_t piece = 64;
    std::array<float, piece> lo;
    std::array<float, piece> hi;
    for (std::size_t first = 0; first < d; first += piece) {
      const std::size_t n = std::min(piece, d - first);
      simd::column_min_max(rows + first, count, d, n, lo.data(), hi.data());
      for (std::size_t j = 0; j < n; ++j) {
        std::uint16_t min_bits = 0;
        std::uint16_t scale_bits = 0;
        Codes::params(lo[j], hi[j], min_bits, scale_bits);
        std::memcpy(params + 2 * (first + j), &min_bits, 2);
        std::memcpy(params + 2 * (d + first + j), &scale_bits, 2);
      }
    }
    for (std::size_t t = 0; t < count; ++t) {
      encode_key(rows + t * d, d, params, codes + t * key_bytes(d));
    }
  }

  // One key row into the codes of an existing group (its range clamps what does not fit).
  void encode_key(const float* row, std::size_t head_dim, const std::byte* params,
                  std::byte* codes) const noexcept {
    // q_c = clamp(nearbyint((x_c − m_c) / s_c), 0, L), 0 where s_c = 0 (a constant channel).
    const auto* minimum = reinterpret_cast<const Eigen::half*>(params);
    const Eigen::half* scale = minimum + head_dim;
    Codes::encode(head_dim, codes, [&](std::size_t first, std::size_t count, std::uint8_t* q) {
      simd::quantize_affine(row + first, count, minimum + first, scale + first,
                            static_cast<float>(Codes::levels), q);
    });
  }

  void decode_key(const std::byte* codes, std::size_t head_dim, const std::byte* params,
                  float* out) const noexcept {
    for (std::size_t c = 0; c < head_dim; ++c) {
      const float m = simd::load_fp16(params + 2 * c);
      const float s = simd::load_fp16(params + 2 * (head_dim + c));
      out[c] = m + s * static_cast<float>(Codes::get(codes, c, head_dim));
    }
  }

  // Scores of a run of tokens that share one key group (at most page_tokens):
  //   q·k̂_j = q·m + Σ_c (q_c s_c) · code_jc
  // tile.scratch holds (page_tokens + rows + 2) · head_dim floats (KvCache's contract for a
  // quantizer that GroupsKeys): the widened codes, the rows q∘s, and m and s in fp32.
  void score_tile(const ScoreTile& tile, const std::byte* params) const noexcept {
    const std::size_t d = tile.head_dim;
    float* codes = tile.scratch;
    float* weighted = codes + tile.tokens * d;
    float* minimum = weighted + tile.rows * d;
    float* scale = minimum + d;
    const auto* halves = reinterpret_cast<const Eigen::half*>(params);
    simd::convert(halves, minimum, d);
    simd::convert(halves + d, scale, d);
    for (std::size_t r = 0; r < tile.rows; ++r) {
      const float* q = tile.queries + r * d;
      float* w = weighted + r * d;
      for (std::size_t c = 0; c < d; ++c) w[c] = q[c] * scale[c];
    }
    if (!tile.exact && integer_kernels(d)) {
      integer_scores(tile, weighted, reinterpret_cast<std::int8_t*>(codes));
    } else {
      for (std::size_t j = 0; j < tile.tokens; ++j) {
        Codes::widen(tile.key_codes + j * key_bytes(d), d, codes + j * d);
      }
      simd::dot_block(weighted, tile.rows, d, codes, tile.tokens, d, d, tile.scores,
                      tile.scores_stride);
    }
    for (std::size_t r = 0; r < tile.rows; ++r) {
      const float offset = simd::dot(tile.queries + r * d, minimum, d);
      float* row = tile.scores + r * tile.scores_stride;
      for (std::size_t j = 0; j < tile.tokens; ++j) row[j] += offset;
    }
  }

  // ---- values: per token, groups of Group channels ---------------------------------------

  template <Element S>
  void encode_value(const S* row, std::size_t head_dim, std::byte* codes) const noexcept {
    for (std::size_t g = 0; g < head_dim / Group; ++g) {
      const auto [lo, hi] = simd::min_max(row + g * Group, Group);
      std::uint16_t min_bits = 0;
      std::uint16_t scale_bits = 0;
      Codes::params(lo, hi, min_bits, scale_bits);
      std::memcpy(codes + 4 * g, &min_bits, 2);
      std::memcpy(codes + 4 * g + 2, &scale_bits, 2);
    }
    // Each run of channels within one group takes that group's (m̂, ŝ).
    Codes::encode(head_dim, codes + value_param_bytes(head_dim),
                  [&](std::size_t first, std::size_t count, std::uint8_t* q) {
                    for (std::size_t c = first; c < first + count;) {
                      const std::size_t g = c / Group;
                      const std::size_t end = std::min(first + count, (g + 1) * Group);
                      const float m = simd::load_fp16(codes + 4 * g);
                      const float s = simd::load_fp16(codes + 4 * g + 2);
                      constexpr auto levels = static_cast<float>(Codes::levels);
                      if constexpr (Group < xsimd::batch<float, simd::default_arch>::size) {
                        // A group narrower than a vector: the vector loop is dead code, and
                        // GCC's -Warray-bounds would flag its loads from a short row.
                        simd::reference::quantize_affine(row + c, end - c, m, s, levels,
                                                         q + (c - first));
                      } else {
                        simd::quantize_affine(row + c, end - c, m, s, levels, q + (c - first));
                      }
                      c = end;
                    }
                  });
  }

  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    Codes::widen(codes + value_param_bytes(head_dim), head_dim, out);
    for (std::size_t g = 0; g < head_dim / Group; ++g) {
      const float m = simd::load_fp16(codes + 4 * g);
      const float s = simd::load_fp16(codes + 4 * g + 2);
      for (std::size_t c = g * Group; c < (g + 1) * Group; ++c) out[c] = m + s * out[c];
    }
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    const std::size_t d = tile.head_dim;
    if (integer_kernels(d)) {
      integer_accumulate(tile);
      return;
    }
    for (std::size_t j = 0; j < tile.tokens; ++j) {
      decode_value(tile.value_codes + j * value_bytes(d), d, tile.scratch + j * d);
    }
    simd::axpy_block(tile.weights, tile.rows, tile.weights_stride, tile.scratch, tile.tokens, d, d,
                     tile.acc, d);
  }

 private:
  static constexpr std::size_t value_param_bytes(std::size_t head_dim) noexcept {
    return 4 * (head_dim / Group);
  }

  // The integer kernels take the codes as int8: 2- and 4-bit codes fit, 8-bit ones (up to
  // 255) do not, so Kivi<8> stays on the fp32 path.
  static constexpr bool integer_kernels(std::size_t head_dim) noexcept {
    return Bits < 8 && detail::int8_fused_fits(head_dim) && Group % simd::int8_chunk == 0;
  }

  // scores[r][j] = (float)Σ_c ŵ_rc · code_jc · scale_r, ŵ = the row q∘s rounded to int8;
  // the caller adds q·m. codes8: tile.tokens × d int8 scratch.
  static void integer_scores(const ScoreTile& tile, const float* weighted,
                             std::int8_t* codes8) noexcept {
    const std::size_t d = tile.head_dim;
    // Planar codes go straight into vpdpbusd (simd::dot_planar: shifted and masked in
    // registers); elsewhere they are widened to int8 rows first.
    const bool planar = simd::dot_planar_fits<Bits>(d);
    for (std::size_t j = 0; j < tile.tokens && !planar; ++j) {
      Codes::widen(tile.key_codes + j * Codes::packed_bytes(d), d, codes8 + j * d);
    }
    std::array<std::int8_t, detail::fused_rows * detail::fused_max_head_dim> row_codes;
    std::array<float, detail::fused_rows> row_scales;
    std::array<std::int32_t, detail::fused_rows * detail::fused_tokens> dots;
    for (std::size_t r0 = 0; r0 < tile.rows; r0 += detail::fused_rows) {
      const std::size_t block = std::min(detail::fused_rows, tile.rows - r0);
      simd::quantize_rows_s8(weighted + r0 * d, block, d, d, row_codes.data(), row_scales.data());
      for (std::size_t t0 = 0; t0 < tile.tokens; t0 += detail::fused_tokens) {
        const std::size_t tokens = std::min(detail::fused_tokens, tile.tokens - t0);
        if (planar) {
          const auto* packed = reinterpret_cast<const std::uint8_t*>(tile.key_codes);
          simd::dot_planar<Bits>(row_codes.data(), block, d, packed + t0 * Codes::packed_bytes(d),
                                 tokens, Codes::packed_bytes(d), dots.data(), detail::fused_tokens);
        } else {
          simd::dot_s8(row_codes.data(), block, d, codes8 + t0 * d, tokens, d, dots.data(),
                       detail::fused_tokens);
        }
        for (std::size_t r = 0; r < block; ++r) {
          float* __restrict scores = tile.scores + (r0 + r) * tile.scores_stride + t0;
          const std::int32_t* __restrict dot = dots.data() + r * detail::fused_tokens;
          const float row_scale = row_scales[r];
          for (std::size_t j = 0; j < tokens; ++j) {
            scores[j] = static_cast<float>(dot[j]) * row_scale;
          }
        }
      }
    }
  }

  // Kivi's value rows as int8_fused_accumulate_part reads them where the planes are whole
  // 32-byte chunks (simd::dot_planar_fits): a scale per Group channels (given, see
  // integer_accumulate) and the planar codes themselves, shifted and masked in registers by
  // simd::accumulate_planar — no widened copy of the rows.
  struct PlanarValueLayout {
    static constexpr unsigned planar_bits = Bits;
    std::size_t stride, code_offset, chunk_stride, chunks_per_scale;
  };

  // Other head dims: the value rows widened into Int8's row layout ([fp32 s × groups][int8
  // code × d], codes 0..L) in the scratch first.
  using UnpackedLayout = Int8<>::Layout;

  // acc += Σ_j p_rj (m_jg + s_jg code_jc): int8_fused_accumulate adds Σ_j p_rj s_jg code_jc
  // (integer sums, see above), then the zero points add Σ_j p_rj m_jg to each channel of
  // group g, in fp32.
  void integer_accumulate(const AccumulateTile& tile) const noexcept {
    const std::size_t d = tile.head_dim;
    const std::size_t groups = d / Group;
    const std::size_t stride = value_bytes(d);
    // Σ_j p_rj m_jg (m: `tokens` zero points of group g, ldm apart) on every channel of g.
    const auto add_zero_points = [&](std::size_t t0, std::size_t tokens, const float* m,
                                     std::size_t ldm) {
      for (std::size_t r = 0; r < tile.rows; ++r) {
        const float* p = tile.weights + r * tile.weights_stride + t0;
        float* acc = tile.acc + r * d;
        for (std::size_t g = 0; g < groups; ++g) {
          const float offset = simd::dot(p, m + g * ldm, tokens);
          for (std::size_t c = g * Group; c < (g + 1) * Group; ++c) acc[c] += offset;
        }
      }
    };
    if (simd::dot_planar_fits<Bits>(d)) {
      constexpr std::size_t part = detail::fused_tokens;
      const PlanarValueLayout layout{stride, value_param_bytes(d), 0, Group / simd::int8_chunk};
      // Every group's (m̂, ŝ) of a part's tokens, [2g + (0: m̂, 1: ŝ)][token]: one transpose
      // of the rows' parameter bytes (groups ≤ 8 here: d ≤ 256, Group ≥ 32).
      std::array<float, 16 * part> params;
      for (std::size_t t0 = 0; t0 < tile.tokens; t0 += part) {
        const std::size_t tokens = std::min(part, tile.tokens - t0);
        simd::transpose_fp16(tile.value_codes + t0 * stride, stride, tokens, 2 * groups,
                             params.data(), part);
        detail::int8_fused_accumulate_part(tile, layout, t0, tokens, params.data() + part,
                                           2 * part);
        add_zero_points(t0, tokens, params.data(), 2 * part);
      }
      return;
    }
    const UnpackedLayout layout{sizeof(float) * groups + d, sizeof(float) * groups,
                                simd::int8_chunk, Group / simd::int8_chunk};
    auto* unpacked = reinterpret_cast<std::byte*>(tile.scratch);
    for (std::size_t j = 0; j < tile.tokens; ++j) {
      const std::byte* codes = tile.value_codes + j * stride;
      std::byte* row = unpacked + j * layout.stride;
      for (std::size_t g = 0; g < groups; ++g) {
        const float s = simd::load_fp16(codes + 4 * g + 2);
        std::memcpy(row + sizeof(float) * g, &s, sizeof s);
      }
      Codes::widen(codes + value_param_bytes(d), d,
                   reinterpret_cast<std::int8_t*>(row + layout.code_offset));
    }
    AccumulateTile widened = tile;
    widened.value_codes = unpacked;
    detail::int8_fused_accumulate(widened, layout);
    // The zero points m̂ of each group, [group][token], in the scratch (free again).
    float* minimum = tile.scratch;
    for (std::size_t g = 0; g < groups; ++g) {
      simd::gather_fp16(tile.value_codes + 4 * g, stride, tile.tokens, minimum + g * tile.tokens);
    }
    add_zero_points(0, tile.tokens, minimum, tile.tokens);
  }
};

}  // namespace kvc::quant
