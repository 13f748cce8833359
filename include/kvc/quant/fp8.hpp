// kvc/quant/fp8.hpp — quant::Fp8<Format>: OCP FP8 (E4M3 / E5M2) codes with an fp32 scale
// per token and kv head. quant::Fp8E4M3 and quant::Fp8E5M2 name the two formats.
//
// Format:     OCP 8-bit floating point (Open Compute Project, "OCP 8-bit Floating Point
//             Specification (OFP8)", rev. 1.0, 2023; Micikevicius et al., "FP8 Formats for
//             Deep Learning", 2022):
//               E4M3 ("e4m3fn")  bias 7, max ±448, no infinities, NaN = S.1111.111,
//                                subnormal step 2^-9, 3 mantissa bits
//               E5M2             bias 15, max ±57344, ±inf and NaNs as IEEE binary16 (it is
//                                binary16's top byte), subnormal step 2^-16, 2 mantissa bits
//             Per token and kv head, for the key and for the value alike:
//               [fp32 scale, little-endian][one code per channel]    (scale first)
//             Bytes per token and kv head, each of K and V: head_dim + 4 (132 at d = 128,
//             0.52× Dense<half>). The scale is read with memcpy (rows are not aligned).
// Keeps:      scale = amax / max over the row (fp32; E4M3 max 448, E5M2 57344), code =
//             round(x / scale) to nearest even on the format's grid, saturating at ±max (a
//             finite input never gets an inf or NaN code), x̂ = scale · value(code) (one fp32
//             rounding). Error per element, with y = x / scale:
//               |x − x̂| ≤ scale · (2^-(m+1) · |y| + s / 2) + fp32 rounding of scale · value
//             m = 3, s = 2^-9 (E4M3) or m = 2, s = 2^-16 (E5M2): relative 2^-4 / 2^-3 in the
//             normal range, absolute scale · 2^-10 / scale · 2^-17 below it. Only when amax
//             < max · 2^-126 (≈ 5e-36, the scale an fp32 denormal) can x / scale exceed max
//             and saturate: the error is then also ≤ amax − max · scale, and a scale that
//             underflows to 0 stores codes 0. A row of zeros gets scale 0 and codes 0
//             (decoded exactly 0). −0 and values that round to zero keep their sign (0x80).
// Needs:      nothing; any head_dim ≥ 1. Every finite input is storable (the scale absorbs
//             the magnitude): no max_magnitude(). NaN/±Inf are rejected by KvCache's
//             check_finite (ValueError) like for every format; with check_finite off they
//             saturate to ±max and the row's scale is unspecified.
// Cost/step:  attend runs simd::dot_block / simd::axpy_block directly on the codes: each
//             16 codes are widened in registers (byte → binary16 bits → vcvtph2ps) inside the
//             register-blocked GQA tiles; the scale multiplies the scores after the dot
//             and the softmax weights before the accumulation. No fp32 copy of a page is
//             ever written. Reads 0.52× the bytes of Dense<half> per token.
// Choices:    * scale in fp32, not fp16: 2 more bytes per row (1.5 % at d = 128) buy an
//               correctly rounded amax / max for every amax (an fp16 scale overflows past
//               65504 · max,
//               flushes rows below ~6e-8 · max and adds its own rounding to the bound).
//             * per token and kv head, like Int8<>; a row whose amax is within an ulp of
//               FLT_MAX steps its scale down one ulp so scale · max stays finite.
//             * rounding of x / scale is a correctly rounded fp32 division followed by RNE to
//               FP8; with 24 ≥ 2 · 4 + 2 bits the double rounding is innocuous, so the codes
//               equal RNE of the exact quotient (the tests check this against float64).
//             * E4M3's NaN codes are never written; the kernels would read S.1111.111 as ±480
//               (see simd/fp8.hpp).
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/token_codec.hpp>
#include <kvc/simd/fp8.hpp>

#include <cstddef>
#include <string_view>

namespace kvc::quant {

using Fp8Format = simd::Fp8Format;

template <Fp8Format Format>
struct Fp8 : TokenCodec<Fp8<Format>> {
  using traits = simd::Fp8Traits<Format>;
  static constexpr Fp8Format format = Format;
  static constexpr bool uniform_tile_cost = true;  // tiles widen in registers (concepts.hpp)

  static constexpr std::string_view name() noexcept {
    return Format == Fp8Format::E4M3 ? "fp8_e4m3" : "fp8_e5m2";
  }

  static constexpr std::size_t row_bytes(std::size_t head_dim) noexcept {
    return sizeof(float) + head_dim;
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept { return head_dim > 0; }

  // Replace TokenCodec's widen-to-scratch kernels: the tile kernels read the codes directly.
  void score_tile(const ScoreTile& tile) const noexcept {
    const std::size_t d = tile.head_dim;
    simd::score_fp8<Format>(tile.queries, tile.rows, d, tile.key_codes, tile.tokens, row_bytes(d),
                            d, tile.scores, tile.scores_stride);
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    const std::size_t d = tile.head_dim;
    simd::accumulate_fp8<Format>(tile.weights, tile.rows, tile.weights_stride, tile.value_codes,
                                 tile.tokens, row_bytes(d), d, tile.acc, d, tile.scratch);
  }

 private:
  friend struct TokenCodec<Fp8>;

  template <Element S>
  static void encode(const S* source, std::size_t head_dim, std::byte* codes) noexcept {
    simd::encode_fp8<Format>(source, head_dim, codes);
  }

  static void decode(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    simd::decode_fp8<Format>(codes, head_dim, out);
  }
};

using Fp8E4M3 = Fp8<Fp8Format::E4M3>;
using Fp8E5M2 = Fp8<Fp8Format::E5M2>;

}  // namespace kvc::quant
