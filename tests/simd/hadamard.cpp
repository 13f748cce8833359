// Tests of kvc/simd/hadamard.hpp: hand-computed transforms, the SIMD kernel equal to its scalar
// reference bit for bit (every arch the target runs, every power-of-two length, unaligned
// rows, adversarial values), and the reference against float64 products with the explicit
// Sylvester matrix: orthonormal (norm kept), its own inverse, no overflow on the way.
#include <kvc/simd/hadamard.hpp>

#include <catch2/catch.hpp>

#include "../support/simd_archs.hpp"

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using kvc::test::for_each_arch;

constexpr double unit_roundoff = 0x1p-24;

// Entry (i, j) of the unnormalized Sylvester matrix: (−1)^popcount(i & j).
double sylvester(std::size_t i, std::size_t j) {
  return std::popcount(i & j) % 2 == 0 ? 1.0 : -1.0;
}

// H_d · x in float64 by the explicit matrix product.
std::vector<double> hadamard_float64(const std::vector<float>& x) {
  const std::size_t d = x.size();
  std::vector<double> y(d, 0.0);
  for (std::size_t i = 0; i < d; ++i) {
    for (std::size_t j = 0; j < d; ++j) y[i] += sylvester(i, j) * x[j];
    y[i] /= std::sqrt(static_cast<double>(d));
  }
  return y;
}

// The fast transform sums d terms in a tree of depth log2(d), then rounds the product by the
// scale (itself rounded): |error| ≤ (log2 d + 2)·u·Σ|x_j|/√d (γ_k of the tree, plus the two
// roundings of the scale; the +1 on the factor below is margin for the γ's higher terms).
double transform_bound(const std::vector<float>& x) {
  const std::size_t d = x.size();
  double l1 = 0;
  for (float v : x) l1 += std::abs(double(v));
  return (std::log2(double(d)) + 3) * unit_roundoff * l1 / std::sqrt(double(d));
}

std::vector<float> random_row(std::mt19937& rng, std::size_t d, int kind) {
  std::normal_distribution<float> normal;
  std::vector<float> x(d);
  for (std::size_t i = 0; i < d; ++i) {
    switch (kind) {
      case 0:
        x[i] = normal(rng);
        break;
      case 1:  // one outlier channel
        x[i] = normal(rng) * (i == 3 % d ? 100.0F : 1.0F);
        break;
      case 2:  // denormals, signed zeros, large values mixed
        x[i] = i % 4 == 0   ? normal(rng) * 1e-40F
               : i % 4 == 1 ? (i % 8 == 1 ? -0.0F : 0.0F)
                            : normal(rng) * 1e30F;
        break;
      default:  // all equal: the transform's largest output
        x[i] = 1.5F;
    }
  }
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("hadamard on hand-computed rows", "[simd][hadamard]") {
  SECTION("d = 1 is the identity") {
    std::vector<float> x{-2.5F};
    kvc::simd::hadamard(x.data(), 1);
    CHECK(x[0] == -2.5F);
  }
  SECTION("d = 2: [3, 1] → [4, 2] / √2") {
    std::vector<float> x{3.0F, 1.0F}, y = x;
    kvc::simd::hadamard(x.data(), 2);
    kvc::simd::reference::hadamard(y.data(), 2);
    CHECK(x[0] == Approx(4.0 / std::sqrt(2.0)).epsilon(1e-7));
    CHECK(x[1] == Approx(2.0 / std::sqrt(2.0)).epsilon(1e-7));
    CHECK(x == y);
  }
  SECTION("d = 4: rows [1,1,1,1], [1,−1,1,−1], [1,1,−1,−1], [1,−1,−1,1], scaled by 1/2") {
    // [1, 2, 3, 4] → [10, −2, −4, 0] / 2, exact (the scale 1/2 is a power of two).
    std::vector<float> x{1.0F, 2.0F, 3.0F, 4.0F}, y = x;
    kvc::simd::hadamard(x.data(), 4);
    kvc::simd::reference::hadamard(y.data(), 4);
    CHECK(x == std::vector<float>{5.0F, -1.0F, -2.0F, 0.0F});
    CHECK(y == x);
  }
  SECTION("a basis vector becomes a column of the matrix") {
    std::vector<float> x(16, 0.0F);
    x[5] = 4.0F;  // 4 · H_16 e_5 = 4/4 · column 5
    kvc::simd::hadamard(x.data(), 16);
    for (std::size_t i = 0; i < 16; ++i) CHECK(x[i] == float(sylvester(i, 5)));
  }
  CHECK(kvc::simd::is_power_of_two(1));
  CHECK(kvc::simd::is_power_of_two(256));
  CHECK(!kvc::simd::is_power_of_two(0));
  CHECK(!kvc::simd::is_power_of_two(96));
  CHECK(kvc::simd::hadamard_scale(64) == 0.125F);
}

TEST_CASE("hadamard SIMD equals the scalar reference bit for bit", "[simd][hadamard]") {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(41);
    for (std::size_t d = 1; d <= 1024; d *= 2) {
      for (int kind = 0; kind < 4; ++kind) {
        for (std::size_t offset : {0, 1}) {
          CAPTURE(Arch::name(), d, kind, offset);
          const auto x = random_row(rng, d, kind);
          // One spare float in front (unaligned rows) and one sentinel behind.
          std::vector<float> simd_row(offset + d + 1, 7.0F), reference_row = simd_row;
          std::copy(x.begin(), x.end(), simd_row.begin() + std::ptrdiff_t(offset));
          std::copy(x.begin(), x.end(), reference_row.begin() + std::ptrdiff_t(offset));
          kvc::simd::hadamard<Arch>(simd_row.data() + offset, d);
          kvc::simd::reference::hadamard(reference_row.data() + offset, d);
          REQUIRE(same_bits(simd_row, reference_row));
        }
      }
    }
  });
}

