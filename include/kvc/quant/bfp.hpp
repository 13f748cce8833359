// kvc/quant/bfp.hpp — quant::Bfp<BlockSize, MantissaBits>: block floating point, with the key
// channels reordered so that channels of similar magnitude (outliers together) share blocks.
//
// Paper:      Trukhanov & Soloveychik, "Accurate Block Quantization in LLMs with Outliers", 2024
//             (arXiv 2403.20137): BFP keys lose their small channels to the few outlier
//             channels that set each block's exponent; permuting K's channels by a calibrated
//             order ("K-sort": sort channels by norm) puts the outliers in blocks of their own,
//             and permuting q the same way keeps q·k unchanged, so nothing is undone at attend.
// Format:     per token and kv head, for the key and for the value alike, head_dim = d, b =
//             BlockSize (16 or 32), m = MantissaBits (4 or 8):
//               [uint8 exponent × d/b][mantissas: d·m/8 bytes]          (exponents first)
//             key_bytes = value_bytes = d/b + d·m/8 (d = 128: bfp16_4 72 = Q4_0's, bfp32_4 68,
//             bfp16_8 136, bfp32_8 132 = Int8<>'s). Block i holds stored channels
//             [b·i, b·i + b). Exponent byte = E + 127, where E = floor(log2 max|x|) over the
//             block, clamped to [−127, 127] (bytes 0..254; 255 is never written); an all-zero
//             block stores E = −127 (byte 0) and codes 0. Mantissas are signed integers q in
//             [−(2^(m−1) − 1), 2^(m−1) − 1] (±7 or ±127; the code −2^(m−1) is never written),
//             two's complement: m = 8 one int8 per element; m = 4 two per byte, stored element
//             2j in the low nibble of byte j, element 2j + 1 in the high nibble.
// Keeps:      x̂ = q · 2^(E − m + 2), q = clamp(round(x · 2^−(E − m + 2)), ±(2^(m−1) − 1)),
//             round = std::nearbyint (ties to even). With step = 2^(E − m + 2):
//             |x − x̂| ≤ step / 2 = 2^E · 2^−(m−1), except for the clamped top code: |x| >
//             (2^(m−1) − ½)·step (within half a step of max|x| < 2^(E+1) = 2^(m−1)·step)
//             get |x − x̂| < step. Decoding is exact in fp32 (q ≤ 127 times a power
//             of two ≥ 2^−133). A block whose max is below 2^−127 (denormals) keeps E = −127,
//             so its step is 2^−129 (m = 4) or 2^−133 (m = 8) and the bound still holds.
//             Keys are stored permuted: stored channel i of every key row is channel π[i], so a
//             block groups the channels π puts together (measured in tests/quant/bfp.cpp: on
//             keys with 8 outlier channels, one per block of 16, calibrated π vs the identity
//             gives 2.1× less key error and 1.8× less attention-output error with bfp16_4,
//             1.8× / 1.6× with bfp32_8). decode_key un-permutes (export_dense,
//             merging and scorers that read stored keys see channel order); values are stored
//             in channel order (no inverse is needed on the output).
// Needs:      head_dim % BlockSize == 0, and, where a permutation was given, permutation.size()
//             == head_dim (supports_head_dim checks both; KvCache at construction). attend and
//             observe call prepare_queries (q'[i] = q[π[i]]: q'·k' = q·k) on the query rows
//             before any score tile (PreparesQueries); KvCache does.
// Cost/step:  append: one pass per row (max, then round; the key gathers its channels
//             through π). attend: one in-place permutation per query row of the block (cycle
//             walk, no buffer), independent of the tokens stored. Where the target has
//             AVX-512 VNNI (integer_scores / integer_values), the tiles work on int8 codes
//             (m = 4: nibbles expanded to int8 in the caller's L1 scratch, simd::expand_nibbles):
//             scores: each query row rounded to int8 (one scale per row, as Int8<>), q̂·k per
//             block exact in int32 (vpdpbusd, simd::dot_s8_scaled), times the block's step
//             and summed in fp32 (head_dim % 64 == 0, ≤ 256); score error ≤ (m_q/254)·Σ|k̂|.
//             Values, BlockSize 32: the tile's softmax weights × each block's step rounded to
//             u8 per block (quant/int8_fused.hpp, as Q8_0), error ≤ 1/510 of the tile's
//             largest; BlockSize 16 keeps the exact fp32 values path (a u8 weight row per
//             16 channels costs as much as the fp32 FMAs it saves). Measured at 16K, GQA 4
//             (bench/attend.cpp): bfp16_4 and bfp32_8 faster than Dense<half>. Elsewhere, and
//             for tiles that ask for exact scores (observe), the tiles widen one page tile
//             (q · step → fp32, simd::dequantize_bfp: nibbles expanded, then
//             simd::dequantize_int8) into the caller's L1 scratch and reuse simd::dot_block /
//             simd::axpy_block: exact fp32 functions of the stored codes. decode is bit for
//             bit decode_reference (the plain scalar twin, ldexp), which tests compare.
// Range:      any finite float: E ≤ 127, so x̂ ≤ 127 · 2^121 or 7 · 2^125 < FLT_MAX. The cache
//             rejects NaN / ±Inf before encoding (check_finite); a direct encode of one is
//             still defined: ±Inf sets E = 127 and saturates to ±max code, NaN gets the code
//             −(2^(m−1) − 1) (std::fmax / fmin drop it) and does not enter the block max.
// Choices:    one permutation per cache (Bfp holds it; default: the identity, stored as an
//             empty vector, which fits every head_dim % BlockSize == 0). The paper calibrates
//             per layer; a per-(layer, kv head) permutation would need the layer and head in
//             encode_key / prepare_queries, which the Quantizer concept does not pass — a
//             permutation calibrated on keys of every layer and head (stacked as rows) serves
//             all of them. calibrate_permutation sorts channels by their L2 norm over the
//             calibration rows, ascending (ties: the lower channel first), the paper's K-sort:
//             the largest channels end up together in the last block(s). The exponent is
//             floor(log2 max|x|) (as OCP MX's shared scale) with clamped codes, rather than a
//             one-larger exponent that never clamps (which doubles every block's step whenever
//             the max's significand ≥ 2 − 2^(1−m)). Symmetric codes, so zero and sign flips are
//             exact; ties to even, as Int8. −0 decodes as +0.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/int8_fused.hpp>
#include <kvc/quant/token_codec.hpp>
#include <kvc/simd/bfp.hpp>
#include <kvc/simd/int8.hpp>
#include <kvc/simd/int8_dot.hpp>
#include <kvc/simd/kernels.hpp>
#include <kvc/simd/quantize.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace kvc::quant {

