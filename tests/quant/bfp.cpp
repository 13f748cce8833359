// Tests of kvc/quant/bfp.hpp: the bytes by hand, the round trip within half a step (the
// clamped top code within one step) for every configuration, with and without a channel
// permutation, adversarial inputs, the decode against its scalar reference, the tiles plus
// prepare_queries (what KvCache calls) against float64 on the decoded rows, attend end to
// end (with H2O and SnapKV and a budget), the outlier case the permutation exists for, and
// the permutation and head_dim rules.
#include <kvc/quant/bfp.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/dense.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using kvc::quant::Bfp;
using kvc::quant::Dense;
using kvc::test::AsTheCacheCalls;
using kvc::test::check_end_to_end;
using kvc::test::check_same_as_dense;
using kvc::test::Errors;
using kvc::test::errors_vs_original;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using Bfp16x4 = Bfp<16, 4>;
using Bfp16x8 = Bfp<16, 8>;
using Bfp32x4 = Bfp<32, 4>;
using Bfp32x8 = Bfp<32, 8>;
using Permutation = Bfp16x4::Permutation;

static_assert(kvc::Quantizer<Bfp16x4> && kvc::Quantizer<Bfp16x8>);
static_assert(kvc::Quantizer<Bfp32x4> && kvc::Quantizer<Bfp32x8>);
static_assert(kvc::PreparesQueries<Bfp16x4> && !kvc::FinishesOutputs<Bfp16x4>);
static_assert(!kvc::BoundsMagnitude<Bfp32x8>);  // every finite float is storable
static_assert(Bfp16x4::name() == "bfp16_4" && Bfp16x8::name() == "bfp16_8");
static_assert(Bfp32x4::name() == "bfp32_4" && Bfp32x8::name() == "bfp32_8");

std::vector<std::byte> bytes(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

Permutation random_permutation(std::mt19937& rng, std::size_t d) {
  Permutation p(d);
  std::iota(p.begin(), p.end(), std::uint16_t{0});
  std::shuffle(p.begin(), p.end(), rng);
  return p;
}

// The bound of the top comment, from an independent exponent (std::ilogb): per stored block,
// E = clamp(floor(log2 max|x|), −127, 127) (−127 for zeros), step = 2^(E − m + 2);
// |x − x̂| ≤ step/2, or < step where |x| > (2^(m−1) − ½)·step (the clamped top code). Also: the
// exponent bytes are E + 127, decode equals decode_reference bit for bit, and decode_key
// puts stored channel i back at channel π[i].
template <class B>
void check_round_trip(const B& quantizer, const std::vector<float>& x, bool key = true) {
  const std::size_t d = x.size();
  const std::size_t b = B::block_size;
  const int m = static_cast<int>(B::mantissa_bits);
  std::vector<std::byte> codes(quantizer.key_bytes(d) + 1);
  std::byte* row = codes.data() + 1;  // off alignment: byte formats must not care
  std::vector<float> decoded(d), stored(d), reference(d);
  if (key) {
    quantizer.encode_key(x.data(), d, row);
    quantizer.decode_key(row, d, decoded.data());
  } else {
    quantizer.encode_value(x.data(), d, row);
    quantizer.decode_value(row, d, decoded.data());
  }
  B::decode(row, d, stored.data());
  B::decode_reference(row, d, reference.data());
  const auto& p = quantizer.permutation();
  const auto channel = [&](std::size_t i) { return key && !p.empty() ? std::size_t{p[i]} : i; };
  for (std::size_t i = 0; i < d; ++i) {
    REQUIRE(std::memcmp(&stored[i], &reference[i], sizeof(float)) == 0);
    REQUIRE(decoded[channel(i)] == stored[i]);
  }
  for (std::size_t block = 0; block < d / b; ++block) {
    double amax = 0;
    for (std::size_t j = 0; j < b; ++j) {
      amax = std::max(amax, std::abs(double(x[channel(block * b + j)])));
    }
    const int exponent = amax > 0 ? std::clamp(std::ilogb(amax), -127, 127) : -127;
    REQUIRE(static_cast<int>(row[block]) == exponent + 127);
    const double step = std::ldexp(1.0, exponent - m + 2);
    for (std::size_t j = 0; j < b; ++j) {
      const std::size_t i = block * b + j;
      const double value = x[channel(i)];
      REQUIRE(std::isfinite(stored[i]));
      const double error = std::abs(value - double(stored[i]));
      if (std::abs(value) > (std::ldexp(1.0, m - 1) - 0.5) * step) {
        REQUIRE(error < step);
      } else {
        REQUIRE(error <= step / 2);
      }
    }
  }
}

template <class B>
void check_round_trips(const B& quantizer, const std::vector<float>& x) {
  check_round_trip(quantizer, x, true);
  check_round_trip(quantizer, x, false);
}

std::vector<float> random_row(std::mt19937& rng, std::size_t d, float spread,
                              float outlier = 1.0F) {
  std::normal_distribution<float> normal;
  std::vector<float> x(d);
  for (std::size_t c = 0; c < d; ++c) x[c] = normal(rng) * spread * (c % 37 == 5 ? outlier : 1.0F);
  return x;
}

// Keys N(0, 1) except 8 outlier channels spread over the blocks (one per block of 16), each
// of one sign and ~16: 16 · (1 + 0.1·N(0, 1)) (the "massive" key channels of real models).
Tensor3 outlier_keys(std::mt19937& rng, std::size_t heads, std::size_t tokens) {
  std::normal_distribution<float> normal;
  Tensor3 k = random_tensor(rng, heads, tokens, 128);
  for (std::size_t h = 0; h < heads; ++h) {
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c : {3, 21, 38, 55, 70, 86, 101, 119}) {
        k.at(h, t, c) = 16.0F * (1.0F + 0.1F * normal(rng));
      }
    }
  }
  return k;
}

