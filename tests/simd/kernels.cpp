// Tests of kvc/simd/kernels.hpp: every SIMD kernel equals its scalar reference (within
// the reordering error of fp32 sums) for lengths around the batch size, random and
// adversarial data.
#include <kvc/simd/kernels.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace {

const std::vector<std::size_t> lengths{0,  1,  2,  3,  7,   8,   15,  16,
                                       17, 31, 33, 64, 127, 128, 129, 1000};

std::vector<float> random_vector(std::mt19937& rng, std::size_t n, float scale = 1.0F) {
  std::normal_distribution<float> normal(0.0F, scale);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

// A reordered fp32 sum of n products differs from the sequential one by at most
// ~n·eps·Σ|a_i b_i| (Higham); use 2n·eps as the bound.
double sum_bound(const float* a, const float* b, std::size_t n) {
  double magnitude = 0;
  for (std::size_t i = 0; i < n; ++i) magnitude += std::abs(double(a[i]) * b[i]);
  return 2.0 * double(n + 1) * std::numeric_limits<float>::epsilon() * magnitude + 1e-30;
}

}  // namespace

TEST_CASE("simd::dot equals the scalar reference", "[simd]") {
  std::mt19937 rng(1);
  const float scale = GENERATE(1e-20F, 1.0F, 1e15F);
  for (std::size_t n : lengths) {
    const auto a = random_vector(rng, n, scale);
    const auto b = random_vector(rng, n, scale);
    CAPTURE(n, scale);
    REQUIRE(std::abs(double(kvc::simd::dot(a.data(), b.data(), n)) -
                     double(kvc::simd::reference::dot(a.data(), b.data(), n))) <=
            2 * sum_bound(a.data(), b.data(), n));
  }
}

TEST_CASE("simd::axpy and simd::scale equal the scalar reference exactly", "[simd]") {
  std::mt19937 rng(2);
  for (std::size_t n : lengths) {
    const auto x = random_vector(rng, n);
    auto y = random_vector(rng, n);
    auto y_reference = y;
    kvc::simd::axpy(0.37F, x.data(), y.data(), n);
    kvc::simd::reference::axpy(0.37F, x.data(), y_reference.data(), n);
    // Element-wise fma vs multiply-add: at most one rounding apart.
    for (std::size_t i = 0; i < n; ++i) {
      REQUIRE(std::abs(y[i] - y_reference[i]) <=
              std::numeric_limits<float>::epsilon() *
                  (std::abs(y_reference[i]) + std::abs(0.37F * x[i])));
    }
    kvc::simd::scale(-3.5F, y.data(), n);
    kvc::simd::reference::scale(-3.5F, y_reference.data(), n);
    for (std::size_t i = 0; i < n; ++i) {
      REQUIRE(std::abs(y[i] - y_reference[i]) <=
              4 * std::numeric_limits<float>::epsilon() * std::abs(y_reference[i]));
    }
  }
}

TEST_CASE("simd::max_value equals the scalar reference", "[simd]") {
  std::mt19937 rng(3);
  CHECK(kvc::simd::max_value(nullptr, 0) == -std::numeric_limits<float>::infinity());
  for (std::size_t n : lengths) {
    auto x = random_vector(rng, n);
    if (n > 3) x[n - 2] = 100.0F;  // the maximum in the scalar tail
    if (n > 1) x[0] = -std::numeric_limits<float>::infinity();
    REQUIRE(kvc::simd::max_value(x.data(), n) == kvc::simd::reference::max_value(x.data(), n));
  }
}

TEST_CASE("simd::exp_shift_sum equals the scalar reference, -inf giving 0", "[simd]") {
  std::mt19937 rng(4);
  for (std::size_t n : lengths) {
    auto x = random_vector(rng, n, 10.0F);
    for (std::size_t i = 0; i < n; i += 5) x[i] = -std::numeric_limits<float>::infinity();
    auto x_reference = x;
    const float shift = kvc::simd::reference::max_value(x.data(), n);
    if (n == 0 || std::isinf(shift)) continue;
    const float sum = kvc::simd::exp_shift_sum(x.data(), n, shift);
    const float sum_reference = kvc::simd::reference::exp_shift_sum(x_reference.data(), n, shift);
    for (std::size_t i = 0; i < n; ++i) {
      if (i % 5 == 0) REQUIRE(x[i] == 0.0F);
      // xsimd::exp is within a few ulp of std::exp.
      REQUIRE(std::abs(x[i] - x_reference[i]) <=
              8 * std::numeric_limits<float>::epsilon() * x_reference[i]);
    }
    REQUIRE(std::abs(sum - sum_reference) <=
            16 * double(n) * std::numeric_limits<float>::epsilon() * sum_reference);
  }
}

TEST_CASE("simd::dot_block and simd::axpy_block equal the scalar reference", "[simd]") {
  std::mt19937 rng(5);
  const std::size_t d = GENERATE(1, 7, 64, 100, 128, 256);
  for (std::size_t rows : {1, 2, 4, 8}) {
    for (std::size_t keys : {1, 3, 4, 5, 16, 33}) {
      CAPTURE(d, rows, keys);
      const std::size_t ldq = d + 3, ldk = d + 1, lds = keys + 2, ldacc = d + 5;  // odd strides
      const auto q = random_vector(rng, rows * ldq);
      const auto k = random_vector(rng, keys * ldk);
      std::vector<float> scores(rows * lds, -1.0F), scores_reference(rows * lds, -1.0F);
      kvc::simd::dot_block(q.data(), rows, ldq, k.data(), keys, ldk, d, scores.data(), lds);
      kvc::simd::reference::dot_block(q.data(), rows, ldq, k.data(), keys, ldk, d,
                                      scores_reference.data(), lds);
      for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t j = 0; j < keys; ++j) {
          REQUIRE(std::abs(scores[r * lds + j] - scores_reference[r * lds + j]) <=
                  2 * sum_bound(q.data() + r * ldq, k.data() + j * ldk, d));
        }
        for (std::size_t j = keys; j < lds; ++j)
          REQUIRE(scores[r * lds + j] == -1.0F);  // untouched
      }

      const auto p = random_vector(rng, rows * lds);
      auto acc = random_vector(rng, rows * ldacc);
      auto acc_reference = acc;
      kvc::simd::axpy_block(p.data(), rows, lds, k.data(), keys, ldk, d, acc.data(), ldacc);
      kvc::simd::reference::axpy_block(p.data(), rows, lds, k.data(), keys, ldk, d,
                                       acc_reference.data(), ldacc);
      for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t c = 0; c < ldacc; ++c) {
          double magnitude = std::abs(acc_reference[r * ldacc + c]);
          if (c < d) {
            for (std::size_t j = 0; j < keys; ++j)
              magnitude += std::abs(double(p[r * lds + j]) * k[j * ldk + c]);
          }
          REQUIRE(std::abs(acc[r * ldacc + c] - acc_reference[r * ldacc + c]) <=
                  4 * double(keys + 1) * std::numeric_limits<float>::epsilon() * magnitude);
        }
      }
    }
  }
}

TEST_CASE("simd::arch_name reports the compiled instruction set", "[simd]") {
  const std::string name = kvc::simd::arch_name();
  CHECK(!name.empty());
#if defined(__AVX512F__)
  CHECK(name.find("avx512") == 0);
#elif defined(__AVX2__)
  CHECK(name.find("avx2") == 0);
#endif
}
