// kvc/quant/kivi.hpp — quant::Kivi<Bits, Group, Residual>: KIVI's asymmetric 2/4/8-bit cache,
// keys per channel over groups of tokens, values per token, newest tokens in full precision.
//
// Paper:      Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
//             ICML 2024 (github.com/jy-yuan/KIVI, models/llama_kivi.py).
// Format:     L = 2^Bits − 1 levels. Asymmetric codes: x̂ = m + s · q, q ∈ [0, L], with
//             m and s little-endian IEEE fp16 (KIVI keeps them in the model's fp16).
//             Codes are packed Bits per channel, channel c in byte c · Bits / 8 at bit
//             (c mod (8 / Bits)) · Bits.
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
// Cost/step:  attend scores the quantized keys group by group (one page tile per run of
//             tokens sharing a group) and the full-precision tail with plain fp32 kernels, in
//             the same online softmax as the rest ("quantized part + full-precision part in one
//             softmax"). Appending a token encodes one value row; every Residual tokens a
//             head quantizes Residual keys (O(Residual · d)).
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
#include <kvc/simd/int8.hpp>
#include <kvc/simd/kernels.hpp>

#include <Eigen/Core>

#include <algorithm>
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
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
// The largest fp16 ≤ value (value finite, ≥ −65504).
inline std::uint16_t fp16_at_most(float value) noexcept {
  std::uint16_t bits = fp16_bits(value);
  if (fp16_value(bits) > value) {
    if (bits == 0x0000U) return 0x8001U;                                  // +0 → −denormal
    bits = (bits & 0x8000U) != 0 ? static_cast<std::uint16_t>(bits + 1)   // more negative
                                 : static_cast<std::uint16_t>(bits - 1);  // less positive
  }
  return bits;
}
// The smallest fp16 ≥ value (value finite, ≥ 0, ≤ 65504).
inline std::uint16_t fp16_at_least(float value) noexcept {
  std::uint16_t bits = fp16_bits(value);
  if (fp16_value(bits) < value) {
    bits = (bits & 0x8000U) != 0
               ? (bits == 0x8000U ? std::uint16_t{0x0001U} : static_cast<std::uint16_t>(bits - 1))
               : static_cast<std::uint16_t>(bits + 1);
  }
  return bits;
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

  static unsigned code(float x, float m, float s) noexcept {
    if (!(s > 0.0F)) return 0;
    const float q = std::nearbyint((x - m) / s);
    return static_cast<unsigned>(std::clamp(q, 0.0F, static_cast<float>(levels)));
  }

  static unsigned get(const std::byte* codes, std::size_t c) noexcept {
    const auto byte = std::to_integer<unsigned>(codes[c / per_byte]);
    return (byte >> ((c % per_byte) * Bits)) & levels;
  }
  static void put(std::byte* codes, std::size_t c, unsigned q) noexcept {
    codes[c / per_byte] |= static_cast<std::byte>(q << ((c % per_byte) * Bits));
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
    for (std::size_t c = 0; c < d; ++c) {
      float lo = rows[c];
      float hi = rows[c];
      for (std::size_t t = 1; t < count; ++t) {
        lo = std::min(lo, rows[t * d + c]);
        hi = std::max(hi, rows[t * d + c]);
      }
      std::uint16_t min_bits = 0;
      std::uint16_t scale_bits = 0;
      Codes::params(lo, hi, min_bits, scale_bits);
      std::memcpy(params + 2 * c, &min_bits, 2);
      std::memcpy(params + 2 * (d + c), &scale_bits, 2);
    }
    for (std::size_t t = 0; t < count; ++t) {
      encode_key(rows + t * d, d, params, codes + t * key_bytes(d));
    }
  }

  // One key row into the codes of an existing group (its range clamps what does not fit).
  void encode_key(const float* row, std::size_t head_dim, const std::byte* params,
                  std::byte* codes) const noexcept {
    std::memset(codes, 0, key_bytes(head_dim));
    for (std::size_t c = 0; c < head_dim; ++c) {
      Codes::put(codes, c,
                 Codes::code(row[c], simd::load_fp16(params + 2 * c),
                             simd::load_fp16(params + 2 * (head_dim + c))));
    }
  }

  void decode_key(const std::byte* codes, std::size_t head_dim, const std::byte* params,
                  float* out) const noexcept {
    for (std::size_t c = 0; c < head_dim; ++c) {
      const float m = simd::load_fp16(params + 2 * c);
      const float s = simd::load_fp16(params + 2 * (head_dim + c));
      out[c] = m + s * static_cast<float>(Codes::get(codes, c));
    }
  }

  // Scores of a run of tokens that share one key group: decoded one page tile at a time into
  // the caller's L1 scratch, then simd::dot_block for all query rows.
  void score_tile(const ScoreTile& tile, const std::byte* params) const noexcept {
    const std::size_t d = tile.head_dim;
    for (std::size_t j = 0; j < tile.tokens; ++j) {
      decode_key(tile.key_codes + j * key_bytes(d), d, params, tile.scratch + j * d);
    }
    simd::dot_block(tile.queries, tile.rows, d, tile.scratch, tile.tokens, d, d, tile.scores,
                    tile.scores_stride);
  }

  // ---- values: per token, groups of Group channels ---------------------------------------

  template <Element S>
  void encode_value(const S* row, std::size_t head_dim, std::byte* codes) const noexcept {
    std::byte* packed = codes + value_param_bytes(head_dim);
    std::memset(packed, 0, Codes::packed_bytes(head_dim));
    for (std::size_t g = 0; g < head_dim / Group; ++g) {
      float lo = static_cast<float>(row[g * Group]);
      float hi = lo;
      for (std::size_t c = g * Group; c < (g + 1) * Group; ++c) {
        lo = std::min(lo, static_cast<float>(row[c]));
        hi = std::max(hi, static_cast<float>(row[c]));
      }
      std::uint16_t min_bits = 0;
      std::uint16_t scale_bits = 0;
      Codes::params(lo, hi, min_bits, scale_bits);
      std::memcpy(codes + 4 * g, &min_bits, 2);
      std::memcpy(codes + 4 * g + 2, &scale_bits, 2);
      const float m = detail::fp16_value(min_bits);
      const float s = detail::fp16_value(scale_bits);
      for (std::size_t c = g * Group; c < (g + 1) * Group; ++c) {
        Codes::put(packed, c, Codes::code(static_cast<float>(row[c]), m, s));
      }
    }
  }

  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    const std::byte* packed = codes + value_param_bytes(head_dim);
    for (std::size_t g = 0; g < head_dim / Group; ++g) {
      const float m = simd::load_fp16(codes + 4 * g);
      const float s = simd::load_fp16(codes + 4 * g + 2);
      for (std::size_t c = g * Group; c < (g + 1) * Group; ++c) {
        out[c] = m + s * static_cast<float>(Codes::get(packed, c));
      }
    }
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    const std::size_t d = tile.head_dim;
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
};

}  // namespace kvc::quant
