// kvc/quant/token_codec.hpp — TokenCodec<Format>: the Quantizer members shared by formats
// that encode each token's key (and value) row on its own, the same way for K and V.
//
// A Format derives from TokenCodec<Format> and provides
//   static constexpr std::size_t row_bytes(std::size_t head_dim);
//   template <Element S> static void encode(const S* row, std::size_t head_dim, std::byte*);
//   static void decode(const std::byte* codes, std::size_t head_dim, float* row);
// (name() and supports_head_dim() stay its own). TokenCodec supplies key/value sizes,
// encode/decode for K and V, and the fused tile kernels: each token of one page tile is
// widened into the caller's L1 scratch (page_tokens × head_dim floats, never more), then
// simd::dot_block / simd::axpy_block serve all query rows of the GQA group at once.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/simd/kernels.hpp>

#include <cstddef>

namespace kvc::quant {

namespace detail {

// The fused tiles of a format whose rows decode one by one (`decode(codes, d, out)`, rows
// `row_bytes` apart): each token of the page tile is widened into the caller's L1 scratch
// (page_tokens × d floats, never more), then simd::dot_block / simd::axpy_block serve all
// query rows of the GQA group at once.
template <class Decode>
void widen_rows(const std::byte* codes, std::size_t tokens, std::size_t d, std::size_t row_bytes,
                float* scratch, Decode decode) noexcept {
  for (std::size_t j = 0; j < tokens; ++j) decode(codes + j * row_bytes, d, scratch + j * d);
}

template <class Decode>
void widened_score_tile(const ScoreTile& tile, std::size_t row_bytes, Decode decode) noexcept {
  const std::size_t d = tile.head_dim;
  widen_rows(tile.key_codes, tile.tokens, d, row_bytes, tile.scratch, decode);
  simd::dot_block(tile.queries, tile.rows, d, tile.scratch, tile.tokens, d, d, tile.scores,
                  tile.scores_stride);
}

template <class Decode>
void widened_accumulate_tile(const AccumulateTile& tile, std::size_t row_bytes,
                             Decode decode) noexcept {
  const std::size_t d = tile.head_dim;
  widen_rows(tile.value_codes, tile.tokens, d, row_bytes, tile.scratch, decode);
  simd::axpy_block(tile.weights, tile.rows, tile.weights_stride, tile.scratch, tile.tokens, d, d,
                   tile.acc, d);
}

}  // namespace detail

template <class Format>
struct TokenCodec {
  constexpr std::size_t key_bytes(std::size_t head_dim) const noexcept {
    return Format::row_bytes(head_dim);
  }
  constexpr std::size_t value_bytes(std::size_t head_dim) const noexcept {
    return Format::row_bytes(head_dim);
  }

  template <Element S>
  void encode_key(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    Format::encode(source, head_dim, codes);
  }
  template <Element S>
  void encode_value(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    Format::encode(source, head_dim, codes);
  }

  void decode_key(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    Format::decode(codes, head_dim, out);
  }
  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    Format::decode(codes, head_dim, out);
  }

  void score_tile(const ScoreTile& tile) const noexcept {
    detail::widened_score_tile(tile, Format::row_bytes(tile.head_dim), Format::decode);
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    detail::widened_accumulate_tile(tile, Format::row_bytes(tile.head_dim), Format::decode);
  }
};

}  // namespace kvc::quant
