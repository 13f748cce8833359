// Tests of kvc/quant/fp8.hpp: byte layout by hand, every code through the quantizer, the
// codes against float64 rounding of x / scale, the round-trip bound, adversarial rows, the
// fused tile kernels, NaN/Inf rejection, and KvCache end to end with H2O and SnapKV.
#include <kvc/quant/fp8.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/dense.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using kvc::quant::Fp8E4M3;
using kvc::quant::Fp8E5M2;
using kvc::test::check_end_to_end;
using kvc::test::check_same_as_dense;
using kvc::test::check_tile_kernels;
using kvc::test::random_tensor;
using kvc::test::Tensor3;

// The OCP value of a code in float64 (finite codes only), from the spec's formula.
template <class Q>
double code_value(unsigned code) {
  constexpr bool e4m3 = Q::format == kvc::quant::Fp8Format::E4M3;
  const int m = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  const int exponent = static_cast<int>((code & 0x7F) >> m);
  const int mantissa = static_cast<int>(code & ((1U << m) - 1));
  const double sign = (code & 0x80) != 0 ? -1.0 : 1.0;
  if (exponent == 0) return sign * std::ldexp(mantissa, 1 - bias - m);
  return sign * std::ldexp(1.0 + std::ldexp(mantissa, -m), exponent - bias);
}

// Saturating round to nearest even in float64 (ties: even code), sign kept.
template <class Q>
std::uint8_t nearest_code(double y) {
  const auto sign = static_cast<unsigned>(std::signbit(y) ? 0x80 : 0);
  if (std::abs(y) >= Q::traits::max) return static_cast<std::uint8_t>(Q::traits::max_code | sign);
  unsigned best = 0;
  double best_error = std::numeric_limits<double>::infinity();
  for (unsigned code = 0; code <= Q::traits::max_code; ++code) {
    const double error = std::abs(code_value<Q>(code) - std::abs(y));
    if (error < best_error || (error == best_error && code % 2 == 0)) {
      best = code;
      best_error = error;
    }
  }
  return static_cast<std::uint8_t>(best | sign);
}

float stored_scale(const std::byte* row) {
  float scale;
  std::memcpy(&scale, row, 4);
  return scale;
}

