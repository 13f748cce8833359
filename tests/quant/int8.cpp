// Tests of kvc/quant/int8.hpp: byte layout by hand, the round-trip bound, the fused tile
// kernels against float64 on the decoded values, adversarial inputs and KvCache end to end.
#include <kvc/quant/int8.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/h2o.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using kvc::test::check_end_to_end;
using kvc::test::check_tile_kernels;

using kvc::test::random_tensor;
using kvc::test::Tensor3;

std::vector<std::byte> encode_keys(const auto& quantizer, const std::vector<float>& x,
                                   std::size_t d) {
  const std::size_t bytes = quantizer.key_bytes(d);
  // One spare byte in front: a token's codes are not aligned inside a page.
  std::vector<std::byte> codes(1 + x.size() / d * bytes);
  for (std::size_t t = 0; t < x.size() / d; ++t) {
    quantizer.encode_key(x.data() + t * d, d, codes.data() + 1 + t * bytes);
  }
  return codes;
}

float stored_scale(const std::byte* codes, std::size_t g) {
  float scale = 0;
  std::memcpy(&scale, codes + 4 * g, 4);
  return scale;
}

// |x − x̂| ≤ max(scale / 2, amax − 127 · scale): half a step, or what the ±127 clamp loses
// when the scale itself was rounded (denormal). Plus one fp32 rounding of scale · q.
template <std::size_t G>
void check_round_trip(const std::vector<float>& x, std::size_t d) {
  const kvc::quant::Int8<G> int8;
  const std::size_t size = int8.group_size(d);
  const auto codes = encode_keys(int8, x, d);
  std::vector<float> decoded(d);
  for (std::size_t t = 0; t < x.size() / d; ++t) {
    const std::byte* token = codes.data() + 1 + t * int8.key_bytes(d);
    int8.decode_key(token, d, decoded.data());
    for (std::size_t c = 0; c < d; ++c) {
      const float scale = stored_scale(token, c / size);
      double amax = 0;
      for (std::size_t i = c / size * size; i < (c / size + 1) * size; ++i) {
        amax = std::max(amax, std::abs(double(x[t * d + i])));
      }
      const double bound =
          std::max(scale / 2.0, amax - 127.0 * scale) + std::abs(double(decoded[c])) * 6e-8 + 1e-45;
      REQUIRE(std::isfinite(decoded[c]));
      REQUIRE(std::abs(double(x[t * d + c]) - decoded[c]) <= bound);
    }
  }
}

}  // namespace

TEST_CASE("Int8 sizes: head_dim + 4 bytes per scale", "[int8]") {
  const kvc::quant::Int8<> per_token;
  const kvc::quant::Int8<32> per_group;
  CHECK(per_token.key_bytes(128) == 132);
  CHECK(per_token.value_bytes(128) == 132);
  CHECK(per_token.key_bytes(7) == 11);
  CHECK(per_group.key_bytes(128) == 128 + 4 * 4);
  CHECK(per_group.value_bytes(64) == 64 + 4 * 2);
  CHECK(per_token.supports_head_dim(7));
  CHECK(!per_token.supports_head_dim(0));
  CHECK(per_group.supports_head_dim(96));
  CHECK(!per_group.supports_head_dim(48));
  CHECK(kvc::Quantizer<kvc::quant::Int8<>>);
  CHECK(kvc::Quantizer<kvc::quant::Int8<32>>);
  CHECK(kvc::quant::Int8<>::name() == "int8");
  CHECK(kvc::quant::Int8<32>::name() == "int8_g32");
}

TEST_CASE("Int8 byte layout by hand: scales first, ties to even", "[int8]") {
  SECTION("per token") {
    // amax 127 → scale 1.0f exactly; q = nearbyint(x): 2.5 → 2, 3.5 → 4, −1.5 → −2.
    const std::vector<float> x{127.0F, -2.5F, 3.5F, 0.5F, -1.5F, 0.49F, -127.0F, 0.0F};
    std::vector<std::byte> codes(12);
    kvc::quant::Int8<>{}.encode_key(x.data(), 8, codes.data());
    const std::vector<std::byte> expected{
        std::byte{0x00}, std::byte{0x00}, std::byte{0x80}, std::byte{0x3F},  // 1.0f, LE
        std::byte{0x7F}, std::byte{0xFE}, std::byte{0x04}, std::byte{0x00},
        std::byte{0xFE}, std::byte{0x00}, std::byte{0x81}, std::byte{0x00}};
    CHECK(codes == expected);
  }
  SECTION("per group of 32") {
    // Group 0: amax 127 → scale 1; group 1: amax 254 → scale 2, 5 / 2 = 2.5 → 2.
    std::vector<float> x(64, 0.0F);
    x[0] = -127.0F;
    x[1] = 1.0F;
    x[32] = 254.0F;
    x[33] = 5.0F;
    x[34] = -7.0F;  // −3.5 → −4
    std::vector<std::byte> codes(72);
    kvc::quant::Int8<32>{}.encode_value(x.data(), 64, codes.data());
    CHECK(stored_scale(codes.data(), 0) == 1.0F);
    CHECK(stored_scale(codes.data(), 1) == 2.0F);
    CHECK(codes[8] == std::byte{0x81});
    CHECK(codes[9] == std::byte{0x01});
    CHECK(codes[10] == std::byte{0x00});
    CHECK(codes[8 + 32] == std::byte{0x7F});
    CHECK(codes[8 + 33] == std::byte{0x02});
    CHECK(codes[8 + 34] == std::byte{0xFC});
  }
}

