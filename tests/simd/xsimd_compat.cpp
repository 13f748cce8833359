// Tests of kvc/simd/xsimd_compat.hpp (and kvc/simd/intrinsics.hpp, which it includes).
#include <kvc/simd/xsimd_compat.hpp>

#include <catch2/catch.hpp>

#include <vector>

TEST_CASE("reduce_add and reduce_max over one batch", "[simd][compat]") {
  using batch = xsimd::batch<float>;
  std::vector<float> lanes(batch::size);
  for (std::size_t i = 0; i < batch::size; ++i) lanes[i] = static_cast<float>(i) - 2.0F;
  const batch x = batch::load_unaligned(lanes.data());
  float expected = 0;
  for (float v : lanes) expected += v;
  CHECK(kvc::simd::detail::reduce_add(x) == expected);
  CHECK(kvc::simd::detail::reduce_max(x) == lanes.back());
}
