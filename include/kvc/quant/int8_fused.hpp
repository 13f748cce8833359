// kvc/quant/int8_fused.hpp — the integer attend path of the int8 formats (quant::Int8,
// quant::Q8_0): score and accumulate tiles computed on the codes with simd::dot_s8 /
// simd::accumulate_u8s8 (VNNI), for any format whose row is int8 codes in chunks of 32
// channels with one fp scale per chunk (several chunks may share one).
//
// A format describes its row with a Layout:
//   std::size_t stride                     bytes per token row
//   std::size_t code_offset                bytes from the row to chunk 0's codes
//   std::size_t chunk_stride               bytes from chunk b's codes to chunk b + 1's
//   std::size_t chunks_per_scale           consecutive chunks sharing one scale
//   float scale(const std::byte* row, std::size_t s)    the row's s-th scale
// and optionally
//   void gather_scales(rows, tokens, s, out)   out[j] = scale(rows + j·stride, s), in one
//                                              pass (simd::gather_fp16 for fp16 scales)
//   static constexpr unsigned planar_bits      the codes are Bits-bit planar (quant::Kivi's
//                                              values), accumulated by simd::accumulate_planar
// What the kernels round (queries to int8 per row, weights to u8 per tile) and why is in
// kvc/simd/int8_dot.hpp. Per tile and block of up to 4 query rows:
//   score:       s[r][j] = (float)Σ_c q̂[r][c]·k̂[j][c] · (sq_r · sk_j)     (one scale per row)
//   block score: s[r][j] = sq_r · Σ_b sk_jb · (float)Σ_{c in b} q̂[r][c]·k̂[j][c]
//                                                  (a scale per block b of 32·k channels)
//   accumulate:  for each scale s of the row: w[j] = p[r][j] · scale_s(j), ŵ = u8(w),
//                acc[r][c] += (w_max/255) · (float)Σ_j ŵ_j · v̂[j][c]   (c in scale s's chunks)
// Tiles are cut into sub-tiles of `fused_tokens` tokens so the buffers stay on the stack.
#pragma once

#include <kvc/core/events.hpp>
#include <kvc/simd/bfp.hpp>
#include <kvc/simd/int8_dot.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

