// Tests of kvc/simd/fp8.hpp: the 256 codes of each format against the OCP formulas, rounding
// against a float64 nearest-even search (halfway points, subnormals, saturation), and every
// SIMD kernel against its scalar reference on every arch the build can run (AVX-512, AVX2,
// SSE2 with -march=native on an AVX-512 machine), including the portable widening path.
#include <kvc/simd/fp8.hpp>

#include <catch2/catch.hpp>

#include "../support/simd_archs.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using kvc::simd::Fp8Code;
using kvc::simd::Fp8Format;
using kvc::simd::Fp8Traits;
using kvc::test::for_each_arch;

constexpr Fp8Format E4M3 = Fp8Format::E4M3;
constexpr Fp8Format E5M2 = Fp8Format::E5M2;

std::uint32_t bits_of(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}

// The OCP OFP8 value of a code in float64, written from the spec: NaN for E4M3 S.1111.111
// and E5M2 S.11111.{01,10,11}, ±inf for E5M2 S.11111.00.
template <Fp8Format F>
double ocp_value(unsigned code) {
  const int m = F == E4M3 ? 3 : 2;
  const int bias = F == E4M3 ? 7 : 15;
  const int exponent_ones = F == E4M3 ? 15 : 31;
  const int exponent = static_cast<int>((code & 0x7F) >> m);
  const int mantissa = static_cast<int>(code & ((1U << m) - 1));
  const double sign = (code & 0x80) != 0 ? -1.0 : 1.0;
  if (F == E4M3 && (code & 0x7F) == 0x7F) return std::numeric_limits<double>::quiet_NaN();
  if (F == E5M2 && exponent == exponent_ones) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, 1 - bias - m);
  return sign * std::ldexp(1.0 + std::ldexp(mantissa, -m), exponent - bias);
}

// Codes whose OCP value is finite (E4M3: 254 of 256, E5M2: 248).
template <Fp8Format F>
std::vector<std::uint8_t> finite_codes() {
  std::vector<std::uint8_t> codes;
  for (unsigned code = 0; code < 256; ++code) {
    if (std::isfinite(ocp_value<F>(code))) codes.push_back(static_cast<std::uint8_t>(code));
  }
  return codes;
}

// Saturating round to nearest even in float64: the finite code nearest to |y| (ties: the
// even code, i.e. even mantissa), the sign of y on top. Beyond max the nearest finite code
// is max itself.
template <Fp8Format F>
std::uint8_t nearest_code(double y) {
  const double magnitude = std::abs(y);
  const auto sign = static_cast<unsigned>(std::signbit(y) ? 0x80 : 0);
  // Saturation (and far beyond max, |value − y| would be equal in float64 for every code).
  if (magnitude >= Fp8Traits<F>::max)
    return static_cast<std::uint8_t>(Fp8Traits<F>::max_code | sign);
  unsigned best = 0;
  double best_error = std::numeric_limits<double>::infinity();
  for (unsigned code = 0; code <= Fp8Traits<F>::max_code; ++code) {
    const double error = std::abs(ocp_value<F>(code) - magnitude);
    if (error < best_error || (error == best_error && code % 2 == 0)) {
      best = code;
      best_error = error;
    }
  }
  return static_cast<std::uint8_t>(best | sign);
}

// Lanes of y through the SIMD rounding on Arch.
template <Fp8Format F, class Arch>
std::vector<std::uint8_t> simd_round(const std::vector<float>& y) {
  constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
  std::vector<float> padded(y);
  padded.resize((y.size() + lanes - 1) / lanes * lanes, 0.0F);
  std::vector<std::uint8_t> codes(padded.size());
  for (std::size_t i = 0; i < padded.size(); i += lanes) {
    const auto batch = xsimd::batch<float, Arch>::load_unaligned(padded.data() + i);
    alignas(64) std::int32_t out[lanes];
    kvc::simd::round_to_fp8<F, Arch>(batch).store_aligned(out);
    for (std::size_t l = 0; l < lanes; ++l) codes[i + l] = static_cast<std::uint8_t>(out[l]);
  }
  codes.resize(y.size());
  return codes;
}

