// Tests of kvc/simd/kernels.hpp: every SIMD kernel equals its scalar reference (within the
// reordering error of fp32 sums) for lengths around the batch size, on random and adversarial
// data (large magnitudes, denormals, zeros, −inf), for every storage type, and for every arch
// the translation unit can run besides the default one.
#include <kvc/simd/kernels.hpp>

#include <catch2/catch.hpp>

#include "../support/simd_archs.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr double eps = std::numeric_limits<float>::epsilon();
// Smallest float denormal: the absolute error of one product or sum rounded into the
// denormal range.
constexpr double denormal_step = 1.4012984643248171e-45;

const std::vector<std::size_t> lengths{0,  1,  2,  3,  7,   8,   15,  16,
                                       17, 31, 33, 64, 127, 128, 129, 1000};

enum class Data { normal, large, tiny, zeros, mixed };
const std::vector<Data> all_data{Data::normal, Data::large, Data::tiny, Data::zeros, Data::mixed};

// Largest finite magnitude a test value may have in T (products of two such values, summed
// 1000 times, must stay finite in fp32).
template <class T>
float large_magnitude() {
  return std::is_same_v<T, Eigen::half> ? 3.0e4F : 1.0e17F;
}

// n values of kind `data`, representable in T (rounded through T).
template <class T = float>
std::vector<float> make_values(std::mt19937& rng, std::size_t n, Data data) {
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::uniform_real_distribution<float> signed_unit(-1.0F, 1.0F);
  std::uniform_int_distribution<int> pick(0, 4);
  std::vector<float> x(n);
  for (float& v : x) {
    Data kind = data;
    if (data == Data::mixed) kind = all_data[static_cast<std::size_t>(pick(rng))];
    switch (kind) {
      case Data::normal:
        v = normal(rng);
        break;
      case Data::large:
        v = signed_unit(rng) * large_magnitude<T>();
        break;
      case Data::tiny:
        v = normal(rng) * 1e-39F;
        break;  // float denormals (0 in f16)
      case Data::zeros:
        v = pick(rng) < 2 ? -0.0F : 0.0F;
        break;
      case Data::mixed:
        break;
    }
    v = static_cast<float>(static_cast<T>(v));
  }
  return x;
}

template <class T>
std::vector<T> narrow(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<T>(x[i]);
  return out;
}

// Two fp32 sums of the same n terms, in different orders and with or without fused
// multiply-adds, are each within γ_{n+1}·Σ|terms| of the exact sum (Higham, Accuracy and
// Stability, §3.1), so they differ by at most 2(n+1)·eps·Σ|terms|; denormal rounding adds at
// most one denormal step per operation.
double sum_tolerance(const float* a, const float* b, std::size_t n, std::size_t stride_b = 1) {
  double magnitude = 0;
  for (std::size_t i = 0; i < n; ++i) magnitude += std::abs(double(a[i]) * b[i * stride_b]);
  return 2.0 * double(n + 1) * eps * magnitude + 2.0 * double(n + 1) * denormal_step;
}

std::uint32_t bits_of(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

using kvc::test::for_each_arch;

template <class T>
void check_dot() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(1);
    for (Data data : all_data) {
      for (std::size_t n : lengths) {
        CAPTURE(Arch::name(), n, int(data));
        const auto a = make_values(rng, n, data);
        const auto b_float = make_values<T>(rng, n, data);
        const auto b = narrow<T>(b_float);
        const double got = kvc::simd::dot<Arch>(a.data(), b.data(), n);
        const double expected = kvc::simd::reference::dot(a.data(), b.data(), n);
        REQUIRE(std::abs(got - expected) <= sum_tolerance(a.data(), b_float.data(), n));
      }
    }
  });
}