template <std::size_t BlockSize, unsigned MantissaBits>
class Bfp {
  static_assert(BlockSize == 16 || BlockSize == 32, "quant::Bfp: BlockSize is 16 or 32");
  static_assert(MantissaBits == 4 || MantissaBits == 8, "quant::Bfp: MantissaBits is 4 or 8");

 public:
  // Stored channel i of a key row is channel permutation[i].
  using Permutation = std::vector<std::uint16_t>;

  static constexpr std::size_t block_size = BlockSize;
  static constexpr unsigned mantissa_bits = MantissaBits;
  static constexpr int max_code = (1 << (MantissaBits - 1)) - 1;  // 7 or 127
  static constexpr int exponent_bias = 127;
  static constexpr int min_exponent = -127;
  static constexpr int max_exponent = 127;
  static constexpr std::size_t max_channels = std::size_t{1} << 16;  // what uint16 indexes

  static constexpr std::string_view name() noexcept {
    if constexpr (BlockSize == 16 && MantissaBits == 4) {
      return "bfp16_4";
    } else if constexpr (BlockSize == 16) {
      return "bfp16_8";
    } else if constexpr (MantissaBits == 4) {
      return "bfp32_4";
    } else {
      return "bfp32_8";
    }
  }

  // The identity permutation, for any head_dim % BlockSize == 0.
  Bfp() = default;

  // Keys stored through `permutation` (a permutation of 0..d−1; empty: the identity).
  explicit Bfp(Permutation permutation) : permutation_(checked(std::move(permutation))) {
    cycle_leaders_ = leaders(permutation_);
  }

