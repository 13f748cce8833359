// Tests of kvc/quant/q4_0.hpp: ggml's block_q4_0 bytes by hand, the round-trip bound, the
// fused tile kernels against float64 on the decoded values, adversarial inputs and KvCache
// end to end.
#include <kvc/quant/q4_0.hpp>

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

std::vector<std::byte> bytes(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

float block_scale(const std::byte* block) {
  return kvc::simd::load_fp16(block);
}

// With m the largest-|x| element, d = m/−8 (fp32) and fp16(d) the stored scale:
// |x − x̂| ≤ |d|/2 + 8·|d − fp16(d)|, and ≤ |d| + 8·|d − fp16(d)| for the clamped top code
// (x/d ∈ [7.5, 8]: q would be 16, 15 is stored). Plus one fp32 rounding of fp16(d)·(q − 8).
void check_round_trip(const std::vector<float>& x) {
  const kvc::quant::Q4_0 q4;
  const std::size_t d = x.size();
  std::vector<std::byte> codes(q4.key_bytes(d));
  std::vector<float> decoded(d);
  q4.encode_key(x.data(), d, codes.data());
  q4.decode_key(codes.data(), d, decoded.data());
  for (std::size_t b = 0; b < d / 32; ++b) {
    float amax = 0, m = 0;
    for (std::size_t j = 0; j < 32; ++j) {
      if (amax < std::abs(x[b * 32 + j])) {
        amax = std::abs(x[b * 32 + j]);
        m = x[b * 32 + j];
      }
    }
    const double d32 = m / -8.0F;
    const double d16 = block_scale(codes.data() + 18 * b);
    for (std::size_t j = 0; j < 32; ++j) {
      const std::size_t i = b * 32 + j;
      REQUIRE(std::isfinite(decoded[i]));
      if (std::abs(d32) < std::numeric_limits<float>::min()) {
        REQUIRE(decoded[i] == 0.0F);
        continue;
      }
      const bool top = double(x[i]) / d32 >= 7.49;
      const double bound =
          std::abs(d32) * (top ? 1.0 : 0.5) + 8 * std::abs(d32 - d16) + std::abs(decoded[i]) * 6e-8;
      REQUIRE(std::abs(double(x[i]) - decoded[i]) <= bound);
    }
  }
}

}  // namespace

TEST_CASE("Q4_0 sizes: 18 bytes per 32 values", "[q4_0]") {
  const kvc::quant::Q4_0 q4;
  CHECK(q4.key_bytes(128) == 72);
  CHECK(q4.value_bytes(128) == 72);
  CHECK(q4.key_bytes(32) == 18);
  CHECK(q4.supports_head_dim(64));
  CHECK(!q4.supports_head_dim(0));
  CHECK(!q4.supports_head_dim(16));
  CHECK(kvc::Quantizer<kvc::quant::Q4_0>);
  CHECK(kvc::quant::Q4_0::name() == "q4_0");
}

TEST_CASE("Q4_0 writes ggml's block_q4_0 bytes (hand-computed)", "[q4_0]") {
  std::vector<float> x(64, 0.0F);  // zeros: code 8
  // Block 0: m = x[16] = −8 → d = 1 (fp16 0x3C00); q = min(15, trunc(x + 8.5)).
  // x[0] = 3 → 11, x[1] = 7.6 → 16 → 15, x[17] = −0.5 → 8 (tie up), x[2] = 0.5 → 9,
  // x[18] = 2.49 → 10. Low nibble element j, high nibble element j + 16.
  x[16] = -8.0F;
  x[0] = 3.0F;
  x[1] = 7.6F;
  x[17] = -0.5F;
  x[2] = 0.5F;
  x[18] = 2.49F;
  // Block 1: m = +4 → d = −0.5 (fp16 0xB800), 1/d = −2: x[5] = 4 → 0, x[20] = −1 → 10,
  // x[0] = 1.75 → 5, x[21] = 3.9 → 0, x[6] = −3.9 → 16.3 → 15 (clamped top code).
  x[32 + 5] = 4.0F;
  x[32 + 20] = -1.0F;
  x[32 + 0] = 1.75F;
  x[32 + 21] = 3.9F;
  x[32 + 6] = -3.9F;
  std::vector<std::byte> codes(36);
  kvc::quant::Q4_0{}.encode_key(x.data(), 64, codes.data());

  std::vector<std::byte> expected = bytes({0x00, 0x3C, 0x0B, 0x8F, 0xA9});
  expected.resize(18, std::byte{0x88});
  for (int b : {0x00, 0xB8, 0x85, 0x88, 0x88, 0x88, 0xA8, 0x00, 0x8F}) {
    expected.push_back(static_cast<std::byte>(b));
  }
  expected.resize(36, std::byte{0x88});
  CHECK(codes == expected);

  std::vector<float> decoded(64);
  kvc::quant::Q4_0{}.decode_value(codes.data(), 64, decoded.data());
  CHECK(decoded[16] == -8.0F);
  CHECK(decoded[1] == 7.0F);  // clamped: 7.6 → 7
  CHECK(decoded[32 + 5] == 4.0F);
  CHECK(decoded[32 + 6] == -3.5F);
  CHECK(decoded[32 + 20] == -1.0F);
  CHECK(decoded[40] == 0.0F);
}