template <class T>
void check_axpy() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(2);
    for (Data data : all_data) {
      for (std::size_t n : lengths) {
        CAPTURE(Arch::name(), n, int(data));
        const auto x_float = make_values<T>(rng, n, data);
        const auto x = narrow<T>(x_float);
        auto y = make_values(rng, n, data);
        auto y_reference = y;
        const float alpha = -0.37F;
        kvc::simd::axpy<Arch>(alpha, x.data(), y.data(), n);
        kvc::simd::reference::axpy(alpha, x.data(), y_reference.data(), n);
        // A fused multiply-add rounds once, the reference twice: they differ by at most one
        // rounding of each of the product and the sum.
        for (std::size_t i = 0; i < n; ++i) {
          REQUIRE(std::abs(double(y[i]) - y_reference[i]) <=
                  eps * (std::abs(double(y_reference[i])) + std::abs(double(alpha) * x_float[i])) +
                      2 * denormal_step);
        }
      }
    }
  });
}

}  // namespace

TEST_CASE("simd::dot on f32 keys equals the scalar reference", "[simd]") {
  check_dot<float>();
}
TEST_CASE("simd::dot on f16 keys equals the scalar reference", "[simd]") {
  check_dot<Eigen::half>();
}
TEST_CASE("simd::dot on bf16 keys equals the scalar reference", "[simd]") {
  check_dot<Eigen::bfloat16>();
}

TEST_CASE("simd::dot on a hand-computed case", "[simd]") {
  std::vector<float> a(37), b(37);
  for (std::size_t i = 0; i < a.size(); ++i) {
    a[i] = static_cast<float>(i);
    b[i] = i % 2 == 0 ? 1.0F : -1.0F;
  }
  // Σ_{i even} i − Σ_{i odd} i over 0..36: the 18 pairs (2m, 2m+1) give −1 each, and the
  // last index, 36, is even: −18 + 36.
  CHECK(kvc::simd::dot(a.data(), b.data(), a.size()) == 18.0F);
  const auto b_half = narrow<Eigen::half>(b);
  CHECK(kvc::simd::dot(a.data(), b_half.data(), a.size()) == 18.0F);
}

TEST_CASE("simd::axpy on f32 values equals the scalar reference", "[simd]") {
  check_axpy<float>();
}
TEST_CASE("simd::axpy on f16 values equals the scalar reference", "[simd]") {
  check_axpy<Eigen::half>();
}
TEST_CASE("simd::axpy on bf16 values equals the scalar reference", "[simd]") {
  check_axpy<Eigen::bfloat16>();
}

TEST_CASE("simd::scale is bit-identical to the scalar reference", "[simd]") {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(3);
    for (Data data : all_data) {
      for (std::size_t n : lengths) {
        CAPTURE(Arch::name(), n, int(data));
        auto y = make_values(rng, n, data);
        auto y_reference = y;
        kvc::simd::scale<Arch>(-3.5F, y.data(), n);
        kvc::simd::reference::scale(-3.5F, y_reference.data(), n);
        for (std::size_t i = 0; i < n; ++i) REQUIRE(bits_of(y[i]) == bits_of(y_reference[i]));
      }
    }
  });
}

TEST_CASE("simd::max_value equals the scalar reference", "[simd]") {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    constexpr float minus_infinity = -std::numeric_limits<float>::infinity();
    CHECK(kvc::simd::max_value<Arch>(nullptr, 0) == minus_infinity);
    std::mt19937 rng(4);
    for (Data data : all_data) {
      for (std::size_t n : lengths) {
        CAPTURE(Arch::name(), n, int(data));
        auto x = make_values(rng, n, data);
        for (std::size_t i = 0; i < n; i += 3) x[i] = minus_infinity;
        REQUIRE(kvc::simd::max_value<Arch>(x.data(), n) ==
                kvc::simd::reference::max_value(x.data(), n));
        // The maximum at every position, vector body and scalar tail alike.
        for (std::size_t at = 0; at < n && n <= 33; ++at) {
          auto y = x;
          y[at] = 1e30F;
          REQUIRE(kvc::simd::max_value<Arch>(y.data(), n) == 1e30F);
        }
      }
      const std::vector<float> all_masked(19, minus_infinity);
      REQUIRE(kvc::simd::max_value<Arch>(all_masked.data(), 19) == minus_infinity);
    }
  });
}