// B with attend always on the exact fp32 path (what the integer path is measured against):
// the checks that compare with a Dense<float> cache token for token need it.
template <class B>
struct ExactTiles : kvc::test::ExactScores<B> {
  using kvc::test::ExactScores<B>::ExactScores;
  void accumulate_tile(const kvc::AccumulateTile& tile) const noexcept {
    kvc::quant::detail::widened_accumulate_tile(tile, B::row_bytes(tile.head_dim), B::decode);
  }
};

// Rows of random bytes (every exponent byte 0..255, every code), then adversarial rows: all
// zero; denormal steps (exponent byte 0, 1, 2) under every code; the largest exponent bytes
// (254, and 255 which encode never writes) under the extreme codes (−2^(m−1) · 2^(E−m+2)
// overflows to −inf there, in the reference as well); all codes negative.
template <class B>
std::vector<std::vector<std::byte>> decode_rows(std::mt19937& rng, std::size_t d) {
  const std::size_t blocks = d / B::block_size, bytes = B::row_bytes(d);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<std::vector<std::byte>> rows;
  for (int i = 0; i < 20; ++i) {
    std::vector<std::byte> row(bytes);
    for (auto& x : row) x = static_cast<std::byte>(byte(rng));
    rows.push_back(row);
  }
  const auto filled = [&](int exponent, int code_byte) {
    std::vector<std::byte> row(bytes, static_cast<std::byte>(code_byte));
    for (std::size_t b = 0; b < blocks; ++b) row[b] = static_cast<std::byte>(exponent);
    return row;
  };
  rows.push_back(filled(0, 0));  // all zero
  for (int exponent : {0, 1, 2, 3, 6, 7, 254, 255}) {
    for (int code_byte : {0x00, 0x77, 0x88, 0x7F, 0x80, 0x81, 0xFF, 0x0F, 0xF0, 0x18}) {
      rows.push_back(filled(exponent, code_byte));
    }
  }
  for (int i = 0; i < 8; ++i) {  // random exponents, every code negative
    std::vector<std::byte> row(bytes);
    for (std::size_t b = 0; b < blocks; ++b) row[b] = static_cast<std::byte>(byte(rng));
    for (std::size_t c = blocks; c < bytes; ++c) {
      row[c] = static_cast<std::byte>(B::mantissa_bits == 8 ? 0x80 | byte(rng) : 0x88 | byte(rng));
    }
    rows.push_back(row);
  }
  return rows;
}

template <class B>
void check_decode_bit_for_bit(unsigned seed) {
  std::mt19937 rng(seed);
  for (int byte = 0; byte < 255; ++byte) {
    REQUIRE(kvc::simd::bfp_steps<B::mantissa_bits>[static_cast<std::size_t>(byte)] ==
            B::step(byte - 127));
  }
  for (std::size_t d : {B::block_size, 2 * B::block_size, std::size_t{96}, std::size_t{128},
                        std::size_t{256}, std::size_t{512}, std::size_t{544}}) {
    if (d % B::block_size != 0) continue;
    for (const auto& stored : decode_rows<B>(rng, d)) {
      std::vector<std::byte> row(stored.size() + 1);  // off alignment
      std::memcpy(row.data() + 1, stored.data(), stored.size());
      std::vector<float> simd(d + 1, -1.0F), value(d + 1, -1.0F), key(d + 1, -1.0F),
          reference(d + 1, -1.0F);
      B::decode(row.data() + 1, d, simd.data());
      B{}.decode_value(row.data() + 1, d, value.data());
      B{}.decode_key(row.data() + 1, d, key.data());
      B::decode_reference(row.data() + 1, d, reference.data());
      INFO(B::name() << ", d = " << d << ", exponent byte " << int(stored[0]));
      REQUIRE(std::memcmp(simd.data(), reference.data(), (d + 1) * sizeof(float)) == 0);
      REQUIRE(std::memcmp(value.data(), reference.data(), (d + 1) * sizeof(float)) == 0);
      REQUIRE(std::memcmp(key.data(), reference.data(), (d + 1) * sizeof(float)) == 0);
    }
  }
}

