// Tests of kvc/quant/q8_0.hpp: ggml's block_q8_0 bytes by hand, the round-trip bound, the
// fused tile kernels against float64 on the decoded values, adversarial inputs and KvCache
// end to end.
#include <kvc/quant/q8_0.hpp>

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

// |x − x̂| ≤ d/2 + 127·|d − fp16(d)| with d = amax/127 in fp32 (the codes come from the fp32
// d, the decoder multiplies by the fp16 one), plus one fp32 rounding of fp16(d)·q. When d is
// below fp32's normal range, 1/d overflows and the block stores codes 0 (fp16(d) is 0 too).
void check_round_trip(const std::vector<float>& x) {
  const kvc::quant::Q8_0 q8;
  const std::size_t d = x.size();
  std::vector<std::byte> codes(q8.key_bytes(d));
  std::vector<float> decoded(d);
  q8.encode_key(x.data(), d, codes.data());
  q8.decode_key(codes.data(), d, decoded.data());
  for (std::size_t b = 0; b < d / 32; ++b) {
    double amax = 0;
    for (std::size_t j = 0; j < 32; ++j) amax = std::max(amax, std::abs(double(x[b * 32 + j])));
    const double d32 = static_cast<float>(static_cast<float>(amax) / 127.0F);
    const double d16 = block_scale(codes.data() + 34 * b);
    for (std::size_t j = 0; j < 32; ++j) {
      const std::size_t i = b * 32 + j;
      REQUIRE(std::isfinite(decoded[i]));
      if (d32 < std::numeric_limits<float>::min()) {
        REQUIRE(decoded[i] == 0.0F);
        continue;
      }
      const double bound = d32 / 2 + 127 * std::abs(d32 - d16) + std::abs(decoded[i]) * 6e-8;
      REQUIRE(std::abs(double(x[i]) - decoded[i]) <= bound);
    }
  }
}

}  // namespace

TEST_CASE("Q8_0 sizes: 34 bytes per 32 values", "[q8_0]") {
  const kvc::quant::Q8_0 q8;
  CHECK(q8.key_bytes(128) == 136);
  CHECK(q8.value_bytes(128) == 136);
  CHECK(q8.key_bytes(32) == 34);
  CHECK(q8.supports_head_dim(96));
  CHECK(!q8.supports_head_dim(0));
  CHECK(!q8.supports_head_dim(48));
  CHECK(kvc::Quantizer<kvc::quant::Q8_0>);
  CHECK(kvc::quant::Q8_0::name() == "q8_0");
}

TEST_CASE("Q8_0 writes ggml's block_q8_0 bytes (hand-computed)", "[q8_0]") {
  std::vector<float> x(64, 0.0F);
  // Block 0: amax 127 → d = 1 (fp16 0x3C00), q = roundf(x): ties away from zero, as ggml.
  const float head[] = {-127.0F, 2.5F, -2.5F, 0.49F, 126.6F, -0.5F, 1e-3F};
  std::copy(std::begin(head), std::end(head), x.begin());
  for (std::size_t j = 7; j < 32; ++j) x[j] = static_cast<float>(j) - 16.0F;
  // Block 1: amax 0.5 → d = 0.5/127 = 0.0039370…: fp16 2^-8 · (1 + 8/1024) = 0x1C08;
  // 1/d = 254: 0.1 → 25.4 → 25, −0.3 → −76.2 → −76.
  x[32] = 0.5F;
  x[33] = 0.1F;
  x[34] = -0.3F;
  std::vector<std::byte> codes(68);
  kvc::quant::Q8_0{}.encode_key(x.data(), 64, codes.data());

  std::vector<std::byte> expected = bytes({0x00, 0x3C, 0x81, 3, 0xFD, 0, 127, 0xFF, 0});
  for (int j = 7; j < 32; ++j) expected.push_back(static_cast<std::byte>(j - 16));
  for (int b : {0x08, 0x1C, 127, 25, 0xB4}) expected.push_back(static_cast<std::byte>(b));
  expected.resize(68, std::byte{0});
  CHECK(codes == expected);

  std::vector<float> decoded(64);
  kvc::quant::Q8_0{}.decode_value(codes.data(), 64, decoded.data());
  const double d16 = std::ldexp(1.0 + 8.0 / 1024.0, -8);
  CHECK(decoded[0] == -127.0F);
  CHECK(decoded[1] == 3.0F);
  CHECK(double(decoded[33]) == d16 * 25);
  CHECK(double(decoded[34]) == d16 * -76);
}