TEST_CASE("Int8 round trip stays within half a step", "[int8]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> x(64 * 128);
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = normal(rng) * (i % 128 == 3 ? 40.0F : 1.0F);  // one outlier channel
  }
  check_round_trip<0>(x, 128);
  check_round_trip<32>(x, 128);
  check_round_trip<0>(std::vector<float>(x.begin(), x.begin() + 7 * 9), 7);

  SECTION("half and bfloat16 hosts encode as their widened fp32 values") {
    kvc::test::check_host_types_encode_as_widened(kvc::quant::Int8<>{}, 128, 10);
    kvc::test::check_host_types_encode_as_widened(kvc::quant::Int8<32>{}, 128, 11);
  }
}

TEST_CASE("Int8 adversarial inputs", "[int8]") {
  const kvc::quant::Int8<> int8;
  std::vector<float> decoded(64);
  SECTION("all zeros: scale 0, codes 0, decoded 0") {
    const std::vector<float> x(64, 0.0F);
    std::vector<std::byte> codes(int8.key_bytes(64), std::byte{0x55});
    int8.encode_key(x.data(), 64, codes.data());
    CHECK(std::all_of(codes.begin(), codes.end(), [](std::byte b) { return b == std::byte{0}; }));
    int8.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("constant channels: every code is ±127 and decodes to the constant") {
    std::vector<float> x(64, 0.3F);
    for (std::size_t c = 32; c < 64; ++c) x[c] = -0.3F;
    std::vector<std::byte> codes(int8.key_bytes(64));
    int8.encode_key(x.data(), 64, codes.data());
    int8.decode_key(codes.data(), 64, decoded.data());
    for (std::size_t c = 0; c < 64; ++c) CHECK(decoded[c] == Approx(x[c]).epsilon(1e-6));
  }
  SECTION("one 1e30 outlier: it survives, the rest round to 0, nothing overflows") {
    std::vector<float> x(64, 1.0F);
    x[17] = 1e30F;
    check_round_trip<0>(x, 64);
    check_round_trip<32>(x, 64);  // the other group keeps its own scale
    std::vector<std::byte> codes(int8.key_bytes(64));
    int8.encode_key(x.data(), 64, codes.data());
    int8.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded[17] == Approx(1e30).epsilon(1e-6));
    CHECK(decoded[0] == 0.0F);
  }
  SECTION("denormals: scale is itself denormal; clamped codes keep the bound") {
    std::vector<float> x(64);
    for (std::size_t c = 0; c < 64; ++c) {
      x[c] = static_cast<float>(c % 7) * 1e-40F * (c % 2 ? 1.0F : -1.0F);
    }
    x[5] = std::numeric_limits<float>::denorm_min();
    check_round_trip<0>(x, 64);
    check_round_trip<32>(x, 64);
    std::vector<float> tiny(64, 0.0F);
    tiny[3] = std::numeric_limits<float>::denorm_min();  // scale underflows to 0
    check_round_trip<0>(tiny, 64);
  }
}

TEST_CASE("Int8 tile kernels on codes match float64 on the decoded values", "[int8]") {
  check_tile_kernels(kvc::quant::Int8<>{}, 128, 16, 4, 1);
  check_tile_kernels(kvc::quant::Int8<>{}, 128, 13, 5, 2);
  check_tile_kernels(kvc::quant::Int8<>{}, 71, 9, 3, 3);
  check_tile_kernels(kvc::quant::Int8<32>{}, 128, 16, 8, 4);
  check_tile_kernels(kvc::quant::Int8<32>{}, 64, 1, 1, 5);
  // Past one sub-tile of the integer path (64 tokens); an odd chunk count; groups of 64;
  // groups of 16 (the fp32 path); 320 channels (past the integer path's head_dim limit).
  check_tile_kernels(kvc::quant::Int8<>{}, 96, 100, 6, 6);
  check_tile_kernels(kvc::quant::Int8<64>{}, 128, 70, 3, 7);
  check_tile_kernels(kvc::quant::Int8<16>{}, 64, 10, 2, 8);
  check_tile_kernels(kvc::quant::Int8<>{}, 320, 5, 2, 9);
}

TEST_CASE("Int8 in a KvCache: attend on codes matches float64 on the stored K/V", "[int8]") {
  check_end_to_end<kvc::evict::Full, kvc::quant::Int8<>>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::Full, kvc::quant::Int8<32>>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::H2O, kvc::quant::Int8<>>(kvc::evict::H2O({.recent_tokens = 16}),
                                                        kvc::Budget::tokens(64), 64);
}
