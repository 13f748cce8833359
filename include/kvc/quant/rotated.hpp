// kvc/quant/rotated.hpp — quant::Rotated<Q>: a Walsh–Hadamard rotation in front of any quantizer.
//
// Paper:      Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024
//             (arXiv 2404.00456): an orthonormal Hadamard rotation of K (and of Q, so q·k is
//             unchanged) spreads outlier channels over all channels before quantizing. The same
//             rotation llama.cpp applies to a quantized K/V cache (ggml-org/llama.cpp #21038,
//             "rotate activations for better quantization": Q, K, V rotated before the store, H
//             applied again to the attention output; #21513 reports Gemma-4-26B perplexity
//             5.704 with q4_0, 5.658 with q4_0 rotated, 5.623 with f16) and ik_llama.cpp's
//             -khad / -vhad.
// Format:     exactly Q's bytes, of the rotated rows: key codes = Q.encode_key(H·k), value codes
//             = Q.encode_value(H·v), with H = H_d the Sylvester Walsh–Hadamard matrix scaled by
//             1/√d (kvc/simd/hadamard.hpp: symmetric, orthonormal, H·H = I). key_bytes and
//             value_bytes are Q's; nothing is added (the rotation is fixed, not stored).
// Keeps:      what Q keeps, in the rotated basis: decode_key(codes) = H·Q.decode_key(codes), so
//             |k − k̂|₂ = |H·k − Q(H·k)|₂ (H preserves the norm): Q's per-element bound, summed
//             in quadrature, is the bound on the decoded row; no element's error is larger than
//             that norm. A channel with an outlier no longer sets the scale of its block: H
//             spreads it as ±x/√d over every channel, which is the point (measured in
//             tests/quant/rotated.cpp: Rotated<Q4_0> vs Q4_0 on keys with one outlier channel).
//             decode_key / decode_value return the unrotated rows, so export_dense, merging and
//             scorers that read stored keys (Knorm, KeyDiff, ...) see k̂ ≈ k, not H·k.
// Needs:      head_dim a power of two ≤ max_head_dim (256), and Q.supports_head_dim(head_dim).
//             Q::name() must be usable at compile time (every kvc format's is). attend and
//             observe call prepare_queries (H on the query rows: q·k = (Hq)·(Hk)) before any
//             score tile and attend calls finish_outputs (H again: Σ p·v = H·Σ p·(H v)) on its
//             accumulator rows; KvCache does both (PreparesQueries / FinishesOutputs).
// Cost/step:  append: one transform per key row and per value row (d·log2 d adds, vectorized)
//             before Q's encode. attend: one transform per query row of the block and one per
//             output row, independent of the tokens stored; the tiles are Q's own kernels on the
//             codes, unchanged (the rotated queries go straight in). decode: Q's + one transform.
// Range:      |(H·x)_i| ≤ √d · max|x|, so a rotated element can exceed what Q stores although
//             every input element is storable (f16: 65504). max_magnitude() is therefore
//             Q's limit (Q::max_magnitude(), or float's largest for a format without one)
//             divided by √max_head_dim = 16, and at most FLT_MAX / 256 (the transform's
//             unscaled sums reach d · max|x|): KvCache's check_finite rejects larger inputs
//             with a ValueError (Rotated<Dense<half>>: ±4094; Rotated<Q4_0>: ±1.3e36). The
//             rotated row is then clamped to ±Q's limit before encoding, which only absorbs
//             the transform's fp32 rounding (≤ log2(d) + 2 ulps); an input that bypasses the
//             check (check_finite off, or a direct encode_*) saturates there instead of
//             becoming ±Inf (up to d · max|x| ≤ FLT_MAX). NaN stays NaN.
// Integer:    Q's integer attend paths (Int8's integer_scores / integer_values, VNNI) apply as
//             they are: the rows they round are the rotated query rows and the tiles' weights,
//             so Rotated forwards Q's integer_scores / integer_values answers. It does not
//             forward Q's code layout: its codes are of the rotated rows, not of decode_*'s.
// Choices:    the fixed (deterministic) Sylvester matrix, as llama.cpp, not a randomized
//             H·diag(±1) (whose signs would have to be stored or seeded); values rotated too,
//             as llama.cpp's attn_rot_v (ik_llama.cpp reports far smaller gains for V than for
//             K). max_head_dim = 256 (a power of 4, so the bound above is an exact power of
//             two) covers the head sizes of current models and bounds the encode's stack
//             buffer (1 KiB). name() is "rot_" + Q::name(), built at compile time ("rot_q4_0",
//             "rot_int8").
#pragma once

#include <kvc/core/concepts.hpp>
#include <kvc/core/element.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/simd/convert.hpp>
#include <kvc/simd/hadamard.hpp>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

namespace kvc::quant {

namespace detail {

// "rot_" + Q::name(), as a constant with static storage (name() returns a view of it).
template <class Q>
inline constexpr auto rotated_name = [] {
  constexpr std::string_view prefix = "rot_";
  constexpr std::string_view base = Q::name();
  std::array<char, prefix.size() + base.size()> chars{};
  std::copy(prefix.begin(), prefix.end(), chars.begin());
  std::copy(base.begin(), base.end(), chars.begin() + prefix.size());
  return chars;
}();

template <class Q>
concept HasIntegerScores = requires(std::size_t head_dim) {
  { Q::integer_scores(head_dim) } -> std::convertible_to<bool>;
};
template <class Q>
concept HasIntegerValues = requires(std::size_t head_dim) {
  { Q::integer_values(head_dim) } -> std::convertible_to<bool>;
};

}  // namespace detail

// Q encodes token rows (QuantizesTokens): a quantizer that GroupsKeys (KIVI) keeps fp32
// rows beside its codes that the rotation would not reach.
template <Quantizer Q>
  requires QuantizesTokens<Q>
struct Rotated {
  static constexpr std::size_t max_head_dim = 256;
  static constexpr float sqrt_max_head_dim = 16.0F;
  // The tiles are Q's (the rotation is per query row and output row, not per tile).
  static constexpr bool uniform_tile_cost = UniformTileCost<Q>;