TEST_CASE("Q8_0 round trip stays within the fp16-scale bound", "[q8_0]") {
  std::mt19937 rng(8);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> x(128);
    const float spread = std::ldexp(1.0F, trial % 20 - 10);
    for (std::size_t c = 0; c < 128; ++c) x[c] = normal(rng) * spread * (c == 5 ? 30.0F : 1.0F);
    check_round_trip(x);
  }
  SECTION("half and bfloat16 hosts encode as their widened fp32 values") {
    kvc::test::check_host_types_encode_as_widened(kvc::quant::Q8_0{}, 64, 10);
  }
}

TEST_CASE("Q8_0 adversarial inputs", "[q8_0]") {
  const kvc::quant::Q8_0 q8;
  std::vector<std::byte> codes(q8.key_bytes(64), std::byte{0x55});
  std::vector<float> decoded(64);
  SECTION("all zeros: d = 0, codes 0") {
    const std::vector<float> x(64, 0.0F);
    q8.encode_key(x.data(), 64, codes.data());
    CHECK(std::all_of(codes.begin(), codes.end(), [](std::byte b) { return b == std::byte{0}; }));
    q8.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded == x);
  }
  SECTION("constant channels") {
    std::vector<float> x(64, 0.7F);
    for (std::size_t c = 32; c < 64; ++c) x[c] = -3.0F;
    check_round_trip(x);
    q8.encode_key(x.data(), 64, codes.data());
    CHECK(codes[2] == std::byte{127});
    CHECK(codes[34 + 2] == std::byte{0x81});
  }
  SECTION("a 1e30 outlier saturates d at the largest fp16, never inf or NaN") {
    std::vector<float> x(64, 1.0F);
    x[9] = -1e30F;
    q8.encode_key(x.data(), 64, codes.data());
    CHECK(block_scale(codes.data()) == 65504.0F);
    CHECK(codes[2 + 9] == std::byte{0x81});
    q8.decode_key(codes.data(), 64, decoded.data());
    CHECK(decoded[9] == -127.0F * 65504.0F);
    CHECK(decoded[0] == 0.0F);
    CHECK(decoded[40] == Approx(1.0).epsilon(1e-3));  // the other block keeps its own d
    std::vector<float> block(x.begin() + 32, x.end());
    check_round_trip(block);
  }
  SECTION("denormals and tiny values decode to finite values within the bound") {
    std::vector<float> x(96);
    for (std::size_t c = 0; c < 32; ++c) x[c] = static_cast<float>(c) * 1e-40F;   // d denormal
    for (std::size_t c = 32; c < 64; ++c) x[c] = static_cast<float>(c) * -1e-7F;  // fp16(d) = 0
    for (std::size_t c = 64; c < 96; ++c)
      x[c] = static_cast<float>(c) * 1e-5F;  // fp16(d) subnormal
    x[3] = std::numeric_limits<float>::denorm_min();
    check_round_trip(x);
  }
}

TEST_CASE("Q8_0 tile kernels on codes match float64 on the decoded values", "[q8_0]") {
  check_tile_kernels(kvc::quant::Q8_0{}, 128, 16, 4, 1);
  check_tile_kernels(kvc::quant::Q8_0{}, 128, 13, 5, 2);
  check_tile_kernels(kvc::quant::Q8_0{}, 96, 3, 1, 3);
  // Past one sub-tile of the integer path (64 tokens), 320 channels past its head_dim limit.
  check_tile_kernels(kvc::quant::Q8_0{}, 160, 100, 6, 4);
  check_tile_kernels(kvc::quant::Q8_0{}, 320, 7, 2, 5);
}

TEST_CASE("Q8_0 in a KvCache: attend on codes matches float64 on the stored K/V", "[q8_0]") {
  check_end_to_end<kvc::evict::Full, kvc::quant::Q8_0>({}, kvc::Budget::unlimited(), 313);
  check_end_to_end<kvc::evict::H2O, kvc::quant::Q8_0>(kvc::evict::H2O({.recent_tokens = 16}),
                                                      kvc::Budget::tokens(64), 64);
}