TEST_CASE("xsimd::exp is within 2 ulp of std::exp on the softmax range", "[simd]") {
  // The accuracy kvc::simd::exp_shift_sum documents: arguments x − max ≤ 0 down to the
  // smallest normal result (exp(−87.33) = FLT_MIN); below it, at most FLT_MIN absolute.
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    using batch = xsimd::batch<float, Arch>;
    std::vector<float> x(batch::size), e(batch::size);
    double worst_ulps = 0;
    for (float start = -104.0F; start < 0.0F; start += 1.0e-4F * float(batch::size)) {
      for (std::size_t i = 0; i < batch::size; ++i) x[i] = start + 1.0e-4F * float(i);
      xsimd::exp(batch::load_unaligned(x.data())).store_unaligned(e.data());
      for (std::size_t i = 0; i < batch::size; ++i) {
        const double expected = std::exp(double(x[i]));
        if (expected >= std::numeric_limits<float>::min()) {
          const double ulp = std::ldexp(1.0, std::ilogb(expected) - 23);
          worst_ulps = std::max(worst_ulps, std::abs(e[i] - expected) / ulp);
        } else {
          REQUIRE(std::abs(e[i] - expected) <= std::numeric_limits<float>::min());
        }
      }
    }
    CAPTURE(Arch::name(), worst_ulps);
    CHECK(worst_ulps <= 2.0);
    const batch masked(-std::numeric_limits<float>::infinity());
    CHECK(kvc::simd::detail::reduce_max(xsimd::exp(masked)) == 0.0F);
  });
}

TEST_CASE("simd::exp_shift_sum equals the scalar reference, -inf giving 0", "[simd]") {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(5);
    for (float spread : {1.0F, 10.0F, 60.0F}) {
      for (std::size_t n : lengths) {
        CAPTURE(Arch::name(), n, spread);
        auto x = make_values(rng, n, Data::normal);
        for (float& v : x) v *= spread;
        for (std::size_t i = 0; i < n; i += 5) x[i] = -std::numeric_limits<float>::infinity();
        auto x_reference = x;
        const float shift = n > 1 ? kvc::simd::reference::max_value(x.data(), n) : 0.0F;
        const float sum = kvc::simd::exp_shift_sum<Arch>(x.data(), n, shift);
        const float sum_reference =
            kvc::simd::reference::exp_shift_sum(x_reference.data(), n, shift);
        // Per element: ≤ 2 ulp apart (both within 1 ulp of exp), or FLT_MIN absolute where
        // the result is denormal. The sums then differ by the per-element errors plus the
        // reordering bound of n positive terms.
        constexpr double element_absolute = std::numeric_limits<float>::min();
        for (std::size_t i = 0; i < n; ++i) {
          if (i % 5 == 0) REQUIRE(x[i] == 0.0F);
          REQUIRE(std::abs(double(x[i]) - x_reference[i]) <=
                  2 * eps * x_reference[i] + element_absolute);
        }
        if (n == 0) REQUIRE(sum == 0.0F);
        REQUIRE(std::abs(double(sum) - sum_reference) <=
                (2 * double(n + 1) + 2) * eps * sum_reference + double(n) * element_absolute);
      }
    }
  });
}