// Inputs that stress the rounding of format F: every value, every halfway point between
// neighbours (and one float ulp either side), subnormals, values beyond max, float
// denormals and zeros, plus random bit patterns from 0 to 4 · max; both signs.
template <Fp8Format F>
std::vector<float> rounding_inputs() {
  std::vector<float> inputs;
  std::vector<double> values;
  for (unsigned code = 0; code <= Fp8Traits<F>::max_code; ++code)
    values.push_back(ocp_value<F>(code));
  const double max = Fp8Traits<F>::max;
  values.push_back(max + (max - values[values.size() - 2]));  // the step past max, unnamed
  for (std::size_t i = 0; i + 1 < values.size(); ++i) {
    const auto value = static_cast<float>(values[i]);
    const auto halfway = static_cast<float>((values[i] + values[i + 1]) / 2);  // exact
    REQUIRE(double(halfway) == (values[i] + values[i + 1]) / 2);
    for (float x : {value, halfway, std::nextafter(halfway, 0.0F), std::nextafter(halfway, 1e30F),
                    std::nextafter(value, 1e30F)}) {
      inputs.push_back(x);
    }
  }
  for (float x : {0.0F, std::numeric_limits<float>::denorm_min(), 1e-40F,
                  std::numeric_limits<float>::min(), 1e-30F, static_cast<float>(max) * 1.0001F,
                  static_cast<float>(max) * 2.0F, 1e30F, std::numeric_limits<float>::max()}) {
    inputs.push_back(x);
  }
  std::mt19937 rng(static_cast<unsigned>(F == E4M3 ? 81 : 82));
  const std::uint32_t top = bits_of(static_cast<float>(4 * max));
  std::uniform_int_distribution<std::uint32_t> pattern(0, top);
  for (int i = 0; i < 20000; ++i) {
    const std::uint32_t bits = pattern(rng);
    float x;
    std::memcpy(&x, &bits, 4);
    inputs.push_back(x);
  }
  const std::size_t positive = inputs.size();
  for (std::size_t i = 0; i < positive; ++i) inputs.push_back(-inputs[i]);
  return inputs;
}

template <Fp8Format F>
void check_rounding() {
  const auto inputs = rounding_inputs<F>();
  std::vector<std::uint8_t> expected(inputs.size());
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    expected[i] = nearest_code<F>(inputs[i]);
    const std::uint8_t reference = kvc::simd::reference::round_to_fp8<F>(inputs[i]);
    CAPTURE(i, inputs[i]);
    REQUIRE(int(reference) == int(expected[i]));
  }
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    const auto codes = simd_round<F, Arch>(inputs);
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      CAPTURE(Arch::name(), i, inputs[i]);
      REQUIRE(int(codes[i]) == int(expected[i]));
    }
  });
}

// Every code widened on every arch equals static_cast<float>(Fp8Code) bit for bit (both NaN
// for the NaN codes), through load_as_float and through the portable bit construction.
template <Fp8Format F>
void check_widening() {
  std::vector<Fp8Code<F>> codes(256 + 1);
  for (unsigned code = 0; code < 256; ++code)
    codes[code + 1].bits = static_cast<std::uint8_t>(code);
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
    for (std::size_t first = 1; first + lanes <= codes.size(); first += lanes) {
      alignas(64) float simd[lanes], portable[lanes];
      kvc::simd::load_as_float<Arch>(codes.data() + first).store_aligned(simd);
      const auto bytes = kvc::simd::detail::load_u8_as_u32<Arch>(&codes[first].bits);
      kvc::simd::detail::half_bits_to_float<Arch>(
          kvc::simd::detail::fp8_to_half_bits<F, Arch>(bytes))
          .store_aligned(portable);
      for (std::size_t l = 0; l < lanes; ++l) {
        const float expected = static_cast<float>(codes[first + l]);
        CAPTURE(Arch::name(), int(codes[first + l].bits));
        if (std::isnan(expected)) {
          REQUIRE(std::isnan(simd[l]));
          REQUIRE(std::isnan(portable[l]));
        } else {
          REQUIRE(bits_of(simd[l]) == bits_of(expected));
          REQUIRE(bits_of(portable[l]) == bits_of(expected));
        }
      }
    }
  });
}

