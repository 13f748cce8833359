// Tests of kvc/quant/dense.hpp: encode/decode round trips and the fused tile kernels
// against a float64 computation.
#include <kvc/quant/dense.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"

#include <cmath>
#include <random>
#include <vector>

namespace {

template <class T>
void check_dense_format(float relative_rounding) {
  const kvc::quant::Dense<T> dense;
  constexpr std::size_t d = 128;
  CHECK(dense.key_bytes(d) == d * sizeof(T));
  CHECK(dense.value_bytes(d) == d * sizeof(T));
  CHECK(dense.supports_head_dim(1));
  CHECK(!dense.supports_head_dim(0));

  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  std::vector<float> keys(16 * d);
  for (float& x : keys) x = normal(rng);
  std::vector<std::byte> codes(dense.key_bytes(d));
  std::vector<float> decoded(d);
  // Round trip: exact for f32, nearest-even rounding for f16/bf16.
  for (std::size_t t = 0; t < 16; ++t) {
    dense.encode_key(keys.data() + t * d, d, codes.data());
    dense.decode_key(codes.data(), d, decoded.data());
    for (std::size_t c = 0; c < d; ++c) {
      const float x = keys[t * d + c];
      REQUIRE(std::abs(decoded[c] - x) <= std::abs(x) * relative_rounding);
      REQUIRE(decoded[c] == static_cast<float>(static_cast<T>(x)));
    }
  }
  // Fused kernels on the stored T == float64 on the decoded values. Typed storage is
  // aligned in pages, so the codes are not offset (offset 0).
  kvc::test::check_tile_kernels(dense, d, 16, 4, 42, 0);
  kvc::test::check_tile_kernels(dense, 100, 13, 5, 43, 0);
  kvc::test::check_host_types_encode_as_widened(dense, d, 44);
}

}  // namespace

TEST_CASE("Dense<float> stores exactly and its kernels match float64", "[dense]") {
  check_dense_format<float>(0.0F);
}
TEST_CASE("Dense<half> rounds to nearest and its kernels match float64", "[dense]") {
  check_dense_format<Eigen::half>(1.0F / 2048.0F);
}
TEST_CASE("Dense<bfloat16> rounds to nearest and its kernels match float64", "[dense]") {
  check_dense_format<Eigen::bfloat16>(1.0F / 256.0F);
}

TEST_CASE("Dense encodes from every host element type", "[dense]") {
  const kvc::quant::Dense<Eigen::half> dense;
  const std::vector<Eigen::bfloat16> source{Eigen::bfloat16(1.5F), Eigen::bfloat16(-2.0F)};
  std::vector<std::byte> codes(dense.key_bytes(2));
  dense.encode_key(source.data(), 2, codes.data());
  std::vector<float> out(2);
  dense.decode_key(codes.data(), 2, out.data());
  CHECK(out == std::vector<float>{1.5F, -2.0F});
}
