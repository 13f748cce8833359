// Tests of kvc/simd/quantize.hpp: every SIMD encode kernel equals its scalar reference bit
// for bit (all lengths and offsets, f32 / f16 / bf16 sources, NaN, ±Inf, denormals, ties),
// and the references follow their documented rules on hand-computed cases.
#include <kvc/simd/int8.hpp>
#include <kvc/simd/quantize.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

// Normal values with the hard cases mixed in: exact ties at the test scales (k + 0.5 steps),
// NaN, ±Inf, denormals, zeros and values far past the clamp.
template <class S>
std::vector<S> adversarial_row(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> normal(0.0F, 3.0F);
  std::uniform_int_distribution<int> pick(0, 15);
  std::vector<S> row(n);
  for (auto& x : row) {
    float v = normal(rng);
    switch (pick(rng)) {
      case 0:
        v = std::floor(v) + 0.5F;
        break;  // a tie at scale 1
      case 1:
        v = std::numeric_limits<float>::quiet_NaN();
        break;
      case 2:
        v = std::numeric_limits<float>::infinity();
        break;
      case 3:
        v = -std::numeric_limits<float>::infinity();
        break;
      case 4:
        v = 1e-40F;
        break;
      case 5:
        v = 0.0F;
        break;
      case 6:
        v = -5000.0F;
        break;
      default:
        break;
    }
    x = static_cast<S>(v);
  }
  return row;
}

template <class S>
void check_against_reference() {
  std::mt19937 rng(31);
  const std::vector<S> row = adversarial_row<S>(rng, 90);
  for (std::size_t offset = 0; offset < 3; ++offset) {
    for (std::size_t n = 0; n + offset <= 87; ++n) {
      const S* x = row.data() + offset;
      // max_abs: the NaNs must not enter the max, the Infs must.
      const float simd_max = kvc::simd::max_abs(x, n);
      const float reference_max = kvc::simd::reference::max_abs(x, n);
      REQUIRE(simd_max == reference_max);
      REQUIRE_FALSE(std::isnan(simd_max));
      if (n > 0) {
        const auto [simd_lo, simd_hi] = kvc::simd::min_max(x, n);
        const auto [reference_lo, reference_hi] = kvc::simd::reference::min_max(x, n);
        REQUIRE(std::bit_cast<std::uint32_t>(simd_lo) ==
                std::bit_cast<std::uint32_t>(reference_lo));
        REQUIRE(std::bit_cast<std::uint32_t>(simd_hi) ==
                std::bit_cast<std::uint32_t>(reference_hi));
      }
      const float simd_value = kvc::simd::max_magnitude_value(x, n);
      REQUIRE(std::bit_cast<std::uint32_t>(simd_value) ==
              std::bit_cast<std::uint32_t>(kvc::simd::reference::max_magnitude_value(x, n)));

      for (const float scale : {1.0F, 0.0371F, 1e-39F}) {
        std::vector<std::int8_t> simd_q(n + 1, 99), reference_q(n + 1, 99);
        kvc::simd::quantize_div(x, n, scale, 127.0F, simd_q.data());
        kvc::simd::reference::quantize_div(x, n, scale, 127.0F, reference_q.data());
        REQUIRE(simd_q == reference_q);  // the sentinel at [n] untouched
        kvc::simd::quantize_div(x, n, scale, 7.0F, simd_q.data());
        kvc::simd::reference::quantize_div(x, n, scale, 7.0F, reference_q.data());
        REQUIRE(simd_q == reference_q);
        kvc::simd::quantize_away(x, n, 1.0F / scale, simd_q.data());
        kvc::simd::reference::quantize_away(x, n, 1.0F / scale, reference_q.data());
        REQUIRE(simd_q == reference_q);
      }
    }
    // quantize_affine: shared (m, s), and per-value fp16 and f32 parameters with zero and
    // negative scales mixed in.
    std::vector<Eigen::half> minimum(90), scale(90);
    std::vector<float> scale_f32(90);
    for (std::size_t i = 0; i < 90; ++i) {
      minimum[i] = static_cast<Eigen::half>(-4.0F + 0.1F * static_cast<float>(i % 7));
      scale[i] = static_cast<Eigen::half>(i % 11 == 0 ? 0.0F : (i % 13 == 0 ? -1.0F : 0.3F));
      scale_f32[i] = static_cast<float>(scale[i]);
    }
    for (std::size_t n = 0; n + offset <= 87; ++n) {
      const S* x = row.data() + offset;
      for (const float levels : {3.0F, 15.0F}) {
        std::vector<std::uint8_t> simd_q(n + 1, 99), reference_q(n + 1, 99);
        kvc::simd::quantize_affine(x, n, -1.5F, 0.7F, levels, simd_q.data());
        kvc::simd::reference::quantize_affine(x, n, -1.5F, 0.7F, levels, reference_q.data());
        REQUIRE(simd_q == reference_q);
        kvc::simd::quantize_affine(x, n, minimum.data() + offset, scale.data() + offset, levels,
                                   simd_q.data());
        kvc::simd::reference::quantize_affine(x, n, minimum.data() + offset, scale.data() + offset,
                                              levels, reference_q.data());
        REQUIRE(simd_q == reference_q);
        const float* f32_scale = scale_f32.data() + offset;
        kvc::simd::quantize_affine(x, n, f32_scale, f32_scale, levels, simd_q.data());
        kvc::simd::reference::quantize_affine(x, n, f32_scale, f32_scale, levels,
                                              reference_q.data());
        REQUIRE(simd_q == reference_q);
      }
    }
    for (const float inverse : {1.0F, -0.5F, 37.0F, 0.0F}) {
      std::vector<std::byte> simd_nibbles(17, std::byte{0x5a}),
          reference_nibbles(17, std::byte{0x5a});
      kvc::simd::q4_0_nibbles(row.data() + offset, inverse, simd_nibbles.data());
      kvc::simd::reference::q4_0_nibbles(row.data() + offset, inverse, reference_nibbles.data());
      REQUIRE(simd_nibbles == reference_nibbles);
    }
  }
}

}  // namespace

