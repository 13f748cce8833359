// kvc/quant/int8.hpp — quant::Int8<Group>: symmetric int8 codes with fp32 absmax scales.
//
// Lineage:    the absmax ("symmetric") int8 quantization of LLM.int8() (Dettmers et al.,
//             "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022),
//             applied per token to the KV cache as in the per-token value path of KIVI (Liu
//             et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024)
//             — here for keys too, and symmetric (no zero point).
// Format:     per token and kv head, for the key and for the value alike:
//               [fp32 scale × groups][int8 code × head_dim]      (scales first)
//             groups = 1 (Int8<>, one scale per (token, head)) or head_dim / Group
//             (Int8<32>: channels [32g, 32g + 32) share scale g). Scales are little-endian
//             IEEE fp32 read with memcpy (a token's codes need not be aligned).
//             Bytes per token and kv head, each of K and V: head_dim + 4 · groups
//             (Int8<>: d + 4; Int8<32>: 1.125 · d).
// Keeps:      scale = max|x| / 127 over the group, q = round(x / scale) ∈ [−127, 127] with
//             std::nearbyint (ties to even), x̂ = scale · q; |x − x̂| ≤ scale / 2. A group of
//             zeros gets scale 0 and codes 0 (the division is guarded). Codes are clamped to
//             ±127, which only matters when the scale is a denormal (rounded): then the
//             error is ≤ max(scale / 2, max|x| − 127 · scale).
// Needs:      nothing. Int8<>: any head_dim ≥ 1; Int8<G>: head_dim % G == 0.
// Cost/step:  reads ~0.51× the bytes of Dense<half> per token. Where the target has AVX-512
//             VNNI and head_dim is a multiple of 32 up to 256 (integer_scores/values), attend
//             multiplies codes by codes (simd/int8_dot.hpp): q·k in int32 with each query row
//             rounded to int8 (Int8<G>: per group in int32, times the group's scale in fp32,
//             simd::dot_s8_scaled; head_dim % 64 == 0 unless G = 32), P·V in int32 with the
//             tile's softmax weights rounded to u8 — faster than Dense<half> at GQA 4
//             (bench/results/attend.md), for a score error ≤
//             (m_q/254) · Σ|k̂| and a weight error ≤ 1/510 of the tile's largest weight. Elsewhere
//             it widens one page tile (codes × scale → fp32) into L1 scratch and runs
//             simd::dot_block / axpy_block: exact fp32 functions of the codes. Tiles that
//             ask for exact scores (ScoreTile::exact: observe's window) take that path too.
// Choices:    symmetric, so zero is exact and no zero point is stored; ties to even, as
//             ALGORITHMS.md's "round" (nearbyint under the default rounding mode).
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
#include <cstring>
#include <string_view>

namespace kvc::quant {

// Group = 0: one scale per (token, kv head); otherwise one per Group consecutive channels.
template <std::size_t Group = 0>
struct Int8 : TokenCodec<Int8<Group>> {
  static_assert(Group == 0 || Group == 16 || Group == 32 || Group == 64 || Group == 128,
                "quant::Int8<Group>: Group is 0 (per token) or one of 16, 32, 64, 128");

  static constexpr std::size_t group = Group;

  static constexpr std::string_view name() noexcept {
    if constexpr (Group == 0) {
      return "int8";
    } else if constexpr (Group == 16) {
      return "int8_g16";
    } else if constexpr (Group == 32) {
      return "int8_g32";
    } else if constexpr (Group == 64) {
      return "int8_g64";
    } else {
      return "int8_g128";
    }
  }

  static constexpr std::size_t groups(std::size_t head_dim) noexcept {
    return Group == 0 ? 1 : head_dim / Group;
  }
  static constexpr std::size_t group_size(std::size_t head_dim) noexcept {
    return Group == 0 ? head_dim : Group;
  }

  static constexpr std::size_t row_bytes(std::size_t head_dim) noexcept {
    return head_dim + sizeof(float) * groups(head_dim);
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim > 0 && (Group == 0 || head_dim % Group == 0);
  }

  // Whether attend takes the integer path (kvc/simd/int8_dot.hpp: VNNI on the codes) for
  // this head_dim: for scores it rounds each query row to int8 (one scale per row; Int8<G>
  // sums each group in int32 and scales it in fp32), for values the tile's softmax weights
  // to u8 (any Group of 32·k channels). Elsewhere attend takes TokenCodec's exact fp32 path.
  static constexpr bool integer_scores(std::size_t head_dim) noexcept {
    if constexpr (Group == 0) {
      return detail::int8_fused_fits(head_dim);
    } else {
      return Group % 32 == 0 && detail::int8_fused_fits(head_dim) &&
             simd::dot_s8_scaled_fits(head_dim, Group);
    }
  }
  static constexpr bool integer_values(std::size_t head_dim) noexcept {
    return Group % 32 == 0 && detail::int8_fused_fits(head_dim);
  }

  void score_tile(const ScoreTile& tile) const noexcept {
    if (integer_scores(tile.head_dim) && !tile.exact) {
      if constexpr (Group == 0) {
        detail::int8_fused_scores(tile, layout(tile.head_dim));
      } else {
        detail::int8_fused_block_scores(tile, layout(tile.head_dim));
      }
    } else {
      TokenCodec<Int8>::score_tile(tile);
    }
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    if (integer_values(tile.head_dim)) {
      detail::int8_fused_accumulate(tile, layout(tile.head_dim));
    } else {
      TokenCodec<Int8>::accumulate_tile(tile);
    }
  }

  // Where a row's int8 codes and scales are, for the integer kernels (quant/int8_fused.hpp).
  struct Layout {
    std::size_t stride, code_offset, chunk_stride, chunks_per_scale;
    static float scale(const std::byte* row, std::size_t s) noexcept {
      float scale = 0.0F;
      std::memcpy(&scale, row + sizeof(float) * s, sizeof scale);
      return scale;
    }
  };
  static constexpr Layout layout(std::size_t head_dim) noexcept {
    return {row_bytes(head_dim), sizeof(float) * groups(head_dim), 32,
            std::max<std::size_t>(group_size(head_dim) / 32, 1)};
  }

 private:
  friend struct TokenCodec<Int8>;

  template <Element S>
  static void encode(const S* source, std::size_t head_dim, std::byte* codes) noexcept {
    const std::size_t size = group_size(head_dim);
    const std::size_t count = groups(head_dim);
    auto* q = reinterpret_cast<std::int8_t*>(codes + sizeof(float) * count);
    for (std::size_t g = 0; g < count; ++g) {
      const S* x = source + g * size;
      const float scale = simd::max_abs(x, size) / 127.0F;
      std::memcpy(codes + sizeof(float) * g, &scale, sizeof scale);
      if (scale > 0.0F) {
        // q = round(x / scale) (ties to even), clamped to ±127; all 0 when the group is.
        simd::quantize_div(x, size, scale, 127.0F, q + g * size);
      } else {
        std::memset(q + g * size, 0, size);
      }
    }
  }

  static void decode(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    const std::size_t size = group_size(head_dim);
    const std::size_t count = groups(head_dim);
    const auto* q = reinterpret_cast<const std::int8_t*>(codes + sizeof(float) * count);
    for (std::size_t g = 0; g < count; ++g) {
      float scale = 0.0F;
      std::memcpy(&scale, codes + sizeof(float) * g, sizeof scale);
      simd::dequantize_int8(q + g * size, scale, out + g * size, size);
    }
  }
};

}  // namespace kvc::quant
