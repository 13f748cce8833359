// kvc/quant/dense.hpp — quant::Dense<T>: keys and values stored as plain T (f32, f16, bf16).
//
// Format:     per token, head_dim values of T for the key, then the same for the value;
//             no scales, no metadata. Bytes per token and kv head: 2 · head_dim · sizeof(T).
// Keeps:      every stored token exactly (f32) or rounded to nearest even (f16/bf16).
// Needs:      nothing. Any head_dim ≥ 1.
// Cost/step:  attend reads each page once per GQA group: simd::dot_block and
//             simd::axpy_block load the stored T and widen f16/bf16 in registers, for all
//             query rows of the group at once. No converted copy is ever written.
// Paper:      none — the uncompressed baselines (Dense<float> is KvCache<>'s default).
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/simd/kernels.hpp>

#include <cstddef>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>

namespace kvc::quant {

template <Element T>
struct Dense {
  using storage_type = T;
  static constexpr bool uniform_tile_cost = true;  // tiles widen in registers (concepts.hpp)

  static constexpr std::string_view name() noexcept {
    if constexpr (std::is_same_v<T, float>) {
      return "dense_f32";
    } else if constexpr (std::is_same_v<T, Eigen::half>) {
      return "dense_f16";
    } else {
      return "dense_bf16";
    }
  }

  constexpr std::size_t key_bytes(std::size_t head_dim) const noexcept {
    return head_dim * sizeof(T);
  }
  constexpr std::size_t value_bytes(std::size_t head_dim) const noexcept {
    return head_dim * sizeof(T);
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept { return head_dim > 0; }

  // The largest magnitude the format stores without overflowing to infinity; KvCache
  // rejects larger inputs (with check_finite) instead of storing inf. Beyond 65504, f16
  // rounds to inf; bf16 and f32 share float's range.
  static constexpr float max_magnitude() noexcept {
    return std::is_same_v<T, Eigen::half> ? 65504.0F : std::numeric_limits<float>::max();
  }

  template <Element S>
  void encode_key(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    encode(source, head_dim, codes);
  }
  template <Element S>
  void encode_value(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    encode(source, head_dim, codes);
  }

  void decode_key(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    simd::convert(stored(codes), out, head_dim);
  }
  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    simd::convert(stored(codes), out, head_dim);
  }

  // The kernels read the stored T directly and widen in registers: no staging copy.
  void score_tile(const ScoreTile& tile) const noexcept {
    simd::dot_block(tile.queries, tile.rows, tile.head_dim, stored(tile.key_codes), tile.tokens,
                    tile.head_dim, tile.head_dim, tile.scores, tile.scores_stride);
  }

  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    simd::axpy_block(tile.weights, tile.rows, tile.weights_stride, stored(tile.value_codes),
                     tile.tokens, tile.head_dim, tile.head_dim, tile.acc, tile.head_dim);
  }

 private:
  static const T* stored(const std::byte* codes) noexcept {
    return reinterpret_cast<const T*>(codes);
  }

  template <Element S>
  static void encode(const S* source, std::size_t head_dim, std::byte* codes) noexcept {
    if constexpr (std::is_same_v<S, T>) {
      std::memcpy(codes, source, head_dim * sizeof(T));
    } else if constexpr (std::is_same_v<S, float>) {
      simd::convert(source, reinterpret_cast<T*>(codes), head_dim);
    } else {
      // half <-> bfloat16: through f32, which holds both exactly.
      for (std::size_t c = 0; c < head_dim; ++c) {
        reinterpret_cast<T*>(codes)[c] = static_cast<T>(static_cast<float>(source[c]));
      }
    }
  }
};

}  // namespace kvc::quant