// The integer tiles against a float64 re-implementation of exactly what they round (each
// query row to int8; per sub-tile of quant::detail::fused_tokens tokens, row and block of
// 32, the weights p · step to u8), to fp32 rounding; and against float64 on the decoded rows
// within the rounding bound: |Δscore| ≤ (s_q/2)·Σ_c|k̂_c|, |Δacc_c| ≤ Σ_j (w_max/255)/2·|q_jc|.
template <class B>
void check_integer_tiles(std::size_t d, std::size_t tokens, std::size_t rows, unsigned seed) {
  using kvc::simd::bfp_steps;
  constexpr std::size_t b = B::block_size;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const B quantizer;
  const std::size_t bytes = B::row_bytes(d);
  std::vector<std::byte> key_codes(1 + tokens * bytes), value_codes(1 + tokens * bytes);
  std::vector<float> x(d), keys(tokens * d), values(tokens * d);
  std::vector<float> queries(rows * d), p(rows * tokens);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t c = 0; c < d; ++c) x[c] = normal(rng) * (c % 29 == 3 ? 12.0F : 1.0F);
    quantizer.encode_key(x.data(), d, key_codes.data() + 1 + t * bytes);
    quantizer.decode_key(key_codes.data() + 1 + t * bytes, d, keys.data() + t * d);
    for (std::size_t c = 0; c < d; ++c) x[c] = normal(rng);
    quantizer.encode_value(x.data(), d, value_codes.data() + 1 + t * bytes);
    quantizer.decode_value(value_codes.data() + 1 + t * bytes, d, values.data() + t * d);
  }
  for (float& q : queries) q = normal(rng);
  for (float& w : p) w = std::abs(normal(rng));
  std::vector<float> scores(rows * (tokens + 3)), acc(rows * d, 0.5F), scratch(tokens * d);
  REQUIRE(B::integer_scores(d));
  kvc::test::score_tile_of(quantizer,
                           kvc::ScoreTile{queries.data(), rows, key_codes.data() + 1, tokens, d,
                                          scores.data(), tokens + 3, scratch.data()});
  quantizer.accumulate_tile(kvc::AccumulateTile{p.data(), rows, tokens, value_codes.data() + 1,
                                                tokens, d, acc.data(), scratch.data()});
  const auto code = [&](const std::vector<std::byte>& codes, std::size_t t, std::size_t c) {
    return B::code_at(codes.data() + 1 + t * bytes, d, c);
  };
  const auto step = [&](const std::vector<std::byte>& codes, std::size_t t, std::size_t block) {
    return double(
        bfp_steps<B::mantissa_bits>[static_cast<std::uint8_t>(codes[1 + t * bytes + block])]);
  };
  std::vector<std::int8_t> q_codes(d);
  for (std::size_t r = 0; r < rows; ++r) {
    float q_scale = 0.0F;
    kvc::simd::reference::quantize_rows_s8(queries.data() + r * d, 1, d, d, q_codes.data(),
                                           &q_scale);
    for (std::size_t j = 0; j < tokens; ++j) {
      double expected = 0, magnitude = 0, exact = 0, exact_magnitude = 0, key_l1 = 0;
      for (std::size_t c = 0; c < d; ++c) {
        const double term = double(q_codes[c]) * code(key_codes, j, c) * step(key_codes, j, c / b);
        expected += term;
        magnitude += std::abs(term);
        exact += double(queries[r * d + c]) * keys[j * d + c];
        exact_magnitude += std::abs(double(queries[r * d + c]) * keys[j * d + c]);
        key_l1 += std::abs(double(keys[j * d + c]));
      }
      const double got = scores[r * (tokens + 3) + j];
      REQUIRE(std::abs(got - expected * q_scale) <= 1e-6 * magnitude * q_scale + 1e-30);
      REQUIRE(std::abs(got - exact) <= double(q_scale) / 2 * key_l1 + 1e-5 * exact_magnitude);
    }
  }
  if (!B::integer_values(d)) return;
  constexpr std::size_t sub = kvc::quant::detail::fused_tokens;
  std::vector<float> weights(sub);
  std::vector<std::uint8_t> weight_codes(sub);
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<double> expected(d, 0.5), bound(d, 0.0);
    for (std::size_t t0 = 0; t0 < tokens; t0 += sub) {
      const std::size_t n = std::min(sub, tokens - t0);
      for (std::size_t block = 0; block < d / b; ++block) {
        for (std::size_t j = 0; j < n; ++j) {
          weights[j] =
              p[r * tokens + t0 + j] * static_cast<float>(step(value_codes, t0 + j, block));
        }
        const float factor =
            kvc::simd::reference::quantize_weights_u8(weights.data(), n, weight_codes.data());
        for (std::size_t c = block * b; c < (block + 1) * b; ++c) {
          double sum = 0, l1 = 0;
          for (std::size_t j = 0; j < n; ++j) {
            sum += double(weight_codes[j]) * code(value_codes, t0 + j, c);
            l1 += std::abs(double(code(value_codes, t0 + j, c)));
          }
          expected[c] += double(factor) * sum;
          bound[c] += double(factor) / 2 * l1;
        }
      }
    }
    kvc::test::require_value_row(p, r, tokens, d, values, expected, bound, acc);
  }
}

}  // namespace

