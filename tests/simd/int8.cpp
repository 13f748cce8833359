// Tests of kvc/simd/int8.hpp: every SIMD kernel equals its scalar reference bit for bit
// (the same fp32 products, one rounding each), over all tails and unaligned inputs.
#include <kvc/simd/int8.hpp>

#include <catch2/catch.hpp>

#include <cstring>
#include <random>
#include <vector>

namespace {

// Random blocks with a finite fp16 d (any sign, normal or subnormal) and random codes.
std::vector<std::byte> random_blocks(std::mt19937& rng, std::size_t blocks,
                                     std::size_t block_bytes) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<std::byte> out(1 + blocks * block_bytes);  // +1: start unaligned
  for (auto& b : out) b = static_cast<std::byte>(byte(rng));
  std::normal_distribution<float> normal;
  for (std::size_t k = 0; k < blocks; ++k) {
    const float d = k % 5 == 4 ? 3e-7F * normal(rng) : normal(rng);
    kvc::simd::store_fp16(d, out.data() + 1 + k * block_bytes);
  }
  return out;
}

}  // namespace

TEST_CASE("dequantize_int8 equals the reference for every length and offset", "[simd][int8]") {
  std::mt19937 rng(21);
  std::uniform_int_distribution<int> code(-128, 127);
  std::vector<std::int8_t> q(80);
  for (auto& x : q) x = static_cast<std::int8_t>(code(rng));
  for (std::size_t offset = 0; offset < 3; ++offset) {
    for (std::size_t n = 0; n + offset <= q.size(); ++n) {
      std::vector<float> simd_out(n + 1, -1.0F), reference_out(n + 1, -1.0F);
      kvc::simd::dequantize_int8(q.data() + offset, 0.0371F, simd_out.data(), n);
      kvc::simd::reference::dequantize_int8(q.data() + offset, 0.0371F, reference_out.data(), n);
      REQUIRE(simd_out == reference_out);  // including the untouched sentinel at [n]
    }
  }
}

TEST_CASE("dequantize_q8_0 / q4_0 equal the reference on random blocks", "[simd][int8]") {
  std::mt19937 rng(22);
  for (std::size_t blocks : {1, 2, 3, 4, 7}) {
    const auto q8 = random_blocks(rng, blocks, 34);
    const auto q4 = random_blocks(rng, blocks, 18);
    std::vector<float> a(blocks * 32), b(blocks * 32);
    kvc::simd::dequantize_q8_0(q8.data() + 1, a.data(), blocks * 32);
    kvc::simd::reference::dequantize_q8_0(q8.data() + 1, b.data(), blocks * 32);
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    kvc::simd::dequantize_q4_0(q4.data() + 1, a.data(), blocks * 32);
    kvc::simd::reference::dequantize_q4_0(q4.data() + 1, b.data(), blocks * 32);
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("reference dequantizers follow ggml's formulas on a hand-built block", "[simd][int8]") {
  // q8_0: d = 0.5 (fp16 0x3800), q = {−128, 127, 1, 0, ...}.
  std::vector<std::byte> q8(34, std::byte{0});
  q8[1] = std::byte{0x38};
  q8[2] = std::byte{0x80};
  q8[3] = std::byte{0x7F};
  q8[4] = std::byte{0x01};
  std::vector<float> out(32);
  kvc::simd::reference::dequantize_q8_0(q8.data(), out.data(), 32);
  CHECK(out[0] == -64.0F);
  CHECK(out[1] == 63.5F);
  CHECK(out[2] == 0.5F);
  CHECK(out[3] == 0.0F);
  // q4_0: d = −2 (fp16 0xC000), qs[0] = 0xF0: element 0 = −2·(0 − 8) = 16, element 16 =
  // −2·(15 − 8) = −14; qs[1] = 0x88: elements 1 and 17 are 0.
  std::vector<std::byte> q4(18, std::byte{0x88});
  q4[0] = std::byte{0x00};
  q4[1] = std::byte{0xC0};
  q4[2] = std::byte{0xF0};
  kvc::simd::reference::dequantize_q4_0(q4.data(), out.data(), 32);
  CHECK(out[0] == 16.0F);
  CHECK(out[16] == -14.0F);
  CHECK(out[1] == 0.0F);
  CHECK(out[17] == 0.0F);
  CHECK(kvc::simd::load_fp16(q4.data()) == -2.0F);
}

TEST_CASE("expand_q4_0 equals the reference and each block's dequantized values over d",
          "[simd][int8]") {
  std::mt19937 rng(23);
  for (std::size_t blocks : {1, 2, 3, 4, 7}) {
    const auto q4 = random_blocks(rng, blocks, 18);
    std::vector<std::int8_t> a(blocks * 32), b(blocks * 32);
    kvc::simd::expand_q4_0(q4.data() + 1, a.data(), blocks * 32);
    kvc::simd::reference::expand_q4_0(q4.data() + 1, b.data(), blocks * 32);
    REQUIRE(a == b);
    // code · d is exactly what dequantize_q4_0 writes (both one fp32 product).
    std::vector<float> values(blocks * 32);
    kvc::simd::reference::dequantize_q4_0(q4.data() + 1, values.data(), blocks * 32);
    for (std::size_t i = 0; i < a.size(); ++i) {
      const float d = kvc::simd::load_fp16(q4.data() + 1 + i / 32 * 18);
      REQUIRE(a[i] >= -8);
      REQUIRE(a[i] <= 7);
      REQUIRE(d * static_cast<float>(a[i]) == values[i]);
    }
  }
}
