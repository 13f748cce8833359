// Tests of kvc/simd/int8.hpp: every SIMD kernel equals its scalar reference bit for bit
// (the same fp32 products, one rounding each), over all tails and unaligned inputs.
#include <kvc/simd/int8.hpp>

#include <catch2/catch.hpp>

#include <cmath>
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

TEST_CASE("gather_fp16 equals the reference for every count, stride and offset", "[simd][int8]") {
  // The fp16 at first + j·stride, over random bit patterns (NaN, inf and subnormals among
  // them): equal bit for bit (a NaN only as a NaN) to the scalar loads.
  std::mt19937 rng(29);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<std::byte> rows(40 * 137 + 8);
  for (auto& b : rows) b = static_cast<std::byte>(byte(rng));
  const auto same = [](float a, float b) {
    return (std::isnan(a) && std::isnan(b)) ||
           std::memcmp(&a, &b, sizeof a) == 0;  // −0 and +0 apart
  };
  for (std::size_t stride : {2, 4, 18, 34, 48, 137}) {
    for (std::size_t offset : {0, 1, 2}) {
      for (std::size_t n = 0; n <= 40 && n * stride + offset + 4 <= rows.size(); ++n) {
        std::vector<float> got(n + 1, -7.0F), want(n + 1, -7.0F);
        kvc::simd::gather_fp16(rows.data() + offset, stride, n, got.data());
        kvc::simd::reference::gather_fp16(rows.data() + offset, stride, n, want.data());
        INFO("stride " << stride << " offset " << offset << " n " << n);
        for (std::size_t j = 0; j <= n; ++j) REQUIRE(same(got[j], want[j]));  // [n]: untouched
      }
    }
  }
  // By hand: fp16 1.5 (0x3e00) and −2 (0xc000) in rows 6 bytes apart.
  std::vector<std::byte> two(12);
  two[2] = std::byte{0x00};
  two[3] = std::byte{0x3e};
  two[8] = std::byte{0x00};
  two[9] = std::byte{0xc0};
  float out[2] = {};
  kvc::simd::gather_fp16(two.data() + 2, 6, 2, out);
  CHECK(out[0] == 1.5F);
  CHECK(out[1] == -2.0F);
}

TEST_CASE("transpose_fp16 equals the reference for every row count, field count and stride",
          "[simd][int8]") {
  std::mt19937 rng(31);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<std::byte> rows(70 * 53 + 40);
  for (auto& b : rows) b = static_cast<std::byte>(byte(rng));
  // Eight fields (Kivi at d = 128: the register transpose for each 16 rows, gathers for the
  // rest) and other counts (gathers only), over row strides with and without padding.
  for (std::size_t fields : {1, 2, 4, 8, 16}) {
    for (std::size_t stride : {2 * fields + 2, 2 * fields + 32, std::size_t{53}}) {
      if (stride < 2 * fields + 2) continue;
      for (std::size_t n = 0; n <= 70 && n * stride + 1 <= rows.size(); ++n) {
        const std::size_t ldo = n + 3;
        std::vector<float> got(fields * ldo, -7.0F), want(fields * ldo, -7.0F);
        kvc::simd::transpose_fp16(rows.data() + 1, stride, n, fields, got.data(), ldo);
        kvc::simd::reference::transpose_fp16(rows.data() + 1, stride, n, fields, want.data(), ldo);
        INFO("fields " << fields << " stride " << stride << " n " << n);
        for (std::size_t k = 0; k < got.size(); ++k) {
          REQUIRE(((std::isnan(got[k]) && std::isnan(want[k])) ||
                   std::memcmp(&got[k], &want[k], sizeof(float)) == 0));
        }
      }
    }
  }
  // By hand: two rows of eight fields, field i of row j = i + 8j (all exact in fp16).
  std::vector<std::byte> two(2 * 16 + 2);
  for (std::size_t j = 0; j < 2; ++j) {
    for (std::size_t i = 0; i < 8; ++i) {
      kvc::simd::store_fp16(static_cast<float>(i + 8 * j), two.data() + 16 * j + 2 * i);
    }
  }
  std::vector<float> out(8 * 2);
  kvc::simd::transpose_fp16(two.data(), 16, 2, 8, out.data(), 2);
  for (std::size_t i = 0; i < 8; ++i) {
    CHECK(out[2 * i] == static_cast<float>(i));
    CHECK(out[2 * i + 1] == static_cast<float>(i + 8));
  }
}