TEST_CASE("Bfp sizes, names and supported head_dims", "[bfp]") {
  // d/b exponent bytes + d·m/8 mantissa bytes, for K and for V.
  for (std::size_t d : {16, 32, 64, 128, 256}) {
    CHECK(Bfp16x4{}.key_bytes(d) == d / 16 + d / 2);
    CHECK(Bfp16x8{}.value_bytes(d) == d / 16 + d);
    if (d % 32 == 0) {
      CHECK(Bfp32x4{}.key_bytes(d) == d / 32 + d / 2);
      CHECK(Bfp32x8{}.value_bytes(d) == d / 32 + d);
    }
  }
  CHECK(Bfp16x4{}.key_bytes(128) == 72);  // Q4_0's
  CHECK(Bfp32x4{}.key_bytes(128) == 68);
  CHECK(Bfp16x8{}.key_bytes(128) == 136);
  CHECK(Bfp32x8{}.key_bytes(128) == 132);  // Int8<>'s
  CHECK(Bfp16x4{}.supports_head_dim(16));
  CHECK(Bfp16x4{}.supports_head_dim(48));
  CHECK(!Bfp16x4{}.supports_head_dim(24));
  CHECK(!Bfp16x4{}.supports_head_dim(0));
  CHECK(!Bfp32x8{}.supports_head_dim(16));
  CHECK(Bfp32x8{}.supports_head_dim(96));
  Permutation p(64);
  std::iota(p.begin(), p.end(), std::uint16_t{0});
  const Bfp16x4 with_permutation(p);
  CHECK(with_permutation.supports_head_dim(64));
  CHECK(!with_permutation.supports_head_dim(128));  // the permutation has 64 channels
  CHECK(!with_permutation.supports_head_dim(32));
  CHECK(Bfp16x4(Permutation{}).supports_head_dim(128));  // empty: the identity, any d
}

TEST_CASE("Bfp writes the documented bytes (hand-computed)", "[bfp]") {
  // max|x| = 7.9 → E = 2 (byte 129 = 0x81). m = 4: step 2^(2−4+2) = 1, q = round(x) ties to
  // even, clamped to ±7: 7.9 → 7 (clamped), −3.4 → −3, 0.5 → 0, 1.5 → 2, 2.5 → 2, −6.5 → −6,
  // −7.6 → −7 (clamped). Nibbles: element 2j low, 2j + 1 high, two's complement.
  std::vector<float> x(32, 0.0F);
  const std::vector<float> head{7.9F, -3.4F, 0.5F, 1.5F, 2.5F, -6.5F, -7.6F};
  std::copy(head.begin(), head.end(), x.begin());
  // Block 1: all 0.25 → E = −2 (byte 125 = 0x7D), step 2^−4: q = 4 (exact); x[17] = −0.25.
  std::fill(x.begin() + 16, x.end(), 0.25F);
  x[17] = -0.25F;
  std::vector<std::byte> codes(Bfp16x4{}.key_bytes(32));
  Bfp16x4{}.encode_key(x.data(), 32, codes.data());
  std::vector<std::byte> expected = bytes({0x81, 0x7D, 0xD7, 0x20, 0xA2, 0x09});
  expected.resize(10, std::byte{0});
  expected.push_back(std::byte{0xC4});  // 4, −4
  expected.resize(18, std::byte{0x44});
  CHECK(codes == expected);
  std::vector<float> decoded(32);
  Bfp16x4{}.decode_key(codes.data(), 32, decoded.data());
  CHECK(std::vector<float>(decoded.begin(), decoded.begin() + 8) ==
        std::vector<float>{7, -3, 0, 2, 2, -6, -7, 0});
  CHECK(decoded[17] == -0.25F);
  CHECK(decoded[31] == 0.25F);

  SECTION("m = 8: step 2^(2−8+2) = 1/16, q = round(16·x)") {
    std::vector<std::byte> codes8(Bfp16x8{}.value_bytes(16));
    Bfp16x8{}.encode_value(x.data(), 16, codes8.data());
    // 126.4 → 126, −54.4 → −54, 8, 24, 40, −104, −121.6 → −122.
    std::vector<std::byte> expected8 =
        bytes({0x81, 126, 256 - 54, 8, 24, 40, 256 - 104, 256 - 122});
    expected8.resize(17, std::byte{0});
    CHECK(codes8 == expected8);
    std::vector<float> decoded8(16);
    Bfp16x8{}.decode_value(codes8.data(), 16, decoded8.data());
    CHECK(decoded8[0] == 7.875F);
    CHECK(decoded8[6] == -7.625F);
  }
  SECTION("a permutation gathers the key's channels into the blocks") {
    // π swaps blocks 0 and 1: stored channel i is channel (i + 16) % 32.
    Permutation p(32);
    for (std::size_t i = 0; i < 32; ++i) p[i] = static_cast<std::uint16_t>((i + 16) % 32);
    const Bfp16x4 swapped(p);
    std::vector<std::byte> permuted(18);
    swapped.encode_key(x.data(), 32, permuted.data());
    CHECK(permuted[0] == std::byte{0x7D});
    CHECK(permuted[1] == std::byte{0x81});
    CHECK(std::equal(permuted.begin() + 2, permuted.begin() + 10, expected.begin() + 10));
    CHECK(std::equal(permuted.begin() + 10, permuted.end(), expected.begin() + 2));
    std::vector<float> back(32);
    swapped.decode_key(permuted.data(), 32, back.data());
    CHECK(back == decoded);
    // Values are never permuted.
    swapped.encode_value(x.data(), 32, permuted.data());
    CHECK(permuted == expected);
    // The query rows are permuted the same way: q'[i] = q[π[i]].
    std::vector<float> q(64);
    std::iota(q.begin(), q.end(), 0.0F);
    swapped.prepare_queries(q.data(), 2, 32);
    for (std::size_t r = 0; r < 2; ++r) {
      for (std::size_t i = 0; i < 32; ++i) REQUIRE(q[r * 32 + i] == float(r * 32 + p[i]));
    }
  }
}