std::vector<std::byte> bytes(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

// Encodes x (rows of d), then checks per row: the scale is fl(amax / max); each code is the
// float64 nearest-even code of x / scale; the decoded value is within the analytic bound.
template <class Q>
void check_rows(const std::vector<float>& x, std::size_t d) {
  const Q quantizer;
  constexpr double max = Q::traits::max;
  constexpr int m = Q::traits::mantissa_bits;
  const double half_subnormal_step = std::ldexp(1.0, -Q::traits::exponent_bias - m);
  std::vector<std::byte> row(1 + quantizer.key_bytes(d));  // +1: unaligned
  std::vector<float> decoded(d);
  for (std::size_t t = 0; t < x.size() / d; ++t) {
    const float* source = x.data() + t * d;
    quantizer.encode_key(source, d, row.data() + 1);
    quantizer.decode_key(row.data() + 1, d, decoded.data());
    float amax = 0;
    for (std::size_t c = 0; c < d; ++c) amax = std::max(amax, std::abs(source[c]));
    const float scale = stored_scale(row.data() + 1);
    CAPTURE(t, amax, scale);
    if (amax < std::numeric_limits<float>::max()) {
      REQUIRE(scale == amax / static_cast<float>(max));
    }
    for (std::size_t c = 0; c < d; ++c) {
      CAPTURE(c, source[c]);
      const auto code = static_cast<std::uint8_t>(row[1 + 4 + c]);
      const std::uint8_t expected =
          scale > 0 ? nearest_code<Q>(double(source[c]) / double(scale)) : std::uint8_t{0};
      REQUIRE(int(code) == int(expected));
      REQUIRE(std::isfinite(decoded[c]));
      const double y = scale > 0 ? double(source[c]) / scale : 0.0;
      double bound = scale * (std::ldexp(1.0, -(m + 1)) * std::abs(y) + half_subnormal_step) +
                     std::abs(double(decoded[c])) * 0x1p-24 + 0x1p-149;
      // A denormal scale is itself rounded: x / scale may exceed max and saturate.
      if (scale < std::numeric_limits<float>::min()) {
        bound = std::max(bound, double(amax) - max * scale + 0x1p-149);
      }
      REQUIRE(std::abs(double(source[c]) - decoded[c]) <= bound);
    }
  }
}

template <class Q>
void check_rows_all_kinds(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> exponent(-30.0F, 30.0F);
  const std::size_t d = 128;
  std::vector<float> gaussian(32 * d), outlier_channel(32 * d), wide(32 * d);
  for (std::size_t i = 0; i < gaussian.size(); ++i) {
    gaussian[i] = normal(rng);
    outlier_channel[i] = normal(rng) * (i % d == 3 ? 80.0F : 1.0F);
    wide[i] = std::copysign(std::exp2(exponent(rng)), normal(rng));  // format subnormals
  }
  check_rows<Q>(gaussian, d);
  check_rows<Q>(outlier_channel, d);
  check_rows<Q>(wide, d);
  check_rows<Q>(std::vector<float>(gaussian.begin(), gaussian.begin() + 7 * 9), 7);
}

// Every finite code through the whole quantizer: a row holding every finite value of the
// format times 2^k (so scale = 2^k exactly) encodes back to those codes and decodes exactly.
template <class Q>
void check_every_code(int k) {
  const Q quantizer;
  std::vector<float> values;
  std::vector<std::uint8_t> codes;
  for (unsigned code = 0; code < 256; ++code) {
    const bool special =
        Q::format == kvc::quant::Fp8Format::E4M3 ? (code & 0x7F) == 0x7F : (code & 0x7C) == 0x7C;
    if (special) continue;
    codes.push_back(static_cast<std::uint8_t>(code));
    values.push_back(static_cast<float>(std::ldexp(code_value<Q>(code), k)));
  }
  const std::size_t d = values.size();
  std::vector<std::byte> row(quantizer.value_bytes(d));
  std::vector<float> decoded(d);
  quantizer.encode_value(values.data(), d, row.data());
  quantizer.decode_value(row.data(), d, decoded.data());
  REQUIRE(stored_scale(row.data()) == std::ldexp(1.0F, k));
  for (std::size_t c = 0; c < d; ++c) {
    CAPTURE(k, int(codes[c]));
    REQUIRE(int(row[4 + c]) == int(codes[c]));
    REQUIRE(std::memcmp(&decoded[c], &values[c], 4) == 0);  // −0 included
  }
}

template <class Q>
void check_adversarial() {
  const Q quantizer;
  constexpr std::size_t d = 64;
  std::vector<std::byte> row(quantizer.key_bytes(d));
  std::vector<float> decoded(d);
  SECTION("all zeros: scale 0, codes 0, decoded exactly 0") {
    const std::vector<float> x(d, 0.0F);
    std::fill(row.begin(), row.end(), std::byte{0x55});
    quantizer.encode_key(x.data(), d, row.data());
    CHECK(std::all_of(row.begin(), row.end(), [](std::byte b) { return b == std::byte{0}; }));
    quantizer.decode_key(row.data(), d, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("constant channels: every code is ±max and decodes to the constant") {
    std::vector<float> x(d, 0.3F);
    for (std::size_t c = d / 2; c < d; ++c) x[c] = -0.3F;
    check_rows<Q>(x, d);
    quantizer.encode_key(x.data(), d, row.data());
    quantizer.decode_key(row.data(), d, decoded.data());
    for (std::size_t c = 0; c < d; ++c) {
      CHECK(int(row[4 + c]) == int(Q::traits::max_code | (c >= d / 2 ? 0x80 : 0)));
      CHECK(decoded[c] == Approx(x[c]).epsilon(1e-6));
    }
  }
  SECTION("huge outliers: 1e30 and ±FLT_MAX stay finite, the rest keeps the bound") {
    std::vector<float> x(d, 1.0F);
    x[17] = 1e30F;
    check_rows<Q>(x, d);
    quantizer.encode_key(x.data(), d, row.data());
    quantizer.decode_key(row.data(), d, decoded.data());
    CHECK(decoded[17] == Approx(1e30).epsilon(1e-6));
    CHECK(std::abs(decoded[0]) <= 1.0F);  // 1 / scale underflows far below the subnormals
    x[17] = std::numeric_limits<float>::max();
    x[18] = -std::numeric_limits<float>::max();
    check_rows<Q>(x, d);
    quantizer.encode_key(x.data(), d, row.data());
    quantizer.decode_key(row.data(), d, decoded.data());
    CHECK(std::isfinite(decoded[17]));
    CHECK(decoded[17] == Approx(std::numeric_limits<float>::max()).epsilon(1e-6));
    CHECK(decoded[18] == -decoded[17]);
  }
  SECTION("denormal inputs: the scale is denormal or 0, errors stay within the bound") {
    std::vector<float> x(d);
    for (std::size_t c = 0; c < d; ++c) {
      x[c] = static_cast<float>(c % 7) * 1e-40F * (c % 2 != 0 ? 1.0F : -1.0F);
    }
    x[5] = std::numeric_limits<float>::denorm_min();
    check_rows<Q>(x, d);
    std::vector<float> tiny(d, 0.0F);
    tiny[3] = std::numeric_limits<float>::denorm_min();  // scale underflows to 0: codes 0
    check_rows<Q>(tiny, d);
    quantizer.encode_key(tiny.data(), d, row.data());
    CHECK(stored_scale(row.data()) == 0.0F);
    std::vector<float> smallest_normals(d, std::numeric_limits<float>::min());
    check_rows<Q>(smallest_normals, d);
  }
  SECTION("negative zeros and values that round to zero keep their sign") {
    std::vector<float> x(d, 0.0F);
    x[0] = 1.0F;
    x[1] = -0.0F;
    x[2] = -1e-12F;
    quantizer.encode_key(x.data(), d, row.data());
    CHECK(row[4 + 1] == std::byte{0x80});
    CHECK(row[4 + 2] == std::byte{0x80});
    CHECK(row[4 + 3] == std::byte{0x00});
  }
}

template <class Q>
void check_rejects_non_finite() {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
  kvc::KvCache<kvc::evict::Full, Q> cache(geometry, {});
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  cache.append(seq, 0, random_tensor(rng, 2, 3, 8).view(), random_tensor(rng, 2, 3, 8).view());
  const auto before = cache.stats();
  const auto rejects = [&](Tensor3 k, Tensor3 v, const std::string& fragment) {
    try {
      cache.append(seq, 0, k.view(), v.view());
      FAIL("append accepted a non-finite value");
    } catch (const kvc::ValueError& error) {
      CHECK_THAT(error.what(), Catch::Contains(fragment));
    }
    CHECK(cache.tokens_seen(seq, 0) == 3);  // nothing was written
    CHECK(cache.stats().code_bytes == before.code_bytes);
  };
  Tensor3 k = random_tensor(rng, 2, 2, 8), v = random_tensor(rng, 2, 2, 8);
  Tensor3 bad = k;
  bad.at(1, 1, 5) = std::numeric_limits<float>::quiet_NaN();
  rejects(bad, v, "append: k[1][1][5] is nan, kvc stores finite values only");
  bad = v;
  bad.at(0, 0, 0) = std::numeric_limits<float>::infinity();
  rejects(k, bad, "append: v[0][0][0] is inf");
  bad = k;
  bad.at(0, 1, 7) = -std::numeric_limits<float>::infinity();
  rejects(bad, v, "append: k[0][1][7] is -inf");
  // f16 host data: the same check on the host type.
  std::vector<Eigen::half> halves(2 * 2 * 8, Eigen::half(1.0F));
  halves[9] = Eigen::half(std::numeric_limits<float>::infinity());
  const kvc::View<const Eigen::half, 3> half_view(halves.data(), {2, 2, 8});
  CHECK_THROWS_AS(cache.append(seq, 0, half_view, half_view), kvc::ValueError);
  CHECK(cache.tokens_seen(seq, 0) == 3);
  // Every finite float is storable: no max_magnitude().
  bad = k;
  bad.at(0, 0, 0) = std::numeric_limits<float>::max();
  cache.append(seq, 0, bad.view(), v.view());
  CHECK(cache.tokens_seen(seq, 0) == 5);
}

}  // namespace

TEST_CASE("Fp8 sizes: head_dim + 4 bytes per row", "[fp8]") {
  for (std::size_t d : {1, 7, 64, 128, 256}) {
    CHECK(Fp8E4M3{}.key_bytes(d) == d + 4);
    CHECK(Fp8E4M3{}.value_bytes(d) == d + 4);
    CHECK(Fp8E5M2{}.key_bytes(d) == d + 4);
    CHECK(Fp8E5M2{}.value_bytes(d) == d + 4);
    CHECK(Fp8E4M3{}.supports_head_dim(d));
  }
  CHECK(!Fp8E4M3{}.supports_head_dim(0));
  CHECK(!Fp8E5M2{}.supports_head_dim(0));
  CHECK(kvc::Quantizer<Fp8E4M3>);
  CHECK(kvc::Quantizer<Fp8E5M2>);
  CHECK(!kvc::BoundsMagnitude<Fp8E4M3>);
  CHECK(std::is_same_v<Fp8E4M3, kvc::quant::Fp8<kvc::quant::Fp8Format::E4M3>>);
  CHECK(Fp8E4M3::name() == "fp8_e4m3");
  CHECK(Fp8E5M2::name() == "fp8_e5m2");
}

TEST_CASE("Fp8 byte layout by hand: scale first, ties to even, saturating", "[fp8]") {
  SECTION("E4M3") {
    // amax 448 → scale 1.0f; 17 → 16 and 19 → 20 (ties to even), 3·2^-10 → 2^-8 (tie, even),
    // 2^-10 → 0 (tie, even), −1 → 0xB8, −0 → 0x80.
    const std::vector<float> x{448.0F, -1.0F, 0.5F, 17.0F, 19.0F, 0x1.8p-9F, 0x1p-10F, -0.0F};
    std::vector<std::byte> row(12);
    Fp8E4M3{}.encode_key(x.data(), 8, row.data());
    CHECK(row == bytes({0x00, 0x00, 0x80, 0x3F, 0x7E, 0xB8, 0x30, 0x58, 0x5A, 0x02, 0x00, 0x80}));
  }
  SECTION("E5M2") {
    // amax 57344 → scale 1.0f; 1.125 → 1 and 1.375 → 1.5 (ties to even), −2^-16 → 0x81.
    const std::vector<float> x{-57344.0F, 1.0F, 1.125F, 1.375F, -0x1p-16F, 0x1p-14F};
    std::vector<std::byte> row(10);
    Fp8E5M2{}.encode_value(x.data(), 6, row.data());
    CHECK(row == bytes({0x00, 0x00, 0x80, 0x3F, 0xFB, 0x3C, 0x3C, 0x3E, 0x81, 0x04}));
  }
  SECTION("scale = amax / max: a row with amax 1 stores 1 / 448 and codes of 448 x") {
    const std::vector<float> x{1.0F, -0.5F};
    std::vector<std::byte> row(6);
    Fp8E4M3{}.encode_key(x.data(), 2, row.data());
    CHECK(stored_scale(row.data()) == 1.0F / 448.0F);
    CHECK(row[4] == std::byte{0x7E});  // 448
    CHECK(row[5] == std::byte{0xF6});  // −224 = −1.75 · 2^7
  }
}

TEST_CASE("Fp8 encodes every finite code back to itself", "[fp8]") {
  for (int k : {0, -20, 30}) {
    check_every_code<Fp8E4M3>(k);
    check_every_code<Fp8E5M2>(k);
  }
}

TEST_CASE("Fp8 codes are the float64 nearest-even codes of x / scale, within the bound", "[fp8]") {
  check_rows_all_kinds<Fp8E4M3>(31);
  check_rows_all_kinds<Fp8E5M2>(32);
  SECTION("half and bfloat16 hosts encode as their widened fp32 values") {
    kvc::test::check_host_types_encode_as_widened(Fp8E4M3{}, 128, 12);
    kvc::test::check_host_types_encode_as_widened(Fp8E5M2{}, 71, 13);
  }
}

TEST_CASE("Fp8E4M3 adversarial inputs", "[fp8]") {
  check_adversarial<Fp8E4M3>();
}

TEST_CASE("Fp8E5M2 adversarial inputs", "[fp8]") {
  check_adversarial<Fp8E5M2>();
}

TEST_CASE("Fp8 tile kernels on codes match float64 on the decoded values", "[fp8]") {
  check_tile_kernels(Fp8E4M3{}, 128, 16, 4, 1);
  check_tile_kernels(Fp8E4M3{}, 128, 13, 5, 2);
  check_tile_kernels(Fp8E4M3{}, 71, 9, 3, 3);
  check_tile_kernels(Fp8E4M3{}, 4, 5, 9, 4);  // more rows than channels: weights in chunks
  check_tile_kernels(Fp8E5M2{}, 128, 16, 8, 5);
  check_tile_kernels(Fp8E5M2{}, 64, 1, 1, 6);
  check_tile_kernels(Fp8E5M2{}, 3, 7, 10, 7);
}

TEST_CASE("Fp8 caches reject NaN and Inf with a ValueError and stay unchanged", "[fp8]") {
  check_rejects_non_finite<Fp8E4M3>();
  check_rejects_non_finite<Fp8E5M2>();
}

TEST_CASE("Fp8 in a KvCache: attend on codes matches float64 on the stored K/V", "[fp8]") {
  check_end_to_end<kvc::evict::Full, Fp8E4M3>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::Full, Fp8E5M2>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::H2O, Fp8E4M3>(kvc::evict::H2O({.recent_tokens = 16}),
                                             kvc::Budget::tokens(64), 64);
  check_end_to_end<kvc::evict::SnapKV, Fp8E5M2>(kvc::evict::SnapKV({.window = 16}),
                                                kvc::Budget::tokens(64), 64);
}

TEST_CASE("H2O with Fp8E4M3 keeps what H2O keeps on the decoded tokens", "[fp8]") {
  check_same_as_dense(kvc::evict::H2O({.recent_tokens = 16}), Fp8E4M3{}, 64, false);
}

TEST_CASE("SnapKV with Fp8E5M2 keeps what SnapKV keeps on the decoded tokens", "[fp8]") {
  check_same_as_dense(kvc::evict::SnapKV({.window = 16}), Fp8E5M2{}, 64, true);
}