namespace {

// The tile kernels on keys/values stored as T (widened in registers) against the scalar
// reference on the same T, with odd strides and sentinels around the written region.
template <class T>
void check_block_kernels() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(6);
    for (Data data : {Data::normal, Data::mixed}) {
      for (std::size_t d : {1, 7, 64, 100, 128, 256}) {
        for (std::size_t rows = 1; rows <= 8; ++rows) {
          for (std::size_t keys : {1, 3, 4, 5, 16, 33}) {
            CAPTURE(Arch::name(), int(data), d, rows, keys);
            const std::size_t ldq = d + 3, ldk = d + 1, lds = keys + 2, ldacc = d + 5;
            const auto q = make_values(rng, rows * ldq, data);
            const auto k_widened = make_values<T>(rng, keys * ldk, data);
            const auto k = narrow<T>(k_widened);
            std::vector<float> scores(rows * lds, -1.0F), scores_reference(rows * lds, -1.0F);
            kvc::simd::dot_block<Arch>(q.data(), rows, ldq, k.data(), keys, ldk, d, scores.data(),
                                       lds);
            kvc::simd::reference::dot_block(q.data(), rows, ldq, k.data(), keys, ldk, d,
                                            scores_reference.data(), lds);
            for (std::size_t r = 0; r < rows; ++r) {
              for (std::size_t j = 0; j < keys; ++j) {
                REQUIRE(std::abs(double(scores[r * lds + j]) - scores_reference[r * lds + j]) <=
                        sum_tolerance(q.data() + r * ldq, k_widened.data() + j * ldk, d));
              }
              for (std::size_t j = keys; j < lds; ++j) REQUIRE(scores[r * lds + j] == -1.0F);
            }

            const auto p = make_values(rng, rows * lds, data);
            const auto acc_initial = make_values(rng, rows * ldacc, data);
            auto acc = acc_initial;
            auto acc_reference = acc;
            kvc::simd::axpy_block<Arch>(p.data(), rows, lds, k.data(), keys, ldk, d, acc.data(),
                                        ldacc);
            kvc::simd::reference::axpy_block(p.data(), rows, lds, k.data(), keys, ldk, d,
                                             acc_reference.data(), ldacc);
            for (std::size_t r = 0; r < rows; ++r) {
              for (std::size_t c = 0; c < ldacc; ++c) {
                const float got = acc[r * ldacc + c], expected = acc_reference[r * ldacc + c];
                if (c >= d) {
                  REQUIRE(bits_of(got) == bits_of(expected));  // padding untouched
                  continue;
                }
                // keys + 1 terms (the initial accumulator is one), summed in the same order
                // but with fused multiply-adds: the sum bound with the initial value as a
                // term of weight 1.
                double magnitude = std::abs(double(acc_initial[r * ldacc + c]));
                for (std::size_t j = 0; j < keys; ++j) {
                  magnitude += std::abs(double(p[r * lds + j]) * k_widened[j * ldk + c]);
                }
                REQUIRE(std::abs(double(got) - expected) <=
                        2 * double(keys + 2) * (eps * magnitude + denormal_step));
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace

TEST_CASE("simd::dot_block and simd::axpy_block on f32 tiles equal the reference", "[simd]") {
  check_block_kernels<float>();
}
TEST_CASE("simd::dot_block and simd::axpy_block on f16 tiles equal the reference", "[simd]") {
  check_block_kernels<Eigen::half>();
}
TEST_CASE("simd::dot_block and simd::axpy_block on bf16 tiles equal the reference", "[simd]") {
  check_block_kernels<Eigen::bfloat16>();
}

TEST_CASE("simd::dot_block and simd::axpy_block on a hand-computed GQA tile", "[simd]") {
  // Two query rows, three keys of dimension 2 (stride 3), scores with stride 4.
  const std::vector<float> q{1, 0, 0, 1};                // q0 = e0, q1 = e1
  const std::vector<float> k{2, 3, 99, 4, 5, 99, 6, 7};  // k_j = (2,3), (4,5), (6,7)
  std::vector<float> scores(8, -1.0F);
  kvc::simd::dot_block(q.data(), 2, 2, k.data(), 3, 3, 2, scores.data(), 4);
  CHECK(scores == std::vector<float>{2, 4, 6, -1, 3, 5, 7, -1});
  const std::vector<float> p{1, 0, 1, 0, 0.5F, 0.5F};  // row 0: k0 + k2; row 1: (k1 + k2)/2
  std::vector<float> acc{10, 20, 30, 40};
  kvc::simd::axpy_block(p.data(), 2, 3, k.data(), 3, 3, 2, acc.data(), 2);
  CHECK(acc == std::vector<float>{18, 30, 35, 46});
}

TEST_CASE("simd::arch_name reports the compiled instruction set", "[simd]") {
  const std::string name = kvc::simd::arch_name();
  CHECK(name == xsimd::default_arch::name());
#if defined(__AVX512BW__)
  CHECK(name.find("avx512") == 0);
#elif defined(__AVX2__)
  CHECK(name.find("avx2") != std::string::npos);
#elif defined(__x86_64__)
  CHECK(name.find("sse") == 0);
#endif
}