TEST_CASE("hadamard_rows transforms each row on its own", "[simd][hadamard]") {
  std::mt19937 rng(42);
  for (std::size_t d : {4, 32, 128}) {
    const std::size_t rows = 5;
    std::vector<float> block(rows * d), expected(rows * d);
    for (std::size_t r = 0; r < rows; ++r) {
      const auto x = random_row(rng, d, static_cast<int>(r % 3));
      std::copy(x.begin(), x.end(), block.begin() + std::ptrdiff_t(r * d));
      std::copy(x.begin(), x.end(), expected.begin() + std::ptrdiff_t(r * d));
      kvc::simd::reference::hadamard(expected.data() + r * d, d);
    }
    std::vector<float> reference_rows = block;
    kvc::simd::hadamard_rows(block.data(), rows, d);
    kvc::simd::reference::hadamard_rows(reference_rows.data(), rows, d);
    REQUIRE(same_bits(block, expected));
    REQUIRE(same_bits(reference_rows, expected));
  }
}

TEST_CASE("hadamard matches the float64 Sylvester product, is orthonormal and self-inverse",
          "[simd][hadamard]") {
  std::mt19937 rng(43);
  for (std::size_t d = 1; d <= 512; d *= 2) {
    for (int kind : {0, 1, 3}) {
      CAPTURE(d, kind);
      const auto x = random_row(rng, d, kind);
      const auto exact = hadamard_float64(x);
      std::vector<float> y = x;
      kvc::simd::hadamard(y.data(), d);
      const double bound = transform_bound(x);
      double norm_x = 0, norm_y = 0;
      for (std::size_t i = 0; i < d; ++i) {
        REQUIRE(std::abs(double(y[i]) - exact[i]) <= bound);
        norm_x += double(x[i]) * x[i];
        norm_y += double(y[i]) * y[i];
      }
      // |‖y‖² − ‖x‖²| ≤ 2‖x‖·‖y − Hx‖ + ‖y − Hx‖², with ‖y − Hx‖ ≤ √d · bound.
      const double drift = std::sqrt(double(d)) * bound;
      REQUIRE(std::abs(norm_y - norm_x) <= 2 * std::sqrt(norm_x) * drift + drift * drift);
      // H(Hx) = x: the second transform's own error plus the first's, which H carries over
      // with ‖H e‖∞ ≤ Σ|e|/√d ≤ √d · bound.
      std::vector<float> back = y;
      kvc::simd::hadamard(back.data(), d);
      const double inverse_bound = transform_bound(y) + std::sqrt(double(d)) * bound;
      for (std::size_t i = 0; i < d; ++i) {
        REQUIRE(std::abs(double(back[i]) - x[i]) <= inverse_bound);
      }
    }
  }
}

TEST_CASE("hadamard is finite whenever d times max|x| is", "[simd][hadamard]") {
  // All 256 elements FLT_MAX/256: the stages sum them to exactly FLT_MAX (no overflow on the
  // way), the scale 1/16 gives [FLT_MAX/16, 0, ..., 0]; and back.
  const float x = std::numeric_limits<float>::max() / 256.0F;
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    std::vector<float> row(256, x);
    kvc::simd::hadamard<Arch>(row.data(), 256);
    CHECK(row[0] == std::numeric_limits<float>::max() / 16.0F);
    for (std::size_t i = 1; i < 256; ++i) REQUIRE(row[i] == 0.0F);
    kvc::simd::hadamard<Arch>(row.data(), 256);
    for (std::size_t i = 0; i < 256; ++i) REQUIRE(row[i] == x);
  });
}