TEST_CASE("Bfp round trip stays within half a step (a step for the clamped top code)", "[bfp]") {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 40; ++trial) {
    const std::size_t d = trial % 3 == 0 ? 64 : 128;
    const float spread = std::ldexp(1.0F, trial % 40 - 20);
    const auto x = random_row(rng, d, spread, trial % 2 ? 40.0F : 1.0F);
    const Bfp16x4 permuted4(random_permutation(rng, d));
    const Bfp32x8 permuted8(random_permutation(rng, d));
    check_round_trips(Bfp16x4{}, x);
    check_round_trips(Bfp32x8{}, x);
    check_round_trips(Bfp16x8{}, x);
    check_round_trips(Bfp32x4{}, x);
    check_round_trips(permuted4, x);
    check_round_trips(permuted8, x);
  }
  SECTION("half and bfloat16 hosts encode as their widened fp32 values") {
    kvc::test::check_host_types_encode_as_widened(Bfp16x4{}, 64, 10);
    kvc::test::check_host_types_encode_as_widened(Bfp32x8{}, 128, 11);
    std::mt19937 prng(12);
    kvc::test::check_host_types_encode_as_widened(Bfp16x4(random_permutation(prng, 64)), 64, 13);
  }
}

TEST_CASE("Bfp adversarial inputs", "[bfp]") {
  std::mt19937 rng(7);
  const Bfp16x4 permuted(random_permutation(rng, 64));
  const auto check_all = [&](const std::vector<float>& x) {
    check_round_trips(Bfp16x4{}, x);
    check_round_trips(Bfp16x8{}, x);
    check_round_trips(Bfp32x4{}, x);
    check_round_trips(Bfp32x8{}, x);
    check_round_trips(permuted, x);
  };
  SECTION("all zeros: exponent byte 0 (E = −127), codes 0, decoded exactly 0") {
    const std::vector<float> x(64, 0.0F);
    check_all(x);
    std::vector<std::byte> codes(Bfp16x4{}.key_bytes(64), std::byte{0x55});
    Bfp16x4{}.encode_key(x.data(), 64, codes.data());
    CHECK(codes == std::vector<std::byte>(36, std::byte{0}));
    std::vector<float> decoded(64, 1.0F);
    permuted.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("constant channels: exact where the constant fits the grid") {
    std::vector<float> x(64, 0.75F);  // E = −1, step 1/8 (m = 4): q = 6
    std::fill(x.begin() + 32, x.end(), -3.0F);
    check_all(x);
    for (std::size_t c = 0; c < 64; c += 2) x[c] = 1.0F / 3.0F;  // not on any grid
    check_all(x);
    std::vector<std::byte> codes(36);
    std::vector<float> decoded(64);
    std::fill(x.begin(), x.end(), -5.0F);
    Bfp16x4{}.encode_value(x.data(), 64, codes.data());
    Bfp16x4{}.decode_value(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("denormals and tiny values: finite, within the bound, E clamped at −127") {
    std::vector<float> x(64);
    for (std::size_t c = 0; c < 16; ++c) x[c] = float(c) * 1e-40F;  // block max < 2^−127
    for (std::size_t c = 16; c < 32; ++c) x[c] = float(c) * std::numeric_limits<float>::min();
    for (std::size_t c = 32; c < 48; ++c) x[c] = -float(c) * 1e-38F;
    x[3] = std::numeric_limits<float>::denorm_min();
    x[60] = std::numeric_limits<float>::denorm_min();
    check_all(x);
    std::vector<std::byte> codes(Bfp32x8{}.key_bytes(64));
    const std::vector<float> smallest(64, std::numeric_limits<float>::denorm_min());
    Bfp32x8{}.encode_key(smallest.data(), 64, codes.data());
    CHECK(codes[0] == std::byte{0});  // E = −127
    std::vector<float> decoded(64, 1.0F);
    Bfp32x8{}.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded[0] == 0.0F);  // 2^−149 / 2^−133 rounds to 0
  }
  SECTION("one huge outlier per row: its block saturates, the other blocks are untouched") {
    for (float huge : {1e30F, std::numeric_limits<float>::max(), -3e38F}) {
      auto x = random_row(rng, 64, 1.0F);
      x[40] = huge;
      check_all(x);
      std::vector<std::byte> codes(Bfp16x4{}.key_bytes(64));
      std::vector<float> decoded(64);
      Bfp16x4{}.encode_key(x.data(), 64, codes.data());
      Bfp16x4{}.decode_key(codes.data(), 64, decoded.data());
      for (float v : decoded) REQUIRE(std::isfinite(v));
      CHECK(decoded[41] == 0.0F);  // under half a step of 2^(E − 2)
    }
    std::vector<float> x(32, 1.0F);
    x[0] = std::numeric_limits<float>::max();  // E = 127 (byte 254), 7.99·2^125 → 7·2^125
    std::vector<std::byte> codes(Bfp32x4{}.key_bytes(32));
    Bfp32x4{}.encode_key(x.data(), 32, codes.data());
    CHECK(codes[0] == std::byte{254});
    std::vector<float> decoded(32);
    Bfp32x4{}.decode_key(codes.data(), 32, decoded.data());
    CHECK(decoded[0] == std::ldexp(7.0F, 125));
  }
  SECTION("a direct encode of ±Inf and NaN (the cache rejects them) is defined") {
    std::vector<float> x(32, 1.0F);
    x[0] = std::numeric_limits<float>::infinity();
    x[1] = -std::numeric_limits<float>::infinity();
    x[2] = std::numeric_limits<float>::quiet_NaN();
    std::vector<std::byte> codes(Bfp32x8{}.key_bytes(32));
    Bfp32x8{}.encode_key(x.data(), 32, codes.data());
    CHECK(codes[0] == std::byte{254});  // E = 127
    std::vector<float> decoded(32);
    Bfp32x8{}.decode_key(codes.data(), 32, decoded.data());
    CHECK(decoded[0] == std::ldexp(127.0F, 121));
    CHECK(decoded[1] == -std::ldexp(127.0F, 121));
    CHECK(decoded[2] == -std::ldexp(127.0F, 121));
    CHECK(decoded[3] == 0.0F);
    x[0] = x[1] = 0.0F;  // NaN alone does not enter the block max
    Bfp32x8{}.encode_value(x.data(), 32, codes.data());
    CHECK(codes[0] == std::byte{127});  // E = 0
  }
}

TEST_CASE("Bfp tiles with prepare_queries match float64 on decoded rows", "[bfp]") {
  using kvc::test::check_tile_kernels;
  std::mt19937 rng(3);
  check_tile_kernels(Bfp16x4{}, 128, 16, 4, 1);
  check_tile_kernels(Bfp32x8{}, 64, 13, 5, 2);
  check_tile_kernels(AsTheCacheCalls<Bfp16x4>{Bfp16x4(random_permutation(rng, 128))}, 128, 16, 4,
                     3);
  check_tile_kernels(AsTheCacheCalls<Bfp32x8>{Bfp32x8(random_permutation(rng, 64))}, 64, 13, 5, 4);
  check_tile_kernels(AsTheCacheCalls<Bfp16x8>{Bfp16x8(random_permutation(rng, 32))}, 32, 7, 2, 5);
  check_tile_kernels(AsTheCacheCalls<Bfp32x4>{Bfp32x4(random_permutation(rng, 256))}, 256, 9, 3, 6);
}

TEST_CASE("Bfp in a KvCache: attend on codes matches float64 on the stored K/V", "[bfp]") {
  check_end_to_end<kvc::evict::Full, Bfp16x4>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::H2O, Bfp16x4>(kvc::evict::H2O({.recent_tokens = 16}),
                                             kvc::Budget::tokens(64), 64);
  check_end_to_end<kvc::evict::SnapKV, Bfp32x8>(kvc::evict::SnapKV({.window = 16}),
                                                kvc::Budget::tokens(64), 64);
}

// These compare with a Dense<float> cache token for token (H2O's kept set follows attend's
// weights), so they run the exact fp32 tiles; the integer tiles are checked above and below.
TEST_CASE("H2O with a permuted Bfp keeps what H2O keeps on the decoded tokens", "[bfp]") {
  std::mt19937 rng(41);
  check_same_as_dense(kvc::evict::H2O({.recent_tokens = 16}),
                      ExactTiles<Bfp16x4>(random_permutation(rng, 64)), 64, false, 12.0F);
  check_same_as_dense(kvc::evict::H2O({.recent_tokens = 8}),
                      ExactTiles<Bfp32x8>(random_permutation(rng, 64)), 48, false, 12.0F);
}

TEST_CASE("SnapKV with a permuted Bfp keeps what SnapKV keeps on the decoded tokens", "[bfp]") {
  // observe() must permute its window queries too: unpermuted, their scores against the
  // permuted keys would be meaningless and SnapKV would keep other tokens.
  std::mt19937 rng(43);
  check_same_as_dense(kvc::evict::SnapKV({.window = 16}),
                      ExactTiles<Bfp16x4>(random_permutation(rng, 64)), 64, true, 12.0F);
  check_same_as_dense(kvc::evict::SnapKV({.window = 16}),
                      ExactTiles<Bfp32x8>(random_permutation(rng, 64)), 64, true, 12.0F);
}

TEST_CASE("Bfp decode (SIMD) equals decode_reference bit for bit, adversarial rows included",
          "[bfp]") {
  check_decode_bit_for_bit<Bfp16x4>(51);
  check_decode_bit_for_bit<Bfp32x4>(52);
  check_decode_bit_for_bit<Bfp16x8>(53);
  check_decode_bit_for_bit<Bfp32x8>(54);
}

TEST_CASE("Bfp integer tiles round only what they state", "[bfp]") {
  if (!kvc::simd::has_int8_dot) return;  // the exact path everywhere: checked above
  check_integer_tiles<Bfp16x4>(128, 100, 5, 61);
  check_integer_tiles<Bfp32x4>(128, 64, 4, 62);
  check_integer_tiles<Bfp16x8>(64, 13, 3, 63);
  check_integer_tiles<Bfp32x8>(256, 70, 4, 64);
  check_integer_tiles<Bfp32x8>(192, 5, 1, 65);
}

TEST_CASE("Bfp with a permutation on the integer path: attend matches float64", "[bfp]") {
  std::mt19937 rng(45);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 128};
  const auto run = [&](auto quantizer) {
    using B = decltype(quantizer);
    kvc::KvCache<kvc::evict::Full, B> cache(geometry, {}, {}, quantizer);
    const auto seq = cache.open_sequence();
    cache.append(seq, 0, random_tensor(rng, 2, 200, 128).view(),
                 random_tensor(rng, 2, 200, 128).view());
    const Tensor3 q = random_tensor(rng, 8, 1, 128);
    Tensor3 out(8, 1, 128);
    cache.attend(seq, 0, q.view(), out.mutable_view());
    // Unpermuted queries against permuted keys would be off by O(1).
    REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < 3e-2);
  };
  run(Bfp16x4(random_permutation(rng, 128)));
  run(Bfp32x8(random_permutation(rng, 128)));
  run(Bfp32x4(random_permutation(rng, 128)));
  run(Bfp16x8(random_permutation(rng, 128)));
}