TEST_CASE("Q4_0 round trip stays within the derived bound", "[q4_0]") {
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> x(128);
    const float spread = std::ldexp(1.0F, trial % 20 - 10);
    for (std::size_t c = 0; c < 128; ++c) x[c] = normal(rng) * spread * (c == 5 ? 30.0F : 1.0F);
    check_round_trip(x);
  }
  SECTION("half and bfloat16 hosts encode as their widened fp32 values") {
    kvc::test::check_host_types_encode_as_widened(kvc::quant::Q4_0{}, 64, 10);
  }
}

TEST_CASE("Q4_0 adversarial inputs", "[q4_0]") {
  const kvc::quant::Q4_0 q4;
  std::vector<std::byte> codes(q4.key_bytes(64), std::byte{0x55});
  std::vector<float> decoded(64);
  SECTION("all zeros: d = 0 / −8 = −0 (fp16 0x8000, as ggml), every nibble 8") {
    const std::vector<float> x(64, 0.0F);
    q4.encode_key(x.data(), 64, codes.data());
    CHECK(codes == bytes({0,    0x80, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88,
                          0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0,    0x80, 0x88, 0x88, 0x88, 0x88,
                          0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88}));
    q4.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("constant channels: exact (the constant is m, code 0)") {
    std::vector<float> x(64, 0.75F);
    for (std::size_t c = 32; c < 64; ++c) x[c] = -3.0F;
    check_round_trip(x);
    q4.decode_key(codes.data(), 64, decoded.data());
    q4.encode_key(x.data(), 64, codes.data());
    q4.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("a 1e30 outlier saturates |d| at the largest fp16, never inf or NaN") {
    std::vector<float> x(64, 1.0F);
    x[40] = 1e30F;
    q4.encode_key(x.data(), 64, codes.data());
    CHECK(block_scale(codes.data() + 18) == -65504.0F);
    q4.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded[40] == 8.0F * 65504.0F);
    CHECK(decoded[41] == 0.0F);
    CHECK(decoded[0] == 1.0F);  // the other block is untouched
  }
  SECTION("denormals and tiny values decode to finite values within the bound") {
    std::vector<float> x(96);
    for (std::size_t c = 0; c < 32; ++c) x[c] = static_cast<float>(c) * -1e-40F;  // d denormal
    for (std::size_t c = 32; c < 64; ++c) x[c] = static_cast<float>(c) * 1e-8F;   // fp16(d) = 0
    for (std::size_t c = 64; c < 96; ++c) x[c] = static_cast<float>(c) * 1e-6F;   // subnormal d
    x[3] = std::numeric_limits<float>::denorm_min();
    check_round_trip(x);
  }
}

TEST_CASE("Q4_0 tile kernels on codes match float64 on the decoded values", "[q4_0]") {
  check_tile_kernels(kvc::quant::Q4_0{}, 128, 16, 4, 1);
  check_tile_kernels(kvc::quant::Q4_0{}, 128, 13, 5, 2);
  check_tile_kernels(kvc::quant::Q4_0{}, 96, 3, 1, 3);
}

TEST_CASE("Q4_0 in a KvCache: attend on codes matches float64 on the stored K/V", "[q4_0]") {
  check_end_to_end<kvc::evict::Full, kvc::quant::Q4_0>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::H2O, kvc::quant::Q4_0>(kvc::evict::H2O({.recent_tokens = 16}),
                                                      kvc::Budget::tokens(64), 64);
}