  [[no_unique_address]] Q inner{};

  constexpr Rotated() = default;
  constexpr explicit Rotated(Q quantizer) : inner(std::move(quantizer)) {}

  static constexpr std::string_view name() noexcept {
    return {detail::rotated_name<Q>.data(), detail::rotated_name<Q>.size()};
  }

  constexpr std::size_t key_bytes(std::size_t head_dim) const { return inner.key_bytes(head_dim); }
  constexpr std::size_t value_bytes(std::size_t head_dim) const {
    return inner.value_bytes(head_dim);
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const {
    return simd::is_power_of_two(head_dim) && head_dim <= max_head_dim &&
           static_cast<bool>(inner.supports_head_dim(head_dim));
  }

  // The largest |x| Q stores after the rotation (float's largest when Q has no bound).
  static constexpr float inner_magnitude() noexcept {
    if constexpr (BoundsMagnitude<Q>) {
      return static_cast<float>(Q::max_magnitude());
    } else {
      return std::numeric_limits<float>::max();
    }
  }
  // Any input with every |x| ≤ this rotates to |H·x| ≤ inner_magnitude() (up to rounding,
  // which the encode's clamp absorbs), for every supported head_dim; and the transform's
  // unscaled sums (≤ d·max|x|, kvc/simd/hadamard.hpp) stay finite.
  static constexpr float max_magnitude() noexcept {
    return std::min(inner_magnitude() / sqrt_max_head_dim,
                    std::numeric_limits<float>::max() / static_cast<float>(max_head_dim));
  }

  // Q's integer attend paths see rotated queries and weights only (see the top): forwarded,
  // where Q has them (a template only so that the constraint can drop them otherwise).
  template <detail::HasIntegerScores Inner = Q>
  static constexpr bool integer_scores(std::size_t head_dim) noexcept {
    return Inner::integer_scores(head_dim);
  }
  template <detail::HasIntegerValues Inner = Q>
  static constexpr bool integer_values(std::size_t head_dim) noexcept {
    return Inner::integer_values(head_dim);
  }

  template <Element S>
  void encode_key(const S* source, std::size_t head_dim, std::byte* codes) const {
    if (!fits_buffer(head_dim)) unsupported(head_dim);
    std::array<float, max_head_dim> row;
    rotate(source, head_dim, row.data());
    inner.encode_key(static_cast<const float*>(row.data()), head_dim, codes);
  }
  template <Element S>
  void encode_value(const S* source, std::size_t head_dim, std::byte* codes) const {
    if (!fits_buffer(head_dim)) unsupported(head_dim);
    std::array<float, max_head_dim> row;
    rotate(source, head_dim, row.data());
    inner.encode_value(static_cast<const float*>(row.data()), head_dim, codes);
  }

  void decode_key(const std::byte* codes, std::size_t head_dim, float* out) const {
    inner.decode_key(codes, head_dim, out);
    simd::hadamard(out, head_dim);
  }
  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const {
    inner.decode_value(codes, head_dim, out);
    simd::hadamard(out, head_dim);
  }

  // The tiles are Q's, on the rotated codes: the queries reaching them went through
  // prepare_queries, and the accumulator goes through finish_outputs.
  void score_tile(const ScoreTile& tile) const { inner.score_tile(tile); }
  void accumulate_tile(const AccumulateTile& tile) const { inner.accumulate_tile(tile); }

  void prepare_queries(float* queries, std::size_t rows, std::size_t head_dim) const noexcept {
    simd::hadamard_rows(queries, rows, head_dim);
  }
  void finish_outputs(float* outputs, std::size_t rows, std::size_t head_dim) const noexcept {
    simd::hadamard_rows(outputs, rows, head_dim);
  }

 private:
  // The head_dim check (O(1)) guards the encode's buffer when encode_* is called outside a
  // KvCache, which checks supports_head_dim once, at construction.
  static constexpr bool fits_buffer(std::size_t head_dim) noexcept {
    return head_dim <= max_head_dim && simd::is_power_of_two(head_dim);
  }
  [[noreturn]] static void unsupported(std::size_t head_dim) {
    kvc::detail::fail<UnsupportedError>("{}: encode: head_dim {} is not a power of two ≤ {}",
                                        name(), head_dim, max_head_dim);
  }

  // row = clamp(H · fp32(source), ±inner_magnitude()); NaN passes through.
  template <Element S>
  static void rotate(const S* source, std::size_t head_dim, float* row) noexcept {
    if constexpr (std::is_same_v<S, float>) {
      std::memcpy(row, source, head_dim * sizeof(float));
    } else {
      simd::convert(source, row, head_dim);
    }
    simd::hadamard(row, head_dim);
    constexpr float limit = inner_magnitude();
    for (std::size_t c = 0; c < head_dim; ++c) row[c] = std::min(std::max(row[c], -limit), limit);
  }
};

}  // namespace kvc::quant