TEST_CASE("Bfp with a calibrated permutation beats the identity on outlier channels", "[bfp]") {
  // 8 outlier channels (~16, one sign), one in each block of 16 in channel order: with the
  // identity every block's exponent is the outlier's (E = 4, step 4 at m = 4), which rounds
  // the block's 15 other N(0, 1) channels to 0 or ±4. Calibrated on separate keys of the same
  // distribution, K-sort puts the 8 outliers in the last block, so 8 channels instead of 120
  // share an outlier's step. Measured (RMS vs float64 on the original K/V):
  //   bfp16_4: keys 0.801 → 0.381 (2.10×), attention output 0.303 → 0.168 (1.81×)
  //   bfp32_8: keys 0.0655 → 0.0368 (1.78×), attention output 0.0262 → 0.0168 (1.57×)
  // At b = 32 the outliers' block still holds 24 ordinary channels (8 at b = 16), and the
  // values' error (the same either way) is a larger share of the output's: bfp32_8's
  // attention gain is asserted at 1.3× only.
  std::mt19937 rng(31);
  const Tensor3 calibration = outlier_keys(rng, 2, 64);
  const Tensor3 k = outlier_keys(rng, 2, 256);
  const Tensor3 v = random_tensor(rng, 2, 256, 128);
  const Tensor3 q = random_tensor(rng, 8, 4, 128, 2.0F);
  const auto order = Bfp16x4::calibrate_permutation(calibration.data, 2 * 64, 128);
  // The 8 outliers are the last 8 stored channels.
  std::vector<std::uint16_t> last(order.end() - 8, order.end());
  std::sort(last.begin(), last.end());
  CHECK(last == std::vector<std::uint16_t>{3, 21, 38, 55, 70, 86, 101, 119});
  const auto compare = [&](auto identity, auto calibrated, double attention_gain) {
    const Errors plain = errors_vs_original(identity, k, v, q);
    const Errors sorted = errors_vs_original(calibrated, k, v, q);
    INFO(identity.name() << " with outlier channels, RMS errors vs float64 on the original K/V: "
                         << "keys identity " << plain.keys << ", calibrated " << sorted.keys << " ("
                         << plain.keys / sorted.keys << "x); attention identity " << plain.attention
                         << ", calibrated " << sorted.attention << " ("
                         << plain.attention / sorted.attention << "x)");
    CHECK(sorted.keys * 1.5 <= plain.keys);
    CHECK(sorted.attention * attention_gain <= plain.attention);
  };
  compare(Bfp16x4{}, Bfp16x4(order), 1.5);
  compare(Bfp32x8{}, Bfp32x8(order), 1.3);
}