template <Fp8Format F, class S>
std::vector<S> random_row(std::mt19937& rng, std::size_t n, int kind) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> exponent(-12.0F, 12.0F);
  std::vector<S> row(n);
  for (std::size_t i = 0; i < n; ++i) {
    float x = normal(rng);
    if (kind == 1) x = std::copysign(std::exp2(exponent(rng)), x);  // wide dynamic range
    if (kind == 2) x *= 1e-39F;                                     // float denormals
    if (kind == 3 && i == n / 2) x = std::is_same_v<S, Eigen::half> ? 6e4F : 1e30F;  // outlier
    if (kind == 4) x = 0.0F;
    row[i] = static_cast<S>(x);
  }
  return row;
}

template <Fp8Format F, class S>
void check_encode_decode_rows() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(7);
    for (int kind = 0; kind < 5; ++kind) {
      for (std::size_t n : {0, 1, 3, 4, 8, 15, 16, 17, 31, 33, 64, 71, 128}) {
        CAPTURE(Arch::name(), kind, n);
        const auto x = random_row<F, S>(rng, n, kind);
        // +1: rows are unaligned inside a page.
        std::vector<std::byte> simd(1 + 4 + n, std::byte{0x5A}), reference = simd;
        kvc::simd::encode_fp8<F, Arch>(x.data(), n, simd.data() + 1);
        kvc::simd::reference::encode_fp8<F>(x.data(), n, reference.data() + 1);
        REQUIRE(simd == reference);
        std::vector<float> out(n + 1, -7.0F), expected(n + 1, -7.0F);
        kvc::simd::decode_fp8<F, Arch>(simd.data() + 1, n, out.data());
        kvc::simd::reference::decode_fp8<F>(simd.data() + 1, n, expected.data());
        for (std::size_t i = 0; i <= n; ++i) REQUIRE(bits_of(out[i]) == bits_of(expected[i]));
      }
    }
  });
}

// Random rows of codes with random (positive) scales; strides leave gaps between rows.
template <Fp8Format F>
std::vector<std::byte> random_codes(std::mt19937& rng, std::size_t tokens, std::size_t stride,
                                    std::size_t d) {
  const auto finite = finite_codes<F>();
  std::uniform_int_distribution<std::size_t> pick(0, finite.size() - 1);
  std::uniform_real_distribution<float> scale(0.001F, 2.0F);
  std::vector<std::byte> rows(1 + tokens * stride, std::byte{0});
  for (std::size_t j = 0; j < tokens; ++j) {
    std::byte* row = rows.data() + 1 + j * stride;
    // E5M2's large codes times a scale near 1 are ±57344: keep the sums moderate.
    const float s = scale(rng) * (F == E5M2 ? 1e-4F : 1.0F);
    std::memcpy(row, &s, 4);
    for (std::size_t c = 0; c < d; ++c) row[4 + c] = static_cast<std::byte>(finite[pick(rng)]);
  }
  return rows;
}

