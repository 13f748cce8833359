// Tests of kvc/core/stats.hpp: derived quantities and the fmt formatter.
#include <kvc/core/stats.hpp>

#include <catch2/catch.hpp>

TEST_CASE("CacheStats derives held bytes, the fp16 baseline and the ratio", "[stats]") {
  kvc::CacheStats stats;
  stats.kv_heads = 8;
  stats.head_dim = 128;
  stats.layers = 2;
  stats.tokens_seen = 2 * 1000;  // two layers of 1000 tokens
  stats.page_bytes = 500000;
  stats.metadata_bytes = 12000;
  stats.tokens_per_head.assign(16, 0);
  stats.tokens_per_head[1 * 8 + 3] = 42;
  CHECK(stats.bytes_held() == 512000);
  CHECK(stats.dense_f16_bytes() == 2000 * 8 * 2 * 128 * 2);
  CHECK(stats.compression_ratio() == Approx(8192000.0 / 512000.0));
  CHECK(stats.tokens(1, 3) == 42);
  CHECK_THROWS_AS(stats.tokens(2, 0), std::out_of_range);
  const kvc::CacheStats empty;
  CHECK(empty.compression_ratio() == 1.0);
}

TEST_CASE("CacheStats prints with fmt", "[stats]") {
  kvc::CacheStats stats;
  stats.scorer = "h2o";
  stats.quantizer = "dense_f16";
  stats.kv_heads = 1;
  stats.head_dim = 4;
  stats.tokens_seen = 10;
  stats.page_bytes = 40;
  const std::string text = fmt::format("{}", stats);
  CHECK(text.find("[h2o + dense_f16]") != std::string::npos);
  CHECK(text.find("held 40 B") != std::string::npos);
  CHECK(text.find("4.00x") != std::string::npos);  // 10 tokens × 2 × 4 × 2 B = 160 B / 40 B
}