TEST_CASE("Bfp calibrate_permutation sorts channels by norm", "[bfp]") {
  // 2 rows of 4 channels: norms² 0 + 9, 1 + 1, 16 + 0, 1 + 1 → order 1, 3 (tie: lower first),
  // 0, 2.
  const std::vector<float> keys{0, 1, 4, -1, 3, 1, 0, 1};
  CHECK(Bfp16x4::calibrate_permutation(keys, 2, 4) == Permutation{1, 3, 0, 2});
  CHECK_THROWS_AS(Bfp16x4::calibrate_permutation(keys, 3, 4), kvc::ShapeError);
  CHECK_THROWS_AS(Bfp16x4::calibrate_permutation(keys, 8, 0), kvc::ShapeError);
  std::vector<float> bad = keys;
  bad[6] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(Bfp16x4::calibrate_permutation(bad, 2, 4), kvc::ValueError);
}

TEST_CASE("Bfp rejects an invalid permutation with a ValueError naming the entry", "[bfp]") {
  const auto message = [](Permutation p) -> std::string {
    try {
      Bfp16x4 quantizer(std::move(p));
    } catch (const kvc::ValueError& error) {
      return error.what();
    }
    return "";
  };
  CHECK(message({0, 1, 2, 3}).empty());
  CHECK(message({3, 0, 2, 1}).empty());
  CHECK(message({0, 1, 4, 3}) ==
        "bfp16_4: permutation[2] = 4 is not a channel of 0..3 (not a permutation)");
  CHECK(message({0, 1, 2, 1}) ==
        "bfp16_4: permutation[3] = 1 repeats permutation[1] (not a "
        "permutation)");
}

