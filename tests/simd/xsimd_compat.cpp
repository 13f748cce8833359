// Tests of kvc/simd/xsimd_compat.hpp (and kvc/simd/intrinsics.hpp, which it includes).
#include <kvc/simd/xsimd_compat.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

TEST_CASE("reduce_add, reduce_max and reduce_min over one batch", "[simd][compat]") {
  using batch = xsimd::batch<float>;
  std::vector<float> lanes(batch::size);
  for (std::size_t i = 0; i < batch::size; ++i) lanes[i] = static_cast<float>(i) - 2.0F;
  const batch x = batch::load_unaligned(lanes.data());
  float expected = 0;
  for (float v : lanes) expected += v;
  CHECK(kvc::simd::detail::reduce_add(x) == expected);  // small integers: exact in any order
  CHECK(kvc::simd::detail::reduce_max(x) == lanes.back());
  lanes[0] = 1e9F;  // the maximum in the first lane too
  CHECK(kvc::simd::detail::reduce_max(batch::load_unaligned(lanes.data())) == 1e9F);
  CHECK(kvc::simd::detail::reduce_min(x) == -2.0F);
  lanes.back() = -1e9F;  // the minimum in the last lane
  CHECK(kvc::simd::detail::reduce_min(batch::load_unaligned(lanes.data())) == -1e9F);
  // +0 stays +0 (not −reduce_max(−x), which xsimd 8 turns into −0).
  CHECK_FALSE(std::signbit(kvc::simd::detail::reduce_min(batch(0.0F))));
}

TEST_CASE("bitcast reinterprets lane bits both ways", "[simd][compat]") {
  using floats = xsimd::batch<float>;
  const auto bits = kvc::simd::detail::bitcast<std::uint32_t>(floats(1.0F));
  static_assert(std::is_same_v<std::remove_const_t<decltype(bits)>,
                               xsimd::batch<std::uint32_t, xsimd::default_arch>>);
  std::vector<std::uint32_t> lanes(floats::size);
  bits.store_unaligned(lanes.data());
  for (std::uint32_t lane : lanes) CHECK(lane == 0x3f800000U);
  const auto back = kvc::simd::detail::bitcast<float>(bits);
  CHECK(kvc::simd::detail::reduce_add(back) == static_cast<float>(floats::size));
}

TEST_CASE("common_arch names xsimd's arch-independent fallback", "[simd][compat]") {
  static_assert(std::is_class_v<kvc::simd::detail::common_arch>);
  // Every concrete x86 arch derives from it (xsimd dispatches its generic kernels that way).
  static_assert(std::is_base_of_v<kvc::simd::detail::common_arch, xsimd::default_arch>);
  CHECK(std::string(xsimd::default_arch::name()).size() > 0);
}
