// Tests of kvc/simd/convert.hpp: bit-exact agreement with Eigen's scalar conversions,
// exhaustively over every 16-bit pattern and on float inputs around every rounding case.
#include <kvc/simd/convert.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

template <class H>
std::vector<H> every_bit_pattern() {
  std::vector<H> values(65536);
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto b = static_cast<std::uint16_t>(bits);
    std::memcpy(static_cast<void*>(&values[bits]), &b, 2);
  }
  return values;
}

std::uint32_t float_bits(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}
std::uint16_t half_bits(const void* x) {
  std::uint16_t bits;
  std::memcpy(&bits, x, 2);
  return bits;
}

template <class H>
void check_widening() {
  const auto values = every_bit_pattern<H>();
  // Offsets 0..15 exercise the vector body and every tail length.
  for (std::size_t offset : {0, 1, 7, 15}) {
    std::vector<float> wide(values.size() - offset);
    kvc::simd::convert(values.data() + offset, wide.data(), wide.size());
    for (std::size_t i = 0; i < wide.size(); ++i) {
      const float expected = static_cast<float>(values[i + offset]);
      if (std::isnan(expected)) {
        REQUIRE(std::isnan(wide[i]));
      } else {
        REQUIRE(float_bits(wide[i]) == float_bits(expected));
      }
    }
  }
}

template <class H>
void check_narrowing() {
  // Every 16-bit value, its neighbours half an ulp away (ties) and random floats of every
  // magnitude: the SIMD path must round exactly like Eigen.
  std::vector<float> inputs;
  for (const H& h : every_bit_pattern<H>()) {
    const float x = static_cast<float>(h);
    if (!std::isfinite(x)) continue;
    inputs.push_back(x);
    inputs.push_back(std::nextafter(x, INFINITY));
    inputs.push_back(std::nextafter(x, -INFINITY));
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int i = 0; i < 100000; ++i) {
    const std::uint32_t bits = any_bits(rng);
    float x;
    std::memcpy(&x, &bits, 4);
    inputs.push_back(x);
  }
  inputs.push_back(INFINITY);
  inputs.push_back(-INFINITY);
  inputs.push_back(NAN);
  std::vector<H> narrow(inputs.size());
  kvc::simd::convert(inputs.data(), narrow.data(), inputs.size());
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const H expected = static_cast<H>(inputs[i]);
    if (std::isnan(inputs[i])) {
      REQUIRE(std::isnan(static_cast<float>(narrow[i])));
    } else {
      CAPTURE(i, float_bits(inputs[i]));
      REQUIRE(half_bits(&narrow[i]) == half_bits(&expected));
    }
  }
}

}  // namespace

TEST_CASE("f16 -> f32 matches Eigen::half on all 65536 patterns", "[simd][convert]") {
  check_widening<Eigen::half>();
}
TEST_CASE("bf16 -> f32 matches Eigen::bfloat16 on all 65536 patterns", "[simd][convert]") {
  check_widening<Eigen::bfloat16>();
}
TEST_CASE("f32 -> f16 rounds like Eigen::half, ties and denormals included", "[simd][convert]") {
  check_narrowing<Eigen::half>();
}
TEST_CASE("f32 -> bf16 rounds like Eigen::bfloat16, ties included", "[simd][convert]") {
  check_narrowing<Eigen::bfloat16>();
}
TEST_CASE("same-type and f16 <-> bf16 conversion", "[simd][convert]") {
  const std::vector<float> source{1.0F, -2.5F, 3.25F};
  std::vector<float> copy(3);
  kvc::simd::convert(source.data(), copy.data(), 3);
  CHECK(copy == source);
  const std::vector<Eigen::half> halves{Eigen::half(1.5F), Eigen::half(-0.25F)};
  std::vector<Eigen::bfloat16> brains(2);
  kvc::simd::convert(halves.data(), brains.data(), 2);
  CHECK(static_cast<float>(brains[0]) == 1.5F);
  CHECK(static_cast<float>(brains[1]) == -0.25F);
}