TEST_CASE("simd encode kernels equal their references on f32, f16 and bf16 rows",
          "[simd][quantize]") {
  check_against_reference<float>();
  check_against_reference<Eigen::half>();
  check_against_reference<Eigen::bfloat16>();
}

TEST_CASE("quantize_div rounds ties to even and clamps, NaN to the lower end", "[simd][quantize]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // 16 values so the vector path runs on every target; the scale is 0.5, so x / scale = 2x.
  const std::vector<float> x = {1.25F, 1.75F, -1.25F, -1.75F, 100.0F, -100.0F, nan,   inf,
                                -inf,  0.0F,  0.24F,  0.26F,  3.0F,   -3.0F,   0.75F, -0.0F};
  const std::vector<std::int8_t> expected = {2, 4, -2, -4, 7, -7, -7, 7, -7, 0, 0, 1, 6, -6, 2, 0};
  std::vector<std::int8_t> q(16);
  kvc::simd::quantize_div(x.data(), 16, 0.5F, 7.0F, q.data());
  REQUIRE(q == expected);
  REQUIRE(kvc::simd::max_abs(x.data(), 16) == inf);
  REQUIRE(kvc::simd::max_abs(x.data(), 4) == 1.75F);
}

TEST_CASE("quantize_away rounds ties away from zero, as ggml's roundf", "[simd][quantize]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {0.5F,   1.5F, 2.5F,   -0.5F, -2.5F, 0.49F, 126.5F, 127.6F,
                                -200.F, nan,  1e-45F, 3.0F,  -3.5F, 64.0F, 0.0F,   -1.0F};
  const std::vector<std::int8_t> expected = {1,    2,    3, -1, -3, 0,  127, 127,
                                             -127, -127, 0, 3,  -4, 64, 0,   -1};
  std::vector<std::int8_t> q(16);
  kvc::simd::quantize_away(x.data(), 16, 1.0F, q.data());
  REQUIRE(q == expected);
}

TEST_CASE("q4_0_nibbles packs value j low and value j + 16 high, codes clamped to 0..15",
          "[simd][quantize]") {
  std::vector<float> x(32);
  for (std::size_t j = 0; j < 16; ++j) {
    x[j] = static_cast<float>(j) - 8.0F;        // codes 0..15 with inverse 1
    x[j + 16] = 20.0F - static_cast<float>(j);  // codes 28.5.. clamp to 15, then 15..
  }
  x[16 + 15] = std::numeric_limits<float>::quiet_NaN();  // code 0
  std::vector<std::byte> nibbles(16);
  kvc::simd::q4_0_nibbles(x.data(), 1.0F, nibbles.data());
  for (std::size_t j = 0; j < 16; ++j) {
    const unsigned high_value = j == 15 ? 0U : std::min(15U, static_cast<unsigned>(28 - j));
    const auto expected = static_cast<std::byte>(j | (high_value << 4));
    INFO("byte " << j);
    REQUIRE(nibbles[j] == expected);
  }
}

