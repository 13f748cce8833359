// kvc/quant/q4_0.hpp — quant::Q4_0: ggml's q4_0 blocks, byte for byte.
//
// Format:     ggml / llama.cpp `block_q4_0` (ggml-common.h, QK4_0 = 32), packed, no padding:
//               offset 0..1   d       IEEE fp16, little-endian (ggml_half)
//               offset 2..17  qs[16]  uint8: element j in the low nibble of qs[j],
//                                     element j + 16 in the high nibble (j < 16)
//             18 bytes per 32 values; a head of d channels is d / 32 consecutive blocks:
//             key_bytes = value_bytes = 18 · d / 32 (72 at d = 128, 0.28× Dense<half>).
//             Identical to a llama.cpp GGML_TYPE_Q4_0 K/V row.
// Keeps:      m = the element of largest |x| (the first such, sign kept), d = m / −8 (fp32,
//             stored rounded to fp16), q = min(15, floor(x · (1 / d) + 8.5)) — i.e.
//             clamp(round(x / d) + 8, 0, 15) with ties rounded up — and x̂ = fp16(d) · (q − 8).
//             m itself gets q = 0 (x̂ = −8 d = m). |x − x̂| ≤ |d| / 2 + 8 · |d − fp16(d)|,
//             except for the clamped top code: values of the opposite sign to m with
//             |x / d| ∈ [7.5, 8] get q = 15 (x̂ = 7 d), error ≤ |d| + 8 · |d − fp16(d)|.
// Needs:      head_dim % 32 == 0.
// Cost/step:  scores: where the target has AVX-512 VNNI and head_dim % 64 == 0, ≤ 256
//             (integer_scores), the nibbles are widened to int8 (simd::expand_q4_0) and each
//             block's q·k runs in int32 times its d (simd::dot_s8_scaled), the query row
//             rounded to int8 (score error ≤ (m_q/254)·Σ|k̂|). Values, and scores elsewhere or
//             for observe's exact tiles: one page tile widened (d · (nibble − 8) → fp32,
//             simd::dequantize_q4_0) into the caller's L1 scratch, then simd::dot_block /
//             simd::axpy_block — exact fp32 functions of the stored codes.
// Paper:      none; the format of ggml (Gerganov et al., github.com/ggml-org/ggml), used by
//             llama.cpp's `--cache-type-k/v q4_0`.
// Choices:    encoding follows ggml's reference `quantize_row_q4_0_ref` exactly (multiply by
//             the fp32 inverse, + 8.5, truncate, min 15), so the bytes match it, except where
//             ggml has no finite answer: |m| > 8 · 65504 saturates |d| at the largest fp16
//             (codes clamped to [0, 15]); a block whose 1 / d overflows (d denormal in fp32,
//             its fp16 is 0 anyway) gets codes 8 (x̂ = 0). An all-zero block stores d = −0
//             (fp16 0x8000: 0 / −8), as ggml does.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/int8_fused.hpp>
#include <kvc/quant/token_codec.hpp>
#include <kvc/simd/bfp.hpp>
#include <kvc/simd/int8.hpp>
#include <kvc/simd/kernels.hpp>
#include <kvc/simd/quantize.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvc::quant {

struct Q4_0 : TokenCodec<Q4_0> {
  static constexpr std::size_t block_values = 32;
  static constexpr std::size_t block_bytes = 18;  // sizeof(block_q4_0)

  static constexpr std::string_view name() noexcept { return "q4_0"; }

  static constexpr std::size_t row_bytes(std::size_t head_dim) noexcept {
    return head_dim / block_values * block_bytes;
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim > 0 && head_dim % block_values == 0;
  }

  // One block_q4_0 from 32 values (ggml's quantize_row_q4_0_ref, saturating; see above).
  template <Element S>
  static void encode_block(const S* x, std::byte* block) noexcept {
    constexpr float fp16_max = 65504.0F;
    const float m = simd::max_magnitude_value(x, block_values);  // the first, sign kept
    const float d = std::clamp(m / -8.0F, -fp16_max, fp16_max);
    float inverse = d != 0.0F ? 1.0F / d : 0.0F;
    if (!std::isfinite(inverse)) inverse = 0.0F;
    simd::store_fp16(d, block);
    simd::q4_0_nibbles(x, inverse, block + 2);
  }

  // Scores on the codes where the target has VNNI (simd::dot_s8_scaled): each block's
  // (nibble − 8) · q̂ exact in int32 times the block's d, the query row rounded to int8.
  // Values, and observe's exact tiles, take TokenCodec's exact fp32 path.
  static constexpr bool integer_scores(std::size_t head_dim) noexcept {
    return detail::int8_fused_fits(head_dim) && simd::dot_s8_scaled_fits(head_dim, block_values);
  }

  void score_tile(const ScoreTile& tile) const noexcept {
    if (integer_scores(tile.head_dim) && !tile.exact) {
      detail::int8_fused_block_scores(tile, layout(tile.head_dim));
    } else {
      TokenCodec<Q4_0>::score_tile(tile);
    }
  }

  // A row for the integer score path (quant/int8_fused.hpp): a scale per 32-channel block,
  // codes widened from nibbles by gather_codes; code(row, c) is channel c's.
  struct Layout {
    std::size_t stride, code_offset, chunk_stride, chunks_per_scale;
    static float scale(const std::byte* row, std::size_t s) noexcept {
      return simd::load_fp16(row + s * block_bytes);
    }
    // The s-th scale of `tokens` rows in one pass (each scale is followed by its codes, so
    // gather_fp16's 4-byte reads stay inside the row).
    void gather_scales(const std::byte* rows, std::size_t tokens, std::size_t s,
                       float* out) const noexcept {
      simd::gather_fp16(rows + s * block_bytes, stride, tokens, out);
    }
    static int code(const std::byte* row, std::size_t c) noexcept {
      const auto byte = static_cast<int>(row[c / block_values * block_bytes + 2 + c % 16]);
      return (c % block_values < 16 ? byte & 15 : byte >> 4) - 8;
    }
    static void gather_codes(const std::byte* row, std::size_t head_dim,
                             std::int8_t* out) noexcept {
      simd::expand_q4_0(row, out, head_dim);
    }
  };
  static constexpr Layout layout(std::size_t head_dim) noexcept {
    return {row_bytes(head_dim), 2, block_bytes, 1};
  }

 private:
  friend struct TokenCodec<Q4_0>;

  static void decode(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    simd::dequantize_q4_0(codes, out, head_dim);
  }

  template <Element S>
  static void encode(const S* source, std::size_t head_dim, std::byte* codes) noexcept {
    for (std::size_t b = 0; b < head_dim / block_values; ++b) {
      encode_block(source + b * block_values, codes + b * block_bytes);
    }
  }
};

}  // namespace kvc::quant