  const Permutation& permutation() const noexcept { return permutation_; }

  // Channels of `keys` ([tokens][d] row-major, e.g. the keys of every layer and kv head of
  // a calibration prompt, stacked) sorted by L2 norm over the rows, ascending (ties: the
  // lower channel first). Throws ShapeError on a size mismatch, ValueError on NaN / Inf.
  static Permutation calibrate_permutation(std::span<const float> keys, std::size_t tokens,
                                           std::size_t d) {
    if (d == 0 || d > max_channels) {
      kvc::detail::fail<ShapeError>("{}: calibrate_permutation: d is {}, expected 1..{}", name(), d,
                                    max_channels);
    }
    if (keys.size() != tokens * d) {
      kvc::detail::fail<ShapeError>(
          "{}: calibrate_permutation: keys has {} values, tokens × d = {} × {} = {}", name(),
          keys.size(), tokens, d, tokens * d);
    }
    std::vector<double> norm2(d, 0.0);
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c = 0; c < d; ++c) {
        const float x = keys[t * d + c];
        if (!std::isfinite(x)) {
          kvc::detail::fail<ValueError>(
              "{}: calibrate_permutation: keys[{}][{}] is {}, expected a finite value", name(), t,
              c, x);
        }
        norm2[c] += double(x) * double(x);
      }
    }
    Permutation order(d);
    std::iota(order.begin(), order.end(), std::uint16_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::uint16_t a, std::uint16_t b) { return norm2[a] < norm2[b]; });
    return order;
  }

  static constexpr std::size_t blocks(std::size_t head_dim) noexcept {
    return head_dim / BlockSize;
  }
  static constexpr std::size_t row_bytes(std::size_t head_dim) noexcept {
    return blocks(head_dim) + head_dim * MantissaBits / 8;
  }
  constexpr std::size_t key_bytes(std::size_t head_dim) const noexcept {
    return row_bytes(head_dim);
  }
  constexpr std::size_t value_bytes(std::size_t head_dim) const noexcept {
    return row_bytes(head_dim);
  }
  constexpr bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim > 0 && head_dim % BlockSize == 0 &&
           (permutation_.empty() || permutation_.size() == head_dim);
  }

  // E = floor(log2 amax), clamped to [min_exponent, max_exponent]; 0 (and NaN) give
  // min_exponent, +Inf max_exponent.
  static int block_exponent(float amax) noexcept {
    if (!(amax > 0.0F)) return min_exponent;
    if (!(amax <= std::numeric_limits<float>::max())) return max_exponent;
    int exponent = 0;
    static_cast<void>(std::frexp(amax, &exponent));  // amax = f · 2^exponent, f ∈ [0.5, 1)
    return std::clamp(exponent - 1, min_exponent, max_exponent);
  }
  // The block's step 2^(E − m + 2), exact (a denormal for E < −124 (m = 4) / −120 (m = 8)).
  static constexpr float step(int exponent) noexcept {
    return power_of_two(exponent - static_cast<int>(MantissaBits) + 2);
  }
  template <Element S>
  void encode_key(const S* source, std::size_t head_dim, std::byte* codes) const {
    if (permutation_.empty()) {
      encode_rows(source, head_dim, codes, [](std::size_t i) { return i; });
    } else {
      check_permutation(head_dim, "encode_key");
      const std::uint16_t* pi = permutation_.data();
      encode_rows(source, head_dim, codes, [pi](std::size_t i) { return std::size_t{pi[i]}; });
    }
  }
  template <Element S>
  void encode_value(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    encode_rows(source, head_dim, codes, [](std::size_t i) { return i; });
  }

  // Channel order: out[π[i]] = stored channel i.
  void decode_key(const std::byte* codes, std::size_t head_dim, float* out) const {
    if (permutation_.empty()) {
      decode(codes, head_dim, out);
      return;
    }
    check_permutation(head_dim, "decode_key");
    std::array<float, BlockSize> block_values;
    for (std::size_t block = 0; block < blocks(head_dim); ++block) {
      decode_block(codes, head_dim, block, block_values.data());
      for (std::size_t j = 0; j < BlockSize; ++j) {
        out[permutation_[block * BlockSize + j]] = block_values[j];
      }
    }
  }
  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    decode(codes, head_dim, out);
  }

  // q'[i] = q[π[i]] for each row, in place: q'·k' = q·k for the stored (permuted) keys.
  void prepare_queries(float* queries, std::size_t rows, std::size_t head_dim) const {
    if (permutation_.empty()) return;
    check_permutation(head_dim, "prepare_queries");
    for (std::size_t r = 0; r < rows; ++r) {
      float* q = queries + r * head_dim;
      for (const std::uint16_t leader : cycle_leaders_) {
        const float first = q[leader];
        std::size_t i = leader;
        while (permutation_[i] != leader) {
          q[i] = q[permutation_[i]];
          i = permutation_[i];
        }
        q[i] = first;
      }
    }
  }

  // Whether attend takes the integer path for this head_dim (AVX-512 VNNI; elsewhere the
  // exact fp32 path). Scores: each query row rounded to int8 (one scale per row), q̂·k per
  // block in int32 (simd::dot_s8_scaled), scaled by the block's step in fp32 (head_dim a
  // multiple of 64 up to 256). Values (BlockSize 32): the tile's softmax weights times each
  // block's step rounded to u8 per block (quant/int8_fused.hpp, as Int8<32> and Q8_0).
  static constexpr bool integer_scores(std::size_t head_dim) noexcept {
    return simd::dot_s8_scaled_fits(head_dim, BlockSize) && head_dim % BlockSize == 0;
  }
  static constexpr bool integer_values(std::size_t head_dim) noexcept {
    return BlockSize == 32 && detail::int8_fused_fits(head_dim);
  }

  // The tiles read the stored rows (keys in stored order: the queries were permuted).
  void score_tile(const ScoreTile& tile) const noexcept {
    if (integer_scores(tile.head_dim) && !tile.exact) {
      integer_score_tile(tile);
    } else {
      detail::widened_score_tile(tile, row_bytes(tile.head_dim), decode);
    }
  }
  void accumulate_tile(const AccumulateTile& tile) const noexcept {
    if constexpr (BlockSize == 32) {
      if (integer_values(tile.head_dim)) {
        integer_accumulate_tile(tile);
        return;
      }
    }
    detail::widened_accumulate_tile(tile, row_bytes(tile.head_dim), decode);
  }

  // One row in stored order (no permutation), the fast path the tiles use; bit for bit
  // decode_reference (simd::dequantize_bfp: q · step, exact in fp32).
  static void decode(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    simd::dequantize_bfp<BlockSize, MantissaBits>(codes, out, head_dim);
  }

  // The scalar reference of decode: x̂ = ldexp(q, E − m + 2), element by element.
  static void decode_reference(const std::byte* codes, std::size_t head_dim, float* out) noexcept {
    for (std::size_t i = 0; i < head_dim; ++i) {
      const int exponent =
          static_cast<int>(static_cast<unsigned>(codes[i / BlockSize])) - exponent_bias;
      out[i] = std::ldexp(static_cast<float>(code_at(codes, head_dim, i)),
                          exponent - static_cast<int>(MantissaBits) + 2);
    }
  }

  // Stored element i's mantissa code.
  static int code_at(const std::byte* codes, std::size_t head_dim, std::size_t i) noexcept {
    const std::byte* mantissas = codes + blocks(head_dim);
    if constexpr (MantissaBits == 8) {
      return static_cast<std::int8_t>(mantissas[i]);
    } else {
      const auto byte = static_cast<unsigned>(mantissas[i / 2]);
      return i % 2 == 0 ? low_nibble(byte) : high_nibble(byte);
    }
  }

 private:
  Permutation permutation_;
  std::vector<std::uint16_t> cycle_leaders_;  // the smallest channel of each cycle of length > 1

  // 2^s for s ∈ [−149, 127], from its bits.
  static constexpr float power_of_two(int s) noexcept {
    return s >= -126 ? std::bit_cast<float>(static_cast<std::uint32_t>(s + 127) << 23)
                     : std::bit_cast<float>(std::uint32_t{1} << (s + 149));
  }
  // A 4-bit two's complement field, sign-extended.
  static int low_nibble(unsigned byte) noexcept {
    return static_cast<int>(static_cast<std::int8_t>(static_cast<std::uint8_t>(byte << 4))) >> 4;
  }
  static int high_nibble(unsigned byte) noexcept {
    return static_cast<int>(static_cast<std::int8_t>(static_cast<std::uint8_t>(byte))) >> 4;
  }

  // Stored channels [b·block, b·block + b) of a row.
  static void decode_block(const std::byte* codes, std::size_t head_dim, std::size_t block,
                           float* out) noexcept {
    const std::byte* mantissas = codes + blocks(head_dim);
    const float block_step = simd::bfp_steps<MantissaBits>[static_cast<std::uint8_t>(codes[block])];
    if constexpr (MantissaBits == 8) {
      simd::dequantize_int8(reinterpret_cast<const std::int8_t*>(mantissas + block * BlockSize),
                            block_step, out, BlockSize);
    } else {
      std::array<std::int8_t, BlockSize> q;
      simd::expand_nibbles(mantissas + block * (BlockSize / 2), q.data(), BlockSize);
      simd::dequantize_int8(q.data(), block_step, out, BlockSize);
    }
  }

  // Where the int8 codes and steps of a row are, for quant/int8_fused.hpp: a stored m = 8
  // row, or a m = 4 row expanded to [exponent bytes][int8 codes] (the steps stay m = 4's).
  struct StepLayout {
    std::size_t stride, code_offset, chunk_stride, chunks_per_scale;
    static float scale(const std::byte* row, std::size_t s) noexcept {
      return simd::bfp_steps<MantissaBits>[static_cast<std::uint8_t>(row[s])];
    }
  };

  // Per sub-tile of detail::fused_tokens tokens: the steps of every block (from the
  // exponent bytes), the key codes as int8 (m = 4: expanded into the scratch), and per
  // block of up to 4 query rows: s[r][j] = sq_r · Σ_b step_jb · Σ_{c in b} q̂[r][c]·k[j][c].
  static void integer_score_tile(const ScoreTile& tile) noexcept {
    constexpr std::size_t sub = detail::fused_tokens;
    constexpr std::size_t max_d = detail::fused_max_head_dim;
    const std::size_t d = tile.head_dim;
    const std::size_t count = blocks(d);
    const std::size_t stride = row_bytes(d);
    std::array<float, sub*(max_d / BlockSize)> steps;
    // m = 4: the sub-tile's codes as int8 rows of d (sub · d bytes ≤ the scratch's floats).
    auto* expanded = reinterpret_cast<std::int8_t*>(tile.scratch);
    for (std::size_t t0 = 0; t0 < tile.tokens; t0 += sub) {
      const std::size_t tokens = std::min(sub, tile.tokens - t0);
      const std::byte* rows = tile.key_codes + t0 * stride;
      for (std::size_t j = 0; j < tokens; ++j) {
        for (std::size_t b = 0; b < count; ++b) {
          steps[j * count + b] =
              simd::bfp_steps<MantissaBits>[static_cast<std::uint8_t>(rows[j * stride + b])];
        }
      }
      const std::int8_t* codes = reinterpret_cast<const std::int8_t*>(rows + count);
      std::size_t ldk = stride;
      if constexpr (MantissaBits == 4) {
        for (std::size_t j = 0; j < tokens; ++j) {
          simd::expand_nibbles(rows + j * stride + count, expanded + j * d, d);
        }
        codes = expanded;
        ldk = d;
      }
      detail::block_scaled_scores(tile, t0, codes, tokens, ldk, steps.data(), BlockSize, count);
    }
  }

  // BlockSize 32: one block per 32-channel chunk of the integer kernels, its step the
  // chunk's scale. m = 8 reads the stored codes; m = 4 expands the tile's rows first into
  // [exponent bytes][int8 codes] rows in the scratch (tokens · (d/32 + d) bytes).
  static void integer_accumulate_tile(const AccumulateTile& tile) noexcept {
    const std::size_t d = tile.head_dim;
    const std::size_t count = blocks(d);
    if constexpr (MantissaBits == 8) {
      detail::int8_fused_accumulate(tile, StepLayout{row_bytes(d), count, BlockSize, 1});
    } else {
      auto* rows = reinterpret_cast<std::byte*>(tile.scratch);
      const std::size_t stride = count + d;
      for (std::size_t j = 0; j < tile.tokens; ++j) {
        const std::byte* row = tile.value_codes + j * row_bytes(d);
        std::memcpy(rows + j * stride, row, count);
        simd::expand_nibbles(row + count, reinterpret_cast<std::int8_t*>(rows + j * stride + count),
                             d);
      }
      AccumulateTile expanded = tile;
      expanded.value_codes = rows;
      detail::int8_fused_accumulate(expanded, StepLayout{stride, count, BlockSize, 1});
    }
  }

  // Stored element i is source[channel(i)].
  template <Element S, class Channel>
  static void encode_rows(const S* source, std::size_t head_dim, std::byte* codes,
                          Channel channel) noexcept {
    std::byte* mantissas = codes + blocks(head_dim);
    std::array<float, BlockSize> x;
    std::array<std::int8_t, BlockSize> q;
    for (std::size_t block = 0; block < blocks(head_dim); ++block) {
      for (std::size_t j = 0; j < BlockSize; ++j) {
        x[j] = static_cast<float>(source[channel(block * BlockSize + j)]);
      }
      const int exponent = block_exponent(simd::max_abs(x.data(), BlockSize));  // NaN ignored
      codes[block] = static_cast<std::byte>(exponent + exponent_bias);
      // q = clamp(round(x / step), ±max_code) (ties to even); NaN → −max_code.
      simd::quantize_div(x.data(), BlockSize, step(exponent), static_cast<float>(max_code),
                         MantissaBits == 8
                             ? reinterpret_cast<std::int8_t*>(mantissas + block * BlockSize)
                             : q.data());
      if constexpr (MantissaBits == 4) {
        for (std::size_t j = 0; j < BlockSize / 2; ++j) {
          const auto low = static_cast<unsigned>(q[2 * j]) & 15U;
          const auto high = static_cast<unsigned>(q[2 * j + 1]) & 15U;
          mantissas[block * (BlockSize / 2) + j] = static_cast<std::byte>(low | (high << 4));
        }
      }
    }
  }

  // O(1): a direct call outside a KvCache (which checks supports_head_dim once) must not
  // index past the row with a permutation of another size.
  void check_permutation(std::size_t head_dim, const char* function) const {
    if (permutation_.size() != head_dim) {
      kvc::detail::fail<UnsupportedError>("{}: {}: head_dim {}, the permutation has {} channels",
                                          name(), function, head_dim, permutation_.size());
    }
  }

  static Permutation checked(Permutation permutation) {
    const std::size_t n = permutation.size();
    if (n > max_channels) {
      kvc::detail::fail<ValueError>("{}: permutation has {} entries, at most {}", name(), n,
                                    max_channels);
    }
    std::vector<std::size_t> seen_at(n, n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t c = permutation[i];
      if (c >= n) {
        kvc::detail::fail<ValueError>(
            "{}: permutation[{}] = {} is not a channel of 0..{} (not a permutation)", name(), i, c,
            n - 1);
      }
      if (seen_at[c] != n) {
        kvc::detail::fail<ValueError>(
            "{}: permutation[{}] = {} repeats permutation[{}] (not a permutation)", name(), i, c,
            seen_at[c]);
      }
      seen_at[c] = i;
    }
    return permutation;
  }

  static std::vector<std::uint16_t> leaders(const Permutation& permutation) {
    std::vector<std::uint16_t> result;
    std::vector<bool> visited(permutation.size(), false);
    for (std::size_t c = 0; c < permutation.size(); ++c) {
      if (visited[c] || permutation[c] == c) continue;
      result.push_back(static_cast<std::uint16_t>(c));
      for (std::size_t i = c; !visited[i]; i = permutation[i]) visited[i] = true;
    }
    return result;
  }
};

}  // namespace kvc::quant