TEST_CASE("max_magnitude_value keeps the sign of the first largest magnitude", "[simd][quantize]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  using row = std::vector<float>;
  const auto first_largest = [](const row& x) {
    return kvc::simd::max_magnitude_value(x.data(), x.size());
  };
  // 32 values (two AVX-512 batches) with the answer placed in the second batch.
  row x(32, 0.25F);
  x[20] = -6.0F;
  REQUIRE(first_largest(x) == -6.0F);
  x[25] = 6.0F;  // a tie: the first (−6) stays
  REQUIRE(first_largest(x) == -6.0F);
  x[3] = 6.0F;  // now +6 comes first
  REQUIRE(first_largest(x) == 6.0F);
  x[7] = nan;  // a NaN never wins
  REQUIRE(first_largest(x) == 6.0F);
  REQUIRE(first_largest(row(32, 0.0F)) == 0.0F);
  REQUIRE(first_largest(row(32, -1.5F)) == -1.5F);
}

TEST_CASE("store_fp16 rounds to nearest even like Eigen::half", "[simd][quantize]") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 100000; ++i) {
    const float value = std::bit_cast<float>(bits(rng));
    if (std::isnan(value)) continue;  // the payload of a NaN is not specified
    std::byte stored[2];
    kvc::simd::store_fp16(value, stored);
    const auto expected = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value));
    std::uint16_t got = 0;
    std::memcpy(&got, stored, sizeof got);
    INFO("value " << value);
    REQUIRE(got == expected);
  }
}

TEST_CASE("quantize_affine rounds (x - m) / s to even, clamps to 0..levels, 0 where s <= 0",
          "[simd][quantize]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // m = -1, s = 0.5: (x + 1) / 0.5 = 2x + 2.
  const std::vector<float> x = {-1.0F, -0.75F, -0.25F, 0.25F,  0.5F, 5.0F,   -3.0F,   nan,
                                0.0F,  -0.5F,  0.75F,  -1.25F, 1.0F, 0.125F, -0.625F, 0.375F};
  const std::vector<std::uint8_t> expected = {0, 0, 2, 2, 3, 3, 0, 0, 2, 1, 3, 0, 3, 2, 1, 3};
  std::vector<std::uint8_t> q(16);
  kvc::simd::quantize_affine(x.data(), 16, -1.0F, 0.5F, 3.0F, q.data());
  REQUIRE(q == expected);
  kvc::simd::quantize_affine(x.data(), 16, -1.0F, 0.0F, 3.0F, q.data());  // a constant group
  REQUIRE(q == std::vector<std::uint8_t>(16, 0));
}

TEST_CASE("min_max starts from x[0] and skips later NaNs", "[simd][quantize]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x(40, 1.0F);
  x[0] = 2.0F;
  x[17] = -3.5F;
  x[33] = 9.0F;  // in the scalar tail on AVX-512
  x[20] = nan;
  const auto [lo, hi] = kvc::simd::min_max(x.data(), x.size());
  REQUIRE(lo == -3.5F);
  REQUIRE(hi == 9.0F);
  const std::vector<float> zeros(20, 0.0F);
  REQUIRE_FALSE(std::signbit(kvc::simd::min_max(zeros.data(), zeros.size()).first));
  const auto [one_lo, one_hi] = kvc::simd::min_max(x.data(), 1);
  REQUIRE(one_lo == 2.0F);
  REQUIRE(one_hi == 2.0F);
}

TEST_CASE("column_min_max equals the reference per channel, NaNs after the first row skipped",
          "[simd][quantize]") {
  std::mt19937 rng(8);
  for (const std::size_t n : {std::size_t{1}, std::size_t{15}, std::size_t{16}, std::size_t{37}}) {
    for (const std::size_t count : {std::size_t{1}, std::size_t{2}, std::size_t{32}}) {
      const std::size_t ld = n + 3;
      const std::vector<float> rows = adversarial_row<float>(rng, count * ld);
      std::vector<float> lo(n), hi(n), reference_lo(n), reference_hi(n);
      kvc::simd::column_min_max(rows.data(), count, ld, n, lo.data(), hi.data());
      kvc::simd::reference::column_min_max(rows.data(), count, ld, n, reference_lo.data(),
                                           reference_hi.data());
      for (std::size_t c = 0; c < n; ++c) {
        INFO("n " << n << ", count " << count << ", channel " << c);
        REQUIRE(std::bit_cast<std::uint32_t>(lo[c]) ==
                std::bit_cast<std::uint32_t>(reference_lo[c]));
        REQUIRE(std::bit_cast<std::uint32_t>(hi[c]) ==
                std::bit_cast<std::uint32_t>(reference_hi[c]));
        // Against a plain scan: every non-NaN value lies in [lo, hi] when row 0 is not NaN.
        if (!std::isnan(rows[c])) {
          for (std::size_t t = 0; t < count; ++t) {
            const float v = rows[t * ld + c];
            if (!std::isnan(v)) {
              REQUIRE(lo[c] <= v);
              REQUIRE(v <= hi[c]);
            }
          }
        }
      }
    }
  }
}
