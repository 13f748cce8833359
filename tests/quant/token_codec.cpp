// Tests of kvc/quant/token_codec.hpp: a format written only as row_bytes/encode/decode
// becomes a full Quantizer whose tile kernels equal float64 on the decoded rows.
#include <kvc/quant/token_codec.hpp>

#include <kvc/core/concepts.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

namespace {

// A toy format: each value rounded to a multiple of 1/16 and stored as int16.
struct Sixteenths : kvc::quant::TokenCodec<Sixteenths> {
  static constexpr std::string_view name() noexcept { return "sixteenths"; }
  static constexpr std::size_t row_bytes(std::size_t d) noexcept { return 2 * d; }
  constexpr bool supports_head_dim(std::size_t d) const noexcept { return d > 0; }
  template <kvc::Element S>
  static void encode(const S* row, std::size_t d, std::byte* codes) noexcept {
    for (std::size_t c = 0; c < d; ++c) {
      const auto q = static_cast<std::int16_t>(std::lround(static_cast<float>(row[c]) * 16.0F));
      std::memcpy(codes + 2 * c, &q, 2);
    }
  }
  static void decode(const std::byte* codes, std::size_t d, float* row) noexcept {
    for (std::size_t c = 0; c < d; ++c) {
      std::int16_t q;
      std::memcpy(&q, codes + 2 * c, 2);
      row[c] = static_cast<float>(q) / 16.0F;
    }
  }
};

}  // namespace

TEST_CASE("TokenCodec turns row encode/decode into a fused Quantizer", "[token_codec]") {
  STATIC_REQUIRE(kvc::Quantizer<Sixteenths>);
  STATIC_REQUIRE(std::is_empty_v<Sixteenths>);
  const Sixteenths format;
  constexpr std::size_t d = 40, tokens = 7, rows = 3;
  CHECK(format.key_bytes(d) == 80);
  CHECK(format.value_bytes(d) == 80);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> keys(tokens * d), queries(rows * d), weights(rows * tokens);
  for (float& x : keys) x = normal(rng);
  for (float& x : queries) x = normal(rng);
  for (float& x : weights) x = std::abs(normal(rng));
  std::vector<std::byte> codes(tokens * format.key_bytes(d));
  for (std::size_t t = 0; t < tokens; ++t) {
    format.encode_key(keys.data() + t * d, d, codes.data() + t * format.key_bytes(d));
  }
  std::vector<float> decoded(tokens * d);
  for (std::size_t t = 0; t < tokens; ++t) {
    format.decode_value(codes.data() + t * format.key_bytes(d), d, decoded.data() + t * d);
  }
  for (std::size_t i = 0; i < keys.size(); ++i)
    REQUIRE(std::abs(decoded[i] - keys[i]) <= 1.0F / 32);

  std::vector<float> scores(rows * tokens), scratch(tokens * d), acc(rows * d, 0.0F);
  format.score_tile(kvc::ScoreTile{queries.data(), rows, codes.data(), tokens, d, scores.data(),
                                   tokens, scratch.data()});
  format.accumulate_tile(kvc::AccumulateTile{weights.data(), rows, tokens, codes.data(), tokens, d,
                                             acc.data(), scratch.data()});
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      double expected = 0;
      for (std::size_t c = 0; c < d; ++c)
        expected += double(queries[r * d + c]) * decoded[j * d + c];
      REQUIRE(scores[r * tokens + j] == Approx(expected).margin(1e-4));
    }
    for (std::size_t c = 0; c < d; ++c) {
      double expected = 0;
      for (std::size_t j = 0; j < tokens; ++j)
        expected += double(weights[r * tokens + j]) * decoded[j * d + c];
      REQUIRE(acc[r * d + c] == Approx(expected).margin(1e-4));
    }
  }
}
