// Tests of kvc/simd/convert.hpp: bit-exact agreement with Eigen's scalar conversions,
// exhaustively over every 16-bit pattern and on float inputs around every rounding case, for
// every arch the translation unit can run (so one -march=native build checks the AVX-512,
// F16C/AVX2 and SSE2 paths) and for the portable bit-manipulation path on its own.
#include <kvc/simd/convert.hpp>

#include <catch2/catch.hpp>

#include "../support/simd_archs.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

namespace {

using kvc::test::for_each_arch;

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
std::uint16_t bits16(const void* x) {
  std::uint16_t bits;
  std::memcpy(&bits, x, 2);
  return bits;
}

constexpr std::uint32_t float_quiet_bit = 0x00400000;

// Widened f16/bf16 -> f32 equals static_cast<float> bit for bit; for a NaN, up to the quiet
// bit (F16C quiets a signalling NaN, Eigen's portable path does not), so sign and payload
// survive on every path.
void require_same_widening(float got, float expected) {
  if (std::isnan(expected)) {
    REQUIRE(std::isnan(got));
    REQUIRE((float_bits(got) | float_quiet_bit) == (float_bits(expected) | float_quiet_bit));
  } else {
    REQUIRE(float_bits(got) == float_bits(expected));
  }
}

template <class H>
void check_widening() {
  const auto values = every_bit_pattern<H>();
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    // Offsets exercise unaligned sources and every tail length.
    for (std::size_t offset : {0, 1, 7, 15}) {
      CAPTURE(Arch::name(), offset);
      std::vector<float> wide(values.size() - offset);
      kvc::simd::convert<Arch>(values.data() + offset, wide.data(), wide.size());
      for (std::size_t i = 0; i < wide.size(); ++i) {
        CAPTURE(i + offset);
        require_same_widening(wide[i], static_cast<float>(values[i + offset]));
      }
    }
  });
}

template <class H>
std::vector<float> narrowing_inputs() {
  // Every 16-bit value, its neighbours half an ulp away (ties) and random floats of every
  // magnitude, infinities and NaNs of both signs.
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
  for (std::uint32_t bits : {0x7f800000U, 0xff800000U, 0x7fc00000U, 0xffc00000U, 0x7f800001U,
                             0xff812345U, 0x7fffffffU}) {
    float x;
    std::memcpy(&x, &bits, 4);
    inputs.push_back(x);
  }
  return inputs;
}

template <class H>
void check_narrowing() {
  const auto inputs = narrowing_inputs<H>();
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    std::vector<H> narrow(inputs.size());
    kvc::simd::convert<Arch>(inputs.data(), narrow.data(), inputs.size());
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      CAPTURE(Arch::name(), i, float_bits(inputs[i]));
      const H expected = static_cast<H>(inputs[i]);
      if (std::is_same_v<H, Eigen::half> && std::isnan(inputs[i])) {
        // vcvtps2ph keeps the payload's top bits, Eigen without F16C writes 0x7e00: both a
        // NaN of the input's sign.
        REQUIRE(std::isnan(static_cast<float>(narrow[i])));
        REQUIRE((bits16(&narrow[i]) & 0x8000) == (bits16(&expected) & 0x8000));
      } else {
        REQUIRE(bits16(&narrow[i]) == bits16(&expected));
      }
    }
  });
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
TEST_CASE("f32 -> bf16 rounds like Eigen::bfloat16, ties and NaN included", "[simd][convert]") {
  check_narrowing<Eigen::bfloat16>();
}

TEST_CASE("portable f16 bit construction matches Eigen on all 65536 patterns", "[simd][convert]") {
  // detail::half_bits_to_float is what load_as_float uses where no conversion instruction
  // exists (SSE2 without F16C, ARM...); check it in every build, for every arch.
  const auto values = every_bit_pattern<Eigen::half>();
  for_each_arch([&](auto arch) {
    using Arch = decltype(arch);
    using wide = xsimd::batch<std::uint32_t, Arch>;
    constexpr std::size_t lanes = wide::size;
    std::vector<std::uint32_t> bits(lanes);
    std::vector<float> out(lanes);
    for (std::size_t first = 0; first < values.size(); first += lanes) {
      for (std::size_t i = 0; i < lanes; ++i) bits[i] = bits16(&values[first + i]);
      kvc::simd::detail::half_bits_to_float<Arch>(wide::load_unaligned(bits.data()))
          .store_unaligned(out.data());
      for (std::size_t i = 0; i < lanes; ++i) {
        CAPTURE(Arch::name(), first + i);
        require_same_widening(out[i], static_cast<float>(values[first + i]));
      }
    }
  });
}

TEST_CASE("load_as_float / store_from_float round-trip one batch", "[simd][convert]") {
  for_each_arch([](auto arch) {
    using Arch = decltype(arch);
    using batch = xsimd::batch<float, Arch>;
    std::vector<float> source(batch::size + 1), back(batch::size + 1, 7.0F);
    for (std::size_t i = 0; i < source.size(); ++i) source[i] = 0.5F * float(i) - 3.0F;
    std::vector<Eigen::bfloat16> stored(batch::size + 1, Eigen::bfloat16(9.0F));
    // Unaligned on purpose (offset 1); exactly batch::size elements written.
    kvc::simd::store_from_float<Arch>(batch::load_unaligned(source.data() + 1), stored.data() + 1);
    CHECK(static_cast<float>(stored[0]) == 9.0F);
    kvc::simd::load_as_float<Arch>(stored.data() + 1).store_unaligned(back.data() + 1);
    CHECK(back[0] == 7.0F);
    for (std::size_t i = 1; i < source.size(); ++i) CHECK(back[i] == source[i]);  // exact in bf16
  });
}

TEST_CASE("same-type and f16 <-> bf16 conversion", "[simd][convert]") {
  const std::vector<float> source{1.0F, -2.5F, 3.25F};
  std::vector<float> copy(3);
  kvc::simd::convert(source.data(), copy.data(), 3);
  CHECK(copy == source);
  kvc::simd::convert(source.data(), static_cast<float*>(nullptr), 0);  // n == 0: no access
  const std::vector<Eigen::half> halves{Eigen::half(1.5F), Eigen::half(-0.25F)};
  std::vector<Eigen::bfloat16> brains(2);
  kvc::simd::convert(halves.data(), brains.data(), 2);
  CHECK(static_cast<float>(brains[0]) == 1.5F);
  CHECK(static_cast<float>(brains[1]) == -0.25F);
}