template <Fp8Format F>
void check_tiles() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(9);
    std::normal_distribution<float> normal;
    for (std::size_t d : {1, 4, 7, 64, 100, 128}) {
      for (std::size_t rows : {1, 2, 3, 4, 5, 8, 9}) {
        for (std::size_t tokens : {1, 3, 4, 5, 16, 33}) {
          CAPTURE(Arch::name(), d, rows, tokens);
          const std::size_t stride = 4 + d + 3, ldq = d + 1, lds = tokens + 2, ldacc = d + 5;
          const auto codes = random_codes<F>(rng, tokens, stride, d);
          std::vector<float> q(rows * ldq), p(rows * lds), decoded(tokens * d);
          for (float& x : q) x = normal(rng);
          for (float& x : p) x = std::abs(normal(rng));
          for (std::size_t j = 0; j < tokens; ++j) {
            kvc::simd::reference::decode_fp8<F>(codes.data() + 1 + j * stride, d,
                                                decoded.data() + j * d);
          }
          std::vector<float> scores(rows * lds, -1.0F), expected(rows * lds, -1.0F);
          kvc::simd::score_fp8<F, Arch>(q.data(), rows, ldq, codes.data() + 1, tokens, stride, d,
                                        scores.data(), lds);
          kvc::simd::reference::score_fp8<F>(q.data(), rows, ldq, codes.data() + 1, tokens, stride,
                                             d, expected.data(), lds);
          for (std::size_t r = 0; r < rows; ++r) {
            for (std::size_t j = 0; j < tokens; ++j) {
              double magnitude = 0;
              for (std::size_t c = 0; c < d; ++c) {
                magnitude += std::abs(double(q[r * ldq + c]) * decoded[j * d + c]);
              }
              REQUIRE(std::abs(double(scores[r * lds + j]) - expected[r * lds + j]) <=
                      4 * (d + 2) * 0x1p-24 * magnitude);
            }
            for (std::size_t j = tokens; j < lds; ++j) REQUIRE(scores[r * lds + j] == -1.0F);
          }

          std::vector<float> acc(rows * ldacc);
          for (float& x : acc) x = normal(rng);
          const std::vector<float> initial = acc;
          std::vector<float> acc_expected = acc, scratch(tokens * d);
          kvc::simd::accumulate_fp8<F, Arch>(p.data(), rows, lds, codes.data() + 1, tokens, stride,
                                             d, acc.data(), ldacc, scratch.data());
          kvc::simd::reference::accumulate_fp8<F>(p.data(), rows, lds, codes.data() + 1, tokens,
                                                  stride, d, acc_expected.data(), ldacc);
          for (std::size_t r = 0; r < rows; ++r) {
            for (std::size_t c = 0; c < ldacc; ++c) {
              if (c >= d) {
                REQUIRE(bits_of(acc[r * ldacc + c]) == bits_of(initial[r * ldacc + c]));
                continue;
              }
              double magnitude = std::abs(double(initial[r * ldacc + c]));
              for (std::size_t j = 0; j < tokens; ++j) {
                magnitude += std::abs(double(p[r * lds + j]) * decoded[j * d + c]);
              }
              REQUIRE(std::abs(double(acc[r * ldacc + c]) - acc_expected[r * ldacc + c]) <=
                      4 * (tokens + 2) * 0x1p-24 * magnitude);
            }
          }
        }
      }
    }
  });
}

// kernels.hpp's dot_block / axpy_block on Fp8Code keys (widened through load_as_float's
// overload) against kvc::simd::reference's, which widens with static_cast<float>.
template <Fp8Format F>
void check_block_kernels_on_codes() {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    std::mt19937 rng(10);
    std::normal_distribution<float> normal;
    const auto finite = finite_codes<F>();
    std::uniform_int_distribution<std::size_t> pick(0, finite.size() - 1);
    for (std::size_t d : {1, 7, 64, 100, 128}) {
      for (std::size_t rows : {1, 2, 4, 5}) {
        for (std::size_t keys : {1, 4, 5, 33}) {
          CAPTURE(Arch::name(), d, rows, keys);
          const std::size_t ldk = d + 1, ldq = d + 3, lds = keys + 2;
          std::vector<Fp8Code<F>> k(keys * ldk);
          for (auto& code : k) code.bits = finite[pick(rng)];
          std::vector<float> q(rows * ldq), p(rows * lds);
          for (float& x : q) x = normal(rng) * (F == E5M2 ? 1e-4F : 1.0F);
          for (float& x : p) x = std::abs(normal(rng)) * (F == E5M2 ? 1e-4F : 1.0F);
          std::vector<float> scores(rows * lds, -1.0F), expected = scores;
          kvc::simd::dot_block<Arch>(q.data(), rows, ldq, k.data(), keys, ldk, d, scores.data(),
                                     lds);
          kvc::simd::reference::dot_block(q.data(), rows, ldq, k.data(), keys, ldk, d,
                                          expected.data(), lds);
          std::vector<float> acc(rows * d, 0.25F), acc_expected = acc;
          kvc::simd::axpy_block<Arch>(p.data(), rows, lds, k.data(), keys, ldk, d, acc.data(), d);
          kvc::simd::reference::axpy_block(p.data(), rows, lds, k.data(), keys, ldk, d,
                                           acc_expected.data(), d);
          for (std::size_t r = 0; r < rows; ++r) {
            for (std::size_t j = 0; j < keys; ++j) {
              double magnitude = 0;
              for (std::size_t c = 0; c < d; ++c) {
                magnitude += std::abs(double(q[r * ldq + c]) * static_cast<float>(k[j * ldk + c]));
              }
              REQUIRE(std::abs(double(scores[r * lds + j]) - expected[r * lds + j]) <=
                      2 * d * 0x1p-24 * magnitude);
            }
            for (std::size_t c = 0; c < d; ++c) {
              double magnitude = 0.25;
              for (std::size_t j = 0; j < keys; ++j) {
                magnitude += std::abs(double(p[r * lds + j]) * static_cast<float>(k[j * ldk + c]));
              }
              REQUIRE(std::abs(double(acc[r * d + c]) - acc_expected[r * d + c]) <=
                      2 * (keys + 1) * 0x1p-24 * magnitude);
            }
          }
        }
      }
    }
  });
}

}  // namespace