namespace kvc::quant::detail {

inline constexpr std::size_t fused_max_head_dim = 256;
inline constexpr std::size_t fused_tokens = 64;
inline constexpr std::size_t fused_rows = 4;

// Whether the integer path serves this head_dim (else the format's fp32 path does).
constexpr bool int8_fused_fits(std::size_t head_dim) noexcept {
  return simd::has_int8_dot && head_dim % simd::int8_chunk == 0 && head_dim <= fused_max_head_dim;
}

// The int8 codes and scales of query rows [r0, r0 + count): the tile's (rounded once per
// attend block by KvCache), else rounded here into `codes` / `scales` — the same numbers.
inline std::pair<const std::int8_t*, const float*> query_codes_of(const ScoreTile& tile,
                                                                  std::size_t r0, std::size_t count,
                                                                  std::int8_t* codes,
                                                                  float* scales) noexcept {
  const std::size_t d = tile.head_dim;
  if (tile.query_codes != nullptr) return {tile.query_codes + r0 * d, tile.query_scales + r0};
  simd::quantize_rows_s8(tile.queries + r0 * d, count, d, d, codes, scales);
  return {codes, scales};
}

// out[j] = the s-th scale of each of `tokens` rows starting at `rows`.
template <class Layout>
void gather_scales(const Layout& layout, const std::byte* rows, std::size_t tokens, std::size_t s,
                   float* out) noexcept {
  if constexpr (requires { layout.gather_scales(rows, tokens, s, out); }) {
    layout.gather_scales(rows, tokens, s, out);
  } else {
    for (std::size_t j = 0; j < tokens; ++j) out[j] = layout.scale(rows + j * layout.stride, s);
  }
}

// Formats with one scale per token row (chunks_per_scale == head_dim / 32).
template <class Layout>
void int8_fused_scores(const ScoreTile& tile, const Layout& layout) noexcept {
  const std::size_t d = tile.head_dim;
  std::array<std::int8_t, fused_rows * fused_max_head_dim> query_codes;
  std::array<float, fused_rows> query_scales;
  std::array<float, fused_tokens> key_scales;
  std::array<std::int32_t, fused_rows * fused_tokens> dots;
  for (std::size_t t0 = 0; t0 < tile.tokens; t0 += fused_tokens) {
    const std::size_t tokens = std::min(fused_tokens, tile.tokens - t0);
    const std::byte* rows = tile.key_codes + t0 * layout.stride;
    gather_scales(layout, rows, tokens, 0, key_scales.data());
    for (std::size_t r0 = 0; r0 < tile.rows; r0 += fused_rows) {
      const std::size_t block = std::min(fused_rows, tile.rows - r0);
      const auto [q_codes, q_scales] =
          query_codes_of(tile, r0, block, query_codes.data(), query_scales.data());
      simd::dot_s8(q_codes, block, d,
                   reinterpret_cast<const std::int8_t*>(rows + layout.code_offset), tokens,
                   layout.stride, dots.data(), fused_tokens);
      for (std::size_t r = 0; r < block; ++r) {
        float* __restrict scores = tile.scores + (r0 + r) * tile.scores_stride + t0;
        const std::int32_t* __restrict dot = dots.data() + r * fused_tokens;
        const float* __restrict key_scale = key_scales.data();
        const float query_scale = q_scales[r];
        for (std::size_t j = 0; j < tokens; ++j) {
          scores[j] = static_cast<float>(dot[j]) * (query_scale * key_scale[j]);
        }
      }
    }
  }
}

// Scores of tokens [t0, t0 + tokens) of the tile from their int8 code rows (`codes`, ldk
// apart) and a scale per block of `block` channels (scales[j · blocks + b]), for every query
// row: s[r][j] = sq_r · Σ_b scale_jb · Σ_{c in b} q̂[r][c]·k[j][c] (simd::dot_s8_scaled).
inline void block_scaled_scores(const ScoreTile& tile, std::size_t t0, const std::int8_t* codes,
                                std::size_t tokens, std::size_t ldk, const float* scales,
                                std::size_t block, std::size_t blocks,
                                std::size_t chunk_stride = simd::int8_chunk) noexcept {
  const std::size_t d = tile.head_dim;
  std::array<std::int8_t, fused_rows * fused_max_head_dim> query_codes;
  std::array<float, fused_rows> query_scales;
  for (std::size_t r0 = 0; r0 < tile.rows; r0 += fused_rows) {
    const std::size_t count = std::min(fused_rows, tile.rows - r0);
    const auto [q_codes, q_scales] =
        query_codes_of(tile, r0, count, query_codes.data(), query_scales.data());
    float* scores = tile.scores + r0 * tile.scores_stride + t0;
    simd::dot_s8_scaled(q_codes, count, d, codes, tokens, ldk, scales, block, blocks, scores,
                        tile.scores_stride, chunk_stride);
    for (std::size_t r = 0; r < count; ++r) {
      float* __restrict row_scores = scores + r * tile.scores_stride;
      const float query_scale = q_scales[r];
      for (std::size_t j = 0; j < tokens; ++j) row_scores[j] *= query_scale;
    }
  }
}

// Formats with a scale per block of 32·k channels (Int8<32>, q8_0): each block's q·k exact
// in int32 and scaled by the key's block scale in fp32 (simd::dot_s8_scaled), then by the
// query row's scale. dot_s8_scaled reads each token's 32-channel chunks in place, also where
// they are not contiguous (q8_0 keeps a scale before each: chunk_stride 34); codes that are
// not bytes (q4_0: Layout::gather_codes) are widened into the scratch first (tile.tokens · d
// bytes, within the page_tokens · d floats the tile may use).
template <class Layout>
void int8_fused_block_scores(const ScoreTile& tile, const Layout& layout) noexcept {
  constexpr std::size_t max_chunks = fused_max_head_dim / simd::int8_chunk;
  const std::size_t d = tile.head_dim;
  const std::size_t block = layout.chunks_per_scale * simd::int8_chunk;
  const std::size_t blocks = d / block;
  std::array<float, fused_tokens * max_chunks> key_scales;  // [token][block]
  const bool contiguous = layout.chunk_stride == simd::int8_chunk;
  auto* gathered = reinterpret_cast<std::int8_t*>(tile.scratch);
  for (std::size_t t0 = 0; t0 < tile.tokens; t0 += fused_tokens) {
    const std::size_t tokens = std::min(fused_tokens, tile.tokens - t0);
    const std::byte* rows = tile.key_codes + t0 * layout.stride;
    for (std::size_t j = 0; j < tokens; ++j) {
      for (std::size_t b = 0; b < blocks; ++b) {
        key_scales[j * blocks + b] = layout.scale(rows + j * layout.stride, b);
      }
    }
    const std::int8_t* codes = reinterpret_cast<const std::int8_t*>(rows + layout.code_offset);
    std::size_t ldk = layout.stride;
    std::size_t chunk_stride = simd::int8_chunk;
    if constexpr (requires { Layout::gather_codes(rows, d, gathered); }) {
      // Codes that are not bytes (q4_0's nibbles): the layout widens them to int8.
      for (std::size_t j = 0; j < tokens; ++j) {
        Layout::gather_codes(rows + j * layout.stride, d, gathered + j * d);
      }
      codes = gathered;
      ldk = d;
    } else if (!contiguous) {
      // Chunks apart (q8_0: a scale before each): dot_s8_scaled reads them in place.
      chunk_stride = layout.chunk_stride;
    }
    block_scaled_scores(tile, t0, codes, tokens, ldk, key_scales.data(), block, blocks,
                        chunk_stride);
  }
}

// int8_fused_accumulate on tokens [t0, t0 + tokens) of the tile (tokens ≤ fused_tokens),
// their value scales given: value_scales[s · lds + j] is the s-th scale of token t0 + j.
template <class Layout>
void int8_fused_accumulate_part(const AccumulateTile& tile, const Layout& layout, std::size_t t0,
                                std::size_t tokens, const float* value_scales,
                                std::size_t lds) noexcept {
  constexpr std::size_t max_chunks = fused_max_head_dim / simd::int8_chunk;
  const std::size_t d = tile.head_dim;
  const std::size_t chunks = d / simd::int8_chunk;
  const std::size_t scales = chunks / layout.chunks_per_scale;
  std::array<float, fused_tokens> weights;
  std::array<std::uint8_t, max_chunks * fused_rows * fused_tokens> weight_codes;
  std::array<float, max_chunks * fused_rows> factors;  // [scale][row]
  std::array<const std::uint8_t*, max_chunks> chunk_weights;
  std::array<std::int32_t, fused_rows * fused_max_head_dim> sums;
  const std::byte* rows = tile.value_codes + t0 * layout.stride;
  for (std::size_t r0 = 0; r0 < tile.rows; r0 += fused_rows) {
    const std::size_t block = std::min(fused_rows, tile.rows - r0);
    for (std::size_t s = 0; s < scales; ++s) {
      for (std::size_t r = 0; r < block; ++r) {
        const float* __restrict p = tile.weights + (r0 + r) * tile.weights_stride + t0;
        const float* __restrict scale = value_scales + s * lds;
        float* __restrict weight = weights.data();
        for (std::size_t j = 0; j < tokens; ++j) weight[j] = p[j] * scale[j];
        factors[s * fused_rows + r] = simd::quantize_weights_u8(
            weights.data(), tokens, weight_codes.data() + (s * fused_rows + r) * fused_tokens);
      }
    }
    for (std::size_t b = 0; b < chunks; ++b) {
      chunk_weights[b] =
          weight_codes.data() + b / layout.chunks_per_scale * fused_rows * fused_tokens;
    }
    if constexpr (requires { Layout::planar_bits; }) {
      simd::accumulate_planar<Layout::planar_bits>(
          chunk_weights.data(), block, fused_tokens,
          reinterpret_cast<const std::uint8_t*>(rows + layout.code_offset), tokens, layout.stride,
          d, sums.data(), fused_max_head_dim);
    } else {
      simd::accumulate_u8s8(chunk_weights.data(), block, fused_tokens,
                            reinterpret_cast<const std::int8_t*>(rows + layout.code_offset), tokens,
                            layout.stride, chunks, layout.chunk_stride, sums.data(),
                            fused_max_head_dim);
    }
    for (std::size_t r = 0; r < block; ++r) {
      float* acc = tile.acc + (r0 + r) * d;
      const std::int32_t* sum = sums.data() + r * fused_max_head_dim;
      const std::size_t width = layout.chunks_per_scale * simd::int8_chunk;
      for (std::size_t s = 0; s < scales; ++s) {
        const float factor = factors[s * fused_rows + r];
        float* __restrict out = acc + s * width;
        const std::int32_t* __restrict in = sum + s * width;
        for (std::size_t c = 0; c < width; ++c) out[c] += factor * static_cast<float>(in[c]);
      }
    }
  }
}

template <class Layout>
void int8_fused_accumulate(const AccumulateTile& tile, const Layout& layout) noexcept {
  constexpr std::size_t max_chunks = fused_max_head_dim / simd::int8_chunk;
  const std::size_t scales = tile.head_dim / simd::int8_chunk / layout.chunks_per_scale;
  std::array<float, max_chunks * fused_tokens> value_scales;  // [scale][token]
  for (std::size_t t0 = 0; t0 < tile.tokens; t0 += fused_tokens) {
    const std::size_t tokens = std::min(fused_tokens, tile.tokens - t0);
    const std::byte* rows = tile.value_codes + t0 * layout.stride;
    for (std::size_t s = 0; s < scales; ++s) {
      gather_scales(layout, rows, tokens, s, value_scales.data() + s * fused_tokens);
    }
    int8_fused_accumulate_part(tile, layout, t0, tokens, value_scales.data(), fused_tokens);
  }
}

}  // namespace kvc::quant::detail