TEST_CASE("Bfp rejects a head_dim that is not a multiple of the block", "[bfp]") {
  CHECK_THROWS_AS((kvc::KvCache<kvc::evict::Full, Bfp16x4>(
                      {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 40})),
                  kvc::UnsupportedError);
  CHECK_THROWS_AS((kvc::KvCache<kvc::evict::Full, Bfp32x8>(
                      {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 48})),
                  kvc::UnsupportedError);
  CHECK_NOTHROW(kvc::KvCache<kvc::evict::Full, Bfp16x4>(
      {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 48}));
  SECTION("a permutation of another size is rejected at construction, and by direct calls") {
    Permutation p(64);
    std::iota(p.begin(), p.end(), std::uint16_t{0});
    std::swap(p[0], p[63]);
    const Bfp16x4 quantizer(p);
    CHECK_THROWS_AS(
        (kvc::KvCache<kvc::evict::Full, Bfp16x4>(
            {.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 128}, {}, {}, quantizer)),
        kvc::UnsupportedError);
    std::vector<float> x(128, 1.0F);
    std::vector<std::byte> codes(quantizer.key_bytes(128));
    CHECK_THROWS_AS(quantizer.encode_key(x.data(), 128, codes.data()), kvc::UnsupportedError);
    CHECK_THROWS_AS(quantizer.decode_key(codes.data(), 128, x.data()), kvc::UnsupportedError);
    CHECK_THROWS_AS(quantizer.prepare_queries(x.data(), 1, 128), kvc::UnsupportedError);
    CHECK_NOTHROW(quantizer.encode_value(x.data(), 128, codes.data()));  // values: no π
  }
}
