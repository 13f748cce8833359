// Tests of kvc/quant/dense.hpp: encode/decode round trips and the fused tile kernels
// against a float64 computation.
#include <kvc/quant/dense.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

namespace {

template <class T>
void check_dense_format(float relative_rounding) {
  const kvc::quant::Dense<T> dense;
  constexpr std::size_t d = 128;
  constexpr std::size_t tokens = 16;
  constexpr std::size_t rows = 4;
  CHECK(dense.key_bytes(d) == d * sizeof(T));
  CHECK(dense.value_bytes(d) == d * sizeof(T));
  CHECK(dense.supports_head_dim(1));
  CHECK(!dense.supports_head_dim(0));

  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  std::vector<float> keys(tokens * d), values(tokens * d), queries(rows * d), p(rows * tokens);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : queries) x = normal(rng);
  for (float& x : p) x = std::abs(normal(rng));

  std::vector<std::byte> key_codes(tokens * dense.key_bytes(d));
  std::vector<std::byte> value_codes(tokens * dense.value_bytes(d));
  for (std::size_t t = 0; t < tokens; ++t) {
    dense.encode_key(keys.data() + t * d, d, key_codes.data() + t * dense.key_bytes(d));
    dense.encode_value(values.data() + t * d, d, value_codes.data() + t * dense.value_bytes(d));
  }
  // Round trip: exact for f32, nearest-even rounding for f16/bf16.
  std::vector<float> decoded(tokens * d);
  for (std::size_t t = 0; t < tokens; ++t) {
    dense.decode_key(key_codes.data() + t * dense.key_bytes(d), d, decoded.data() + t * d);
  }
  for (std::size_t i = 0; i < keys.size(); ++i) {
    REQUIRE(std::abs(decoded[i] - keys[i]) <= std::abs(keys[i]) * relative_rounding);
    REQUIRE(decoded[i] == static_cast<float>(static_cast<T>(keys[i])));
  }
  std::vector<float> decoded_values(tokens * d);
  for (std::size_t t = 0; t < tokens; ++t) {
    dense.decode_value(value_codes.data() + t * dense.value_bytes(d), d,
                       decoded_values.data() + t * d);
  }

  // Fused kernels on the codes == float64 math on the decoded values.
  std::vector<float> scores(rows * tokens), scratch(tokens * d), acc(rows * d, 0.0F);
  dense.score_tile(kvc::ScoreTile{queries.data(), rows, key_codes.data(), tokens, d, scores.data(),
                                  tokens, scratch.data()});
  dense.accumulate_tile(kvc::AccumulateTile{p.data(), rows, tokens, value_codes.data(), tokens, d,
                                            acc.data(), scratch.data()});
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      double expected = 0, magnitude = 0;
      for (std::size_t c = 0; c < d; ++c) {
        expected += double(queries[r * d + c]) * decoded[j * d + c];
        magnitude += std::abs(double(queries[r * d + c]) * decoded[j * d + c]);
      }
      REQUIRE(std::abs(scores[r * tokens + j] - expected) <= 1e-5 * magnitude + 1e-6);
    }
    for (std::size_t c = 0; c < d; ++c) {
      double expected = 0, magnitude = 0;
      for (std::size_t j = 0; j < tokens; ++j) {
        expected += double(p[r * tokens + j]) * decoded_values[j * d + c];
        magnitude += std::abs(double(p[r * tokens + j]) * decoded_values[j * d + c]);
      }
      REQUIRE(std::abs(acc[r * d + c] - expected) <= 1e-5 * magnitude + 1e-6);
    }
  }
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
