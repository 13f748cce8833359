// Tests of kvc/simd/bfp.hpp: the step table from its definition, the nibble expansion bit
// for bit against its reference over every byte, length and offset, and the block-scaled
// int8 dot against its reference and float64 (they differ by fp32 rounding only).
#include <kvc/simd/bfp.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

TEST_CASE("bfp_steps holds 2^(byte − 127 − m + 2) for every exponent byte", "[simd][bfp]") {
  for (int byte = 0; byte < 256; ++byte) {
    const auto i = static_cast<std::size_t>(byte);
    REQUIRE(kvc::simd::bfp_steps<4>[i] == std::ldexp(1.0F, byte - 127 - 2));
    REQUIRE(kvc::simd::bfp_steps<8>[i] == std::ldexp(1.0F, byte - 127 - 6));
  }
  CHECK(kvc::simd::bfp_steps<8>[0] == std::ldexp(1.0F, -133));  // denormal, exact
  CHECK(kvc::simd::bfp_steps<4>[255] == std::ldexp(1.0F, 126));
}

TEST_CASE("expand_nibbles equals the reference for every byte, length and offset", "[simd][bfp]") {
  std::vector<std::byte> packed(3 + 256 + 70);
  for (std::size_t i = 0; i < packed.size(); ++i) {
    packed[i] = static_cast<std::byte>(i < 259 ? (i + 253) % 256 : i * 37 % 256);
  }
  for (std::size_t offset = 0; offset < 3; ++offset) {
    for (std::size_t n = 0; n <= 2 * (packed.size() - offset); n += 2) {
      std::vector<std::int8_t> simd_out(n + 1, 99), reference_out(n + 1, 99);
      kvc::simd::expand_nibbles(packed.data() + offset, simd_out.data(), n);
      kvc::simd::reference::expand_nibbles(packed.data() + offset, reference_out.data(), n);
      REQUIRE(simd_out == reference_out);  // including the untouched sentinel at [n]
    }
  }
  // Hand-checked: 0x8F → element 0 = −1 (0xF), element 1 = −8 (0x8); 0x70 → 0, 7.
  const std::vector<std::byte> two{std::byte{0x8F}, std::byte{0x70}};
  std::vector<std::int8_t> out(4);
  kvc::simd::expand_nibbles(two.data(), out.data(), 4);
  CHECK(out == std::vector<std::int8_t>{-1, -8, 0, 7});
}

TEST_CASE("dot_s8_scaled matches its reference and float64 on every shape", "[simd][bfp]") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> code(-128, 127);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::normal_distribution<float> normal;
  for (std::size_t block : {16, 32, 64, 128}) {
    for (std::size_t d : {32, 64, 128, 192, 256, 320}) {
      if (d % block != 0) continue;
      // Contiguous rows, and chunks of 32 codes 34 bytes apart (q8_0's blocks read in place).
      for (std::size_t chunk_stride : {32, 34}) {
        for (std::size_t rows : {1, 3, 4, 5}) {
          for (std::size_t tokens : {1, 3, 4, 9}) {
            const std::size_t ldk = d / 32 * chunk_stride + 7, lds = d / block + 1,
                              ldo = tokens + 2;
            std::vector<std::int8_t> q(rows * d), k(tokens * ldk + 1);
            for (auto& x : q) x = static_cast<std::int8_t>(code(rng));
            for (auto& x : k) x = static_cast<std::int8_t>(code(rng));
            std::vector<float> scales(tokens * lds);
            for (std::size_t i = 0; i < scales.size(); ++i) {
              // powers of two (BFP's steps) and arbitrary fp32 scales
              scales[i] = i % 3 == 2 ? normal(rng) : std::ldexp(1.0F, exponent(rng));
            }
            std::vector<float> got(rows * ldo, -1.0F), expected(rows * ldo, -1.0F);
            const std::int8_t* keys = k.data() + 1;  // unaligned
            kvc::simd::dot_s8_scaled(q.data(), rows, d, keys, tokens, ldk, scales.data(), block,
                                     lds, got.data(), ldo, chunk_stride);
            kvc::simd::reference::dot_s8_scaled(q.data(), rows, d, keys, tokens, ldk, scales.data(),
                                                block, lds, expected.data(), ldo, chunk_stride);
            for (std::size_t r = 0; r < rows; ++r) {
              for (std::size_t j = 0; j < ldo; ++j) {
                if (j >= tokens) {  // untouched
                  REQUIRE(got[r * ldo + j] == -1.0F);
                  continue;
                }
                double exact = 0, magnitude = 0;
                for (std::size_t b = 0; b < d / block; ++b) {
                  double dot = 0;
                  for (std::size_t c = b * block; c < (b + 1) * block; ++c) {
                    const double term =
                        double(q[r * d + c]) * keys[j * ldk + c / 32 * chunk_stride + c % 32];
                    dot += term;
                    magnitude += std::abs(double(scales[j * lds + b]) * term);
                  }
                  exact += double(scales[j * lds + b]) * dot;
                }
                // Exact int32 sums per block (reference) or per 4 channels (VNNI), one rounding
                // each when scaled, then fp32 sums: ≤ d · 2^−24 relative to Σ|terms|.
                const double tolerance = 1e-5 * magnitude + 1e-30;
                REQUIRE(std::abs(got[r * ldo + j] - exact) <= tolerance);
                REQUIRE(std::abs(expected[r * ldo + j] - exact) <= tolerance);
              }
            }
          }
        }
      }
    }
  }
}