TEST_CASE("FP8 code values follow the OCP formulas, hand-checked codes included", "[simd][fp8]") {
  using kvc::simd::reference::fp8_to_float;
  for (unsigned code = 0; code < 256; ++code) {
    CAPTURE(code);
    const auto c = static_cast<std::uint8_t>(code);
    const double e4m3 = ocp_value<E4M3>(code), e5m2 = ocp_value<E5M2>(code);
    if (std::isnan(e4m3)) {
      CHECK(fp8_to_float<E4M3>(c) == ((code & 0x80) != 0 ? -480.0F : 480.0F));  // the NaN rule
    } else {
      REQUIRE(double(fp8_to_float<E4M3>(c)) == e4m3);
    }
    if (std::isnan(e5m2)) {
      REQUIRE(std::isnan(fp8_to_float<E5M2>(c)));
    } else {
      REQUIRE(double(fp8_to_float<E5M2>(c)) == e5m2);
    }
  }
  CHECK(ocp_value<E4M3>(0x7E) == 448.0);
  CHECK(ocp_value<E4M3>(0xFE) == -448.0);
  CHECK(ocp_value<E4M3>(0x38) == 1.0);
  CHECK(ocp_value<E4M3>(0x08) == 0x1p-6);  // smallest normal
  CHECK(ocp_value<E4M3>(0x07) == 7 * 0x1p-9);
  CHECK(ocp_value<E4M3>(0x01) == 0x1p-9);  // smallest subnormal
  CHECK(std::isnan(ocp_value<E4M3>(0x7F)));
  CHECK(ocp_value<E5M2>(0x7B) == 57344.0);
  CHECK(ocp_value<E5M2>(0x3C) == 1.0);
  CHECK(ocp_value<E5M2>(0x04) == 0x1p-14);
  CHECK(ocp_value<E5M2>(0x01) == 0x1p-16);
  CHECK(ocp_value<E5M2>(0x7C) == std::numeric_limits<double>::infinity());
  CHECK(ocp_value<E5M2>(0xFC) == -std::numeric_limits<double>::infinity());
  CHECK(std::isnan(ocp_value<E5M2>(0x7D)));
  CHECK(finite_codes<E4M3>().size() == 254);
  CHECK(finite_codes<E5M2>().size() == 248);
  // E5M2 is the top byte of the binary16 of the same value.
  for (std::uint8_t code : finite_codes<E5M2>()) {
    const auto half = Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(code << 8));
    REQUIRE(static_cast<double>(static_cast<float>(half)) == ocp_value<E5M2>(code));
  }
}

