// kvc/quant/q8_0.hpp — quant::Q8_0: ggml's q8_0 blocks, byte for byte.
//
// Format:     ggml / llama.cpp `block_q8_0` (ggml-common.h, QK8_0 = 32), packed, no padding:
//               offset 0..1   d      IEEE fp16, little-endian (ggml_half)
//               offset 2..33  q[32]  int8, element j of the block in q[j]
//             34 bytes per 32 values; a head of d channels is d / 32 consecutive blocks, the
//             same for keys and values: key_bytes = value_bytes = 34 · d / 32 (136 at d = 128,
//             0.53× Dense<half>). A row of blocks is exactly what llama.cpp stores for a
//             GGML_TYPE_Q8_0 K/V row, so a token's codes can be handed to (or taken from) a
//             llama.cpp cache as they are.
// Keeps:      amax = max|x| over the block, d = amax / 127 (fp32, stored rounded to fp16),
//             q[j] = roundf(x[j] · (1 / d)) (ties away from zero), x̂ = fp16(d) · q.
//             |x − x̂| ≤ d / 2 + 127 · |d − fp16(d)| (≤ ~0.56 d).
// Needs:      head_dim % 32 == 0.
// Cost/step:  where the target has AVX-512 VNNI and head_dim ≤ 256 (integer_scores: also
//             head_dim % 64 == 0; integer_values), attend runs on the codes
//             (simd/int8_dot.hpp, simd::dot_s8_scaled): q·k per block exact in int32 times
//             the block's scale, the query row rounded to int8 (score error ≤ (m_q/254)·Σ|k̂|);
//             P·V with each block's weights (softmax weight × block scale) rounded to u8 per
//             tile, error ≤ 1/510 of the tile's largest. Elsewhere, and for observe's exact
//             tiles, it widens one page tile (d · q → fp32, simd::dequantize_q8_0) into the
//             caller's L1 scratch and runs simd::dot_block / axpy_block: exact.
// Paper:      none; the format of ggml (Gerganov et al., github.com/ggml-org/ggml), used by
//             llama.cpp's `--cache-type-k/v q8_0`.
// Choices:    encoding follows ggml's reference `quantize_row_q8_0_ref` exactly (multiply by
//             the fp32 inverse, roundf), so the bytes match it, except where ggml has no
//             finite answer: amax > 127 · 65504 saturates d at the largest fp16 (65504) and
//             clamps codes to ±127 (ggml would store d = inf and decode NaN); a block whose
//             1 / d overflows (d denormal in fp32 — its fp16 is 0 anyway) gets codes 0.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/int8_fused.hpp>
#include <kvc/quant/token_codec.hpp>
#include <kvc/simd/int8.hpp>
#include <kvc/simd/kernels.hpp>
#include <kvc/simd/quantize.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvc::quant {

struct Q8_0 : TokenCodec<Q8_0> {
  static constexpr std::size_t block_values = 32;
  static constexpr std::size_t block_bytes = 34;  // sizeof(block_q8_0)

  static constexpr std::string_view name() noexcept { return "q8_0"; }

  static constexpr std::size_t row_bytes(std::size_t head_dim) noexcept {
    return head_dim / block_values * block_bytes;
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim > 0 && head_dim % block_values == 0;
  }

  // One block_q8_0 from 32 values (ggml's quantize_row_q8_0_ref, saturating; see above).
  template <Element S>
  static void encode_block(const S* x, std::byte* block) noexcept {
    constexpr float fp16_max = 65504.0F;
    const float amax = simd::max_abs(x, block_values);
    const float d = std::min(amax / 127.0F, fp16_max);
    float inverse = d != 0.0F ? 1.0F / d : 0.0F;
    if (!std::isfinite(inverse)) inverse = 0.0F;
    simd::store_fp16(d, block);
    simd::quantize_away(x, block_values, inverse, reinterpret_cast<std::int8_t*>(block + 2));
  }

  // attend's integer paths where the target has VNNI (simd/int8_dot.hpp): scores with each
  // block's q·k exact in int32 times its scale (the query row rounded to int8), values with
  // one u8 weight row per block; else TokenCodec's exact fp32 paths.
  static constexpr bool integer_scores(std::size_t head_dim) noexcept {
    return detail::int8_fused_fits(head_dim) && simd::dot_s8_scaled_fits(head_dim, block_values);
  }
  static constexpr bool integer_values(std::size_t head_dim) noexcept {
    return detail::int8_fused_fits(head_dim);
  }

  void score_tile(const ScoreTile& tile) const noexcept {
    if (integer_scores(tile.head_dim) && !tile.exact) {
      detail::int8_fused_block_scores(tile, layout(tile.head_dim));
    } else {
      TokenCodec<Q8_0>::score_tile(tile);
    }
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    if (integer_values(tile.head_dim)) {
      detail::int8_fused_accumulate(tile, layout(tile.head_dim));
    } else {
      TokenCodec<Q8_0>::accumulate_tile(tile);
    }
  }

  // Where a row's int8 codes and scales are, for the integer kernels (quant/int8_fused.hpp).
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
  };
  static constexpr Layout layout(std::size_t head_dim) noexcept {
    return {row_bytes(head_dim), 2, block_bytes, 1};
  }

 private:
  friend struct TokenCodec<Q8_0>;

  static void decode(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    simd::dequantize_q8_0(codes, out, head_dim);
  }

  template <Element S>
  static void encode(const S* source, std::size_t head_dim, std::byte* codes) noexcept {
    for (std::size_t b = 0; b < head_dim / block_values; ++b) {
      encode_block(source + b * block_values, codes + b * block_bytes);
    }
  }
};

}  // namespace kvc::quant