TEST_CASE("FP8 widening in registers is exact for all 256 codes on every arch", "[simd][fp8]") {
  check_widening<E4M3>();
  check_widening<E5M2>();
  for (std::uint8_t code : finite_codes<E4M3>()) {
    REQUIRE(double(static_cast<float>(Fp8Code<E4M3>{code})) * 256 == ocp_value<E4M3>(code));
  }
}

TEST_CASE("FP8 rounding maps every finite code's value back to the code", "[simd][fp8]") {
  const auto round_trip = [](auto format) {
    constexpr Fp8Format F = decltype(format)::value;
    const auto codes = finite_codes<F>();
    std::vector<float> values;
    for (std::uint8_t code : codes) values.push_back(static_cast<float>(ocp_value<F>(code)));
    for (std::size_t i = 0; i < codes.size(); ++i) {
      REQUIRE(int(kvc::simd::reference::round_to_fp8<F>(values[i])) == int(codes[i]));
    }
    for_each_arch([&](auto arch) {
      using Arch = decltype(arch);
      const auto simd = simd_round<F, Arch>(values);
      for (std::size_t i = 0; i < codes.size(); ++i) {
        CAPTURE(Arch::name(), int(codes[i]));
        REQUIRE(int(simd[i]) == int(codes[i]));
      }
    });
  };
  round_trip(std::integral_constant<Fp8Format, E4M3>{});
  round_trip(std::integral_constant<Fp8Format, E5M2>{});
}

TEST_CASE("FP8 rounding equals a float64 nearest-even search, saturating", "[simd][fp8]") {
  check_rounding<E4M3>();
  check_rounding<E5M2>();
  using kvc::simd::reference::round_to_fp8;
  // Hand-picked: ties to even in the normal and subnormal range, saturation, signed zero.
  CHECK(round_to_fp8<E4M3>(17.0F) == 0x58);   // 16 | 18: tie → 16 (even mantissa)
  CHECK(round_to_fp8<E4M3>(19.0F) == 0x5A);   // 18 | 20: tie → 20
  CHECK(round_to_fp8<E4M3>(464.0F) == 0x7E);  // halfway past 448: even → 448
  CHECK(round_to_fp8<E4M3>(1e9F) == 0x7E);
  CHECK(round_to_fp8<E4M3>(-1e9F) == 0xFE);
  CHECK(round_to_fp8<E4M3>(0x1.8p-9F) == 0x02);  // 1.5 subnormal steps → 2
  CHECK(round_to_fp8<E4M3>(0x1p-10F) == 0x00);   // half a step → 0 (even)
  CHECK(round_to_fp8<E4M3>(-0x1p-11F) == 0x80);  // rounds to −0
  CHECK(round_to_fp8<E4M3>(-0.0F) == 0x80);
  CHECK(round_to_fp8<E5M2>(61440.0F) == 0x7B);  // halfway past 57344 (odd): saturates
  CHECK(round_to_fp8<E5M2>(std::numeric_limits<float>::max()) == 0x7B);
  CHECK(round_to_fp8<E5M2>(1.125F) == 0x3C);  // 1 | 1.25: tie → 1
  CHECK(round_to_fp8<E5M2>(1.375F) == 0x3E);  // 1.25 | 1.5: tie → 1.5
  CHECK(round_to_fp8<E5M2>(0x1.8p-16F) == 0x02);
}

TEST_CASE("encode_fp8 and decode_fp8 equal their references bit for bit", "[simd][fp8]") {
  check_encode_decode_rows<E4M3, float>();
  check_encode_decode_rows<E5M2, float>();
  check_encode_decode_rows<E4M3, Eigen::half>();
  check_encode_decode_rows<E5M2, Eigen::bfloat16>();
}

TEST_CASE("dot_block and axpy_block run on FP8 codes like the reference", "[simd][fp8]") {
  check_block_kernels_on_codes<E4M3>();
  check_block_kernels_on_codes<E5M2>();
}

TEST_CASE("score_fp8 and accumulate_fp8 equal their references", "[simd][fp8]") {
  check_tiles<E4M3>();
  check_tiles<E5M2>();
}
